"""The Cortex-M DSP kernels (kernels/dsp: SMLAD / SXTB16 through ACLE intrinsics) on the emulated
M4 (mps2-an386) and M7 (mps2-an500): each example is generated for the board, built with
arm-none-eabi-gcc -Wall -Wextra -Werror as self-test firmware with the inputs baked in, run under
QEMU, and compared with the numpy reference: 0 differing elements. Shapes and parameters are random
(hypothesis), so the tails (K % 4, odd pixels and channels), padding and the portable fallbacks
(depth multiplier > 1) are all reached."""
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cortex_m_selftest import run_selftest
from edgekit import reference
from helpers import float_graph, quantize_with_random_data, tiny_quantized_fc
from test_kernels_c import SETTINGS, activations, conv_case, conv_case_graph, input_range, observers, pool_case

pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(shutil.which("qemu-system-arm") is None or shutil.which("arm-none-eabi-gcc") is None,
                                 reason="needs qemu-system-arm and arm-none-eabi-gcc (make setup)")]

DSP_SETTINGS = settings(SETTINGS, max_examples=max(4, int(os.environ.get("EDGEKIT_DSP_EXAMPLES", "10"))))

HOST_DSP_BOARD = """# The host, rendering the Cortex-M DSP kernel folder: without the DSP extension every kernel there
# compiles its portable code (the 4x2 convolution and the rows-of-four fully connected their loops over
# the packed filter and records), so those can run on the host under ASan / UBSan.
name = "host-dsp-portable"
description = "host process built from kernels/dsp (their portable paths)"
kind = "host"
templates = ["host", "runtime"]
cc = "cc"
cflags = ["-O2"]
kernel_variant = "dsp"
"""

BOARDS = st.sampled_from(["mps2-an386", "mps2-an386", "mps2-an500"])  # mostly the M4, the M7 too


def _check_on_board(g, rng, board, ranges=None, observer="minmax", n=6, shift_zero=None, extra_cflags=()):
    q = quantize_with_random_data(g, rng, ranges, observer)
    if shift_zero is not None:  # these channels' scale in [0.5, 1): the kernels' generic output stage
        for op in q.ops:
            if "shift" in op.attrs:
                op.attrs["shift"] = np.array(op.attrs["shift"]).copy()
                op.attrs["shift"][shift_zero] = 0
    name = q.inputs[0]
    x = rng.integers(-128, 128, size=(n,) + q.tensors[name].shape[1:]).astype(np.int8)
    with tempfile.TemporaryDirectory() as tmp:
        got = run_selftest(q, board, x, Path(tmp), extra_cflags=extra_cflags)
        kernel_dir = Path(tmp) / "project" / "kernels"
        assert all("ek_dsp.h" in p.read_text() for p in kernel_dir.glob("*.c"))  # the DSP variants
    ref = reference.run(q, x)[0].reshape(n, -1)
    diff = int(np.sum(got != ref))
    assert diff == 0, f"{board}: {diff} of {got.size} elements differ; first at {np.argwhere(got != ref)[:3].tolist()}"


@given(conv_case(), BOARDS)
@DSP_SETTINGS
def test_conv2d_s8_dsp(case, board):
    rng = np.random.default_rng(case["seed"])
    g = conv_case_graph(case, rng)
    _check_on_board(g, rng, board, {"x0": case["rng"]}, case["observer"])


@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 40), st.integers(1, 20), activations,
       st.integers(0, 2 ** 31), BOARDS)
@DSP_SETTINGS
def test_pointwise_conv2d_s8_dsp(h, w, c, o, act, seed, board):
    """1x1 convolutions (the DS-CNN's bulk) over wide channels: the matrix-product path."""
    rng = np.random.default_rng(seed)
    weights = {"w": rng.normal(0, 0.5, (o, 1, 1, c)), "b": rng.normal(0, 0.5, o)}
    attrs = dict(stride=(1, 1), dilation=(1, 1), padding=(0, 0, 0, 0), activation=act)
    g = float_graph("conv2d", [(1, h, w, c)], attrs, weights, (1, h, w, o))
    _check_on_board(g, rng, board, {"x0": (-1.5, 2.0)})


@given(conv_case(depthwise=True), BOARDS)
@DSP_SETTINGS
def test_depthwise_conv2d_s8_dsp(case, board):
    rng = np.random.default_rng(case["seed"])
    g = conv_case_graph(case, rng, depthwise=True)
    _check_on_board(g, rng, board, {"x0": case["rng"]}, case["observer"])


