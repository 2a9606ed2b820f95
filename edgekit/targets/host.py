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


def count_instructions(out_dir: Path, data: np.ndarray, dtype=np.int8, timeout: float = 600, args=()) -> float:
    """Instructions per inference of the project's program on this machine (the mean over ``data``),
    counted by valgrind's callgrind inside ek_model_invoke only (no file I/O, no start-up): deterministic,
    unlike a clock on a shared machine. ``data``: raw samples as ``run_raw`` takes them; ``args`` as there
    (an early-exit threshold: the count then follows each input's exit).

    Valgrind does not decode AVX-512, which ``-march=native`` may emit: on x86-64 the count is taken on
    a copy built for x86-64-v3 (AVX2 + FMA, what the x86 kernels use), the rest of the flags unchanged."""
    import platform
    import re
    import shutil

    if shutil.which("valgrind") is None:
        raise EdgekitError("counting instructions on the host needs valgrind: sudo apt-get install valgrind "
                           "(or run `make setup`)")
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "project"
        shutil.copytree(out_dir, copy, ignore=shutil.ignore_patterns(RUNNER, "model_runner_sanitize"))
        make = ["make", "-s", RUNNER]
        if platform.machine() in ("x86_64", "AMD64"):
            make.append("OPT=-O2 -march=x86-64-v3")
        run_checked(make, cwd=copy, what="building the program to count its instructions", timeout=600)
        src, dst, log = Path(tmp) / "in.bin", Path(tmp) / "out.bin", Path(tmp) / "callgrind.out"
        np.ascontiguousarray(data, dtype=dtype).tofile(src)
        proc = subprocess.run(["valgrind", "--tool=callgrind", "--toggle-collect=ek_model_invoke",
                               f"--callgrind-out-file={log}", str(copy / RUNNER), str(src), str(dst), *map(str, args)],
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not log.exists():
            raise EdgekitError(f"callgrind could not run {RUNNER} (exit {proc.returncode}): "
                               f"{proc.stderr.strip()[-1000:]}")
        totals = re.search(r"^(?:summary|totals):\s+(\d+)", log.read_text(), re.MULTILINE)
    if totals is None:
        raise EdgekitError(f"callgrind wrote no instruction total for {RUNNER}")
    return int(totals.group(1)) / len(data)
