"""The Pi NEON add's fast path (kernels/neon/ek_add_s8: an operand of multiplier 1/2 rescaled by a shift
and accumulated with SMLAL, the others by SHLL + SQRDMULH + a one-instruction rounding fix-up) and the
general path it falls back to, on both Pi CPUs: cross-built with UBSan, run under qemu-aarch64
(-cpu cortex-a72 / cortex-a76), bit-exact with the numpy reference. The layer's parameters are drawn
directly (not only what the quantizer gives): every operand kind on either side, left shifts 16..22 and
outside the fast path's range, offsets at the ends of int8's zero points, output shifts right and left,
clamps, broadcasting, runs with tails, inputs at -128 and 127."""
import shutil

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from edgekit.boards import load_board
from edgekit.codegen.kernel_prep import DW_PAD_COPY_MAX
from edgekit.codegen.project import generate_project
from helpers import conv_out, float_graph, quantize_with_random_data
from test_kernels_c import SETTINGS
from test_rpi import CrossBuild, run_layer_on_pi as run_on_pi

pytestmark = pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None or shutil.which("qemu-aarch64") is None,
                                reason="needs aarch64-linux-gnu-gcc and qemu-aarch64 (scripts/setup.sh)")

# a fifth of the kernel examples (5 by default) plus the explicit ones
ADD_SETTINGS = settings(SETTINGS, max_examples=max(3, SETTINGS.max_examples // 5))
HALF = 1 << 30  # the multiplier 1/2 TFLite gives the input of the larger scale


@pytest.fixture(scope="module")
def xbuild(tmp_path_factory):
    return CrossBuild(tmp_path_factory.mktemp("aarch64_add_dw"))


@st.composite
def operand(draw, left_shift):
    """One input's (offset, multiplier, shift): 'half' (1/2 after a right shift: the shifted fast path),
    'scaled' (right shift >= 1), 'plain' (shift 0 or left: the general path). The left shift plus a
    positive shift stays <= 21, as TFLite's (20 and shift <= 0) do: the int32 sums cannot overflow."""
    kind = draw(st.sampled_from(["half", "scaled", "scaled", "plain"]))
    offset = draw(st.sampled_from([-127, 128, 0])) if draw(st.booleans()) else draw(st.integers(-127, 128))
    if kind == "half":
        return offset, HALF, -draw(st.integers(0, 3))
    multiplier = draw(st.integers(HALF, (1 << 31) - 1))
    if kind == "scaled":
        return offset, multiplier, -draw(st.integers(1, 8))
    return offset, multiplier, draw(st.integers(0, max(0, 21 - left_shift)))


@st.composite
def add_case(draw):
    shape = (1, draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.sampled_from([1, 7, 16, 17, 40])))
    other = tuple(1 if i > 0 and draw(st.booleans()) else d for i, d in enumerate(shape))
    left_shift = draw(st.sampled_from([20, 20, 16, 18, 21, 15]))
    o1, m1, s1 = draw(operand(left_shift))
    o2, m2, s2 = draw(operand(left_shift))
    full = draw(st.booleans())
    lo = -128 if full else draw(st.integers(-128, 0))
    hi = 127 if full else draw(st.integers(lo, 127))
    attrs = dict(input1_offset=o1, input2_offset=o2, output_offset=draw(st.integers(-128, 127)), left_shift=left_shift,
                 input1_multiplier=m1, input1_shift=s1, input2_multiplier=m2, input2_shift=s2,
                 output_multiplier=draw(st.integers(HALF, (1 << 31) - 1)),
                 output_shift=draw(st.sampled_from([-20, -19, -17, -12, -1, 0, 1])) if left_shift == 20 else
                 -draw(st.integers(max(1, left_shift - 8), left_shift + 2)),
                 act_min=lo, act_max=hi)
    return dict(shape=shape, other=other, swap=draw(st.booleans()), attrs=attrs, extremes=draw(st.booleans()),
                seed=draw(st.integers(0, 2 ** 31)))


def add_graph(case, rng, kind="add"):
    shapes = [case["other"], case["shape"]] if case["swap"] else [case["shape"], case["other"]]
    g = float_graph(kind, shapes, dict(activation="none"), None, case["shape"])
    q = quantize_with_random_data(g, rng, {"x0": (-1.0, 1.0), "x1": (-2.0, 2.0)})
    (op,) = [op for op in q.ops if op.kind == kind]
    op.attrs.update(case["attrs"])
    return q


def add_inputs(q, rng, n: int, extremes: bool) -> dict:
    xs = {name: rng.integers(-128, 128, size=(n,) + q.tensors[name].shape[1:]).astype(np.int8) for name in q.inputs}
    if extremes:  # the ends of int8 in every combination
        for i, (a, b) in enumerate([(-128, -128), (127, 127), (-128, 127), (127, -128)]):
            xs[q.inputs[0]][i], xs[q.inputs[1]][i] = a, b
    return xs


@given(add_case(), st.sampled_from(["rpi4", "rpi5"]))
@ADD_SETTINGS
@example(  # ResNet-8's residual add: the scaled input first, the half one second, relu at -128
    dict(shape=(1, 4, 4, 16), other=(1, 4, 4, 16), swap=False, extremes=True, seed=1,
         attrs=dict(input1_offset=128, input2_offset=-4, output_offset=-128, left_shift=20,
                    input1_multiplier=1623821475, input1_shift=-2, input2_multiplier=HALF, input2_shift=0,
                    output_multiplier=1098017566, output_shift=-17, act_min=-128, act_max=127)), "rpi5")
@example(  # the half input first (swapped into second place), offsets at both ends
    dict(shape=(1, 3, 5, 17), other=(1, 3, 5, 17), swap=False, extremes=True, seed=2,
         attrs=dict(input1_offset=-127, input2_offset=128, output_offset=5, left_shift=20,
                    input1_multiplier=HALF, input1_shift=-1, input2_multiplier=(1 << 31) - 1, input2_shift=-1,
                    output_multiplier=(1 << 31) - 1, output_shift=-12, act_min=-100, act_max=90)), "rpi4")
@example(  # both half (equal scales), a channel broadcast
    dict(shape=(1, 2, 3, 40), other=(1, 2, 3, 1), swap=True, extremes=True, seed=3,
         attrs=dict(input1_offset=128, input2_offset=128, output_offset=-128, left_shift=20,
                    input1_multiplier=HALF, input1_shift=0, input2_multiplier=HALF, input2_shift=0,
                    output_multiplier=HALF, output_shift=-19, act_min=-128, act_max=127)), "rpi5")
@example(  # an output that shifts left: the general path
    dict(shape=(1, 2, 2, 16), other=(1, 2, 2, 16), swap=False, extremes=True, seed=4,
         attrs=dict(input1_offset=3, input2_offset=-9, output_offset=0, left_shift=20,
                    input1_multiplier=HALF + 12345, input1_shift=-1, input2_multiplier=HALF, input2_shift=0,
                    output_multiplier=(1 << 31) - 1, output_shift=1, act_min=-128, act_max=127)), "rpi4")
def test_add_fast_and_general_paths(xbuild, case, board):
    rng = np.random.default_rng(case["seed"])
    q = add_graph(case, rng)
    run_on_pi(q, add_inputs(q, rng, 6, case["extremes"]), xbuild, board)


@given(add_case(), st.sampled_from(["rpi4", "rpi5"]))
@ADD_SETTINGS
@example(  # the half input second: SMLSL subtracts it
    dict(shape=(1, 4, 4, 16), other=(1, 4, 4, 16), swap=False, extremes=True, seed=5,
         attrs=dict(input1_offset=128, input2_offset=-4, output_offset=-128, left_shift=20,
                    input1_multiplier=1623821475, input1_shift=-2, input2_multiplier=HALF, input2_shift=0,
                    output_multiplier=1098017566, output_shift=-17, act_min=-128, act_max=127)), "rpi5")
@example(  # the half input first (no swap for SUB: the 'hs' walk), offsets at both ends
    dict(shape=(1, 3, 5, 17), other=(1, 3, 5, 17), swap=False, extremes=True, seed=6,
         attrs=dict(input1_offset=-127, input2_offset=128, output_offset=5, left_shift=20,
                    input1_multiplier=HALF, input1_shift=-1, input2_multiplier=(1 << 31) - 1, input2_shift=-1,
                    output_multiplier=(1 << 31) - 1, output_shift=-12, act_min=-100, act_max=90)), "rpi4")
@example(  # both half (equal scales), a channel broadcast of the first operand
    dict(shape=(1, 2, 3, 40), other=(1, 2, 3, 1), swap=True, extremes=True, seed=7,
         attrs=dict(input1_offset=128, input2_offset=-127, output_offset=0, left_shift=20,
                    input1_multiplier=HALF, input1_shift=0, input2_multiplier=HALF, input2_shift=0,
                    output_multiplier=HALF, output_shift=-19, act_min=-128, act_max=127)), "rpi5")
@example(  # both scaled
    dict(shape=(1, 2, 2, 33), other=(1, 2, 2, 33), swap=False, extremes=True, seed=8,
         attrs=dict(input1_offset=3, input2_offset=-9, output_offset=7, left_shift=20,
                    input1_multiplier=HALF + 12345, input1_shift=-1, input2_multiplier=(1 << 31) - 7, input2_shift=-3,
                    output_multiplier=(1 << 31) - 1, output_shift=-18, act_min=-128, act_max=127)), "rpi4")
def test_sub_fast_and_general_paths(xbuild, case, board):
    """SUB is ADD's NEON template with the second operand subtracted (kernels/neon/ek_sub_s8): every
    operand kind on either side (no swap), the general path, broadcasting, clamps, int8's extremes."""
    rng = np.random.default_rng(case["seed"])
    q = add_graph(case, rng, "sub")
    run_on_pi(q, add_inputs(q, rng, 6, case["extremes"]), xbuild, board)

# The fast path's pieces against the scalar ek_requantize, lane by lane: the whole output of a layer
# rarely shows an off-by-one in an operand's rescale (2^-17 of an output step), so the operand and
# output rescales are compared directly, on all 256 int8 inputs and on random sums.
RESCALE_MAIN = r"""
#include <stdio.h>
#include "kernels/ek_add_s8.c"
int32_t ek_kernel_scratch[2];
const int32_t ek_kernel_scratch_bytes = 8;
/* stdin: records (kind, offset, left_shift, multiplier, shift, s[16]); kind 0: an operand over the
 * 256 int8 values; kind 1: the output rescale of the 16 sums s (left_shift unused).
 * stdout per record: the fast path's kind (-1: general path, nothing compared), then pairs (scalar, vector). */
int main(void)
{
    int32_t r[21];
    while (fread(r, sizeof r, 1, stdin) == 1) {
        int32_t pairs[512], n = 0;
        int32_t kind = -1;
        if (r[0] == 0) {
            int16_t factor = 0, shift16 = 0;
            kind = ek_add_operand_kind(r[1], r[2], r[3], r[4], &factor, &shift16);
            for (int32_t base = -128; kind >= 0 && base < 128; base += 16) {
                int8_t x[16];
                int32_t got[16];
                for (int i = 0; i < 16; ++i) {
                    x[i] = (int8_t)(base + i);
                }
                int16x8_t w[2];
                int32x4_t v[4] = {vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0)};
                ek_add_int16(vld1q_s8(x), vdupq_n_s16((int16_t)r[1]), vdupq_n_s16(shift16), w);
                if (kind == 1) {
                    ek_add_scaled(w, vdupq_n_s32(r[3]), vdupq_n_s32(r[4]), v);
                } else {
                    ek_add_shifted(w, factor, v);
                }
                for (int k = 0; k < 4; ++k) {
                    vst1q_s32(got + 4 * k, v[k]);
                }
                for (int i = 0; i < 16; ++i) {
                    pairs[n++] = ek_requantize((int32_t)((uint32_t)(x[i] + r[1]) << r[2]), r[3], r[4]);
                    pairs[n++] = got[i];
                }
            }
        } else if (r[4] <= -1) {
            kind = 1;
            for (int k = 0; k < 4; ++k) {
                int32_t got[4];
                vst1q_s32(got, ek_neon_divide_pot4_right(vqrdmulhq_s32(vld1q_s32(r + 5 + 4 * k), vdupq_n_s32(r[3])),
                                                         vdupq_n_s32(r[4])));
                for (int i = 0; i < 4; ++i) {
                    pairs[n++] = ek_requantize(r[5 + 4 * k + i], r[3], r[4]);
                    pairs[n++] = got[i];
                }
            }
        }
        fwrite(&kind, sizeof kind, 1, stdout);
        fwrite(&n, sizeof n, 1, stdout);
        fwrite(pairs, sizeof pairs[0], (size_t)n, stdout);
    }
    return 0;
}
"""


@pytest.fixture(scope="module")
def rescale_exes(tmp_path_factory):
    import subprocess
    from test_rpi import CHECKS
    rng = np.random.default_rng(0)
    g = float_graph("add", [(1, 1, 1, 16), (1, 1, 1, 16)], dict(activation="none"), None, (1, 1, 1, 16))
    q = quantize_with_random_data(g, rng)
    exes = {}
    for name in ("rpi4", "rpi5"):
        board = load_board(name)
        d = tmp_path_factory.mktemp(f"add_rescale_{name}")
        generate_project(q, d, board, threads=1)
        (d / "rescale.c").write_text(RESCALE_MAIN)
        subprocess.run([board["cc"], *board["cflags"], *CHECKS, "-I", str(d / "include"), "-I", str(d),
                        str(d / "rescale.c"), "-o", str(d / "rescale")], check=True, capture_output=True, text=True)
        exes[name] = (d / "rescale", board["qemu"]["cpu"])
    return exes


@st.composite
def rescale_record(draw):
    """An operand (kind 0) of any offset, left shift 14..23, multiplier (1/2 often) and shift; or an
    output rescale (kind 1) of 16 sums within +-2^30 (two operands' worth), sums near ties included."""
    kind = draw(st.integers(0, 1))
    multiplier = HALF if draw(st.booleans()) else draw(st.integers(HALF, (1 << 31) - 1))
    shift = -draw(st.integers(0, 10)) if kind == 0 else -draw(st.integers(1, 24))
    left = draw(st.integers(14, 23))
    s = [draw(st.integers(-(1 << 30), 1 << 30)) for _ in range(8)]
    # with the multiplier 1/2, sums whose SQRDMULH result (s / 2) lies exactly half-way between two
    # steps of the right shift (where the fix-up for negative values decides)
    tie = 1 << max(0, -shift - 1)
    s += [draw(st.sampled_from([-2, 2])) * (2 * draw(st.integers(0, 1000)) + 1) * tie for _ in range(8)]
    s = [max(-(1 << 30), min(1 << 30, v)) for v in s]
    return [kind, draw(st.integers(-128, 128)), left, multiplier, shift] + s


@given(st.lists(rescale_record(), min_size=1, max_size=40), st.sampled_from(["rpi4", "rpi5"]))
@settings(SETTINGS, max_examples=max(10, SETTINGS.max_examples // 2))
@example([[0, 128, 20, 1623821475, -2] + [0] * 16, [0, -127, 20, HALF, 0] + [0] * 16,
          [0, 128, 20, HALF, -3] + [0] * 16, [1, 0, 0, HALF, -17] + [-(3 << 16), 3 << 16] * 8,
          [1, 0, 0, HALF, -1] + [-3, -1, 1, 3] * 4], "rpi4")
def test_add_rescales_equal_scalar(rescale_exes, records, board):
    """ek_add_operand_kind's fast rescales (shifted: (x + offset) << t via SMLAL; scaled: SHLL, SQRDMULH,
    rounding shift with the SSRA fix-up) and the output's equal ek_requantize on every input they take;
    operands outside the fast path's range must be refused (-1), never computed differently."""
    import subprocess
    exe, cpu = rescale_exes[board]
    proc = subprocess.run(["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu", "-cpu", cpu, str(exe)],
                          input=np.array(records, dtype=np.int32).tobytes(), capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    assert b"runtime error" not in proc.stderr, proc.stderr.decode()[-3000:]
    out, pos = np.frombuffer(proc.stdout, np.int32), 0
    for rec in records:
        kind, n = int(out[pos]), int(out[pos + 1])
        pairs = out[pos + 2:pos + 2 + n].reshape(-1, 2)
        pos += 2 + n
        if rec[0] == 0:
            offset, left, mult, shift = rec[1:5]
            fast = abs(offset) <= 128 and 1 <= left <= 22 and (
                (mult == HALF and shift <= 0 and left - 1 + shift >= 0 and left - 1 + shift <= 21) or
                (shift <= -1 and left >= 16))
            assert (kind >= 0) == fast, (rec[:5], kind)
            if fast:
                assert n == 512
        assert np.array_equal(pairs[:, 0], pairs[:, 1]), (rec[:5], pairs[pairs[:, 0] != pairs[:, 1]][:4])


def depthwise_extremes(q, rng, minus128: bool, stage: str):
    """Two channels' 3x3 taps set to +-127 (against -128 inputs: the largest int16 pair sums, 2 * 127 * 128),
    with ``minus128`` one weight -128 (the layer must keep the one-product kernel); ``stage`` forces the output
    stage's form in one channel: "right1" leaves the quantizer's shifts (all right by >= 1 here), "right" a
    shift of 0, "any" a left shift of 1, each with a multiplier small enough for outputs inside int8."""
    (op,) = [op for op in q.ops if op.kind == "depthwise_conv2d"]
    w = q.tensors[op.inputs[1]].data  # (1, 3, 3, c)
    extreme = rng.choice(w.shape[3], size=min(2, w.shape[3]), replace=False)
    for ch in extreme:
        w[..., ch] = np.where(rng.random(w.shape[:3]) < 0.5, -127, 127)
    if minus128:
        w[0, rng.integers(3), rng.integers(3), rng.integers(w.shape[3])] = -128
    if stage != "right1":  # with a small multiplier, so that the channel's outputs do not all saturate
        ch = extreme[0]  # sums of either sign
        op.attrs["shift"], op.attrs["multiplier"] = op.attrs["shift"].copy(), op.attrs["multiplier"].copy()
        op.attrs["shift"][ch] = 0 if stage == "right" else 1
        op.attrs["multiplier"][ch] = rng.integers(1 << 18, 1 << 20) >> op.attrs["shift"][ch]
    return op


@given(st.integers(1, 7), st.integers(1, 9), st.sampled_from([8, 12, 16, 17, 24, 40]),
       st.tuples(*(st.integers(0, 1) for _ in range(4))), st.integers(1, 2), st.integers(1, 2),
       st.sampled_from(["none", "relu", "relu6"]), st.booleans(), st.sampled_from(["right1", "right1", "right", "any"]),
       st.sampled_from(["rpi4", "rpi5"]), st.integers(0, 2 ** 31))
@ADD_SETTINGS
@example(5, 6, 16, (1, 1, 1, 1), 1, 1, "none", False, "right1", "rpi4", 1)
@example(4, 5, 12, (1, 1, 1, 1), 2, 1, "none", False, "right", "rpi5", 2)  # 8-channel groups
@example(6, 6, 24, (1, 0, 1, 0), 1, 2, "relu6", True, "any", "rpi5", 3)  # -128: the one-product kernel
@example(3, 9, 40, (0, 1, 0, 1), 2, 1, "none", False, "any", "rpi4", 4)
@example(5, 7, 8, (1, 1, 1, 1), 1, 1, "relu6", False, "right1", "rpi5", 5)  # 8 channels: pixel pairs, an odd last
@example(6, 8, 8, (0, 0, 0, 0), 1, 2, "none", False, "right", "rpi4", 6)  # pairs read in place (no padding)
@example(7, 9, 16, (0, 0, 0, 0), 2, 1, "relu", False, "right1", "rpi4", 7)  # in place, stride 2
def test_depthwise_3x3_pairs_and_output_stages(xbuild, h, w, c, padding, stride, dilation, act, minus128, stage,
                                               board, seed):
    """ek_depthwise_conv2d_s8_pairs' 3x3 groups (16 and 8 lanes, four tap pairs summed in int16 and one
    single tap; the register-planned loop, with and without a clamp, and the C loops) and the three output
    stages of the 3x3 groups, interior and border pixels, strides, dilation; every sample's first input all -128. A -128 weight keeps ek_depthwise_conv2d_s8 and says
    so in the project's notes."""
    rng = np.random.default_rng(seed)
    out = conv_out(h, w, (3, 3), (stride, stride), (dilation, dilation), padding)
    if out[0] < 1 or out[1] < 1:
        padding = (padding[0] + 3 * dilation, padding[1], padding[2] + 3 * dilation, padding[3])
        out = conv_out(h, w, (3, 3), (stride, stride), (dilation, dilation), padding)
    attrs = dict(stride=(stride, stride), dilation=(dilation, dilation), padding=padding, activation=act,
                 depth_multiplier=1)
    g = float_graph("depthwise_conv2d", [(1, h, w, c)], attrs,
                    {"w": rng.normal(0, 1, (1, 3, 3, c)), "b": rng.normal(0, 1, c)}, (1, *out, c))
    q = quantize_with_random_data(g, rng, {"x0": (-1.0, 4.0)})
    op = depthwise_extremes(q, rng, minus128, stage)
    if act == "relu6":  # a clamp inside int8 (the quantizer's relu / relu6 ranges give [-128, 127])
        op.attrs["act_min"], op.attrs["act_max"] = max(int(op.attrs["act_min"]), -90), min(int(op.attrs["act_max"]), 90)
    x = rng.integers(-128, 128, size=(6, h, w, c)).astype(np.int8)
    x[0] = -128
    _, record = run_on_pi(q, x, xbuild, board, threads=1)
    assert record["layers"][0]["kernel"] == ("ek_depthwise_conv2d_s8" if minus128 else "ek_depthwise_conv2d_s8_pairs")
    assert any("-128" in n for n in record["notes"]) == minus128


@pytest.mark.parametrize("board,c,stride,dilation", [("rpi4", 16, 1, 1), ("rpi5", 8, 1, 2), ("rpi5", 24, 2, 1)])
def test_depthwise_3x3_bands(xbuild, board, c, stride, dilation):
    """A 3x3 layer whose padded input is larger than the scratch the kernel may take for it
    (kernel_prep.DW_PAD_COPY_MAX): the kernel copies and runs it in bands of output rows (the rows
    between bands read twice), 8 channels as pixel pairs, a dilation, a stride."""
    rng = np.random.default_rng(c + stride)
    h, w = 40, 2 * (130 // c) * 8 + 1
    padding = (1, 1, 1, 1)
    out = conv_out(h, w, (3, 3), (stride, stride), (dilation, dilation), padding)
    attrs = dict(stride=(stride, stride), dilation=(dilation, dilation), padding=padding, activation="relu",
                 depth_multiplier=1)
    g = float_graph("depthwise_conv2d", [(1, h, w, c)], attrs,
                    {"w": rng.normal(0, 1, (1, 3, 3, c)), "b": rng.normal(0, 1, c)}, (1, *out, c))
    q = quantize_with_random_data(g, rng, {"x0": (-1.0, 4.0)})
    x = rng.integers(-128, 128, size=(2, h, w, c)).astype(np.int8)
    _, record = run_on_pi(q, x, xbuild, board, threads=1)
    cols = (out[1] - 1) * stride + 2 * dilation + 1
    every_row = ((out[0] - 1) * stride + 2 * dilation + 1) * cols * c
    assert record["scratch_bytes"] == DW_PAD_COPY_MAX < every_row  # more than one band
