"""Every generated C kernel against the numpy reference, over random shapes and
quantization parameters (hypothesis). Each example is generated, compiled with
gcc -Wall -Wextra -Werror and AddressSanitizer + UndefinedBehaviorSanitizer,
and run on random int8 inputs covering the whole int8 range: 0 differing
elements allowed."""
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import c_matches_reference, conv_out, float_graph, quantize_with_random_data

EXAMPLES = int(os.environ.get("EDGEKIT_KERNEL_EXAMPLES", "25"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

activations = st.sampled_from(["none", "relu", "relu6"])
observers = st.sampled_from(["minmax", "percentile"])


@st.composite
def input_range(draw):
    lo = draw(st.floats(min_value=-4.0, max_value=0.5))
    width = draw(st.floats(min_value=0.05, max_value=8.0))
    return (lo, lo + width)


def _random_int8(rng, shape, n=12):
    return rng.integers(-128, 128, size=(n,) + tuple(shape[1:]), dtype=np.int64).astype(np.int8)


def _check(g, rng, cbuild, ranges=None, observer="minmax"):
    q = quantize_with_random_data(g, rng, ranges, observer)
    inputs = {name: _random_int8(rng, q.tensors[name].shape) for name in q.inputs}
    with tempfile.TemporaryDirectory() as tmp:
        got, ref = c_matches_reference(q, Path(tmp), cbuild, inputs)
    diff = int(np.sum(got != ref))
    assert diff == 0, f"{diff} of {got.size} elements differ; first at {np.argwhere(got != ref)[:3].tolist()}"


@st.composite
def conv_case(draw, depthwise=False):
    h, w = draw(st.integers(1, 10)), draw(st.integers(1, 10))
    c = draw(st.integers(1, 8))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = tuple(draw(st.integers(0, 3)) for _ in range(4))
    oh, ow = conv_out(h, w, (kh, kw), stride, dilation, padding)
    if oh < 1 or ow < 1:
        padding = (padding[0] + kh * dilation[0], padding[1], padding[2] + kw * dilation[1], padding[3])
        oh, ow = conv_out(h, w, (kh, kw), stride, dilation, padding)
    mult = draw(st.integers(1, 3)) if depthwise else 1
    o = c * mult if depthwise else draw(st.integers(1, 8))
    return dict(h=h, w=w, c=c, o=o, k=(kh, kw), stride=stride, dilation=dilation, padding=padding, out=(oh, ow),
                mult=mult, act=draw(activations), bias=draw(st.booleans()),
                wscale=draw(st.floats(min_value=0.01, max_value=3.0)), rng=draw(input_range()),
                observer=draw(observers), seed=draw(st.integers(0, 2 ** 31)))


def conv_case_graph(case, rng, depthwise=False):
    """The float one-op graph of a conv_case: random weights (and bias) at the case's scale."""
    kh, kw = case["k"]
    shape = (1, kh, kw, case["o"]) if depthwise else (case["o"], kh, kw, case["c"])
    weights = {"w": rng.normal(0, case["wscale"], shape)}
    if case["bias"]:
        weights["b"] = rng.normal(0, case["wscale"], case["o"])
    attrs = dict(stride=case["stride"], dilation=case["dilation"], padding=case["padding"], activation=case["act"])
    if depthwise:
        attrs["depth_multiplier"] = case["mult"]
    return float_graph("depthwise_conv2d" if depthwise else "conv2d", [(1, case["h"], case["w"], case["c"])], attrs,
                       weights, (1, *case["out"], case["o"]))


@given(conv_case())
@SETTINGS
def test_conv2d_s8(cbuild, case):
    rng = np.random.default_rng(case["seed"])
    g = conv_case_graph(case, rng)
    _check(g, rng, cbuild, {"x0": case["rng"]}, case["observer"])


@given(conv_case(depthwise=True))
@SETTINGS
def test_depthwise_conv2d_s8(cbuild, case):
    rng = np.random.default_rng(case["seed"])
    g = conv_case_graph(case, rng, depthwise=True)
    _check(g, rng, cbuild, {"x0": case["rng"]}, case["observer"])


@given(st.integers(1, 80), st.integers(1, 40), activations, st.booleans(), st.floats(0.01, 2.0), input_range(),
       observers, st.integers(0, 2 ** 31))
@SETTINGS
def test_fully_connected_s8(cbuild, n_in, n_out, act, bias, wscale, in_range, observer, seed):
    rng = np.random.default_rng(seed)
    weights = {"w": rng.normal(0, wscale, (n_out, n_in))}
    if bias:
        weights["b"] = rng.normal(0, wscale, n_out)
    g = float_graph("fully_connected", [(1, n_in)], dict(activation=act), weights, (1, n_out))
    _check(g, rng, cbuild, {"x0": in_range}, observer)


@st.composite
def pool_case(draw):
    h, w, c = draw(st.integers(1, 10)), draw(st.integers(1, 10)), draw(st.integers(1, 6))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    ceil_mode = draw(st.booleans())

    def out(size, k, s, p):
        n = size + 2 * p - k
        if n < 0:
            return 0
        o = (-(-n // s) if ceil_mode else n // s) + 1
        if ceil_mode and (o - 1) * s >= size + p:
            o -= 1
        return o

    oh, ow = out(h, kh, sh, ph), out(w, kw, sw, pw)
    if oh < 1 or ow < 1:
        h, w = max(h, kh), max(w, kw)
        oh, ow = out(h, kh, sh, ph), out(w, kw, sw, pw)
    return dict(shape=(1, h, w, c), out=(1, oh, ow, c), attrs=dict(kernel=(kh, kw), stride=(sh, sw),
                padding=(ph, ph, pw, pw), activation=draw(activations), count_include_pad=draw(st.booleans())),
                rng=draw(input_range()), seed=draw(st.integers(0, 2 ** 31)))


@given(pool_case())
@SETTINGS
def test_max_pool2d_s8(cbuild, case):
    rng = np.random.default_rng(case["seed"])
    g = float_graph("max_pool2d", [case["shape"]], case["attrs"], None, case["out"])
    _check(g, rng, cbuild, {"x0": case["rng"]})


@given(pool_case(), st.sampled_from([1, 5, 8, 16, 17, 32, 33, 50]))
@SETTINGS
def test_max_pool2d_s8_wide(cbuild, case, c):
    """Channel counts that run the vector variants' 32-, 16-, 8- and 4-lane groups and their tails."""
    rng = np.random.default_rng(case["seed"])
    g = float_graph("max_pool2d", [(*case["shape"][:3], c)], case["attrs"], None, (*case["out"][:3], c))
    _check(g, rng, cbuild, {"x0": case["rng"]})


@given(pool_case())
@SETTINGS
def test_avg_pool2d_s8(cbuild, case):
    rng = np.random.default_rng(case["seed"])
    g = float_graph("avg_pool2d", [case["shape"]], case["attrs"], None, case["out"])
    _check(g, rng, cbuild, {"x0": case["rng"]})


@given(st.integers(1, 9), st.integers(1, 9), st.integers(1, 16), input_range(), observers, st.integers(0, 2 ** 31))
@SETTINGS
def test_mean_s8(cbuild, h, w, c, in_range, observer, seed):
    rng = np.random.default_rng(seed)
    g = float_graph("mean", [(1, h, w, c)], {}, None, (1, 1, 1, c))
    _check(g, rng, cbuild, {"x0": in_range}, observer)


@given(st.sampled_from([(1, 7), (1, 3, 5, 4), (1, 1, 1, 33), (1, 8, 8, 2)]), input_range(), input_range(),
       activations, st.integers(0, 2 ** 31))
@SETTINGS
def test_add_s8(cbuild, shape, r1, r2, act, seed):
    rng = np.random.default_rng(seed)
    g = float_graph("add", [shape, shape], dict(activation=act), None, shape)
    _check(g, rng, cbuild, {"x0": r1, "x1": r2})


@given(st.lists(st.integers(1, 6), min_size=1, max_size=4), st.integers(1, 4), st.integers(1, 4),
       st.sampled_from([1, 2, 3]), input_range(), st.integers(0, 2 ** 31))
@SETTINGS
def test_concat_s8(cbuild, sizes, h, w, axis, in_range, seed):
    rng = np.random.default_rng(seed)
    shapes = []
    for s in sizes:
        shape = [1, h, w, 3]
        shape[axis] = s
        shapes.append(tuple(shape))
    out = [1, h, w, 3]
    out[axis] = sum(sizes)
    g = float_graph("concat", shapes, dict(axis=axis), None, tuple(out))
    _check(g, rng, cbuild, {f"x{i}": in_range for i in range(len(sizes))})


@given(st.integers(1, 100), st.integers(1, 3), input_range(), st.floats(0.25, 4.0), st.integers(0, 2 ** 31))
@SETTINGS
def test_softmax_s8(cbuild, depth, rows, in_range, scale, seed):
    rng = np.random.default_rng(seed)
    shape = (1, depth) if rows == 1 else (1, 1, rows, depth)
    g = float_graph("softmax", [shape], dict(beta=1.0), None, shape)
    _check(g, rng, cbuild, {"x0": (in_range[0] * scale * 4, in_range[1] * scale * 4)})


@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 4), st.tuples(*[st.integers(0, 3)] * 4),
       st.sampled_from([0.0, 0.5, -1.0]), input_range(), st.integers(0, 2 ** 31))
@SETTINGS
def test_pad_s8(cbuild, h, w, c, pads, value, in_range, seed):
    rng = np.random.default_rng(seed)
    t, b, l, r = pads
    g = float_graph("pad", [(1, h, w, c)], dict(padding=pads, value=value), None, (1, h + t + b, w + l + r, c))
    _check(g, rng, cbuild, {"x0": in_range})


@given(st.sampled_from(["relu", "relu6"]), input_range(), st.integers(0, 2 ** 31))
@SETTINGS
def test_clamp_s8(cbuild, kind, in_range, seed):
    rng = np.random.default_rng(seed)
    g = float_graph(kind, [(1, 3, 4, 5)], {}, None, (1, 3, 4, 5))
    _check(g, rng, cbuild, {"x0": (in_range[0] * 4, in_range[1] * 4)})


def test_overflow_is_refused_at_generate_time(tmp_path):
    from edgekit.codegen.project import generate_project
    from edgekit.errors import EdgekitError

    rng = np.random.default_rng(0)
    g = float_graph("fully_connected", [(1, 8)], dict(activation="none"),
                    {"w": rng.normal(0, 1, (4, 8)), "b": np.zeros(4)}, (1, 4))
    q = quantize_with_random_data(g, rng)
    q.tensors["b"].data[2] = 2 ** 31 - 100  # an accumulator that must overflow
    with pytest.raises(EdgekitError, match=r"layer 'op'.*output channel 2.*int32"):
        generate_project(q, tmp_path, "host")
    assert not (tmp_path / "model.c").exists()


# ---------------------------------------------------------------------------
# Weight-only kernels: float math, so equal to the float reference within float rounding.
# ---------------------------------------------------------------------------

def _check_weight_only(g, rng, cbuild):
    from edgekit.passes.fuse import prepare_float
    from edgekit.passes.quantize import quantize_weights_only

    q = quantize_weights_only(prepare_float(g))
    inputs = {n: rng.uniform(-2, 2, (8,) + q.tensors[n].shape[1:]).astype(np.float32) for n in q.inputs}
    with tempfile.TemporaryDirectory() as tmp:
        got, ref = c_matches_reference(q, Path(tmp), cbuild, inputs)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


@given(conv_case(), st.booleans())
@settings(max_examples=max(5, EXAMPLES // 3), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
def test_weight_only_conv_kernels(cbuild, case, depthwise):
    rng = np.random.default_rng(case["seed"])
    kh, kw = case["k"]
    o = case["c"] * case["mult"] if depthwise else case["o"]
    shape = (1, kh, kw, o) if depthwise else (o, kh, kw, case["c"])
    weights = {"w": rng.normal(0, case["wscale"], shape), "b": rng.normal(0, 1, o)}
    attrs = dict(stride=case["stride"], dilation=case["dilation"], padding=case["padding"], activation=case["act"],
                 depth_multiplier=case["mult"])
    kind = "depthwise_conv2d" if depthwise else "conv2d"
    g = float_graph(kind, [(1, case["h"], case["w"], case["c"])], attrs, weights, (1, *case["out"], o))
    _check_weight_only(g, rng, cbuild)


@pytest.mark.parametrize("kind", ["fully_connected", "max_pool2d", "avg_pool2d", "mean", "add", "concat",
                                  "softmax", "pad", "relu6"])
def test_weight_only_other_kernels(cbuild, kind):
    rng = np.random.default_rng(7)
    pool = dict(kernel=(3, 2), stride=(2, 1), padding=(1, 1, 1, 1), activation="relu", count_include_pad=True)
    cases = {
        "fully_connected": ([(1, 20)], dict(activation="relu"), {"w": rng.normal(0, 1, (7, 20)),
                                                                  "b": rng.normal(0, 1, 7)}, (1, 7)),
        "max_pool2d": ([(1, 5, 6, 3)], pool, None, (1, 3, 7, 3)),
        "avg_pool2d": ([(1, 5, 6, 3)], pool, None, (1, 3, 7, 3)),
        "mean": ([(1, 4, 5, 6)], {}, None, (1, 1, 1, 6)),
        "add": ([(1, 3, 3, 2), (1, 3, 3, 2)], dict(activation="relu6"), None, (1, 3, 3, 2)),
        "concat": ([(1, 2, 2, 3), (1, 2, 2, 5)], dict(axis=3), None, (1, 2, 2, 8)),
        "softmax": ([(1, 10)], dict(beta=1.0), None, (1, 10)),
        "pad": ([(1, 3, 3, 2)], dict(padding=(1, 0, 2, 1), value=0.5), None, (1, 4, 6, 2)),
        "relu6": ([(1, 9)], {}, None, (1, 9)),
    }
    shapes, attrs, weights, out = cases[kind]
    _check_weight_only(float_graph(kind, shapes, attrs, weights, out), rng, cbuild)
