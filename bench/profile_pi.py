"""Where a model's instructions go on an emulated Raspberry Pi: executed aarch64 instructions per function
(and, with --insn, per instruction of one function) for one inference, under qemu-aarch64 with the TCG
plugin bench/qemu_insn_count.c in its per-address mode (pcs=FILE).

    .venv/bin/python bench/profile_pi.py MODEL.tflite --board rpi5 [--threads N] [--insn FUNCTION] [--top 30]

The model is generated and built for the board (edgekit's own build, whose outputs are first checked
bit-exact against the numpy reference on 3 random inputs), then linked with bench/bench_runner.c without PIE
(so that addresses are the ELF's symbols; -g for objdump) and run for 1 and for 3 inferences: the
difference, halved, is one inference without the start-up. Shared-library code (libc, the loader) is one
line, "<shared library>". Instructions under QEMU, not time.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

import edgekit
from edgekit import reference
from edgekit.boards import load_board
from edgekit.codegen.project import generate_project
from edgekit.targets.linux_aarch64 import run_raw

HERE = Path(__file__).resolve().parent
SOURCES = ["model.c", "model_weights.c", "ek_port.c", "ek_protocol.c", "ek_pool.c"]


def build(model: Path, out: Path, board, threads: int) -> Path:
    graph = edgekit.load(model)
    generate_project(graph, out, board, threads=threads)
    edgekit.build(out)
    shape = graph.tensors[graph.inputs[0]].shape
    x = np.random.default_rng(0).integers(-128, 128, size=(3, *shape[1:])).astype(np.int8)
    got = run_raw(board, out, x, graph.tensors[graph.outputs[0]].size, np.int8)
    if not np.array_equal(got, reference.run(graph, x)[0].reshape(got.shape)):
        raise SystemExit(f"{model}: the build's outputs differ from the reference")
    record = json.loads((out / "edgekit_project.json").read_text())
    sources = [str(HERE / "bench_runner.c"), *SOURCES] + [f"kernels/{k}.c" for k in record["kernels"]]
    subprocess.run([board["cc"], *board["cflags"], "-no-pie", "-g", "-std=c99", "-Iinclude", "-I.", *sources,
                    "-o", "profile_runner", "-lm", "-pthread"], cwd=out, check=True)
    return out / "profile_runner"


def counts(plugin: Path, exe: Path, cpu: str, sysroot: str, iterations: int) -> collections.Counter:
    pcs = exe.parent / f"pcs_{iterations}.txt"
    subprocess.run(["qemu-aarch64", "-L", sysroot, "-cpu", cpu, "-plugin", f"{plugin},pcs={pcs}", str(exe),
                    str(iterations)], check=True, capture_output=True, timeout=3600)
    out = collections.Counter()
    for line in pcs.read_text().splitlines():
        address, n = line.split()
        out[int(address, 16)] += int(n)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--board", default="rpi5", choices=["rpi4", "rpi5"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--insn", help="also list this function's instructions with their counts")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    board = load_board(args.board)
    with tempfile.TemporaryDirectory() as tmp:
        plugin = Path(tmp) / "qemu_insn_count.so"
        subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(plugin), str(HERE / "qemu_insn_count.c")],
                       check=True)
        exe = build(args.model, Path(tmp) / "project", board, args.threads)
        cpu, sysroot = board["qemu"]["cpu"], board["qemu"]["sysroot"]
        one, three = counts(plugin, exe, cpu, sysroot, 1), counts(plugin, exe, cpu, sysroot, 3)
        per_pc = {a: (three[a] - one.get(a, 0)) / 2 for a in three}
        nm = subprocess.run([board["cc"].replace("gcc", "nm"), "-n", str(exe)], capture_output=True, text=True,
                            check=True).stdout
        symbols = [(int(p[0], 16), p[2]) for p in (line.split() for line in nm.splitlines())
                   if len(p) == 3 and p[1] in "tTwW"]
        starts = [s[0] for s in symbols]
        text_end = max(starts) + 0x100000  # past the executable's text: shared libraries

        def function(address: int) -> str:
            i = bisect.bisect_right(starts, address) - 1
            return "<shared library>" if address > text_end or i < 0 else symbols[i][1]

        per_function = collections.Counter()
        for address, n in per_pc.items():
            per_function[function(address)] += n
        total = sum(per_function.values())
        print(f"{args.model.name} on {args.board} ({cpu}), {args.threads} thread(s): {total:,.0f} instructions "
              "per inference, all threads")
        for name, n in per_function.most_common(args.top):
            if n:
                print(f"{n:14,.0f} {100 * n / total:5.1f} %  {name}")
        if args.insn:
            dump = subprocess.run([board["cc"].replace("gcc", "objdump"), "-d", "--no-show-raw-insn", str(exe)],
                                  capture_output=True, text=True, check=True).stdout
            current = None
            for line in dump.splitlines():
                head = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
                if head:
                    current = head.group(1)
                    continue
                row = re.match(r"^\s*([0-9a-f]+):\s+(.*)$", line)
                if current == args.insn and row:
                    print(f"{per_pc.get(int(row.group(1), 16), 0):12,.0f}  {line.strip()}")


if __name__ == "__main__":
    sys.exit(main())
