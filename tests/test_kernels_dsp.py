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
from helpers import float_graph, quantize_with_random_data
from test_kernels_c import SETTINGS, activations, conv_case, conv_case_graph, input_range, observers, pool_case

pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(shutil.which("qemu-system-arm") is None or shutil.which("arm-none-eabi-gcc") is None,
                                 reason="needs qemu-system-arm and arm-none-eabi-gcc (make setup)")]

DSP_SETTINGS = settings(SETTINGS, max_examples=max(4, int(os.environ.get("EDGEKIT_DSP_EXAMPLES", "10"))))
BOARDS = st.sampled_from(["mps2-an386", "mps2-an386", "mps2-an500"])  # mostly the M4, the M7 too


def _check_on_board(g, rng, board, ranges=None, observer="minmax", n=6):
    q = quantize_with_random_data(g, rng, ranges, observer)
    name = q.inputs[0]
    x = rng.integers(-128, 128, size=(n,) + q.tensors[name].shape[1:]).astype(np.int8)
    with tempfile.TemporaryDirectory() as tmp:
        got = run_selftest(q, board, x, Path(tmp))
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


@given(st.integers(1, 80), st.integers(1, 40), activations, st.booleans(), st.floats(0.01, 2.0), input_range(),
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