@given(st.integers(1, 80), st.integers(1, 72), activations, st.booleans(), st.floats(0.01, 2.0), input_range(),
       observers, st.integers(0, 2 ** 31), BOARDS)
@DSP_SETTINGS
def test_fully_connected_s8_dsp(n_in, n_out, act, bias, wscale, in_range, observer, seed, board):
    rng = np.random.default_rng(seed)
    weights = {"w": rng.normal(0, wscale, (n_out, n_in))}
    if bias:
        weights["b"] = rng.normal(0, wscale, n_out)
    g = float_graph("fully_connected", [(1, n_in)], dict(activation=act), weights, (1, n_out))
    _check_on_board(g, rng, board, {"x0": in_range}, observer)


@given(pool_case(), st.integers(1, 4), BOARDS)
@DSP_SETTINGS
def test_max_pool2d_s8_dsp(case, widen, board):
    """Four channels per word (SSUB8 / SEL), the last 1-3 channels scalar, padding and fused clamps."""
    rng = np.random.default_rng(case["seed"])
    c = case["shape"][3] * widen + (widen - 1)  # 1 .. 27 channels: whole words and tails
    shape, out = (*case["shape"][:3], c), (*case["out"][:3], c)
    g = float_graph("max_pool2d", [shape], case["attrs"], None, out)
    _check_on_board(g, rng, board, {"x0": case["rng"]})


@given(pool_case(), st.integers(1, 4), BOARDS)
@DSP_SETTINGS
def test_avg_pool2d_s8_dsp(case, widen, board):
    """SXTAB16 lane sums four channels a word, the last 1-3 channels scalar; padding counted or not,
    strides, fused clamps, windows that span the input's width (one run of pixels) and those that do not."""
    rng = np.random.default_rng(case["seed"])
    c = case["shape"][3] * widen + (widen - 1)  # 1 .. 27 channels: whole words and tails
    shape, out = (*case["shape"][:3], c), (*case["out"][:3], c)
    g = float_graph("avg_pool2d", [shape], case["attrs"], None, out)
    _check_on_board(g, rng, board, {"x0": case["rng"]})


@pytest.mark.parametrize("h, w, c, kernel, stride, board", [
    (25, 5, 64, (25, 5), (1, 1), "mps2-an386"),  # a global pool (a DS-CNN's): one run of 125 pixels
    (23, 19, 9, (23, 19), (1, 1), "mps2-an500"),  # 437 values a lane: emptied into int32 after 256
    (20, 21, 8, (17, 17), (3, 4), "mps2-an386"),  # 289-value windows in rows narrower than the input
])
def test_avg_pool2d_s8_dsp_large_windows(h, w, c, kernel, stride, board):
    """Windows of more values than an int16 lane holds (256), global and not, and the inputs' extremes:
    an all -128 / all 127 image would overflow the lanes if they were not emptied."""
    rng = np.random.default_rng(h * w)
    oh, ow = (h - kernel[0]) // stride[0] + 1, (w - kernel[1]) // stride[1] + 1
    attrs = dict(kernel=kernel, stride=stride, padding=(0, 0, 0, 0), activation="none", count_include_pad=False)
    g = float_graph("avg_pool2d", [(1, h, w, c)], attrs, None, (1, oh, ow, c))
    q = quantize_with_random_data(g, rng, {"x0": (-1.0, 1.0)}, "minmax")
    x = rng.integers(-128, 128, size=(4, h, w, c)).astype(np.int8)
    x[0], x[1] = -128, 127
    with tempfile.TemporaryDirectory() as tmp:
        got = run_selftest(q, board, x, Path(tmp))
        assert "ek_dsp.h" in (Path(tmp) / "project" / "kernels" / "ek_avg_pool2d_s8.c").read_text()
    ref = reference.run(q, x)[0].reshape(4, -1)
    assert np.array_equal(got, ref), f"{int(np.sum(got != ref))} of {got.size} elements differ"
    assert len(np.unique(ref[2:])) > 1  # not a constant output


@given(st.integers(1, 9), st.integers(1, 9), st.integers(1, 27), input_range(), observers, st.integers(0, 2 ** 31),
       BOARDS)
@DSP_SETTINGS
def test_mean_s8_dsp(h, w, c, in_range, observer, seed, board):
    """The mean over height and width on the DSP sums (four channels a word, the last 1-3 scalar)."""
    rng = np.random.default_rng(seed)
    g = float_graph("mean", [(1, h, w, c)], {}, None, (1, 1, 1, c))
    _check_on_board(g, rng, board, {"x0": in_range}, observer)


