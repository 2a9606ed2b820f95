"""Executed aarch64 instructions per inference on the Raspberry Pi builds, under qemu-aarch64.

    .venv/bin/python bench/bench_rpi.py

Until hardware numbers exist, this counts instructions deterministically: QEMU
runs one instruction per translation block (-singlestep) and logs every block
it executes (-d exec,nochain); the count of two extra inferences, halved, is
one inference. Instructions are not time (no pipeline, caches, dual issue),
but they compare kernels fairly: portable C vs NEON (rpi4) vs NEON + SDOT (rpi5).
"""
from __future__ import annotations

import copy
import json
import platform
import subprocess
import tempfile
from datetime import date
from pathlib import Path

import numpy as np

import edgekit
from edgekit import models
from edgekit.boards import load_board

HERE = Path(__file__).resolve().parent


def build_runner(project: Path, board) -> Path:
    record = json.loads((project / "edgekit_project.json").read_text())
    sources = [str(HERE / "bench_runner.c"), "model.c", "model_weights.c", "ek_port.c", "ek_protocol.c", "ek_pool.c"] + \
        [f"kernels/{k}.c" for k in record["kernels"]]
    exe = project / "bench_runner"
    subprocess.run([board["cc"], *board["cflags"], "-std=c99", "-Wall", "-Wextra", "-Werror", "-Iinclude", "-I.",
                    *sources, "-o", str(exe), "-lm", "-pthread"], cwd=project, check=True)
    return exe


def executed(exe: Path, cpu: str, iterations: int) -> int:
    cmd = (f"qemu-aarch64 -L /usr/aarch64-linux-gnu -cpu {cpu} -singlestep -d exec,nochain -D /dev/stdout "
           f"{exe} {iterations} | grep -c '^Trace'")
    return int(subprocess.run(cmd, shell=True, capture_output=True, text=True, check=True).stdout.strip())


def per_inference(exe: Path, cpu: str) -> int:
    return (executed(exe, cpu, 3) - executed(exe, cpu, 1)) // 2


def variants():
    rpi4, rpi5 = load_board("rpi4"), load_board("rpi5")
    portable = copy.deepcopy(rpi4)
    portable.data["kernel_variant"] = None
    return [("rpi4 portable C", portable, "cortex-a72"), ("rpi4 NEON", rpi4, "cortex-a72"),
            ("rpi5 NEON + SDOT", rpi5, "cortex-a76")]


def main():
    cases = [("digits MLP 64-300-100-10", models.digits_mlp(), (64,)),
             ("digits CNN (demo)", models.DigitsCNN(), (1, 8, 8)),
             ("DS-CNN keyword spotting", models.ds_cnn_kws(), (1, 49, 10))]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, shape in cases:
            calib = np.random.default_rng(0).uniform(0, 1, (64,) + shape).astype(np.float32)
            q = edgekit.quantize(model.eval(), calib)
            counts = {}
            for label, board, cpu in variants():
                project = Path(tmp) / f"{name[:6]}-{label}".replace(" ", "_")
                edgekit.generate(q, project, board=board)
                counts[label] = per_inference(build_runner(project, board), cpu)
            rows.append((name, counts))
    labels = [v[0] for v in variants()]
    print(f"# executed aarch64 instructions per inference under qemu-aarch64, {date.today()}, "
          f"host {platform.machine()}, aarch64-linux-gnu-gcc -O2")
    print("| model | " + " | ".join(labels) + " | NEON / portable | SDOT / portable |")
    print("|---" * (len(labels) + 3) + "|")
    for name, c in rows:
        base = c[labels[0]]
        print(f"| {name} | " + " | ".join(f"{c[l]:,}" for l in labels) +
              f" | {c[labels[1]] / base:.2f} | {c[labels[2]] / base:.2f} |")


if __name__ == "__main__":
    main()
