"""Build and run generated projects on each kind of target."""
from __future__ import annotations

from pathlib import Path

from ..boards import Board
from ..errors import EdgekitError


def build_for_board(board: Board, out: Path, project: dict) -> dict:
    if board.kind == "cortex-m":
        from . import cortex_m
        return cortex_m.build(board, out, project)
    raise EdgekitError(f"board {board.name!r} of kind {board.kind!r} has no build support yet")
