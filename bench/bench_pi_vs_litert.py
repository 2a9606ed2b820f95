"""edgekit on the emulated Raspberry Pi CPUs against TensorFlow Lite (LiteRT) + XNNPACK: MLPerf Tiny's four
models and MobileNetV2 1.0 at 224x224.

    .venv/bin/python bench/bench_pi_vs_litert.py [--models DIR] [--only kws,resnet,mbv2] [--threads 4]
        [--litert measure|note] [--cache DIR] [--json out.json]

Executed aarch64 instructions per inference under qemu-aarch64 (-cpu cortex-a72 for rpi4, cortex-a76 for
rpi5), counted per guest thread by a TCG plugin (bench/qemu_insn_count.c, built here with gcc; under
qemu-user each guest thread is a vCPU of its own): bench/bench_runner.c run with 1 and with 3 timed
inferences after a warm-up, the difference halved, per thread. Each model is generated with one thread
and with ``--threads`` (default 4), and both builds' outputs are compared with the numpy reference
(model_runner under qemu, 3 random inputs) before counting. Instructions are not time.

MobileNetV2 (edgekit.models.MobileNetV2, torchvision's architecture, random weights, quantized with 8
random calibration images) is written as an int8-I/O .tflite by edgekit's own exporter, and both sides
run that file.

LiteRT (``--litert measure``, the default): bench/litert_aarch64.py runs the ai-edge-litert aarch64
wheel in an arm64 Python under qemu-aarch64 (building that sysroot in the cache on first use) and counts
one steady-state tflite::Subgraph::Invoke(), one thread, XNNPACK and LiteRT's builtin kernels. Its
outputs on one input are compared with the reference (how far XNNPACK is from bit-exact).
``--litert note`` takes the MLPerf Tiny numbers from DIR/LITERT-AARCH64.md (2026-12-02) instead.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import re
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
from edgekit.targets.linux_aarch64 import run_raw

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_rpi import build_runner  # noqa: E402
import litert_aarch64  # noqa: E402

DEFAULT_DIR = HERE.parents[1] / "shared" / "mlperf-tiny"
MODELS = {"kws_ref_model": "kws", "vww_96_int8": "vww", "pretrainedResnet_quant": "resnet", "ad01_int8": "ad",
          "mobilenet_v2_224": "mbv2"}
MLPERF = [n for n in MODELS if n != "mobilenet_v2_224"]
CPUS = {"rpi4": ("cortex-a72", "A72"), "rpi5": ("cortex-a76", "A76")}
GOAL_ONE_THREAD = 0.8  # x XNNPACK, each model, each CPU
GOAL_LONGEST = 0.3     # the longest thread x one thread, on VWW and ResNet-8
GOAL_TOTAL = 1.1       # all threads' work x one thread


def models_dir(given: str | None) -> Path:
    for d in ([Path(given)] if given else []) + [DEFAULT_DIR, Path("/work/shared/mlperf-tiny")]:
        if (d / "LITERT-AARCH64.md").exists():
            return d
    raise SystemExit("no MLPerf Tiny models found: pass --models DIR (the folder with LITERT-AARCH64.md)")


def litert_numbers(note: Path) -> dict:
    """{model: {"xnnpack": {"A72": n, "A76": n}, "builtin": {...}}} from the note's table."""
    out = {}
    for line in note.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name = cells[0].split(" ")[0] if cells else ""
        if name in MLPERF and len(cells) >= 5:
            n = [int(c.replace(",", "")) for c in cells[1:5]]
            out[name] = {"xnnpack": {"A72": n[0], "A76": n[1]}, "builtin": {"A72": n[2], "A76": n[3]}}
    missing = set(MLPERF) - set(out)
    if missing:
        raise SystemExit(f"{note} has no row for {sorted(missing)}")
    return out


def build_plugin(tmp: Path) -> Path:
    so = tmp / "qemu_insn_count.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(so),
                    str(HERE / "qemu_insn_count.c")], check=True)
    return so


def thread_counts(plugin: Path, exe: Path, cpu: str, iterations: int) -> list[int]:
    log = exe.parent / f"insns_{iterations}.txt"
    subprocess.run(["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu", "-cpu", cpu, "-plugin", str(plugin), "-d", "plugin",
                    "-D", str(log), str(exe), str(iterations)], check=True, capture_output=True, timeout=3600)
    line = [l for l in log.read_text().splitlines() if l.startswith("insns")][-1]
    return [int(v) for v in line.split()[1:]]


