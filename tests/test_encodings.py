"""Encoded weights (codebook, Huffman, sparse): lossless encoders, and kernels
that decode on the fly, bit-exact with the numpy reference.

Each C example is generated, compiled with -Wall -Wextra -Werror and
AddressSanitizer + UndefinedBehaviorSanitizer, and run on random int8 inputs
over the whole int8 range: 0 differing elements allowed. The weights are drawn
clustered (1..256 shared values, per layer or per channel) and pruned (0..99 %
zeros), so every encoding meets few and many symbols, short and long zero runs.
"""
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgekit.codegen.project import load_project
from edgekit.codegen.weights import FILTER_ENCODINGS, decode_filter, encode_filter
from helpers import c_matches_reference, conv_out, float_graph, quantize_with_random_data

EXAMPLES = int(os.environ.get("EDGEKIT_KERNEL_EXAMPLES", "25"))
SETTINGS = settings(max_examples=max(8, EXAMPLES // 2), deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
ENCODED = ("codebook", "huffman", "sparse")


@st.composite
def weight_style(draw):
    return dict(bits=draw(st.integers(1, 8)), per_channel=draw(st.booleans()),
                sparsity=draw(st.sampled_from([0.0, 0.3, 0.7, 0.9, 0.99])), scale=draw(st.floats(0.05, 2.0)))


def clustered_weights(rng, shape, channel_axis, style):
    """Float weights with at most 2**bits values per layer (or per channel), some exact zeros."""
    k = 1 << style["bits"]
    channels = shape[channel_axis]
    if style["per_channel"]:
        centroids = rng.normal(0, style["scale"], (channels, k))
        idx = rng.integers(0, k, shape)
        chan = np.arange(channels).reshape([-1 if a == channel_axis else 1 for a in range(len(shape))])
        w = centroids[np.broadcast_to(chan, shape), idx]
    else:
        w = rng.choice(rng.normal(0, style["scale"], k), size=shape)
    w[rng.random(shape) < style["sparsity"]] = 0.0
    return w


# ---------------------------------------------------------------------------
# The encoders alone: lossless, and "auto" never larger than any encoding
# ---------------------------------------------------------------------------

@given(st.integers(1, 40), st.integers(1, 300), st.integers(1, 256), st.floats(0, 1), st.integers(0, 2 ** 31))
@settings(max_examples=200, deadline=None, derandomize=True)
def test_encoders_are_lossless(out_c, length, distinct, sparsity, seed):
    rng = np.random.default_rng(seed)
    values = rng.integers(-128, 128, distinct)
    rows = rng.choice(values, (out_c, length)).astype(np.int8)
    rows[rng.random(rows.shape) < sparsity] = 0
    for encoding in FILTER_ENCODINGS:
        enc = encode_filter("w", rows, encoding)
        assert enc.encoding == encoding
        assert np.array_equal(decode_filter(enc), rows), encoding
        assert all(a.values.size > 0 for a in enc.arrays.values())


def test_encodings_shrink_what_they_should():
    rng = np.random.default_rng(0)
    rows = rng.choice(np.arange(-7, 9), (100, 300)).astype(np.int8)  # 16 values: 4-bit indices
    sizes = {e: encode_filter("w", rows, e).nbytes for e in FILTER_ENCODINGS}
    assert sizes["codebook"] == 16 + 100 * 300 // 2 + 1
    assert sizes["huffman"] < sizes["codebook"] + 200
    rows[rng.random(rows.shape) < 0.95] = 0
    sizes = {e: encode_filter("w", rows, e).nbytes for e in FILTER_ENCODINGS}
    nnz = int(np.count_nonzero(rows))
    assert sizes["sparse"] == 100 * 300 // 8 + 1 + nnz
    assert sizes["huffman"] < sizes["sparse"] < sizes["codebook"] < sizes["dense"]


def test_codebook_per_channel_when_smaller():
    rng = np.random.default_rng(1)
    # Each channel has 4 values, but 64 channels have 256 different values between them.
    rows = np.stack([rng.choice(rng.integers(-128, 128, 4), 500) for _ in range(64)]).astype(np.int8)
    enc = encode_filter("w", rows, "codebook")
    assert enc.fields["bits"] == 2 and enc.fields["codebook_stride"] == 4
    shared = np.stack([rng.choice(np.array([-90, -3, 5, 77]), 500) for _ in range(64)]).astype(np.int8)
    enc = encode_filter("w", shared, "codebook")
    assert enc.fields["bits"] == 2 and enc.fields["codebook_stride"] == 0


# ---------------------------------------------------------------------------
# The kernels: every encoding of every weighted op, against the reference
# ---------------------------------------------------------------------------

def _check_all_encodings(g, rng, cbuild, in_range):
    q = quantize_with_random_data(g, rng, {"x0": in_range})
    inputs = {"x0": rng.integers(-128, 128, size=(8,) + q.tensors["x0"].shape[1:]).astype(np.int8)}
    arenas = set()
    for encoding in ENCODED:
        with tempfile.TemporaryDirectory() as tmp:
            got, ref = c_matches_reference(q, Path(tmp), cbuild, inputs, weights=encoding)
            record = load_project(tmp)
        assert record["layers"][0]["encoding"] == encoding
        assert record["layers"][0]["kernel"].endswith(f"_s8_{encoding}")
        arenas.add(record["arena_bytes"])
        diff = int(np.sum(got != ref))
        assert diff == 0, f"{encoding}: {diff} of {got.size} elements differ; first at {np.argwhere(got != ref)[:3]}"
    assert len(arenas) == 1


@st.composite
def conv_case(draw, depthwise=False):
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    c = draw(st.integers(1, 12))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = tuple(draw(st.integers(0, 3)) for _ in range(4))
    oh, ow = conv_out(h, w, (kh, kw), stride, dilation, padding)
    if oh < 1 or ow < 1:
        padding = (padding[0] + kh * dilation[0], padding[1], padding[2] + kw * dilation[1], padding[3])
        oh, ow = conv_out(h, w, (kh, kw), stride, dilation, padding)
    mult = draw(st.integers(1, 3)) if depthwise else 1
    o = c * mult if depthwise else draw(st.integers(1, 10))
    return dict(h=h, w=w, c=c, o=o, k=(kh, kw), stride=stride, dilation=dilation, padding=padding, out=(oh, ow),
                mult=mult, act=draw(st.sampled_from(["none", "relu", "relu6"])), bias=draw(st.booleans()),
                style=draw(weight_style()), seed=draw(st.integers(0, 2 ** 31)))


def _conv_graph(case, rng, depthwise):
    kh, kw = case["k"]
    shape = (1, kh, kw, case["o"]) if depthwise else (case["o"], kh, kw, case["c"])
    weights = {"w": clustered_weights(rng, shape, 3 if depthwise else 0, case["style"])}
    if case["bias"]:
        weights["b"] = rng.normal(0, 1, case["o"])
    attrs = dict(stride=case["stride"], dilation=case["dilation"], padding=case["padding"], activation=case["act"],
                 depth_multiplier=case["mult"])
    kind = "depthwise_conv2d" if depthwise else "conv2d"
    return float_graph(kind, [(1, case["h"], case["w"], case["c"])], attrs, weights, (1, *case["out"], case["o"]))


@given(conv_case())
@SETTINGS
def test_conv2d_s8_encoded(cbuild, case):
    rng = np.random.default_rng(case["seed"])
    _check_all_encodings(_conv_graph(case, rng, False), rng, cbuild, (-1.0, 2.0))


@given(conv_case(depthwise=True))
@SETTINGS
def test_depthwise_conv2d_s8_encoded(cbuild, case):
    rng = np.random.default_rng(case["seed"])
    _check_all_encodings(_conv_graph(case, rng, True), rng, cbuild, (-2.0, 1.0))


@given(st.integers(1, 300), st.integers(1, 40), st.booleans(), weight_style(), st.integers(0, 2 ** 31))
@SETTINGS
def test_fully_connected_s8_encoded(cbuild, n_in, n_out, bias, style, seed):
    rng = np.random.default_rng(seed)
    weights = {"w": clustered_weights(rng, (n_out, n_in), 0, style)}
    if bias:
        weights["b"] = rng.normal(0, 1, n_out)
    g = float_graph("fully_connected", [(1, n_in)], dict(activation="relu"), weights, (1, n_out))
    _check_all_encodings(g, rng, cbuild, (-0.5, 1.5))


# ---------------------------------------------------------------------------
# Whole models: arena unchanged, flash smaller, outputs the same
# ---------------------------------------------------------------------------

def _clustered_pruned_mlp(seed=0, bits=4, sparsity=0.9):
    import torch
    from edgekit import models

    torch.manual_seed(seed)
    model = models.digits_mlp().eval()
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                w = m.weight.numpy()
                centroids = np.quantile(w, np.linspace(0.02, 0.98, (1 << bits) - 1))
                w = centroids[np.abs(w[..., None] - centroids).argmin(-1)]
                w[rng.random(w.shape) < sparsity] = 0.0
                m.weight.copy_(torch.as_tensor(w, dtype=torch.float32))
    return model


def test_flash_shrinks_and_arena_stays(tmp_path):
    import edgekit
    from edgekit.targets.elf import symbol_sizes

    model = _clustered_pruned_mlp()
    rng = np.random.default_rng(0)
    q = edgekit.quantize(model, rng.uniform(0, 1, (64, 64)).astype(np.float32))
    x = rng.uniform(0, 1, (50, 64)).astype(np.float32)
    ref = edgekit.reference_run(q, x)
    text, arena, weight_bytes = {}, {}, {}
    for encoding in ("dense", "codebook", "huffman", "sparse", "auto"):
        out = tmp_path / encoding
        record = edgekit.generate(q, out, weights=encoding)
        built = edgekit.build(out)
        assert np.array_equal(edgekit.run(out, x), ref), encoding
        text[encoding] = built["sizes"]["text"]
        arena[encoding] = (record["arena_bytes"], symbol_sizes(built["binary"], ["ek_arena"])["ek_arena"],
                           built["sizes"]["bss"])
        weight_bytes[encoding] = record["weight_bytes"]
    assert len(set(arena.values())) == 1, arena
    assert arena["dense"][1] == arena["dense"][0]  # the symbol really is the planned arena
    for encoding in ("codebook", "huffman", "sparse"):
        assert text[encoding] < text["dense"], (encoding, text)
        assert weight_bytes[encoding] < weight_bytes["dense"]
    assert weight_bytes["auto"] <= min(weight_bytes[e] for e in ("codebook", "huffman", "sparse"))


@pytest.mark.parametrize("encoding", ["codebook", "huffman", "sparse", "auto"])
def test_cnn_encoded_bit_exact_under_sanitizers(trained_rescnn, digits, cbuild, encoding, tmp_path):
    """Every op kind of the residual CNN (conv, dilated depthwise with a multiplier, 1x1, dense), encoded."""
    import edgekit
    from helpers import run_c

    q = edgekit.quantize(trained_rescnn, digits.x_train[:100])
    x = edgekit.api.to_ir_inputs(q, digits.x_test[:40])
    p = q.tensors[q.inputs[0]].quant
    from edgekit import quant_math as qm
    x_q = qm.quantize(x, p.scale[0], p.zero_point[0])
    record = edgekit.generate(q, tmp_path, weights=encoding)
    kinds = {l["kind"] for l in record["layers"] if l.get("encoding") not in (None, "dense")}
    assert kinds == {"conv2d", "depthwise_conv2d", "fully_connected"} or encoding == "auto"
    got = run_c(cbuild.build(tmp_path), [x_q], 10)
    assert np.array_equal(got, edgekit.reference_run(q, x_q, int8=True).reshape(40, -1))


def test_bad_weights_choice_is_refused(tmp_path):
    import edgekit
    from edgekit.errors import EdgekitError
    from helpers import float_graph

    rng = np.random.default_rng(0)
    g = float_graph("fully_connected", [(1, 8)], dict(activation="none"), {"w": rng.normal(0, 1, (4, 8))}, (1, 4))
    q = quantize_with_random_data(g, rng)
    with pytest.raises(EdgekitError, match="unknown weight encoding 'zip'"):
        edgekit.generate(q, tmp_path / "a", weights="zip")
    with pytest.raises(EdgekitError, match="'nope'.*not weighted layers.*op"):
        edgekit.generate(q, tmp_path / "b", weights={"nope": "huffman"})
    record = edgekit.generate(q, tmp_path / "c", weights={"op": "sparse"})
    assert record["layers"][0]["encoding"] == "sparse"
    from edgekit.passes.fuse import prepare_float
    from edgekit.passes.quantize import quantize_weights_only
    wo = quantize_weights_only(prepare_float(g))
    with pytest.raises(EdgekitError, match="weight-only"):
        edgekit.generate(wo, tmp_path / "d", weights="huffman")
