"""The Cortex-M DSP kernels under UndefinedBehaviorSanitizer on the emulated M4 / M7 themselves.

Their SMLAD / SXTB16 / SXTAB16 paths exist only with the DSP extension, so the host's ASan / UBSan runs
(HOST_DSP_BOARD) reach only their portable forms. GCC's trap mode needs no runtime library: every check
becomes a `udf` that faults, so a bare-metal build is instrumented as it stands, and a firmware that hits
undefined behaviour never reaches its exit (the self-test times out) instead of printing outputs."""
from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import edgekit
from cortex_m_selftest import run_selftest
from edgekit import reference
from helpers import MLPERF_TINY, float_graph
from test_kernels_c import conv_case, conv_case_graph, pool_case
from test_kernels_dsp import BOARDS, DSP_SETTINGS, _check_on_board, pytestmark  # noqa: F401 (the qemu marks)
from test_kernels_dsp_depthwise import _graph as depthwise_graph
from test_kernels_dsp_depthwise import dw_case

UBSAN = ("-fsanitize=undefined", "-fsanitize-undefined-trap-on-error")
UBSAN_SETTINGS = settings(DSP_SETTINGS, max_examples=max(3, DSP_SETTINGS.max_examples // 3))


@given(conv_case(), BOARDS)
@UBSAN_SETTINGS
def test_conv2d_dsp_under_ubsan(case, board):
    rng = np.random.default_rng(case["seed"])
    _check_on_board(conv_case_graph(case, rng), rng, board, {"x0": case["rng"]}, case["observer"],
                    extra_cflags=UBSAN)


@given(dw_case(), BOARDS)
@UBSAN_SETTINGS
def test_depthwise_dsp_under_ubsan(case, board):
    rng = np.random.default_rng(case["seed"])
    _check_on_board(depthwise_graph(case, rng), rng, board, {"x0": (-2.0, 2.0)}, extra_cflags=UBSAN)


@given(pool_case(), st.integers(1, 4), BOARDS)
@UBSAN_SETTINGS
def test_avg_pool2d_dsp_under_ubsan(case, widen, board):
    rng = np.random.default_rng(case["seed"])
    c = case["shape"][3] * widen + (widen - 1)
    g = float_graph("avg_pool2d", [(*case["shape"][:3], c)], case["attrs"], None, (*case["out"][:3], c))
    _check_on_board(g, rng, board, {"x0": case["rng"]}, extra_cflags=UBSAN)


@pytest.mark.skipif(not MLPERF_TINY.exists(), reason="needs the shared MLPerf Tiny models")
@pytest.mark.parametrize("board", ["mps2-an386", "mps2-an500"])
@pytest.mark.parametrize("model", ["kws_ref_model", "vww_96_int8", "pretrainedResnet_quant", "ad01_int8"])
def test_mlperf_tiny_under_ubsan(model, board):
    """Every DSP kernel form a real model picks (4x2 convolutions, unrolled depthwise, rows-of-four fully
    connected, table add, SXTAB16 pool) in one instrumented firmware, bit-exact."""
    g = edgekit.load(MLPERF_TINY / f"{model}.tflite")
    x = np.random.default_rng(0).integers(-128, 128, size=(2, *g.tensors[g.inputs[0]].shape[1:])).astype(np.int8)
    with tempfile.TemporaryDirectory() as tmp:
        got = run_selftest(g, board, x, Path(tmp), extra_cflags=UBSAN)
        code = subprocess.run(["arm-none-eabi-objdump", "-d", str(Path(tmp) / "project" / "selftest.elf")],
                              capture_output=True, text=True, check=True).stdout
    assert code.count("\tudf\t") > 50, "the firmware was not instrumented"
    ref = reference.run(g, x)[0].reshape(len(x), -1)
    assert np.array_equal(got, ref), f"{int(np.sum(got != ref))} of {got.size} outputs differ"
