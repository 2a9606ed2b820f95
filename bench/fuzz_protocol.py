"""Fuzz the device side of the serial protocol with libFuzzer (ASan + UBSan), linked with a generated model.

    .venv/bin/python bench/fuzz_protocol.py [seconds]
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np

HARNESS = Path(__file__).resolve().parent.parent / "tests" / "fuzz" / "fuzz_protocol.c"


def build_fuzzer(graph, work: Path) -> Path:
    import edgekit

    project = work / "project"
    record = edgekit.generate(graph, project, board="host")
    sources = [HARNESS] + [project / f for f in ("ek_protocol.c", "ek_port.c", "model.c", "model_weights.c")]
    sources += [project / "kernels" / f"{k}.c" for k in record["kernels"]]
    exe = work / "fuzz_protocol"
    cmd = ["clang", "-g", "-O1", "-std=c99", "-Wall", "-Wextra", "-Werror",
           "-fsanitize=fuzzer,address,undefined", "-fno-sanitize-recover=all",
           "-I", str(project / "include"), "-I", str(project), *map(str, sources), "-o", str(exe), "-lm"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return exe


def run_fuzzer(exe: Path, corpus: Path, *, runs: int | None = None, seconds: int | None = None, seed: int = 1) -> dict:
    corpus.mkdir(parents=True, exist_ok=True)
    args = [str(exe), str(corpus), f"-seed={seed}", "-max_len=700", "-print_final_stats=1"]
    if runs is not None:
        args.append(f"-runs={runs}")
    if seconds is not None:
        args.append(f"-max_total_time={seconds}")
    proc = subprocess.run(args, capture_output=True, text=True, cwd=exe.parent)
    log = proc.stdout + proc.stderr
    m = re.search(r"stat::number_of_executed_units:\s+(\d+)", log)
    cov = re.findall(r"cov: (\d+)", log)
    return {"executions": int(m.group(1)) if m else 0, "crashed": proc.returncode != 0,
            "exit_code": proc.returncode, "coverage": int(cov[-1]) if cov else None, "log_tail": log[-3000:]}


def main():
    import platform
    from datetime import date

    import torch

    import edgekit
    from edgekit import models

    seconds = int(sys.argv[1]) if len(sys.argv) > 1 else 120
    torch.manual_seed(0)
    graph = edgekit.quantize(models.DigitsCNN(), np.random.default_rng(0).uniform(size=(16, 1, 8, 8)).astype(np.float32))
    work = Path("runs/fuzz").resolve()
    exe = build_fuzzer(graph, work)
    result = run_fuzzer(exe, work / "corpus", seconds=seconds)
    print(f"{date.today()} {platform.machine()}: libFuzzer + ASan + UBSan on the protocol handler with the demo CNN: "
          f"{result['executions']:,} executions in {seconds} s, exit code {result['exit_code']}, "
          f"{'CRASH' if result['crashed'] else 'no crash'}, coverage {result['coverage']}")
    if result["crashed"]:
        print(result["log_tail"])
        sys.exit(1)


if __name__ == "__main__":
    main()
