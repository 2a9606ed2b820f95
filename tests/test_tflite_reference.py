"""The numpy reference against TensorFlow Lite's own reference kernels, op by op.

Each example builds a one-op int8 graph (random shapes and quantization
parameters, hypothesis), exports it with edgekit's .tflite writer, runs it in
tflite-runtime with the reference op resolver (BUILTIN_REF, what TFLite Micro
also computes) and compares every output element with ``reference.run``:
0 differing elements allowed. Where TFLite has no exact equivalent of a
graph, the exporter must refuse it with a clear message.
"""
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import float_graph, quantize_with_random_data, tflite_run
from test_kernels_c import SETTINGS, activations, conv_case, conv_case_graph, input_range, observers, pool_case

from edgekit import reference
from edgekit.errors import EdgekitError
from edgekit.export.tflite import export_tflite

tflite_runtime = pytest.importorskip("tflite_runtime.interpreter")


def _check(g, rng, ranges=None, observer="minmax", n=12):
    q = quantize_with_random_data(g, rng, ranges, observer)
    inputs = {name: rng.integers(-128, 128, size=(n,) + q.tensors[name].shape[1:]).astype(np.int8)
              for name in q.inputs}
    with tempfile.TemporaryDirectory() as tmp:
        path = export_tflite(q, Path(tmp) / "op.tflite", io="int8")
        got = tflite_run(path, [inputs[name] for name in q.inputs])
    ref = reference.run(q, inputs if len(q.inputs) > 1 else inputs[q.inputs[0]])
    for gv, rv in zip(got, ref):
        gv = gv.reshape(rv.shape)
        diff = int(np.sum(gv != rv))
        assert diff == 0, (f"{diff} of {gv.size} elements differ from TFLite; first at "
                           f"{np.argwhere(gv != rv)[:3].tolist()}: tflite {gv[gv != rv][:5]} ours {rv[gv != rv][:5]}")


@given(conv_case())
@SETTINGS
def test_conv2d(case):
    rng = np.random.default_rng(case["seed"])
    g = conv_case_graph(case, rng)
    _check(g, rng, {"x0": case["rng"]}, case["observer"])


@given(conv_case(depthwise=True))
@SETTINGS
def test_depthwise_conv2d(case):
    rng = np.random.default_rng(case["seed"])
    g = conv_case_graph(case, rng, depthwise=True)
    _check(g, rng, {"x0": case["rng"]}, case["observer"])


@given(st.integers(1, 64), st.integers(1, 32), activations, st.booleans(), st.floats(0.01, 2.0), input_range(),
       observers, st.booleans(), st.integers(0, 2 ** 31))
@SETTINGS
def test_fully_connected(n_in, n_out, act, bias, wscale, in_range, observer, spatial_input, seed):
    rng = np.random.default_rng(seed)
    # Per-channel weights with very different channel scales: a per-tensor kernel would be far off.
    weights = {"w": rng.normal(0, wscale, (n_out, n_in)) * rng.uniform(0.05, 1.0, (n_out, 1))}
    if bias:
        weights["b"] = rng.normal(0, wscale, n_out)
    shape = (1, 1, 1, n_in) if spatial_input else (1, n_in)
    g = float_graph("fully_connected", [shape], dict(activation=act), weights, (1, n_out))
    _check(g, rng, {"x0": in_range}, observer)


def _pool(kind, case):
    rng = np.random.default_rng(case["seed"])
    g = float_graph(kind, [case["shape"]], case["attrs"], None, case["out"])
    try:
        _check(g, rng, {"x0": case["rng"]})
    except EdgekitError as exc:  # only what TFLite cannot express may be refused
        a = case["attrs"]
        assert kind == "avg_pool2d" and "no exact TFLite equivalent" in str(exc), exc
        (_, h, w, _), (kh, kw), (sh, sw) = case["shape"], a["kernel"], a["stride"]
        valid_out = (1, (h - kh) // sh + 1, (w - kw) // sw + 1, case["shape"][3])
        assert any(a["padding"]) or tuple(case["out"]) != valid_out, exc  # padded, or ceil_mode windows


@given(pool_case())
@SETTINGS
def test_max_pool2d(case):
    _pool("max_pool2d", case)


@given(pool_case())
@SETTINGS
def test_avg_pool2d(case):
    _pool("avg_pool2d", case)


@given(st.integers(1, 12), st.integers(1, 12), st.integers(1, 16), input_range(), observers, st.integers(0, 2 ** 31))
@SETTINGS
def test_mean(h, w, c, in_range, observer, seed):
    rng = np.random.default_rng(seed)
    g = float_graph("mean", [(1, h, w, c)], {}, None, (1, 1, 1, c))
    _check(g, rng, {"x0": in_range}, observer)


@given(st.sampled_from([(1, 7), (1, 3, 5, 4), (1, 1, 1, 33), (1, 8, 8, 2)]), input_range(), input_range(),
       activations, st.integers(0, 2 ** 31))
@SETTINGS
def test_add(shape, r1, r2, act, seed):
    rng = np.random.default_rng(seed)
    g = float_graph("add", [shape, shape], dict(activation=act), None, shape)
    _check(g, rng, {"x0": r1, "x1": r2})


@given(st.lists(st.integers(1, 6), min_size=1, max_size=4), st.integers(1, 4), st.integers(1, 4),
       st.sampled_from([1, 2, 3]), input_range(), st.integers(0, 2 ** 31))
@SETTINGS
def test_concat(sizes, h, w, axis, in_range, seed):
    rng = np.random.default_rng(seed)
    shapes = []
    for s in sizes:
        shape = [1, h, w, 3]
        shape[axis] = s
        shapes.append(tuple(shape))
    out = [1, h, w, 3]
    out[axis] = sum(sizes)
    g = float_graph("concat", shapes, dict(axis=axis), None, tuple(out))
    _check(g, rng, {f"x{i}": in_range for i in range(len(sizes))})


@given(st.integers(1, 100), st.integers(1, 3), input_range(), st.floats(0.25, 4.0), st.integers(0, 2 ** 31))
@SETTINGS
def test_softmax(depth, rows, in_range, scale, seed):
    rng = np.random.default_rng(seed)
    shape = (1, depth) if rows == 1 else (1, 1, rows, depth)
    g = float_graph("softmax", [shape], dict(beta=1.0), None, shape)
    _check(g, rng, {"x0": (in_range[0] * scale * 4, in_range[1] * scale * 4)})


@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 4), st.tuples(*[st.integers(0, 3)] * 4),
       st.sampled_from([0.0, 0.5, -1.0]), input_range(), st.integers(0, 2 ** 31))
@SETTINGS
def test_pad(h, w, c, pads, value, in_range, seed):
    rng = np.random.default_rng(seed)
    t, b, l, r = pads
    g = float_graph("pad", [(1, h, w, c)], dict(padding=pads, value=value), None, (1, h + t + b, w + l + r, c))
    _check(g, rng, {"x0": in_range})


@given(st.sampled_from(["relu", "relu6"]), input_range(), st.integers(0, 2 ** 31))
@SETTINGS
def test_relu(kind, in_range, seed):
    rng = np.random.default_rng(seed)
    g = float_graph(kind, [(1, 3, 4, 5)], {}, None, (1, 3, 4, 5))
    _check(g, rng, {"x0": (in_range[0] * 4, in_range[1] * 4)})


def test_reshape_and_flatten(rng):
    g = float_graph("reshape", [(1, 2, 3, 4)], {}, None, (1, 24))
    _check(g, rng)

