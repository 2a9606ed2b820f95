"""rpi4's int16-pair kernels (kernels/neon, "_pairs"): two int8 products added in an int16 lane before
widening, exact only when no weight of the layer is -128 (codegen/kernel_prep.py: int16_pairs_exact).
Cross-built with UBSan, run under qemu-aarch64 -cpu cortex-a72, bit-exact with the numpy reference over
random shapes, with rows of +-127 weights against -128 inputs (the largest pair sums), and layers with a
-128 weight, which must keep the one-product kernel and say so in the project's notes."""
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from edgekit import reference
from edgekit.boards import load_board
from edgekit.codegen import kernel_prep
from edgekit.codegen.project import generate_project
from helpers import conv_out_nonempty, float_graph, quantize_with_random_data
from test_kernels_c import SETTINGS
from test_rpi import CrossBuild, run_qemu

pytestmark = pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None or shutil.which("qemu-aarch64") is None,
                                reason="needs aarch64-linux-gnu-gcc and qemu-aarch64 (scripts/setup.sh)")


# a fifth of the kernel examples (5 by default) plus the explicit ones: the module stays near a minute
PAIRS_SETTINGS = settings(SETTINGS, max_examples=max(3, SETTINGS.max_examples // 5))


@pytest.fixture(scope="module")
def xbuild(tmp_path_factory):
    return CrossBuild(tmp_path_factory.mktemp("aarch64_pairs"))


def extreme_weights(q, rng, minus128: bool):
    """Some output channels' weights set to +-127 (the largest int16 pair sums against -128 inputs), and
    with ``minus128`` one weight to -128 (the layer must then keep the one-product kernel)."""
    w = q.tensors[q.ops[0].inputs[1]].data
    rows = w.reshape(w.shape[0], -1)
    for r in rng.choice(rows.shape[0], size=min(2, rows.shape[0]), replace=False):
        rows[r] = np.where(rng.random(rows.shape[1]) < 0.5, -127, 127)
    if minus128:
        rows[rng.integers(rows.shape[0]), rng.integers(rows.shape[1])] = -128


def run_rpi4(q, rng, xbuild, threads=1):
    """Generate for rpi4, build, run 10 random inputs (every int8 value likely, -128 included) under
    qemu; assert bit-exact. Returns the project record."""
    x = rng.integers(-128, 128, size=(10,) + q.tensors[q.inputs[0]].shape[1:]).astype(np.int8)
    x[0] = -128  # every input at -128: with the +-127 rows, the largest pair sums
    board = load_board("rpi4")
    with tempfile.TemporaryDirectory() as tmp:
        record = generate_project(q, tmp, board, threads=threads)
        exe = xbuild.build(Path(tmp), board)
        got = run_qemu(exe, board["qemu"]["cpu"], x.reshape(10, -1), q.tensors[q.outputs[0]].size)
    ref = reference.run(q, x)[0].reshape(got.shape)
    assert int(np.sum(got != ref)) == 0, f"{int(np.sum(got != ref))} of {got.size} differ"
    return record


@given(st.integers(1, 300), st.integers(1, 24), st.sampled_from(["none", "relu"]), st.booleans(), st.integers(1, 3),
       st.integers(0, 2 ** 31))
@example(40, 12, "none", False, 2, 1)
@example(40, 12, "relu", True, 1, 2)
@example(200, 90, "none", False, 3, 3)  # 5 blocks of 16 rows over 3 threads, the last share ending on the overlapping block
@example(16, 16, "none", False, 1, 4)  # one whole step, one whole block
@example(33, 7, "relu", False, 1, 5)  # a 1-input head step, 7 rows of a zero-padded block
@PAIRS_SETTINGS
def test_fully_connected_pairs(xbuild, n_in, n_out, act, minus128, threads, seed):
    """ek_fully_connected_s8_pairs: 16-row blocks of the packed filter (fewer than 16 rows: zero rows
    past out_c; else a last block overlapping the one before); steps of 16 inputs, the first one the
    in_c % 16 odd inputs when there are some; thread shares of 16-row blocks. A -128 weight keeps
    ek_fully_connected_s8."""
    rng = np.random.default_rng(seed)
    g = float_graph("fully_connected", [(1, n_in)], dict(activation=act),
                    {"w": rng.normal(0, 1, (n_out, n_in)), "b": rng.normal(0, 1, n_out)}, (1, n_out))
    q = quantize_with_random_data(g, rng, {"x0": (-2.0, 3.0)})
    extreme_weights(q, rng, minus128)
    record = run_rpi4(q, rng, xbuild, threads)
    if (n_in, n_out, threads) == (200, 90, 3):
        assert record["layers"][0]["split"] == "channels"
    kernel = record["layers"][0]["kernel"]
    assert kernel == ("ek_fully_connected_s8" if minus128 else "ek_fully_connected_s8_pairs")
    assert any("-128" in n for n in record["notes"]) == minus128


@given(st.integers(1, 9), st.integers(1, 6), st.sampled_from([1, 3, 4, 8, 13, 16, 20, 33]),
       st.sampled_from([1, 5, 15, 16, 17, 32, 40]), st.sampled_from([(1, 1), (1, 3), (3, 3), (2, 5)]),
       st.tuples(*(st.integers(0, 2) for _ in range(4))), st.integers(1, 2), st.sampled_from(["none", "relu"]),
       st.booleans(), st.integers(1, 3), st.integers(0, 2 ** 31))
@example(5, 5, 16, 17, (3, 3), (1, 1, 1, 1), 1, "relu", False, 1, 1)
@example(4, 3, 8, 16, (1, 1), (0, 0, 0, 0), 1, "none", True, 2, 2)
@example(1, 9, 33, 40, (1, 3), (0, 0, 1, 1), 1, "none", False, 3, 3)  # one row: 16-channel block shares
@PAIRS_SETTINGS
def test_conv2d_pairs(xbuild, h, w, c, o, k, padding, stride, act, minus128, threads, seed):
    """ek_conv2d_s8_pairs: 16-channel blocks (fewer than 16, a last block overlapping the one before),
    4-pixel groups with the last pixel repeated, K (= kh * kw * in_c) with a tail of 1..7 taps past
    the last 8 (one or two groups of 4), windows in place (1x1 / 1xN) or gathered with padding, thread
    shares (rows or 16-channel blocks). A -128 weight keeps ek_conv2d_s8."""
    rng = np.random.default_rng(seed)
    kh, kw = k
    out, padding = conv_out_nonempty(h, w, k, (stride, stride), padding)
    attrs = dict(stride=(stride, stride), dilation=(1, 1), padding=padding, activation=act)
    g = float_graph("conv2d", [(1, h, w, c)], attrs, {"w": rng.normal(0, 1, (o, kh, kw, c)), "b": rng.normal(0, 1, o)},
                    (1, *out, o))
    q = quantize_with_random_data(g, rng, {"x0": (-2.0, 3.0)})
    extreme_weights(q, rng, minus128)
    record = run_rpi4(q, rng, xbuild, threads)
    if (h, w, o, threads) == (1, 9, 40, 3):
        assert record["layers"][0]["split"] == "channels"
    assert record["layers"][0]["kernel"] == ("ek_conv2d_s8" if minus128 else "ek_conv2d_s8_pairs")
    assert any("-128" in n for n in record["notes"]) == minus128


@given(st.integers(1, 7), st.integers(1, 13), st.sampled_from([1, 2, 3, 4, 5, 8, 12, 13, 16, 36]), st.sampled_from([1, 5, 8, 16, 17, 40]),
       st.sampled_from([(3, 3), (1, 1), (2, 5), (5, 1), (1, 3)]), st.tuples(*(st.integers(0, 2) for _ in range(4))),
       st.integers(1, 2), st.integers(1, 2), st.integers(1, 2), st.integers(1, 3), st.integers(0, 2 ** 31))
@example(6, 13, 16, 17, (3, 3), (1, 1, 1, 1), 1, 1, 1, 1, 4)  # stepped rows and table groups, two blocks
@example(3, 11, 8, 5, (1, 1), (0, 0, 0, 0), 1, 1, 1, 1, 5)  # a GEMM with a last group of one pixel
@example(5, 12, 12, 16, (2, 5), (0, 1, 2, 0), 1, 2, 2, 2, 6)  # per-tap stepped runs (dilation across the row)
@example(9, 13, 3, 8, (3, 3), (0, 1, 0, 1), 2, 1, 1, 1, 7)  # a first layer: 3 channels into 8, stride 2, padded rows
@example(3, 20, 3, 40, (3, 3), (0, 0, 1, 1), 1, 1, 1, 3, 8)  # one row: 16-channel block shares of padded rows
@PAIRS_SETTINGS
def test_conv2d_pairs_runs(xbuild, h, w, c, o, k, padding, stride, dil_h, dil_w, threads, seed):
    """ek_conv2d_s8_pairs, windows read in place: four pixels of one output row inside the input as kh
    rows of kw * in_c (in_c not a multiple of 4: rows padded to whole groups of 4 in the packed filter,
    read while they stay inside the input; dilated across the row: kh * kw runs) at fixed offsets, a 1x1
    stride-1 layer's pixels as a GEMM; the other groups through the run-pointer table (in_c a multiple
    of 4: padding on every side reading the zero-point row, groups crossing an output row, the last
    pixel repeated) or gathered with the padded row stride; the 8-channel tile (out_c <= 8), one
    16-channel block set up once or several per group, thread shares. Rows of +-127 weights against -128
    inputs: the largest pair sums."""
    rng = np.random.default_rng(seed)
    kh, kw = k
    dilation = (dil_h, dil_w)
    out, padding = conv_out_nonempty(h, w, k, (stride, stride), padding, dilation)
    attrs = dict(stride=(stride, stride), dilation=dilation, padding=padding, activation="relu")
    g = float_graph("conv2d", [(1, h, w, c)], attrs, {"w": rng.normal(0, 1, (o, kh, kw, c)), "b": rng.normal(0, 1, o)},
                    (1, *out, o))
    q = quantize_with_random_data(g, rng, {"x0": (-2.0, 3.0)})
    extreme_weights(q, rng, False)
    record = run_rpi4(q, rng, xbuild, threads)
    assert record["layers"][0]["kernel"] == "ek_conv2d_s8_pairs"
    if (h, w, c, o, threads) == (3, 20, 3, 40, 3):
        assert record["layers"][0]["split"] == "channels"


@pytest.mark.parametrize("c, o, k, stride, shifts", [
    (16, 17, (3, 3), 1, "right1"),  # every channel shifts right: the output stage in the asm, two blocks
    (16, 17, (3, 3), 1, "zero"),  # one channel with no shift: the output stage in C (right-only form)
    (8, 32, (1, 1), 1, "left"),  # one channel shifting left: the output stage in C (general form)
    (3, 8, (3, 3), 2, "right1"),  # a first layer into 8 channels: the 8-lane output stage in the asm
    (3, 8, (3, 3), 2, "zero"),
])
def test_conv2d_pairs_output_stages(xbuild, c, o, k, stride, shifts):
    """ek_conv2d_s8_pairs' output stages: four whole pixels of whole blocks of a layer whose channels all
    shift right by >= 1 take the output stage written in the asm (SSRA #31 fix-up, multipliers and
    shifts loaded straight from the layer's arrays), any other layer (a channel with shift 0 or a left
    shift) and the last group's 1-3 pixels the one in C; all bit-exact (7x9 pixels: 63 = 15 groups of 4
    and a last group of 3)."""
    rng = np.random.default_rng(11)
    h, w = (7, 9) if stride == 1 else (13, 17)
    kh, kw = k
    out, padding = conv_out_nonempty(h, w, k, (stride, stride), (1, 1, 1, 1) if kh > 1 else (0, 0, 0, 0))
    attrs = dict(stride=(stride, stride), dilation=(1, 1), padding=padding, activation="none")  # negative outputs kept: rounding ties of negative sums show
    g = float_graph("conv2d", [(1, h, w, c)], attrs, {"w": rng.normal(0, 1, (o, kh, kw, c)), "b": rng.normal(0, 1, o)},
                    (1, *out, o))
    q = quantize_with_random_data(g, rng, {"x0": (-2.0, 3.0)})
    extreme_weights(q, rng, False)
    shift = np.asarray(q.ops[0].attrs["shift"]).copy()
    assert np.all(shift <= -1)  # random layers: every shift right (the asm form)
    if shifts == "zero":
        shift[o // 2] = 0
    elif shifts == "left":
        shift[o // 2] = 1
    q.ops[0].attrs["shift"] = shift
    record = run_rpi4(q, rng, xbuild)
    assert record["layers"][0]["kernel"] == "ek_conv2d_s8_pairs"


@pytest.mark.parametrize("h, c", [(130, 4), (150, 3)])
def test_conv2d_pairs_span_too_large_for_the_copy(xbuild, h, c):
    """A padded layer whose input span (with its padding) is over PAIRS_PAD_COPY_MAX bytes gets no
    padded copy (the scratch stays small) and reads its edge windows from the input as before: through
    the run-pointer table and its zero-point row (in_c 4), or gathered rows (in_c 3); bit-exact."""
    rng = np.random.default_rng(h)
    attrs = dict(stride=(1, 1), dilation=(1, 1), padding=(1, 1, 1, 1), activation="none")
    g = float_graph("conv2d", [(1, h, h, c)], attrs, {"w": rng.normal(0, 1, (8, 3, 3, c)), "b": rng.normal(0, 1, 8)},
                    (1, h, h, 8))
    q = quantize_with_random_data(g, rng, {"x0": (-2.0, 3.0)})
    extreme_weights(q, rng, False)
    record = run_rpi4(q, rng, xbuild)
    assert record["layers"][0]["kernel"] == "ek_conv2d_s8_pairs"
    assert (h + 2) * (h + 2) * c > kernel_prep.PAIRS_PAD_COPY_MAX and record["scratch_bytes"] < 4096



def test_conv2d_pairs_padded_copy_planned(tmp_path):
    """The padded copy is planned only where a window reaches into the padding: a padded 3x3 layer over
    16 channels gets the 10x12x16 span (and 16 spare bytes) after its run table (36 bytes a tap and a
    zero-point row, to 16 bytes), an unpadded one (every window inside) none (its scratch stays the
    planner's floor of 4 windows of K = 144 bytes)."""
    rng = np.random.default_rng(3)
    for padding, out, expect in [((1, 1, 1, 1), (8, 10), (36 * 9 + 16 + 15) // 16 * 16 + 10 * 12 * 16 + 16),
                                 ((0, 0, 0, 0), (6, 8), 4 * 144)]:
        g = float_graph("conv2d", [(1, 8, 10, 16)], dict(stride=(1, 1), dilation=(1, 1), padding=padding,
                                                          activation="relu"),
                        {"w": rng.normal(0, 1, (16, 3, 3, 16)), "b": rng.normal(0, 1, 16)}, (1, *out, 16))
        q = quantize_with_random_data(g, rng)
        record = generate_project(q, tmp_path / str(padding[0]), load_board("rpi4"))
        assert record["layers"][0]["kernel"] == "ek_conv2d_s8_pairs"
        assert record["scratch_bytes"] == (expect + 7) // 8 * 8
