"""The host target: gcc builds the project into a program that runs here."""
from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import numpy as np

from ..errors import EdgekitError
from .toolchain import require, run_checked

RUNNER = "model_runner"


def build(out_dir: Path, sanitize: bool = False) -> Path:
    require("make")
    require("cc")
    target = "model_runner_sanitize" if sanitize else RUNNER
    run_checked(["make", "-s", target], cwd=out_dir, what="building the generated C", timeout=600)
    return out_dir / target


def run_raw(out_dir: Path, data: np.ndarray, out_elems: int, dtype, sanitize: bool = False,
            timeout: float = 600, args=()) -> np.ndarray:
    """Feed raw samples (batched, IR layout, already in the I/O dtype) through the program
    (``args``: more command-line arguments, e.g. an early-exit threshold)."""
    # By its absolute path: a bare name ("model_runner" for `edgekit run .`) would be looked up in $PATH.
    binary = (Path(out_dir) / ("model_runner_sanitize" if sanitize else RUNNER)).absolute()
    from .build_record import require_fresh
    require_fresh(out_dir, binary)  # built by `edgekit build` from the sources the project has now
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.bin", Path(tmp) / "out.bin"
        np.ascontiguousarray(data, dtype=dtype).tofile(src)
        proc = subprocess.run([str(binary), str(src), str(dst), *map(str, args)], capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise EdgekitError(f"{binary.name} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
        out = np.fromfile(dst, dtype=dtype)
    n = data.shape[0]
    if out.size != n * out_elems:
        raise EdgekitError(f"{binary.name} wrote {out.size} values, expected {n * out_elems}")
    return out.reshape(n, out_elems)
