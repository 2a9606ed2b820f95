"""Raspberry Pi 64-bit boards: aarch64 Linux programs, cross-built here and run under qemu-aarch64
(or natively, when edgekit itself runs on an aarch64 machine such as the Pi)."""
from __future__ import annotations

import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from ..boards import Board
from ..errors import EdgekitError
from .elf import section_sizes
from .toolchain import TOOLS, require

TOOLS.setdefault("aarch64-linux-gnu-gcc", ("gcc-aarch64-linux-gnu libc6-dev-arm64-cross",
                                           "cross-compiling for the Raspberry Pi"))
TOOLS.setdefault("qemu-aarch64", ("qemu-user", "running aarch64 programs on this machine"))


def native() -> bool:
    return platform.machine() in ("aarch64", "arm64")


def compiler(board: Board) -> str:
    cc = board.get("cc", "aarch64-linux-gnu-gcc")
    if native() and shutil.which(cc) is None:
        return "gcc"  # building on the Pi itself
    return cc


def build(board: Board, out: Path, project: dict) -> dict:
    require("make")
    cc = compiler(board)
    require(cc)
    proc = subprocess.run(["make", "-s", f"CC={cc}"], cwd=out, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise EdgekitError(f"building for {board.name} failed:\n{tail}")
    runner = out / "edgekit_runner"
    project["binary"] = str(runner)
    project["sizes"] = section_sizes(runner)
    return project


def command(board: Board, program: Path, cpu: str | None = None) -> list[str]:
    """How to start an aarch64 program here: directly on aarch64, else under qemu-aarch64."""
    program = Path(program).absolute()  # a bare name would be looked up in $PATH
    if native():
        return [str(program)]
    q = board.get("qemu", {})
    require(q.get("user", "qemu-aarch64"))
    return [q.get("user", "qemu-aarch64"), "-L", q.get("sysroot", "/usr/aarch64-linux-gnu"),
            "-cpu", cpu or q.get("cpu", "max"), str(program)]


def run_raw(board: Board, out: Path, data: np.ndarray, out_elems: int, dtype, timeout: float = 600,
            args=()) -> np.ndarray:
    """Feed raw samples through the project's model_runner (under qemu-aarch64 on other machines)."""
    binary = (Path(out) / "model_runner").absolute()  # never a bare name: that would be a $PATH lookup
    from .build_record import require_fresh
    require_fresh(out, binary)  # built by `edgekit build` from the sources the project has now
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.bin", Path(tmp) / "out.bin"
        np.ascontiguousarray(data, dtype=dtype).tofile(src)
        proc = subprocess.run(command(board, binary) + [str(src), str(dst), *map(str, args)], capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0:
            raise EdgekitError(f"{binary.name} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
        result = np.fromfile(dst, dtype=dtype)
    n = data.shape[0]
    if result.size != n * out_elems:
        raise EdgekitError(f"{binary.name} wrote {result.size} values, expected {n * out_elems}")
    return result.reshape(n, out_elems)
