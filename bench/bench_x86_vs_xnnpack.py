"""edgekit's generated C on this x86-64 host (the host board: -O2 -march=native, kernels/x86's AVX2
paths) against TensorFlow Lite (ai-edge-litert) with its default XNNPACK delegate, one thread: MLPerf
Tiny's four models and MobileNetV2 1.0 at 224x224 (issue 13's x86-64 row).

    .venv/bin/python bench/bench_x86_vs_xnnpack.py --litert-python VENV/bin/python
        [--models DIR] [--only kws,vww,resnet,ad,mbv2] [--rounds 15] [--clock cpu|wall] [--builtin] [--count]
        [--json out.json]

ai-edge-litert needs numpy 2, so it runs in a Python of its own (``python3 -m venv VENV &&
VENV/bin/pip install ai-edge-litert``), as a server (bench/litert_timer.py serve) that keeps one
interpreter and times N back-to-back invocations on request. tflite-runtime 2.14 (the project's venv)
is no XNNPACK baseline for these models: its default resolver applies XNNPACK to float graphs only,
its int8 times equal those with the default delegates off (BENCHMARKS.md, issue 13, x86-64). ai-edge-litert's
default resolver does delegate these int8 graphs to XNNPACK (``--builtin`` times LiteRT with the default
delegates off, its own optimized kernels, for comparison).

Per model: generate for the host board, build, compare the program's outputs with the numpy reference
on 3 random inputs (must be 0 differences), then ``--rounds`` rounds; each round times every engine
once (~0.1 s of back-to-back inferences each: the C in bench/bench_runner.c, XNNPACK, and with
``--builtin`` LiteRT's own kernels), in an order that rotates from round to round, so a burst of load
from the other jobs on this shared machine hits all engines alike. Times are the thread's CPU time by
default (``--clock wall``: the wall clock): with more runnable jobs than cores the wall clock also counts
the time the others ran; CPU time still grows when they share caches and cores with us. Reported: each
engine's median time per inference, the per-round ratio C / XNNPACK (median, quartiles, min-max) and the
load average before and after.

``--count`` also counts executed instructions per inference under qemu-x86_64 7.2 (TCG, ``-cpu max``:
AVX2, no AVX-512) with the TCG plugin bench/qemu_insn_count.c: the C built for x86-64-v3 (AVX2), 1 and
3 inferences after a warm-up, the difference halved; XNNPACK as one steady-state
tflite::Subgraph::Invoke() (bench/litert_aarch64_guest.py, which is not aarch64-specific), with whatever
kernels XNNPACK picks for the CPU that QEMU reports (AVX2). Instructions, not time.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

import edgekit
from edgekit import reference
from edgekit.boards import load_board
from edgekit.codegen.project import generate_project
from edgekit.targets.host import run_raw

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_pi_vs_litert import mobilenet_v2_tflite, models_dir  # noqa: E402
from bench_tflite import build_runner  # noqa: E402

MODELS = {"kws": "kws_ref_model", "vww": "vww_96_int8", "resnet": "pretrainedResnet_quant", "ad": "ad01_int8",
          "mbv2": "mobilenet_v2_224"}
SAMPLE_S = 0.1  # seconds of back-to-back inferences per engine per round
LIBRARY = "libpywrap_litert_common.so"
INVOKE = "_ZN6tflite8Subgraph6InvokeEv"  # tflite::Subgraph::Invoke()


class Litert:
    """A LiteRT interpreter in its own Python (bench/litert_timer.py serve), timed on request."""

    def __init__(self, python: str, model: Path, x: np.ndarray, tmp: Path, mode: str, clock: str):
        np.save(tmp / f"x_{mode}.npy", x)
        self.proc = subprocess.Popen([python, str(HERE / "litert_timer.py"), str(model), str(tmp / f"x_{mode}.npy"),
                                      "serve", mode, clock], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
        self.outputs = np.array(json.loads(self.proc.stdout.readline())["outputs"], np.int8)

    def ns(self, iterations: int) -> float:
        self.proc.stdin.write(f"{iterations}\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


class Program:
    """The generated C in bench/bench_runner.c (times ek_model_invoke alone, after a warm-up call)."""

    def __init__(self, exe: Path, clock: str):
        self.exe, self.clock = exe, clock

    def ns(self, iterations: int) -> float:
        out = subprocess.run([str(self.exe), str(iterations), self.clock], capture_output=True, text=True,
                             check=True).stdout
        return float(out.split()[0])


def iterations_for(engine) -> int:
    n = 1
    while True:
        ns = engine.ns(n)
        if ns * n > SAMPLE_S * 1e9 / 4 or n >= 1 << 20:
            return max(1, int(SAMPLE_S * 1e9 / ns))
        n *= 4


def interleaved(engines: dict, rounds: int) -> dict:
    """{name: [ns per inference, one per round]}, the order of the engines rotating each round."""
    names = list(engines)
    n = {k: iterations_for(e) for k, e in engines.items()}
    times = {k: [] for k in names}
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            times[k].append(engines[k].ns(n[k]))
    return times


def quartiles(values) -> tuple[float, float, float]:
    q = np.percentile(values, [25, 50, 75])
    return float(q[0]), float(q[1]), float(q[2])


def prepare(name: str, path: Path, tmp: Path):
    t0 = time.perf_counter()
    graph = edgekit.load(path)
    project = tmp / name
    record = generate_project(graph, project, load_board("host"))
    edgekit.build(project)
    shape = graph.tensors[graph.inputs[0]].shape
    x = np.random.default_rng(0).integers(-128, 128, size=(3, *shape[1:])).astype(np.int8)
    got = run_raw(project, x, graph.tensors[graph.outputs[0]].size, np.int8)
    want = reference.run(graph, x)[0].reshape(got.shape)
    diffs = int(np.sum(got != want))
    if diffs:
        raise SystemExit(f"{name}: {diffs} outputs of the generated C differ from the reference")
    macs = sum(layer["macs"] for layer in record["layers"])
    print(f"  {name}: generated, built and bit-exact in {time.perf_counter() - t0:.1f} s ({macs:,} MACs)",
          file=sys.stderr)
    return graph, project, x, want, macs


# --- instruction counts under qemu-x86_64 -------------------------------------------------------------------

def build_plugin(tmp: Path) -> Path:
    so = tmp / "qemu_insn_count.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(so),
                    str(HERE / "qemu_insn_count.c")], check=True)
    return so


def qemu_insns(plugin: Path, cmd: list[str], log: Path, env=None, window: tuple[int, int] | None = None) -> str:
    arg = str(plugin) + (f",start={window[0]:#x},stop={window[1]:#x}" if window else "")
    proc = subprocess.run(["qemu-x86_64", "-cpu", "max", "-plugin", arg, "-d", "plugin", "-D", str(log), *cmd],
                          capture_output=True, text=True, timeout=3600, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"qemu-x86_64 {cmd[0]} failed: {proc.stderr[-2000:]}")
    return proc.stdout


def c_instructions(plugin: Path, project: Path) -> int:
    exe = build_runner(project, ["-O2", "-march=x86-64-v3"], "bench_v3")
    counts = []
    for n in (1, 3):
        log = project / f"insns_{n}.txt"
        qemu_insns(plugin, [str(exe), str(n)], log)
        counts.append(int([line for line in log.read_text().splitlines() if line.startswith("insns")][-1].split()[1]))
    return (counts[1] - counts[0]) // 2


def invoke_window(python: str) -> tuple[Path, int, int]:
    """The LiteRT library, the offsets of Subgraph::Invoke()'s entry and of its one `ret`."""
    site = subprocess.run([python, "-c", "import ai_edge_litert, os; print(os.path.dirname(ai_edge_litert.__file__))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    lib = Path(site) / LIBRARY
    syms = subprocess.run(["nm", "-S", str(lib)], capture_output=True, text=True, check=True).stdout
    m = re.search(rf"^([0-9a-f]+) ([0-9a-f]+) t {INVOKE}$", syms, re.M)
    if not m:
        raise SystemExit(f"{lib}: no symbol {INVOKE}")
    start, size = int(m.group(1), 16), int(m.group(2), 16)
    dis = subprocess.run(["objdump", "-d", f"--start-address={start:#x}", f"--stop-address={start + size:#x}",
                          str(lib)], capture_output=True, text=True, check=True).stdout
    rets = [int(a, 16) for a in re.findall(r"^\s*([0-9a-f]+):\s+c3\s+ret", dis, re.M)]
    if len(rets) != 1:
        raise SystemExit(f"{lib}: {INVOKE} has {len(rets)} ret instructions, the counter needs exactly one")
    return lib, start, rets[0]


def litert_instructions(plugin: Path, python: str, model: Path, tmp: Path) -> tuple[int, np.ndarray]:
    """One steady-state Subgraph::Invoke() under qemu-x86_64, and the 3 invocations' outputs."""
    _, start, stop = invoke_window(python)
    guest = str(HERE / "litert_aarch64_guest.py")
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    # qemu-user maps the guest with the host's mmap: a probe with the same plugin arguments (same lengths)
    # tells where the library lands; the counting run checks it landed there.
    placeholder = 0x7f0000000000
    log = tmp / "litert_probe.txt"
    out = qemu_insns(plugin, [python, guest, "probe"], log, {**env, "EK_LITERT_BASE": f"{placeholder:#x}"},
                     (placeholder + start, placeholder + stop))
    base = int(re.search(r"base (0x[0-9a-f]+)", out).group(1), 16)
    log, npy = tmp / "litert_count.txt", tmp / "litert_count.npy"
    qemu_insns(plugin, [python, guest, str(model), "xnnpack", "3", str(npy)], log, {**env, "EK_LITERT_BASE": f"{base:#x}"},
               (base + start, base + stop))
    windows = [line for line in log.read_text().splitlines() if line.startswith("windows")]
    counts = [int(v) for v in windows[-1].split()[1:]] if windows else []
    if len(counts) != 3:
        raise SystemExit(f"{model.name}: {len(counts)} Subgraph::Invoke() windows counted, not 3")
    return counts[2], np.load(npy)


# --- the run ------------------------------------------------------------------------------------------------

def measure(name: str, path: Path, tmp: Path, args, plugin: Path | None) -> dict:
    graph, project, x, want, macs = prepare(name, path, tmp)
    row = {"model": name, "macs": macs, "load_before": os.getloadavg()[0]}
    engines = {"c": Program(build_runner(project), args.clock)}
    litert = {"xnnpack": Litert(args.litert_python, path, x, tmp, "xnnpack", args.clock)}
    if args.builtin:
        litert["builtin"] = Litert(args.litert_python, path, x, tmp, "builtin", args.clock)
    for mode, engine in litert.items():
        row[f"{mode}_lsb"] = int(np.abs(engine.outputs.astype(np.int32).reshape(want.shape) - want).max())
    engines.update(litert)
    times = interleaved(engines, args.rounds)
    for engine in litert.values():
        engine.close()
    row["load_after"] = os.getloadavg()[0]
    for k, v in times.items():
        row[f"{k}_ns"] = v
    ratios = [c / xn for c, xn in zip(times["c"], times["xnnpack"])]
    row["ratio"] = ratios
    q = quartiles(ratios)
    print(f"  {name}: C {statistics.median(times['c']) / 1e3:,.1f} us, XNNPACK "
          f"{statistics.median(times['xnnpack']) / 1e3:,.1f} us, C / XNNPACK {q[1]:.2f}x "
          f"(quartiles {q[0]:.2f}-{q[2]:.2f}, min-max {min(ratios):.2f}-{max(ratios):.2f}), load "
          f"{row['load_before']:.1f} -> {row['load_after']:.1f}", file=sys.stderr)
    if plugin is not None:
        row["c_insns"] = c_instructions(plugin, project)
        row["xnnpack_insns"], y = litert_instructions(plugin, args.litert_python, path, tmp)
        print(f"  {name}: instructions C {row['c_insns']:,}, XNNPACK (qemu AVX2) {row['xnnpack_insns']:,}, "
              f"{row['c_insns'] / row['xnnpack_insns']:.2f}x", file=sys.stderr)
    return row


def table(rows: list[dict], builtin: bool, count: bool) -> str:
    head = ["model", "MACs", "edgekit C µs", "XNNPACK µs", "**C / XNNPACK** median", "quartiles", "min-max"]
    if builtin:
        head += ["LiteRT builtin µs", "builtin / C"]
    if count:
        head += ["C instructions", "XNNPACK instructions (AVX2)", "C / XNNPACK instr."]
    head += ["XNNPACK max \\|diff\\| LSB", "load"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        q = quartiles(r["ratio"])
        c, xn = statistics.median(r["c_ns"]), statistics.median(r["xnnpack_ns"])
        cells = [r["model"], f"{r['macs']:,}", f"{c / 1e3:,.1f}", f"{xn / 1e3:,.1f}", f"**{q[1]:.2f}x**",
                 f"{q[0]:.2f}-{q[2]:.2f}", f"{min(r['ratio']):.2f}-{max(r['ratio']):.2f}"]
        if builtin:
            b = statistics.median(r["builtin_ns"])
            cells += [f"{b / 1e3:,.1f}", f"{b / c:.2f}x"]
        if count:
            cells += [f"{r['c_insns']:,}", f"{r['xnnpack_insns']:,}", f"{r['c_insns'] / r['xnnpack_insns']:.2f}x"]
        cells += [str(r["xnnpack_lsb"]), f"{r['load_before']:.1f} / {r['load_after']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    ratios = [statistics.median(r["ratio"]) for r in rows]
    lines.append("")
    lines.append(f"Geometric mean of the median ratios: {float(np.exp(np.mean(np.log(ratios)))):.2f}x "
                 f"({date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores).")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--litert-python", required=True, help="a Python with ai-edge-litert (numpy 2: its own venv)")
    ap.add_argument("--models", help="the folder with MLPerf Tiny's .tflite files")
    ap.add_argument("--only", default=",".join(MODELS), help="comma-separated: " + ",".join(MODELS))
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="time on the thread's CPU clock (default: leaves out the time other jobs ran) or the wall clock")
    ap.add_argument("--builtin", action="store_true", help="also time LiteRT's builtin kernels (delegates off)")
    ap.add_argument("--count", action="store_true", help="also count instructions under qemu-x86_64")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plugin = build_plugin(tmp) if args.count else None
        for short in args.only.split(","):
            name = MODELS[short]
            path = mobilenet_v2_tflite(tmp) if short == "mbv2" else models_dir(args.models) / f"{name}.tflite"
            rows.append(measure(short, path, tmp, args, plugin))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(table(rows, args.builtin, args.count))


if __name__ == "__main__":
    main()
