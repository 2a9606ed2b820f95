"""Build and run generated projects on each kind of target."""
from __future__ import annotations

from pathlib import Path

from ..boards import Board
from ..errors import EdgekitError


def build_for_board(board: Board, out: Path, project: dict, stack: int | str | None = None) -> dict:
    if stack is not None and board.kind != "cortex-m":
        raise EdgekitError(f"--stack sizes a microcontroller's stack; {board.name} runs an OS that sizes its own")
    if board.kind == "cortex-m":
        from . import cortex_m
        return cortex_m.build(board, out, project, stack=stack)
    if board.kind == "linux-aarch64":
        from . import linux_aarch64
        return linux_aarch64.build(board, out, project)
    raise EdgekitError(f"board {board.name!r} of kind {board.kind!r} has no build support yet")
