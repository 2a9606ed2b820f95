"""Generate-time decisions of the fast kernels: the input offset folded into the bias, its
overflow proof, and the planned scratch."""
import shutil

import numpy as np
import pytest

from edgekit.boards import load_board
from edgekit.codegen.kernel_prep import folded_bias
from edgekit.codegen.project import generate_project
from edgekit.errors import EdgekitError
from edgekit.passes.verify import ACCUMULATOR_LIMIT, LIMIT, accumulator_bounds, check_int8_arithmetic
from helpers import float_graph, quantize_with_random_data


def _fc(rng, n_in=8, n_out=4):
    g = float_graph("fully_connected", [(1, n_in)], dict(activation="none"),
                    {"w": rng.normal(0, 1, (n_out, n_in)), "b": rng.normal(0, 1, n_out)}, (1, n_out))
    return quantize_with_random_data(g, rng, {"x0": (0.0, 3.0)})


def test_folded_bias_is_bias_plus_offset_times_weight_sums():
    rng = np.random.default_rng(3)
    q = _fc(rng)
    op = q.ops[0]
    w = q.tensors[op.inputs[1]].data.astype(np.int64)
    b = q.tensors[op.inputs[2]].data.astype(np.int64)
    expected = b + op.attrs["input_offset"] * w.sum(axis=1)
    assert op.attrs["input_offset"] != 0
    assert np.array_equal(folded_bias(q, op), expected)


def test_depthwise_weight_sums_are_per_output_channel():
    rng = np.random.default_rng(4)
    g = float_graph("depthwise_conv2d", [(1, 5, 5, 3)], dict(stride=(1, 1), dilation=(1, 1), padding=(1, 1, 1, 1),
                                                             activation="relu", depth_multiplier=2),
                    {"w": rng.normal(0, 1, (1, 3, 3, 6))}, (1, 5, 5, 6))
    q = quantize_with_random_data(g, rng, {"x0": (0.0, 2.0)})
    op = q.ops[0]
    w = q.tensors[op.inputs[1]].data.astype(np.int64)
    b = q.tensors[op.inputs[2]].data.astype(np.int64)
    assert np.array_equal(folded_bias(q, op), b + op.attrs["input_offset"] * w.sum(axis=(0, 1, 2)))


def test_extreme_accumulators_stay_exact_with_the_folded_bias(tmp_path, cbuild):
    """A layer at the edge of the proof (weights all 127, zero point -128, a bias that takes the
    reference's bound to within 10 of the limit, 2^31 - 1 - 128) is accepted as before, and the folded kernels,
    which add the bias last, compute it exactly on inputs that reach the bound."""
    from edgekit import reference
    from helpers import c_matches_reference
    rng = np.random.default_rng(5)
    q = _fc(rng, n_in=64, n_out=2)
    op = q.ops[0]
    q.tensors[op.inputs[1]].data[:] = 127
    op.attrs["shift"][:] = -1
    op.attrs["input_offset"] = 128  # zero point -128: |q + offset| <= 255
    unfolded_without_bias = accumulator_bounds(q, op) - np.abs(q.tensors[op.inputs[2]].data.astype(np.int64))
    q.tensors[op.inputs[2]].data[:] = int(ACCUMULATOR_LIMIT - unfolded_without_bias[0] - 10)
    bounds = accumulator_bounds(q, op)
    assert np.all(bounds <= ACCUMULATOR_LIMIT) and np.all(bounds > ACCUMULATOR_LIMIT - 20)
    check_int8_arithmetic(q)
    assert np.all(np.abs(folded_bias(q, op).astype(np.int64)) <= LIMIT)
    x = np.array([[127] * 64, [-128] * 64, [0] * 64], np.int8)
    got, ref = c_matches_reference(q, tmp_path / "host", cbuild, {"x0": x})
    assert np.array_equal(got, ref)
    if shutil.which("qemu-system-arm") and shutil.which("arm-none-eabi-gcc"):  # the SMLAD kernels too
        from cortex_m_selftest import run_selftest
        assert np.array_equal(run_selftest(q, "mps2-an386", x, tmp_path / "m4"), reference.run(q, x)[0])


