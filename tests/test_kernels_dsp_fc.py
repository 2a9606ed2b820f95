"""The Cortex-M DSP add's rescale tables and fully connected paths (kernels/dsp/ek_add_s8,
ek_fully_connected_s8) on the emulated M4 (mps2-an386) and M7 (mps2-an500): random shapes and
quantization parameters (hypothesis), self-test firmware built with -Wall -Wextra -Werror, every output
compared with the numpy reference (0 differing elements)."""
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from cortex_m_selftest import run_selftest
from edgekit import reference
from edgekit.boards import load_board
from edgekit.codegen.kernel_prep import ADD_TABLE_BYTES, add_tables
from edgekit.codegen.project import generate_project, load_project
from helpers import float_graph, quantize_with_random_data
from test_kernels_c import activations
from test_kernels_dsp import BOARDS, DSP_SETTINGS, _check_on_board, pytestmark  # noqa: F401 (the qemu marks)


def _residual_graph(h, w, c, act, wscale, rng):
    """x + conv3x3(x) then the activation: the 3x3 convolution over c >= 57 channels plans >= 2 KB of
    scratch (ek_conv2d_s8's windows), which the add's tables then share."""
    from edgekit.ir import Op, Tensor

    weights = {"w": rng.normal(0, wscale, (c, 3, 3, c)), "b": rng.normal(0, wscale, c)}
    attrs = dict(stride=(1, 1), dilation=(1, 1), padding=(1, 1, 1, 1), activation="none")
    g = float_graph("conv2d", [(1, h, w, c)], attrs, weights, (1, h, w, c))
    g.add_tensor(Tensor("z", (1, h, w, c)))
    g.ops.append(Op("add", "residual", ["x0", "y"], ["z"], {"activation": act}))
    g.outputs[:] = ["z"]
    g.source_layouts["z"] = "NHWC"
    return g


@given(st.integers(1, 6), st.integers(1, 6), st.integers(57, 64), activations, st.floats(0.01, 0.3),
       st.integers(0, 2 ** 31), BOARDS)
@DSP_SETTINGS
def test_add_s8_dsp_tables(h, w, c, act, wscale, seed, board):
    """The residual add through its rescale tables (>= 256 elements) or, when shorter, its loop; in place
    when the plan puts the output over an input."""
    rng = np.random.default_rng(seed)
    g = _residual_graph(h, w, c, act, wscale, rng)
    add = quantize_with_random_data(g, np.random.default_rng(seed + 1), {"x0": (-2.0, 3.0)}).ops[-1].attrs
    assert add["left_shift"] <= 22 and max(add["input1_shift"], add["input2_shift"], add["output_shift"]) <= 0, \
        "these parameters would take the portable loop, not the DSP one under test"
    _check_on_board(g, rng, board, {"x0": (-2.0, 3.0)}, n=3)


def test_add_tables_chosen_only_with_room():
    """EK_ADD_S8_TABLES is defined when the scratch already holds the tables and an add is long enough:
    a 3x3 convolution over 64 channels plans 2,304 B; over 8 channels it plans less, and no tables."""
    rng = np.random.default_rng(0)
    board = load_board("mps2-an386")
    for c, expect in ((64, True), (8, False)):
        q = quantize_with_random_data(_residual_graph(8, 8, c, "relu", 0.1, rng), rng, {"x0": (-2.0, 3.0)})
        with tempfile.TemporaryDirectory() as tmp:
            generate_project(q, Path(tmp), board)
            record = load_project(Path(tmp))
            header = (Path(tmp) / "include" / "ek_nn.h").read_text()
        assert (record["scratch_bytes"] >= ADD_TABLE_BYTES) == expect
        assert ("#define EK_ADD_S8_TABLES 1" in header) == expect
    assert not add_tables([], load_board("host"), 4096)
