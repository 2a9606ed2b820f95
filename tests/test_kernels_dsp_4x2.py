"""The Cortex-M DSP convolution in 4 pixel x 2 channel register blocks (kernels/dsp/ek_conv2d_s8_4x2,
filter packed by codegen/kernel_prep.pack_conv_4x2) on the emulated M4 (mps2-an386) and M7
(mps2-an500): self-test firmware built with -Wall -Wextra -Werror, run under QEMU, compared with the
numpy reference, 0 differing elements. Random shapes reach pixel counts that are not a multiple of 4,
odd output channels, K = kh * kw * in_c not a multiple of 4, strides, dilation and padding; the
kernel's portable form over the packed filter runs on the host under ASan / UBSan."""
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgekit import reference
from edgekit.codegen.kernel_prep import (conv_4x2_chosen, conv_4x2_chunk, conv_4x2_layout, conv_4x2_scratch,
                                         pack_conv_4x2)
from helpers import float_graph, quantize_with_random_data
from test_kernels_c import activations, conv_out
from test_kernels_dsp import BOARDS, DSP_SETTINGS, HOST_DSP_BOARD

needs_qemu = [pytest.mark.qemu,
              pytest.mark.skipif(shutil.which("qemu-system-arm") is None or shutil.which("arm-none-eabi-gcc") is None,
                                 reason="needs qemu-system-arm and arm-none-eabi-gcc (make setup)")]