@pytest.mark.parametrize("board", ["mps2-an386", "mps2-an500"])
def test_mean_s8_dsp_over_256_values(board, tmp_path):
    """A mean over 23 x 19 = 437 values a channel (the lanes emptied into int32 after 256), with the
    extremes -128 / 127 everywhere in two of the inputs."""
    rng = np.random.default_rng(5)
    g = float_graph("mean", [(1, 23, 19, 12)], {}, None, (1, 1, 1, 12))
    q = quantize_with_random_data(g, rng, {"x0": (-1.0, 1.0)}, "minmax")
    x = rng.integers(-128, 128, size=(4, 23, 19, 12)).astype(np.int8)
    x[0], x[1] = -128, 127
    got = run_selftest(q, board, x, tmp_path)
    assert "ek_dsp.h" in (tmp_path / "project" / "kernels" / "ek_mean_s8.c").read_text()
    ref = reference.run(q, x)[0].reshape(4, -1)
    assert np.array_equal(got, ref), f"{int(np.sum(got != ref))} of {got.size} elements differ"
    assert len(np.unique(ref[2:])) > 1


@pytest.mark.parametrize("kind", ["conv1x1", "conv3x3", "depthwise", "fully_connected"])
@pytest.mark.parametrize("channels", ["all", "some"])
def test_dsp_kernels_nonnegative_shift(kind, channels):
    """Channels whose requantization shift is >= 0 (scale >= 0.5) take the DSP kernels' generic
    output stage, for every channel or mixed with negative shifts in the same block of channels."""
    rng = np.random.default_rng(len(kind) + len(channels))
    o = 9
    which = slice(None) if channels == "all" else [0, 3, 5, 8]
    if kind == "fully_connected":
        g = float_graph("fully_connected", [(1, 37)], dict(activation="relu"),
                        {"w": rng.normal(0, 0.3, (o, 37)), "b": rng.normal(0, 0.3, o)}, (1, o))
    elif kind == "depthwise":
        g = float_graph("depthwise_conv2d", [(1, 5, 4, o)], dict(stride=(1, 1), dilation=(1, 1),
                                                                  padding=(1, 1, 1, 1), activation="none",
                                                                  depth_multiplier=1),
                        {"w": rng.normal(0, 0.3, (1, 3, 3, o)), "b": rng.normal(0, 0.3, o)}, (1, 5, 4, o))
    else:
        k = 1 if kind == "conv1x1" else 3
        g = float_graph("conv2d", [(1, 5, 3, 6)], dict(stride=(1, 1), dilation=(1, 1), padding=(k // 2,) * 4,
                                                       activation="relu6"),
                        {"w": rng.normal(0, 0.3, (o, k, k, 6)), "b": rng.normal(0, 0.3, o)}, (1, 5, 3, o))
    _check_on_board(g, rng, "mps2-an386", shift_zero=which)


def test_dsp_build_executes_smlad(tmp_path):
    """The M4 build really contains the DSP instructions, and the M3 (no DSP) keeps the portable kernels."""
    rng = np.random.default_rng(1)
    g = float_graph("conv2d", [(1, 6, 6, 8)], dict(stride=(1, 1), dilation=(1, 1), padding=(1, 1, 1, 1),
                                                   activation="relu"),
                    {"w": rng.normal(0, 0.5, (8, 3, 3, 8))}, (1, 6, 6, 8))
    q = quantize_with_random_data(g, rng)
    x = rng.integers(-128, 128, size=(2, 6, 6, 8)).astype(np.int8)
    got = run_selftest(q, "mps2-an386", x, tmp_path / "m4")
    assert np.array_equal(got, reference.run(q, x)[0].reshape(2, -1))
    dump = subprocess.run(["arm-none-eabi-objdump", "-d", str(tmp_path / "m4" / "project" / "selftest.elf")],
                          capture_output=True, text=True, check=True).stdout
    assert "smlad" in dump and "sxtb16" in dump
    from edgekit.codegen.project import generate_project
    record = generate_project(q, tmp_path / "m3", "mps2-an385")
    assert record["scratch_bytes"] == 0
    assert "__smlad" not in (tmp_path / "m3" / "kernels" / "ek_conv2d_s8.c").read_text()


REQUANT_MAIN = r"""/* The DSP output stage (ek_dsp.h) against the scalar ek_requantize_acc, case by case. */
#include <stdint.h>
#include "ek_dsp.h"
#ifndef EK_DSP
#error "built for a core with the DSP extension"
#endif

static const int32_t cases[%(n)d][6] = { /* acc, multiplier, shift (<= -1), offset, act_min, act_max */
%(rows)s
};

static void semihost(uint32_t op, const void *arg)
{
    register uint32_t r0 __asm__("r0") = op;
    register const void *r1 __asm__("r1") = arg;
    __asm__ volatile("bkpt 0xab" : "+r"(r0) : "r"(r1) : "memory");
}

static void put_hex(char *p, uint32_t v)
{
    static const char hex[] = "0123456789abcdef";
    for (int i = 7; i >= 0; --i, v >>= 4) {
        p[i] = hex[v & 15];
    }
}

int main(void)
{
    static char line[64];
    for (int32_t i = 0; i < %(n)d; ++i) {
        const int32_t x = cases[i][0], m = cases[i][1], sh = cases[i][2];
        const int32_t offset = cases[i][3], act_min = cases[i][4], act_max = cases[i][5];
        const ek_dsp_rshift_quant q = ek_dsp_rshift_prepare(m, sh);
        const int32_t fast = ek_dsp_requantize_rshift(x, &q);
        const int narrow = act_min > -128 || act_max < 127;
        const int32_t out = ek_dsp_clamp_s8(fast + offset, act_min, act_max, narrow);
        line[0] = 'Y';
        line[1] = ':';
        put_hex(line + 2, (uint32_t)fast);
        put_hex(line + 10, (uint32_t)ek_requantize_acc(x, m, sh));
        put_hex(line + 18, (uint32_t)out);
        put_hex(line + 26, (uint32_t)ek_dsp_output(x, m, sh, offset, act_min, act_max));
        line[34] = '\n';
        line[35] = 0;
        semihost(0x04u, line); /* SYS_WRITE0 */
    }
    const uint32_t block[2] = {0x20026u, 0};
    semihost(0x20u, block); /* SYS_EXIT_EXTENDED */
    for (;;) {
    }
}
"""


@pytest.fixture(scope="module")
def requant_projects(tmp_path_factory):
    """Generated projects (startup, linker script, include/) for the emulated M4 and M7."""
    from edgekit.boards import load_board
    from edgekit.codegen.project import generate_project
    from edgekit.codegen.render import render_to
    q = tiny_quantized_fc()
    out = {}
    for name in ("mps2-an386", "mps2-an500"):
        board = load_board(name)
        d = tmp_path_factory.mktemp(name)
        generate_project(q, d, board)
        render_to(d / "linker.ld", "cortex_m/linker.ld.j2", board=board, region=board["memory"],
                  region_name="self-test", stack_bytes=4096)
        (d / "ek_port.h").write_text("#include <stdint.h>\n")
        out[name] = (d, board)
    return out


@st.composite
def rshift_requant_case(draw):
    """An accumulator, multiplier and negative shift the generator accepts (passes/verify.py:
    |acc| <= 2^31 - 1 - 128, multiplier in [0, 2^31)), extremes included, with an output offset
    and activation bounds."""
    shift = draw(st.one_of(st.sampled_from([-31, -30, -2, -1]), st.integers(-31, -1)))
    bound = 2 ** 31 - 1 - 128
    edges = [0, 1, -1, bound, -bound, bound // 2, -(bound // 2) - 1, 1 << (-shift - 1), -(1 << (-shift - 1)),
             3 << (-shift - 1), -(3 << (-shift - 1))]  # ties of the rounding shift among them
    acc = draw(st.one_of(st.sampled_from([v for v in edges if abs(v) <= bound]), st.integers(-bound, bound)))
    mult = draw(st.one_of(st.sampled_from([0, 1, 2 ** 30, 2 ** 31 - 1, 2 ** 30 + 1]), st.integers(0, 2 ** 31 - 1)))
    lo, hi = sorted(draw(st.one_of(st.just((-128, 127)), st.tuples(st.integers(-128, 127), st.integers(-128, 127)))))
    return acc, mult, shift, draw(st.integers(-128, 127)), lo, hi


@given(st.lists(rshift_requant_case(), min_size=1, max_size=128), BOARDS)
@settings(SETTINGS, max_examples=max(20, SETTINGS.max_examples))
def test_dsp_rshift_output_equals_scalar(requant_projects, cases, board):
    """The DSP kernels' output stage for a negative shift (one SMLAL with the rounding folded in,
    SSAT) equals ek_requantize_acc and the generic ek_dsp_output, over extreme accumulators,
    multipliers and shifts, on the emulated M4 / M7."""
    from cortex_m_selftest import build_and_run
    d, b = requant_projects[board]
    rows = ",\n".join("    {" + ", ".join(str(v) for v in c) + "}" for c in cases)
    (d / "selftest.c").write_text(REQUANT_MAIN % dict(n=len(cases), rows=rows))
    stdout = build_and_run(d, b, board, [])
    got = [l[2:] for l in stdout.splitlines() if l.startswith("Y:")]
    assert len(got) == len(cases), stdout[-2000:]
    for c, line in zip(cases, got):
        fast, scalar, out, generic = (line[i:i + 8] for i in range(0, 32, 8))
        assert (fast, out) == (scalar, generic), (c, line)


@given(st.integers(1, 7), st.integers(1, 7), st.integers(1, 20), activations, st.floats(0.05, 4.0),
       st.integers(0, 2 ** 31), BOARDS)
@DSP_SETTINGS
def test_add_s8_dsp(h, w, c, act, wscale, seed, board):
    """The residual add (ResNet): x + conv1x1(x), two differently quantized inputs, then the
    activation; the DSP output stage for all three requantizations. The plan may run it in place."""
    from edgekit.ir import Op, Tensor

    rng = np.random.default_rng(seed)
    weights = {"w": rng.normal(0, wscale, (c, 1, 1, c)), "b": rng.normal(0, wscale, c)}
    attrs = dict(stride=(1, 1), dilation=(1, 1), padding=(0, 0, 0, 0), activation="none")
    g = float_graph("conv2d", [(1, h, w, c)], attrs, weights, (1, h, w, c))
    g.add_tensor(Tensor("z", (1, h, w, c)))
    g.ops.append(Op("add", "residual", ["x0", "y"], ["z"], {"activation": act}))
    g.outputs[:] = ["z"]
    g.source_layouts["z"] = "NHWC"
    add = quantize_with_random_data(g, np.random.default_rng(seed + 1), {"x0": (-2.0, 3.0)}).ops[-1].attrs
    assert add["left_shift"] <= 22 and max(add["input1_shift"], add["input2_shift"], add["output_shift"]) <= 0, \
        "these parameters would take the portable loop, not the DSP one under test"
    _check_on_board(g, rng, board, {"x0": (-2.0, 3.0)})


@given(st.integers(6, 12), st.integers(1, 8), st.integers(1, 3), st.integers(1, 3), st.integers(1, 70),
       st.integers(0, 2 ** 31), BOARDS)
@DSP_SETTINGS
def test_fully_connected_s8_dsp_widened(c, m, h, w, n_out, seed, board):
    """A fully connected layer after a 3x3 convolution, whose im2col scratch leaves room for the
    widened input vector: the kernel's widened path (alone, it sign-extends in its loop)."""
    import torch
    from torch import nn

    import edgekit
    from edgekit.codegen.kernel_prep import FC_DSP_CHUNK

    torch.manual_seed(seed % 10000)
    rng = np.random.default_rng(seed)
    model = nn.Sequential(nn.Conv2d(c, m, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(m * h * w, n_out)).eval()
    g = edgekit.quantize(model, rng.normal(size=(16, c, h, w)).astype(np.float32))
    in_c = m * h * w
    assert 4 * 9 * c >= 4 * min(n_out & ~3, FC_DSP_CHUNK) + 4 * ((in_c + 1) // 2)  # room to widen
    x = rng.integers(-128, 128, size=(4,) + g.tensors[g.inputs[0]].shape[1:]).astype(np.int8)
    with tempfile.TemporaryDirectory() as tmp:
        got = run_selftest(g, board, x, Path(tmp))
    ref = reference.run(g, x)[0].reshape(len(x), -1)
    assert int(np.sum(got != ref)) == 0


@pytest.mark.parametrize("depth", [10, 13, 19])
def test_fully_connected_s8_dsp_rows_at_any_offset(depth):
    """A Linear on (N, L, C) runs the row kernel at input + r * C: with C % 4 != 0 the rows start off word
    boundaries. The kernel's non-widened path used to read them with LDRD, which faults (UsageFault) on
    an address that is not a multiple of 4 on the M4 (the firmware hung); its input loads are now single
    (unaligned) LDRs. C >= 8, so the loop reads two blocks at once."""
    rng = np.random.default_rng(depth)
    rows, n_out = 5, 8
    weights = {"w": rng.normal(0, 0.4, (n_out, depth)), "b": rng.normal(0, 0.4, n_out)}
    g = float_graph("fully_connected", [(1, rows, depth)], dict(activation="none"), weights, (1, rows, n_out))
    _check_on_board(g, rng, "mps2-an386", {"x0": (-2.0, 2.0)}, n=2)
