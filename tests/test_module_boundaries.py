"""Which parts of edgekit import which: code generation does not pull in the build targets, and the
torch-level compression report does not pull in the C generator (both take their numbers from cost.py)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np

from edgekit import cost
from edgekit.boards import load_board
from edgekit.errors import EdgekitError

from helpers import float_graph


def _loaded_after(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(m for m in sys.modules if m.startswith('edgekit.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_codegen_does_not_import_the_build_targets():
    loaded = _loaded_after("edgekit.codegen.project")
    assert "edgekit.cost" in loaded
    assert not {m for m in loaded if m.startswith("edgekit.targets")}


def test_compression_report_does_not_import_the_c_generator():
    loaded = _loaded_after("edgekit.compress.report")
    assert "edgekit.cost" in loaded
    assert not {m for m in loaded if m.startswith("edgekit.codegen") or m.startswith("edgekit.targets")}


def test_macs_of_a_convolution_and_a_linear_layer():
    conv = float_graph("conv2d", [(1, 8, 8, 3)], dict(stride=(1, 1), dilation=(1, 1), padding=(0, 0, 0, 0)),
                       {"w": np.zeros((4, 3, 3, 3)), "b": np.zeros(4)}, (1, 6, 6, 4))
    assert cost.layer_macs(conv, conv.ops[0]) == 6 * 6 * 4 * 3 * 3 * 3
    fc = float_graph("fully_connected", [(1, 10)], {}, {"w": np.zeros((5, 10))}, (1, 5))
    assert cost.graph_macs(fc) == 50


def test_budget_names_the_part_that_does_not_fit():
    board = load_board("mps2-an386")
    lines = cost.check_before_build(board, 1000, 1000, cost.estimate_code_bytes(["ek_conv2d_s8"]))
    assert lines[0].startswith("flash:") and lines[1].startswith("RAM:")
    try:
        cost.check_before_build(board, board["app"]["flash_size"] + 1, 1000, 0)
    except EdgekitError as exc:
        assert "flash: needs" in str(exc) and "RAM" not in str(exc)
    else:
        raise AssertionError("an oversized model was accepted")
    assert cost.check_before_build(load_board("host"), 10 ** 8, 10 ** 8, 0) == []  # an OS board: no budget
    try:  # ... but a sane cap on static arrays (safety.MAX_ARENA_BYTES_OS)
        cost.check_before_build(load_board("host"), 10 ** 12, 10 ** 12, 0)
    except EdgekitError as exc:
        assert "arena" in str(exc)
    else:
        raise AssertionError("a 1 TB arena was accepted on the host")