@st.composite
def conv_4x2_case(draw, first=False, chunked=False):
    """A convolution the 4x2 kernel is chosen for: in_c > 8 (8 for a 1x1), or with ``first`` a first
    layer's 1-3 (windows up to 10x4, K >= 8, odd sizes); at least 4 output pixels, K <= 256 (the
    scratch cap of a model without larger convolutions). With ``chunked`` K is 261-648: the four
    windows exceed the scratch and the kernel gathers them in chunks (2-5, their edges inside window
    rows and taps, K not always a multiple of 4)."""
    c = draw(st.integers(1, 3) if first else st.integers(29, 72) if chunked else st.integers(8, 28))
    if chunked:
        kh, kw = draw(st.sampled_from([(3, 3), (3, 3), (2, 3), (3, 2), (1, 9)]))
        c = max(c, 261 // (kh * kw) + 1)
    elif c <= 3:  # a first layer over an image or a spectrogram (KWS: 10x4 over 1 channel)
        kh, kw = draw(st.sampled_from([(3, 3), (3, 3), (10, 4), (2, 3), (5, 5), (4, 1)]))
        if kh * kw * c < 8:
            kh, kw = 3, 3
    else:
        kh, kw = draw(st.sampled_from([(1, 1), (1, 1), (3, 3), (1, 3), (2, 2)])) if c > 8 else (1, 1)
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2))) if kh * kw > 1 else (1, 1)
    padding = tuple(draw(st.integers(0, 2)) for _ in range(4)) if kh * kw > 1 else (0, 0, 0, 0)
    h, w = draw(st.integers(2, 5 if chunked else 7)), draw(st.integers(2, 5 if chunked else 7))
    if c <= 3:  # larger, odd images so that a 10x4 window fits with strides
        h, w = draw(st.integers(2, 13)), draw(st.integers(2, 9))
    oh, ow = conv_out(h, w, (kh, kw), stride, dilation, padding)
    if oh < 1 or ow < 1 or oh * ow < 4:
        stride, dilation, padding = (1, 1), (1, 1), (kh // 2, kh - 1 - kh // 2, kw // 2, kw - 1 - kw // 2)
        oh, ow = h, w
    o = draw(st.integers(1, 8 if chunked else 11))
    # output channels whose weights are all zero (a pruned model's): written as constants
    dead = draw(st.lists(st.integers(0, o - 1), max_size=3, unique=True)) if draw(st.booleans()) else []
    return dict(h=h, w=w, c=c, o=o, k=(kh, kw), stride=stride, dilation=dilation, padding=padding, out=(oh, ow),
                act=draw(activations), bias=draw(st.booleans()), wscale=draw(st.floats(0.05, 1.5)), dead=dead,
                seed=draw(st.integers(0, 2 ** 31)))


def _graph(case, rng):
    kh, kw = case["k"]
    weights = {"w": rng.normal(0, case["wscale"], (case["o"], kh, kw, case["c"]))}
    if case["bias"]:
        weights["b"] = rng.normal(0, case["wscale"], case["o"])
    attrs = dict(stride=case["stride"], dilation=case["dilation"], padding=case["padding"], activation=case["act"])
    g = float_graph("conv2d", [(1, case["h"], case["w"], case["c"])], attrs, weights, (1, *case["out"], case["o"]))
    q = quantize_with_random_data(g, rng, {"x0": (-1.5, 2.0)})
    q.tensors[q.ops[0].inputs[1]].data[case.get("dead", [])] = 0
    return q


@pytest.mark.parametrize("shape", [(1, 1, 1, 4), (3, 1, 1, 9), (5, 3, 3, 7), (2, 1, 2, 13)])
def test_pack_conv_4x2_order(shape):
    """Every weight lands where the kernel reads it (the index of ek_conv4x2_weight in the template):
    pair oc // 2, block k // 4, channel oc % 2, byte k % 4, even positions ^ 0x80; zeros (stored
    0x80 at even positions) elsewhere."""
    w = np.random.default_rng(0).integers(-128, 128, size=shape).astype(np.int8)
    packed = pack_conv_4x2(w)
    out_c, k = shape[0], int(np.prod(shape[1:]))
    k4 = (k + 3) // 4 * 4
    assert packed.size == (out_c + 1) // 2 * 2 * k4
    flat = w.reshape(out_c, -1)
    seen = np.zeros(packed.size, bool)
    for oc in range(out_c):
        for i in range(k):
            idx = (oc >> 1) * 2 * k4 + (i & ~3) * 2 + 4 * (oc & 1) + (i & 3)
            assert packed[idx] == (flat[oc, i] if i & 1 else flat[oc, i] ^ np.int8(-128))
            seen[idx] = True
    even = (np.arange(packed.size) & 1) == 0
    assert not packed[~seen & ~even].any() and np.all(packed[~seen & even] == -128)


def test_conv_4x2_choice():
    """Python decides per layer: wide inputs, a few pixels and a window within the scratch cap take
    the 4x2 kernel; the rest keep ek_conv2d_s8."""
    rng = np.random.default_rng(0)

    def conv(k, c, o, hw):
        attrs = dict(stride=(1, 1), dilation=(1, 1), padding=(k // 2,) * 4, activation="relu")
        g = float_graph("conv2d", [(1, *hw, c)], attrs, {"w": rng.normal(0, 0.3, (o, k, k, c))}, (1, *hw, o))
        q = quantize_with_random_data(g, rng, {"x0": (-1.5, 2.0)})
        return q, q.ops[0]

    assert conv_4x2_chosen(*conv(1, 64, 64, (25, 5)), cap=2048)  # the keyword spotter's 1x1 layers
    assert conv_4x2_chosen(*conv(3, 16, 16, (8, 8)), cap=2048)  # ResNet-8's first 3x3 layers
    assert not conv_4x2_chosen(*conv(3, 4, 16, (8, 8)), cap=2048)  # 4-8 input channels: ek_conv2d_s8
    assert conv_4x2_chosen(*conv(3, 3, 16, (8, 8)), cap=2048)  # a first layer over an image (ResNet-8, VWW)
    assert conv_4x2_chosen(*conv(3, 1, 8, (8, 8)), cap=2048)  # over one channel, K = 9
    assert not conv_4x2_chosen(*conv(1, 3, 8, (8, 8)), cap=2048)  # a 1x1 over 3 channels: K < 8
    assert not conv_4x2_chosen(*conv(3, 8, 16, (8, 8)), cap=2048)
    assert conv_4x2_chosen(*conv(1, 8, 16, (8, 8)), cap=2048)  # but a 1x1 over 8 channels (VWW's second layer)
    assert not conv_4x2_chosen(*conv(1, 4, 16, (8, 8)), cap=2048)  # a window of 4 values: one block
    assert not conv_4x2_chosen(*conv(1, 32, 16, (1, 3)), cap=2048)  # fewer than 4 pixels
    assert conv_4x2_chosen(*conv(3, 64, 16, (4, 4)), cap=8 * 576)
    # 4 windows of 576 int16 over the cap: in chunks, within what ek_conv2d_s8 would take (4 x 576,
    # the cap of a model with this layer: ResNet-8's 3x3 over 64 channels)
    assert conv_4x2_chosen(*conv(3, 64, 64, (4, 4)), cap=4 * 576)
    assert conv_4x2_scratch(576, 32, 4 * 576) == 4 * 576
    assert conv_4x2_chunk(576, 32, 4 * 576) == 160  # (2304 - 32 pairs x 32 bytes of sums) / 8
    assert conv_4x2_scratch(576, 32, 4 * 576 - 8) == 0  # below 4 x K the layer keeps ek_conv2d_s8
    assert not conv_4x2_chosen(*conv(3, 64, 16, (4, 4)), cap=2048)
    # many pairs leave no room for a chunk beside their sums
    assert conv_4x2_scratch(300, 61, 2048) == 0 and conv_4x2_scratch(300, 60, 2048) == 2048
    # more than CONV_4X2_SUM_MAX = 340 taps are summed in chunks even when the four windows fit
    assert conv_4x2_scratch(288, 16, 4096) == 8 * 288 and conv_4x2_chunk(288, 16, 8 * 288) == 288
    assert conv_4x2_scratch(360, 16, 4096) == 4 * 360 and conv_4x2_chunk(360, 16, 4 * 360) == 116
    assert conv_4x2_chunk(360, 16, 4096) == 340
    # an accumulator that may reach 2^30 (the kernel's sums are doubled) keeps ek_conv2d_s8
    g, op = conv(1, 64, 64, (25, 5))
    assert conv_4x2_chosen(g, op, cap=2048)
    bias = np.zeros(64, np.int32)
    bias[5] = 2 ** 30
    g.tensors[op.inputs[2]].data = bias
    assert not conv_4x2_chosen(g, op, cap=2048)


def _check_on_cortex_m(case, board):
    if shutil.which("qemu-system-arm") is None or shutil.which("arm-none-eabi-gcc") is None:
        pytest.skip("needs qemu-system-arm and arm-none-eabi-gcc (make setup)")
    from cortex_m_selftest import run_selftest

    rng = np.random.default_rng(case["seed"])
    q = _graph(case, rng)
    x = rng.integers(-128, 128, size=(3, case["h"], case["w"], case["c"])).astype(np.int8)
    with tempfile.TemporaryDirectory() as tmp:
        got = run_selftest(q, board, x, Path(tmp))
        kernels = [p.stem for p in (Path(tmp) / "project" / "kernels").glob("*.c")]
    assert kernels == ["ek_conv2d_s8_4x2"]
    ref = reference.run(q, x)[0].reshape(len(x), -1)
    diff = int(np.sum(got != ref))
    assert diff == 0, f"{board} {case}: {diff} of {got.size} elements differ"


@given(conv_4x2_case(), BOARDS)
@DSP_SETTINGS
def test_conv2d_s8_4x2_on_cortex_m(case, board):
    _check_on_cortex_m(case, board)


@given(conv_4x2_case(first=True), BOARDS)
@DSP_SETTINGS
def test_conv2d_s8_4x2_first_layer_on_cortex_m(case, board):
    """1-3 input channels (KWS's 10x4 over a spectrogram, 3x3 over an RGB image)."""
    _check_on_cortex_m(case, board)


@given(conv_4x2_case(chunked=True), BOARDS)
@DSP_SETTINGS
def test_conv2d_s8_4x2_chunked_on_cortex_m(case, board):
    """Windows of 261-648 values, over the scratch as four int16 copies: gathered in chunks, the pairs'
    partial sums kept between them (the K-chunked form)."""
    _check_on_cortex_m(case, board)



@given(conv_4x2_case())
@DSP_SETTINGS
def test_conv2d_s8_4x2_portable_host_asan(case):
    """The packed filter, the per-channel records and the gather order through the kernel's portable
    form, on the host under ASan / UBSan, bit-exact with the numpy reference."""
    _check_portable_host(case)


@given(conv_4x2_case(first=True))
@DSP_SETTINGS
def test_conv2d_s8_4x2_first_layer_portable_host_asan(case):
    _check_portable_host(case)


@given(conv_4x2_case(chunked=True))
@settings(DSP_SETTINGS, max_examples=max(3, DSP_SETTINGS.max_examples // 2))  # long windows under ASan
def test_conv2d_s8_4x2_chunked_portable_host_asan(case):
    """The shapes the DSP kernel takes in chunks, through the portable form (whole windows)."""
    _check_portable_host(case)


def _check_portable_host(case):
    from edgekit.boards import load_board_file
    from edgekit.codegen.project import generate_project
    from helpers import CBuild, run_c

    rng = np.random.default_rng(case["seed"])
    q = _graph(case, rng)
    x = rng.integers(-128, 128, size=(3, case["h"], case["w"], case["c"])).astype(np.int8)
    with tempfile.TemporaryDirectory() as tmp:
        board_file = Path(tmp) / "host-dsp.toml"
        board_file.write_text(HOST_DSP_BOARD)
        record = generate_project(q, Path(tmp) / "project", load_board_file(board_file))
        assert record["kernels"] == ["ek_conv2d_s8_4x2"]
        exe = CBuild(Path(tmp), sanitize=True).build(Path(tmp) / "project")
        got = run_c(exe, [x], int(np.prod(q.tensors[q.outputs[0]].shape)))
    ref = reference.run(q, x)[0].reshape(len(x), -1)
    assert int(np.sum(got != ref)) == 0


@pytest.mark.parametrize("board", ["mps2-an386", "mps2-an500"])
def test_conv2d_s8_4x2_sums_at_the_exact_shift_bound(board, tmp_path):
    """The kernel's sums are 256 x (sum of w x at even taps + w (x - 128) at odd ones) modulo 2^32,
    exact for at most CONV_4X2_SUM_MAX = 340 taps at a time: here every weight is -128 and every input
    -128, so a chunk of 340 taps reaches 170 x 16384 + 170 x 32768 = 8,355,840, just below 2^23 (a 1x1
    over 688 channels, gathered in chunks of 340, 340 and 8). The requantization is set so that the
    outputs (accumulators of 11.3 M, and of mixed signs in the other pixels) are not saturated. (Checked
    once by hand: with the bound raised to 344 taps, 696 channels, a chunk reaches 8,454,144 > 2^23 and
    10 of the 16 outputs differ.)"""
    if shutil.which("qemu-system-arm") is None or shutil.which("arm-none-eabi-gcc") is None:
        pytest.skip("needs qemu-system-arm and arm-none-eabi-gcc (make setup)")
    from cortex_m_selftest import run_selftest

    rng = np.random.default_rng(3)
    case = dict(h=2, w=2, c=688, o=2, k=(1, 1), stride=(1, 1), dilation=(1, 1), padding=(0, 0, 0, 0), out=(2, 2),
                act="none", bias=False, wscale=0.3)
    q = _graph(case, rng)
    op = q.ops[0]
    q.tensors[op.inputs[1]].data[:] = -128
    op.attrs["input_offset"] = 0
    op.attrs["multiplier"] = np.full(2, 1 << 30, np.int64)
    op.attrs["shift"] = np.full(2, -20, np.int64)
    op.attrs["output_offset"] = 0
    x = np.full((2, 2, 2, 688), -128, np.int8)
    x[1, 0, 1, ::3] = 127  # other pixels: mixed signs
    x[1, 1, :, 1::2] = rng.integers(-128, 128, size=(2, 344))
    assert conv_4x2_chunk(688, 1, conv_4x2_scratch(688, 1, 4 * 688)) == 340
    got = run_selftest(q, board, x, tmp_path)
    ref = reference.run(q, x)[0].reshape(len(x), -1)
    assert np.all(np.abs(ref) < 127) and np.any(ref != 0)
    assert int(np.sum(got != ref)) == 0


@pytest.mark.parametrize("board", ["mps2-an386", "host-dsp-portable"])
def test_conv2d_s8_4x2_generic_output_channels(board, tmp_path):
    """Channels whose right shift is outside the fast output stage's 2..20 (shift 0 or -1: a scale
    >= 0.25; -21, -24: tiny scales, as channels of zero weights have) take the generic stage, next to
    fast channels in the same pair, and channels of zero weights are written as constants (an odd
    number left to compute); on the M4 and through the portable form on the host (ASan)."""
    rng = np.random.default_rng(7)
    case = dict(h=5, w=3, c=12, o=9, k=(1, 1), stride=(1, 1), dilation=(1, 1), padding=(0, 0, 0, 0), out=(5, 3),
                act="relu6", bias=True, wscale=0.3, dead=[1, 5, 6, 8])
    q = _graph(case, rng)
    op = q.ops[0]
    op.attrs["shift"] = np.array(op.attrs["shift"]).copy()
    op.attrs["shift"][[0, 3, 4, 7]] = [0, -1, -21, -24]
    x = rng.integers(-128, 128, size=(3, 5, 3, 12)).astype(np.int8)
    if board == "mps2-an386":
        if shutil.which("qemu-system-arm") is None or shutil.which("arm-none-eabi-gcc") is None:
            pytest.skip("needs qemu-system-arm and arm-none-eabi-gcc (make setup)")
        from cortex_m_selftest import run_selftest
        got = run_selftest(q, board, x, tmp_path)
    else:
        from edgekit.boards import load_board_file
        from edgekit.codegen.project import generate_project
        from helpers import CBuild, run_c
        board_file = tmp_path / "host-dsp.toml"
        board_file.write_text(HOST_DSP_BOARD)
        generate_project(q, tmp_path / "project", load_board_file(board_file))
        got = run_c(CBuild(tmp_path, sanitize=True).build(tmp_path / "project"), [x], 5 * 3 * 9)
    assert (tmp_path / "project" / "kernels" / "ek_conv2d_s8_4x2.c").exists()
    _, table = conv_4x2_layout(q, op)
    assert list(table[:2]) == [3, 4]  # 5 computed channels in 3 pairs, 4 constants
    if board == "mps2-an386":  # the generic stage is kept (kernel_prep.dsp_fallbacks_unused)
        assert "EK_CONV2D_S8_4X2_ANY" not in (tmp_path / "project" / "include" / "ek_nn.h").read_text()
    ref = reference.run(q, x)[0].reshape(len(x), -1)
    assert int(np.sum(got != ref)) == 0


@pytest.mark.parametrize("c, k", [(16, 3), (64, 3), (8, 1)])
def test_conv2d_s8_4x2_built_without_its_fallback(tmp_path, c, k):
    """The generator plans the 4x2 kernel's scratch, so no layer reaches its portable form on a DSP
    board: ek_nn.h leaves it out (flash); the kernel without the DSP extension keeps it (host test).
    Over 64 channels (K = 576) in chunks, within the 4 x K bytes ek_conv2d_s8 would take; a window of
    8 values (shorter than a chunk may be) whole."""
    from edgekit.boards import load_board
    from edgekit.codegen.project import generate_project

    rng = np.random.default_rng(3)
    case = dict(h=4, w=4, c=c, o=6, k=(k, k), stride=(1, 1), dilation=(1, 1), padding=(k // 2,) * 4, out=(4, 4),
                act="relu", bias=True, wscale=0.3)
    record = generate_project(_graph(case, rng), tmp_path, load_board("mps2-an386"))
    assert record["kernels"] == ["ek_conv2d_s8_4x2"]
    assert record["scratch_bytes"] == {16: 8 * 144, 64: 4 * 576, 8: 64}[c]
    header = (tmp_path / "include" / "ek_nn.h").read_text()
    assert "#define EK_CONV2D_S8_4X2_FALLBACK 0" in header
    assert ("#define EK_CONV2D_S8_4X2_CHUNKED 0" in header) == (c != 64)


@pytest.mark.parametrize("narrow, dilated_dead", [(False, False), (True, False), (False, True)])
def test_conv2d_s8_4x2_built_with_only_the_output_stages_it_takes(tmp_path, narrow, dilated_dead):
    """ek_nn.h leaves out the output stage forms no layer takes: the clamp after SSAT when no
    activation narrows [-128, 127] (NARROW 0), the SSAT-only form when every one does (WIDE 0), the
    generic stage when every record is a fast one (ANY 0: an even number of channels, shifts in
    -20..-2), the dilated gathers and the constant channels' loop when no layer is dilated or has a
    channel of zero weights (DILATED / CONSTANTS 0); the kernel so built is bit-exact on the M4.
    Narrow: the activation's bounds set to [-100, 100] (the reference clamps to the same)."""
    if shutil.which("qemu-system-arm") is None or shutil.which("arm-none-eabi-gcc") is None:
        pytest.skip("needs qemu-system-arm and arm-none-eabi-gcc (make setup)")
    from cortex_m_selftest import run_selftest
    from edgekit.codegen.kernel_prep import conv_4x2_generic, conv_4x2_narrow

    rng = np.random.default_rng(11)
    d = 2 if dilated_dead else 1
    case = dict(h=5, w=4, c=12, o=6, k=(3, 3), stride=(1, 1), dilation=(d, d), padding=(d, d, d, d), out=(5, 4),
                act="none", bias=True, wscale=0.3, dead=[2] if dilated_dead else [])
    q = _graph(case, rng)
    op = q.ops[0]
    if narrow:
        op.attrs["act_min"], op.attrs["act_max"] = -100, 100
    x = rng.integers(-128, 128, size=(2, 5, 4, 12)).astype(np.int8)
    got = run_selftest(q, "mps2-an386", x, tmp_path)
    header = (tmp_path / "project" / "include" / "ek_nn.h").read_text()
    assert conv_4x2_narrow(op) == narrow
    assert ("#define EK_CONV2D_S8_4X2_NARROW 0" in header) == (not narrow)
    assert ("#define EK_CONV2D_S8_4X2_WIDE 0" in header) == narrow
    assert ("#define EK_CONV2D_S8_4X2_ANY 0" in header) == (not conv_4x2_generic(q, op))
    assert ("#define EK_CONV2D_S8_4X2_DILATED 0" in header) == (not dilated_dead)
    assert ("#define EK_CONV2D_S8_4X2_CONSTANTS 0" in header) == (not dilated_dead)
    ref = reference.run(q, x)[0].reshape(len(x), -1)
    assert int(np.sum(got != ref)) == 0