def per_inference(plugin: Path, exe: Path, cpu: str) -> list[int]:
    """Instructions of one inference on each thread (main thread first)."""
    one, three = thread_counts(plugin, exe, cpu, 1), thread_counts(plugin, exe, cpu, 3)
    if len(one) != len(three):
        raise SystemExit(f"{exe}: {len(one)} threads with 1 inference, {len(three)} with 3")
    return [(b - a) // 2 for a, b in zip(one, three)]


def check_bit_exact(graph, project: Path, board) -> None:
    shape = graph.tensors[graph.inputs[0]].shape
    x = np.random.default_rng(0).integers(-128, 128, size=(3, *shape[1:])).astype(np.int8)
    got = run_raw(board, project, x, graph.tensors[graph.outputs[0]].size, np.int8)
    want = reference.run(graph, x)[0].reshape(got.shape)
    if not np.array_equal(got, want):
        raise SystemExit(f"{project}: {int(np.sum(got != want))} outputs differ from the reference")


def mobilenet_v2_tflite(dest: Path) -> Path:
    """MobileNetV2 1.0, 224x224, random weights, quantized with 8 random images, as an int8-I/O .tflite."""
    import torch
    from edgekit.models import MobileNetV2
    torch.manual_seed(0)
    x = np.random.default_rng(0).uniform(-1, 1, (8, 3, 224, 224)).astype(np.float32)
    t0 = time.perf_counter()
    q = edgekit.quantize(MobileNetV2().eval(), x)
    t1 = time.perf_counter()
    path = edgekit.export_tflite(q, dest / "mobilenet_v2_224.tflite", io="int8")
    print(f"  mobilenet_v2_224: quantized in {t1 - t0:.1f} s, exported in {time.perf_counter() - t1:.1f} s "
          f"({path.stat().st_size:,} bytes)", file=sys.stderr)
    return path


def litert_measure(counter, name: str, path: Path) -> dict:
    """LiteRT's counts on both CPUs and how far its outputs are from the reference (LSB)."""
    graph = edgekit.load(path)
    shape = graph.tensors[graph.inputs[0]].shape
    x = np.random.default_rng(0).integers(-128, 128, size=shape).astype(np.int8)  # the guest's input
    want = reference.run(graph, x)[0].astype(np.int32).ravel()
    out = {"xnnpack": {}, "builtin": {}, "xnnpack_lsb": {}, "builtin_lsb": {}}
    for _, (cpu, label) in CPUS.items():
        for mode in ("xnnpack", "builtin"):
            n, y = counter.count(path, cpu, mode)
            out[mode][label] = n
            out[f"{mode}_lsb"][label] = int(np.abs(y[-1].astype(np.int32).ravel() - want).max())
            print(f"  {name} LiteRT {mode} {cpu}: {n:,} (max |LiteRT - reference| {out[f'{mode}_lsb'][label]} LSB)",
                  file=sys.stderr)
    return out


def measure(name: str, path: Path, tmp: Path, plugin: Path, threads: int) -> dict:
    t0 = time.perf_counter()
    graph = edgekit.load(path)
    print(f"  {name}: loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    result = {}
    for board_name, (cpu, _) in CPUS.items():
        board = load_board(board_name)
        for t in (1, threads):
            out = tmp / f"{MODELS[name]}_{board_name}_{t}"
            t0 = time.perf_counter()
            record = generate_project(graph, out, board, threads=t)
            t1 = time.perf_counter()
            edgekit.build(out)
            print(f"  {name} {board_name} threads={t}: generated in {t1 - t0:.1f} s, built in "
                  f"{time.perf_counter() - t1:.1f} s, arena {record['arena_bytes']:,} B, weights "
                  f"{record['weight_bytes']:,} B", file=sys.stderr)
            check_bit_exact(graph, out, board)
            counts = per_inference(plugin, build_runner(out, board), cpu)
            result[f"{board_name}/{t}"] = counts
            print(f"  {name} {board_name} threads={t}: {counts}", file=sys.stderr)
    return result


def geomean(values) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def tables(rows: dict, litert: dict, threads: int, source: str) -> str:
    lines = []
    for board_name, (_, label) in CPUS.items():
        lines += [f"**{board_name} ({'Cortex-' + label})**, instructions per inference; XNNPACK and builtin {source}", "",
                  f"| model | XNNPACK | LiteRT builtin | edgekit 1 thread | **/ XNNPACK** | edgekit {threads} threads: "
                  f"longest | all threads | **longest / 1 thread** | all / 1 thread | longest / XNNPACK |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        ratios, ratios_mt = [], []
        for name, r in rows.items():
            if name not in litert:
                continue
            x = litert[name]["xnnpack"][label]
            one = r[f"{board_name}/1"][0]
            mt = r[f"{board_name}/{threads}"]
            longest, total = max(mt), sum(mt)
            if name in MLPERF:  # the geometric mean stays the four MLPerf Tiny models'
                ratios.append(one / x)
                ratios_mt.append(longest / x)
            lines.append(f"| {name} | {x:,} | {litert[name]['builtin'][label]:,} | {one:,} | **{one / x:.2f}** | "
                         f"{longest:,} | {total:,} | **{longest / one:.2f}** | {total / one:.2f} | {longest / x:.2f} |")
        if ratios:
            lines.append(f"| geometric mean (MLPerf Tiny) | | | | **{geomean(ratios):.2f}** | | | | | "
                         f"{geomean(ratios_mt):.2f} |")
        lines.append("")
    return "\n".join(lines)


def goals(rows: dict, litert: dict, threads: int) -> str:
    lines = []
    for board_name, (_, label) in CPUS.items():
        over = [f"{MODELS[n]} {r[f'{board_name}/1'][0] / litert[n]['xnnpack'][label]:.2f}" for n, r in rows.items()
                if n in litert and r[f"{board_name}/1"][0] / litert[n]["xnnpack"][label] > GOAL_ONE_THREAD]
        compared = [MODELS[n] for n in rows if n in litert]
        if not compared:  # e.g. --only mbv2 --litert note: the note has no MobileNetV2 row
            lines.append(f"- one thread <= {GOAL_ONE_THREAD}x XNNPACK on {board_name}: not compared (no XNNPACK "
                         "count for these models; --litert measure counts it)")
            continue
        lines.append(f"- one thread <= {GOAL_ONE_THREAD}x XNNPACK on {board_name}: "
                     + (f"met ({', '.join(compared)})" if not over else f"NOT met ({', '.join(over)})"))
    for board_name in CPUS:
        for n in ("vww_96_int8", "pretrainedResnet_quant", "mobilenet_v2_224"):
            if n not in rows:
                continue
            mt, one = rows[n][f"{board_name}/{threads}"], rows[n][f"{board_name}/1"][0]
            ok = max(mt) / one <= GOAL_LONGEST and sum(mt) / one <= GOAL_TOTAL
            lines.append(f"- {threads} threads, {MODELS[n]} on {board_name}: longest {max(mt) / one:.2f}x, all "
                         f"{sum(mt) / one:.2f}x one thread (goal <= {GOAL_LONGEST} and <= {GOAL_TOTAL}): "
                         + ("met" if ok else "NOT met"))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help="the folder with the .tflite files and LITERT-AARCH64.md")
    ap.add_argument("--only", help="comma-separated short names: " + ", ".join(MODELS.values()))
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--litert", choices=["measure", "note"], default="measure",
                    help="count LiteRT here (bench/litert_aarch64.py) or take LITERT-AARCH64.md's numbers")
    ap.add_argument("--cache", type=Path, default=litert_aarch64.default_cache(),
                    help="where bench/litert_aarch64.py keeps its arm64 sysroot")
    ap.add_argument("--json", help="also write the counts here")
    args = ap.parse_args()
    folder = models_dir(args.models)
    litert = litert_numbers(folder / "LITERT-AARCH64.md") if args.litert == "note" else {}
    only = set(args.only.split(",")) if args.only else set(MODELS.values())
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        plugin = build_plugin(Path(tmp))
        counter = litert_aarch64.Counter(args.cache, plugin, Path(tmp)) if args.litert == "measure" else None
        for name, short in MODELS.items():
            if short not in only:
                continue
            path = mobilenet_v2_tflite(Path(tmp)) if name == "mobilenet_v2_224" else folder / f"{name}.tflite"
            if counter is not None:
                litert[name] = litert_measure(counter, name, path)
            rows[name] = measure(name, path, Path(tmp), plugin, args.threads)
    cc = subprocess.run(["aarch64-linux-gnu-gcc", "-dumpfullversion"], capture_output=True, text=True).stdout.strip()
    qemu = re.search(r"version (\S+)", subprocess.run(["qemu-aarch64", "--version"], capture_output=True,
                                                      text=True).stdout)
    print(f"# {date.today()}, host {platform.machine()}, aarch64-linux-gnu-gcc {cc}, qemu-aarch64 "
          f"{qemu.group(1) if qemu else '?'}; every build bit-exact with the reference\n")
    source = ("measured in this run (bench/litert_aarch64.py)" if args.litert == "measure"
              else "from LITERT-AARCH64.md")
    print(tables(rows, litert, args.threads, source))
    if args.litert == "measure":
        print("max |LiteRT - reference| over one output, LSB (edgekit: 0 on every build):")
        for name in rows:
            lsb = {m: " / ".join(f"{v} ({k})" for k, v in litert[name][f"{m}_lsb"].items()) for m in ("xnnpack", "builtin")}
            print(f"- {name}: XNNPACK {lsb['xnnpack']}, builtin {lsb['builtin']}")
    print(goals(rows, litert, args.threads))
    if args.json:
        Path(args.json).write_text(json.dumps({"date": str(date.today()), "threads": args.threads, "edgekit": rows,
                                               "litert": litert}, indent=2) + "\n")


if __name__ == "__main__":
    main()
