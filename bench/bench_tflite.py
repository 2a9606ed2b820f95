"""Generated C against TensorFlow Lite on the same int8 models, one thread, side by side.

    .venv/bin/python bench/bench_tflite.py [--litert-python PATH]

For each model (digits MLP, demo CNN, DS-CNN keyword spotter): quantize with
edgekit, export the int8 .tflite, import it back, generate C (gcc with the host board's flags, -O2 -march=native, the
host board) and time one inference of each engine on the same input:

- edgekit's generated C (bench/bench_runner.c around ek_model_invoke),
- tflite-runtime 2.14 with its default op resolver and with BUILTIN_REF,
- ai-edge-litert (its default XNNPACK path), when a Python with it is given
  (it needs numpy 2: keep it in its own venv).

Times are the best of 5 repeats of a loop long enough to take ~0.2 s.
Executed instructions per inference of the C come from valgrind's callgrind
(deterministic), counted on a -march=x86-64-v3 (AVX2) build: valgrind does not run AVX-512. Outputs are compared too: the C must equal BUILTIN_REF.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import subprocess
import tempfile
from datetime import date
from pathlib import Path

import numpy as np

import edgekit
from edgekit import models
from edgekit.boards import load_board
from edgekit import quant_math as qm
from edgekit.frontends.tflite import load_tflite

HERE = Path(__file__).resolve().parent
REPEATS = 5


def build_runner(project: Path, flags: list[str] | None = None, name: str = "bench_runner") -> Path:
    record = json.loads((project / "edgekit_project.json").read_text())
    sources = [str(HERE / "bench_runner.c"), "model.c", "model_weights.c"] + [f"kernels/{k}.c" for k in record["kernels"]]
    exe = project / name
    # No per-layer timing hooks (the protocol runtime's EK_LAYER_BEGIN/END read the clock twice a
    # layer): the runner times ek_model_invoke alone. The project is a temporary copy.
    (project / "ek_port.h").write_text("#include <stdint.h>\n")
    flags = flags or load_board("host")["cflags"]  # the host board's own flags (-O2 -march=native)
    subprocess.run(["gcc", *flags, "-g", "-std=c99", "-Wall", "-Wextra", "-Werror", "-Iinclude", "-I.", *sources,
                    "-o", str(exe)], cwd=project, check=True)
    return exe


def time_c(exe: Path) -> float:
    iterations = 10
    while True:  # grow the loop until it takes ~0.2 s
        ns = float(subprocess.run([str(exe), str(iterations)], capture_output=True, text=True, check=True).stdout.split()[0])
        if ns * iterations > 0.2e9 or iterations > 10 ** 7:
            break
        iterations = int(iterations * max(2.0, 0.25e9 / max(ns * iterations, 1.0)))
    return min(float(subprocess.run([str(exe), str(iterations)], capture_output=True, text=True, check=True)
                     .stdout.split()[0]) for _ in range(REPEATS))


def callgrind_instructions(exe: Path) -> int | None:
    if shutil.which("valgrind") is None:
        return None
    calls = 10
    proc = subprocess.run(["valgrind", "--tool=callgrind", "--toggle-collect=ek_model_invoke",
                           "--callgrind-out-file=/dev/null", str(exe), str(calls)],
                          capture_output=True, text=True, check=True)
    m = re.search(r"Collected\s*:\s*(\d+)", proc.stderr)
    return int(m.group(1)) // (calls + 1) if m else None  # +1: the warm-up call


def time_tflite(path: Path, x: np.ndarray, reference: bool) -> tuple[float, np.ndarray]:
    import time

    from tflite_runtime.interpreter import Interpreter, OpResolverType
    kwargs = dict(experimental_op_resolver_type=OpResolverType.BUILTIN_REF) if reference else {}
    it = Interpreter(model_path=str(path), num_threads=1, **kwargs)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    outputs = []
    for sample in x:
        it.set_tensor(inp["index"], sample[None])
        it.invoke()
        outputs.append(it.get_tensor(out["index"]).copy())
    it.set_tensor(inp["index"], x[:1])
    iterations = 10
    while True:
        t0 = time.perf_counter()
        for _ in range(iterations):
            it.invoke()
        elapsed = time.perf_counter() - t0
        if elapsed > 0.2:
            break
        iterations *= 2
    best = elapsed / iterations
    for _ in range(REPEATS - 1):
        t0 = time.perf_counter()
        for _ in range(iterations):
            it.invoke()
        best = min(best, (time.perf_counter() - t0) / iterations)
    return best * 1e9, np.concatenate(outputs)


def time_litert(python: str, path: Path, x: np.ndarray, iterations: int, tmp: Path) -> tuple[float, np.ndarray]:
    np.save(tmp / "x.npy", x)
    proc = subprocess.run([python, str(HERE / "litert_timer.py"), str(path), str(tmp / "x.npy"), str(iterations)],
                          capture_output=True, text=True, check=True)
    rec = json.loads(proc.stdout)
    return rec["ns"], np.array(rec["outputs"], np.int8)


def measure(name, model, shape, litert_python, tmp: Path) -> dict:
    rng = np.random.default_rng(0)
    calib = rng.uniform(0, 1, (64,) + shape).astype(np.float32)
    q = edgekit.quantize(model.eval(), calib)
    path = edgekit.export_tflite(q, tmp / f"{name}.tflite", io="int8")
    g = load_tflite(path)
    project = tmp / name
    edgekit.generate(g, project)
    edgekit.build(project)
    x_ir = edgekit.api.to_ir_inputs(q, rng.uniform(0, 1, (20,) + shape).astype(np.float32))
    p = g.tensors[g.inputs[0]].quant
    x_q = qm.quantize(x_ir, p.scale[0], p.zero_point[0])
    y_c = edgekit.run(project, x_q, int8=True).reshape(20, -1)
    exe = build_runner(project)
    row = {"model": name, "macs": sum(l["macs"] for l in json.loads((project / "edgekit_project.json")
                                                                    .read_text())["layers"])}
    row["c_ns"] = time_c(exe)
    # valgrind cannot run AVX-512, which -march=native may emit: count a build for x86-64-v3 (AVX2).
    row["c_instructions"] = callgrind_instructions(build_runner(project, ["-O2", "-march=x86-64-v3"], "bench_v3"))
    row["ref_ns"], y_ref = time_tflite(path, x_q, reference=True)
    row["default_ns"], y_def = time_tflite(path, x_q, reference=False)
    row["c_vs_ref_diffs"] = int(np.sum(y_c != y_ref.reshape(20, -1)))
    row["default_vs_ref_diffs"] = int(np.sum(y_def.reshape(20, -1) != y_ref.reshape(20, -1)))
    if litert_python:
        iterations = max(10, int(0.2e9 / max(row["default_ns"], 1.0)))
        row["litert_ns"], y_lit = time_litert(litert_python, path, x_q, iterations, tmp)
        row["litert_vs_ref_diffs"] = int(np.sum(y_lit.reshape(20, -1) != y_ref.reshape(20, -1)))
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--litert-python", help="a Python with ai-edge-litert installed (e.g. .venv-litert/bin/python)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    cases = [("digits MLP 64-300-100-10", models.digits_mlp(), (64,)),
             ("digits CNN (demo)", models.DigitsCNN(), (1, 8, 8)),
             ("DS-CNN keyword spotting", models.ds_cnn_kws(), (1, 49, 10))]
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(f"m{i}", m, s, args.litert_python, Path(tmp)) | {"name": n} for i, (n, m, s) in enumerate(cases)]
    cpu = ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"# edgekit C vs TensorFlow Lite, {date.today()}, {platform.machine()} {cpu}, one thread")
    lit = args.litert_python is not None
    print("| model | MACs | edgekit C µs | C instructions | tflite-runtime REF µs | ratio | tflite-runtime "
          "default µs | ratio |" + (" ai-edge-litert XNNPACK µs | ratio |" if lit else "") +
          " C = REF | default = REF |" + (" litert = REF |" if lit else ""))
    print("|---" * (13 if lit else 10) + "|")
    for r in rows:
        c = r["c_ns"]
        line = (f"| {r['name']} | {r['macs']:,} | {c / 1e3:.2f} | {r['c_instructions'] or 0:,} | "
                f"{r['ref_ns'] / 1e3:.2f} | {r['ref_ns'] / c:.1f}x | {r['default_ns'] / 1e3:.2f} | "
                f"{r['default_ns'] / c:.2f}x |")
        if lit:
            line += f" {r['litert_ns'] / 1e3:.2f} | {r['litert_ns'] / c:.2f}x |"
        line += f" {'yes' if r['c_vs_ref_diffs'] == 0 else r['c_vs_ref_diffs']} | {r['default_vs_ref_diffs']} diffs |"
        if lit:
            line += f" {r['litert_vs_ref_diffs']} diffs |"
        print(line)
    print("ratio = that engine's time / edgekit C's time (above 1: the C is faster). diffs: int8 output elements "
          "that differ from BUILTIN_REF over 20 inputs.")
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