def test_a_bias_past_the_bound_is_refused(tmp_path):
    rng = np.random.default_rng(5)
    q = _fc(rng, n_in=64, n_out=2)
    op = q.ops[0]
    q.tensors[op.inputs[1]].data[:] = 127
    op.attrs["input_offset"] = 128
    q.tensors[op.inputs[2]].data[:] = ACCUMULATOR_LIMIT - 10  # past the limit once the weights add
    with pytest.raises(EdgekitError, match=r"layer 'op'.*output channel 0.*int32"):
        generate_project(q, tmp_path, "host")


def test_scratch_is_planned_per_board(tmp_path):
    rng = np.random.default_rng(6)
    g = float_graph("conv2d", [(1, 6, 6, 5)], dict(stride=(1, 1), dilation=(1, 1), padding=(1, 1, 1, 1),
                                                   activation="relu"),
                    {"w": rng.normal(0, 1, (4, 3, 3, 5))}, (1, 6, 6, 4))
    q = quantize_with_random_data(g, rng)
    k = 3 * 3 * 5
    # host: the VNNI tile's 4 u8 windows (or the AVX2 tile's 2 int16 ones) of K rounded up to whole groups of 4
    expect = {"mps2-an386": (4 * k + 7) // 8 * 8, "host": 4 * ((k + 3) // 4 * 4), "mps2-an385": 0,
              # rpi4's pair tile: 4 windows of 3 rows of 15 taps padded to 16, and 3 row offsets, to 16
              # bytes, then the padded copy of the 8x8x5 span and 16 spare bytes; rpi5: 4 windows of
              # 16-byte loads
              "rpi4": (4 * 3 * 16 + 4 * 3 + 15) // 16 * 16 + 8 * 8 * 5 + 16, "rpi5": 4 * ((k + 15) // 16 * 16)}
    for board, scratch in expect.items():
        record = generate_project(q, tmp_path / board, load_board(board))
        assert record["scratch_bytes"] == scratch, board
        model_c = (tmp_path / board / "model.c").read_text()
        assert (f"ek_kernel_scratch[{scratch // 4}]" in model_c) == (scratch > 0)


@pytest.mark.parametrize("group", [4, 1])
@pytest.mark.parametrize("out_c, k", [(1, 1), (5, 9), (16, 16), (17, 45), (40, 7), (64, 144)])
def test_tile_packing_is_the_filter_in_the_tile_order(out_c, k, group):
    """pack_conv_tile puts w[c][t] at block b (first channel sdot_block_starts[b]), group t // group,
    channel c - start, byte t % group; every other byte is zero (group 4: rpi5's SDOT tile, 1: rpi4's)."""
    from edgekit.codegen.kernel_prep import pack_conv_tile, sdot_block_starts
    w = np.random.default_rng(out_c * 100 + k).integers(-128, 128, (out_c, 1, 1, k)).astype(np.int8)
    packed = pack_conv_tile(w, group)
    starts, k4 = sdot_block_starts(out_c), (k + group - 1) // group
    assert packed.size == len(starts) * k4 * 16 * group
    assert starts[-1] + min(out_c, 16) == out_c and all(b - a == 16 for a, b in zip(starts, starts[1:-1]))
    tiles = packed.reshape(len(starts), k4, 16, group)
    for b, start in enumerate(starts):
        for j in range(16):
            got = tiles[b, :, j, :].reshape(-1)
            want = np.zeros(group * k4, np.int8)
            if start + j < out_c:
                want[:k] = w[start + j].reshape(-1)
            assert np.array_equal(got, want), (b, j)


@pytest.mark.parametrize("out_c, k", [(1, 1), (3, 9), (8, 36), (8, 40)])
def test_narrow_tile_packing_is_one_8_channel_block(out_c, k):
    """pack_conv_tile with block 8 (rpi5's narrow tile, out_c <= 8): per group of 4 taps the 8 channels'
    4 weights (32 bytes), zeros past K and past out_c; more than 8 channels refused."""
    from edgekit.codegen.kernel_prep import pack_conv_tile, sdot_narrow
    assert sdot_narrow(out_c) and not sdot_narrow(9)
    w = np.random.default_rng(out_c * 100 + k).integers(-128, 128, (out_c, 1, 1, k)).astype(np.int8)
    k4 = (k + 3) // 4
    tiles = pack_conv_tile(w, 4, 8).reshape(k4, 8, 4)
    for j in range(8):
        want = np.zeros(4 * k4, np.int8)
        if j < out_c:
            want[:k] = w[j].reshape(-1)
        assert np.array_equal(tiles[:, j, :].reshape(-1), want), j
    with pytest.raises(AssertionError):
        pack_conv_tile(np.zeros((9, 1, 1, 4), np.int8), 4, 8)


@pytest.mark.parametrize("out_c, kh, kw, in_c", [(1, 1, 1, 3), (8, 3, 3, 3), (9, 1, 1, 8), (16, 2, 2, 4), (17, 3, 5, 3),
                                                (5, 10, 4, 1)])
def test_pairs_packing_is_the_filter_in_the_pair_tile_order(out_c, kh, kw, in_c):
    """pack_conv_pairs: each window row of kw * in_c taps padded with zeros to a multiple of 4, then per
    block and group of 4 taps, channels 0-7 x taps (0, 1), channels 0-7 x taps (2, 3), then (16 channels)
    the same for channels 8-15, each channel's two weights side by side; a layer of at most 8 channels
    keeps only the first 32 bytes per group (rpi4's 8-channel tile)."""
    from edgekit.codegen.kernel_prep import pack_conv_pairs, sdot_block_starts
    w = np.random.default_rng(out_c * 100 + kh * kw * in_c).integers(-127, 128, (out_c, kh, kw, in_c)).astype(np.int8)
    packed = pack_conv_pairs(w)
    row4 = (kw * in_c + 3) // 4 * 4
    starts, groups, halves = sdot_block_starts(out_c), kh * row4 // 4, 1 if out_c <= 8 else 2
    assert packed.size == len(starts) * groups * halves * 32
    tiles = packed.reshape(len(starts), groups, halves, 2, 8, 2)  # block, group, channel half, tap pair, channel, tap
    for b, start in enumerate(starts):
        for c in range(8 * halves):
            want = np.zeros((kh, row4), np.int8)
            if start + c < out_c:
                want[:, :kw * in_c] = w[start + c].reshape(kh, -1)
            got = tiles[b, :, c // 8, :, c % 8, :].reshape(-1)
            assert np.array_equal(got, want.reshape(-1)), (b, c)


def test_cold_kernels_build_portable_and_for_size(tmp_path):
    """On Cortex-M a kernel whose layers do under 1 % of the work (here the classifier head) comes from
    its portable source and is built -Os; the hot convolution keeps the DSP variant and -O2; the host
    board keeps every variant. Bit-exactness on the emulated cores: test_cortex_m's demo models."""
    import torch

    import edgekit
    from edgekit import models
    torch.manual_seed(0)
    x = np.random.default_rng(0).normal(size=(8, 1, 49, 10)).astype(np.float32)
    g = edgekit.quantize(models.ds_cnn_kws(filters=16).eval(), x)
    rec = edgekit.generate(g, tmp_path / "m4", board="mps2-an386")
    # every convolution of this model (the first one over 1 channel too) runs ek_conv2d_s8_4x2
    assert "ek_fully_connected_s8" in rec["cold_kernels"] and "ek_conv2d_s8_4x2" not in rec["cold_kernels"]
    kernels = tmp_path / "m4" / "kernels"
    assert "ek_dsp.h" not in (kernels / "ek_fully_connected_s8.c").read_text()
    assert "ek_dsp.h" in (kernels / "ek_conv2d_s8_4x2.c").read_text()
    make = (tmp_path / "m4" / "Makefile").read_text()
    size_sources = next(l for l in make.splitlines() if l.startswith("SIZE_SOURCES ="))
    assert "kernels/ek_fully_connected_s8.c" in size_sources and "ek_protocol.c" in size_sources
    assert "kernels/ek_conv2d_s8_4x2.c" not in size_sources
    host = edgekit.generate(g, tmp_path / "host", board="host")
    assert host["cold_kernels"] == []
    if shutil.which("arm-none-eabi-gcc"):
        built = edgekit.build(tmp_path / "m4", stack="auto")
        assert built["stack_bound"] is not None  # the -Os objects' call-graph records are read too


@pytest.mark.parametrize("in_c, shift_zero, dropped", [
    (5, False, {"FALLBACK", "SHIFT_ANY"}),  # K = 45: the DSP path, every channel shift < 0
    (5, True, {"FALLBACK"}),  # a channel with shift 0: its output stage stays
    (1, False, {"SHIFT_ANY"}),  # a 1x1 convolution on one channel (K = 1 < 4): the portable loop stays
])
def test_dsp_paths_no_layer_reaches_are_left_out(tmp_path, in_c, shift_zero, dropped):
    """ek_nn.h turns off the DSP convolution's portable fallback and its output stage for shifts >= 0
    when no layer reaches them (kernel_prep.dsp_fallbacks_unused); the same checks as the kernel's.
    The random shapes of test_kernels_dsp run both states bit-exact on the emulated M4 / M7."""
    rng = np.random.default_rng(in_c)
    k = 3 if in_c > 1 else 1
    g = float_graph("conv2d", [(1, 6, 6, in_c)], dict(stride=(1, 1), dilation=(1, 1),
                                                      padding=(k // 2,) * 4, activation="relu"),
                    {"w": rng.normal(0, 1, (4, k, k, in_c))}, (1, 6, 6, 4))
    q = quantize_with_random_data(g, rng)
    assert np.max(q.ops[0].attrs["shift"]) < 0
    if shift_zero:
        q.ops[0].attrs["shift"] = np.array(q.ops[0].attrs["shift"]).copy()
        q.ops[0].attrs["shift"][1] = 0
    generate_project(q, tmp_path / "m4", load_board("mps2-an386"))
    header = (tmp_path / "m4" / "include" / "ek_nn.h").read_text()
    for path in ("FALLBACK", "SHIFT_ANY"):
        assert (f"#define EK_CONV2D_S8_{path} 0" in header) == (path in dropped), path
    generate_project(q, tmp_path / "host", load_board("host"))
    assert "EK_CONV2D_S8_FALLBACK" not in (tmp_path / "host" / "include" / "ek_nn.h").read_text()


def test_4x2_layers_store_no_quant_arrays(tmp_path):
    """ek_conv2d_s8_4x2 reads its requantization from its table: its layers store no multiplier /
    shift arrays (flash; bit-exact runs: test_kernels_dsp_4x2)."""
    rng = np.random.default_rng(12)
    g = float_graph("conv2d", [(1, 6, 6, 16)], dict(stride=(1, 1), dilation=(1, 1), padding=(1, 1, 1, 1),
                                                    activation="relu"),
                    {"w": rng.normal(0, 1, (8, 3, 3, 16))}, (1, 6, 6, 8))
    q = quantize_with_random_data(g, rng)
    rec = generate_project(q, tmp_path / "m4", load_board("mps2-an386"))
    assert rec["layers"][0]["kernel"] == "ek_conv2d_s8_4x2"
    assert "_multiplier" not in (tmp_path / "m4" / "model_weights.c").read_text()
    assert "_quant = { 0, 0 };" in (tmp_path / "m4" / "model.c").read_text()
    generate_project(q, tmp_path / "host", load_board("host"))
    assert "_multiplier" in (tmp_path / "host" / "model_weights.c").read_text()


def test_depthwise_dsp_records_requantize_like_the_reference():
    """kernel_prep.depthwise_dsp_records: per four channels {hs, biases, (m, c) each, per tap its
    weights as two words of int16 pairs (c0, c2), (c1, c3), per window column two words of its weights'
    sums}. For a group whose
    right shifts are all in 2..22 the kernel's stage (the high word of (c - [x < 0], 2^30 + [x < 0] 2^31)
    + x * m, shifted right by hs's byte, saturated) equals the reference requantization plus offset for
    any int32 accumulator; another shift (r = 1, 23) or a narrowing activation makes the group generic
    (hs = -1). On the boards: test_kernels_dsp_depthwise."""
    from edgekit import quant_math
    from edgekit.codegen.kernel_prep import DW_DSP_REC, depthwise_dsp_records, depthwise_dsp_takes_records
    rng = np.random.default_rng(21)
    g = float_graph("depthwise_conv2d", [(1, 5, 5, 14)], dict(stride=(1, 1), dilation=(1, 1), padding=(1, 1, 1, 1),
                                                              activation="relu", depth_multiplier=1),
                    {"w": rng.normal(0, 1, (1, 3, 3, 14)), "b": rng.normal(0, 1, 14)}, (1, 5, 5, 14))
    q = quantize_with_random_data(g, rng, {"x0": (-1.0, 2.0)})
    op = q.ops[0]
    assert depthwise_dsp_takes_records(op)
    op.attrs["shift"] = np.array([-2, -22, -5, -9, -1, -3, -4, -6, -7, -8, -23, -10, -11, -12], np.int32)
    op.attrs["multiplier"] = rng.integers(2 ** 30, 2 ** 31, 14).astype(np.int32)
    op.attrs["act_min"], op.attrs["act_max"] = -128, 127
    for offset in (-128, 37, 127):
        op.attrs["output_offset"] = offset
        rec = depthwise_dsp_records(q, op).astype(np.int64).reshape(-1, DW_DSP_REC + 24)
        assert rec.shape == (3, DW_DSP_REC + 24)  # 14 channels: three groups, the last two channels are the tail's
        assert np.array_equal(rec[:, 1:5].reshape(-1), folded_bias(q, op)[:12])
        w = q.tensors[op.inputs[1]].data.reshape(9, 14)  # (tap, channel)
        # per tap, int16 pairs (c0, c2), (c1, c3)
        halves = rec[:, DW_DSP_REC:DW_DSP_REC + 18].astype("<i4").view(np.int16).reshape(3, 9, 2, 2)
        words = halves.reshape(3, 9, 4)[:, :, [0, 2, 1, 3]]  # (group, tap, ch): c0, c2, c1, c3 reordered
        assert np.array_equal(words.transpose(1, 0, 2).reshape(9, 12), w[:, :12])
        # per window column its weights' sums over the rows, int16 pairs (c0, c2), (c1, c3)
        pairs = rec[:, DW_DSP_REC + 18:].astype("<i4").view(np.int16).reshape(3, 3, 2, 2)  # (group, kx, word, half)
        col = w.reshape(3, 3, 14).astype(np.int64).sum(axis=0)  # (kx, channel)
        for grp in range(3):
            for kx in range(3):
                c0 = 4 * grp
                assert pairs[grp, kx].tolist() == [[col[kx, c0], col[kx, c0 + 2]], [col[kx, c0 + 1], col[kx, c0 + 3]]]
        assert list(rec[:, 0] < 0) == [False, True, True]  # r = 1 in group 1, r = 23 in group 2
        # a layer without unrolled code (tap-table path, weights from the filter): the stage words alone
        short = depthwise_dsp_records(q, op, unrolled=False).astype(np.int64)
        assert np.array_equal(short, rec[:, :DW_DSP_REC].reshape(-1))
        x = np.concatenate([rng.integers(-2 ** 31, 2 ** 31, 2000), [-2 ** 31 + 1, 2 ** 31 - 1, -1, 0, 1]])
        for k in range(4):
            m, c, hs = int(rec[0, 5 + 2 * k]), int(rec[0, 6 + 2 * k]), (int(rec[0, 0]) >> (8 * k)) & 0xFF
            got = [max(-128, min(127, ((((c - (v < 0)) << 32) + (1 << 30) + (v < 0) * (1 << 31) + v * m) >> 32) >> hs))
                   for v in x.tolist()]
            want = np.clip(quant_math.multiply_by_quantized_multiplier(x, m, int(op.attrs["shift"][k])) + offset,
                           -128, 127)
            assert got == want.tolist()
    op.attrs["shift"] = np.full(14, -5, np.int32)
    assert np.all(depthwise_dsp_records(q, op).reshape(-1, DW_DSP_REC + 24)[:, 0] >= 0)
    op.attrs["act_min"] = -100  # a bound that narrows int8: the generic stage clamps it
    assert np.all(depthwise_dsp_records(q, op).reshape(-1, DW_DSP_REC + 24)[:, 0] == -1)


@pytest.mark.skipif(shutil.which("arm-none-eabi-gcc") is None, reason="needs arm-none-eabi-gcc")
def test_dsp_kernels_compile_at_every_optimization_level(tmp_path):
    """A user's build of the model as a library may use any -O (CMake's Debug is -O0): the DSP kernels'
    inline asm, which takes up to 14 registers, must compile at each of them on the M4 and the M7
    (ek_dsp.h compiles them optimized at -O0, where gcc keeps r7 as the frame pointer)."""
    import subprocess

    import torch

    import edgekit
    from edgekit import models
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    projects = {
        "dscnn": (models.ds_cnn_kws(filters=16), (8, 1, 49, 10)),  # 4x2 convolutions, unrolled depthwise
        "res": (models.DigitsResCNN(), (8, 1, 8, 8)),  # residual adds
        "mlp": (models.digits_mlp(), (8, 64)),  # fully connected rows of four
    }
    kernels = set()
    for name, (model, shape) in projects.items():
        g = edgekit.quantize(model.eval(), rng.normal(size=shape).astype(np.float32))
        edgekit.generate(g, tmp_path / name, board="mps2-an386")
        kernels |= {(name, p.name) for p in (tmp_path / name / "kernels").glob("*.c")
                    if "ek_dsp.h" in p.read_text()}
    assert {k for _, k in kernels} >= {"ek_conv2d_s8_4x2.c", "ek_depthwise_conv2d_s8.c", "ek_add_s8.c",
                                        "ek_fully_connected_s8_rows4.c"}
    cpus = {"cortex-m4": "-mfpu=fpv4-sp-d16", "cortex-m7": "-mfpu=fpv5-d16"}
    for name, kernel in sorted(kernels):
        project = tmp_path / name
        for cpu, fpu in cpus.items():
            for opt in ("-O0", "-Og", "-O1", "-Os", "-O3"):
                cmd = ["arm-none-eabi-gcc", "-mthumb", f"-mcpu={cpu}", fpu, "-mfloat-abi=hard", opt,
                       "-std=c99", "-Wall", "-Wextra", "-Werror", f"-I{project / 'include'}", f"-I{project}",
                       "-c", str(project / "kernels" / kernel), "-o", str(tmp_path / "k.o")]
                run = subprocess.run(cmd, capture_output=True, text=True)
                assert run.returncode == 0, f"{kernel} ({name}) at {opt} on {cpu}:\n{run.stderr[-2000:]}"
