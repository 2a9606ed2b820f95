"""MLPerf Tiny's four int8 reference models on the emulated Cortex-M4, side by side with TFLM + CMSIS-NN.

    .venv/bin/python bench/bench_mlperf_tiny.py [--models DIR] [--board mps2-an386] [--only kws,ad]
                                                [--memory off] [--memory-off NAME,...] [--json out.json]

Each model goes generate -> build (stack reserve = the static bound) -> emulate -> flash -> profile; every
output of every input is compared bit for bit with the numpy reference (the profiler does it, the script
stops on a difference). Instructions are executed instructions on QEMU (-icount, SysTick), per Invoke, the
median over the inputs. The TFLM figures are the ones in ``DIR/TFLM-M4.md`` (TFLM + CMSIS-NN, -O2, same
board, QEMU instruction counter), not re-measured here.

Columns: peak RAM = arena + kernel scratch + static stack bound (targets/stack.py); "act. RAM" = arena +
kernel scratch, the issue's activation-RAM goal, against TFLM's arena. Flash = text + data of the whole
firmware. "Non-weight flash" = flash minus the model's constant arrays (weights, biases, requantization),
against TFLM's flash minus the flatbuffer (its runtime, kernels and harness).
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
from datetime import date
from pathlib import Path

import numpy as np

import edgekit
from edgekit.device.emulator import Emulator
from edgekit.device.flash import flash_project
from edgekit.device.profile import profile
from edgekit.device.protocol import DeviceLink

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "shared" / "mlperf-tiny"
# TFLM + CMSIS-NN on mps2-an386 (DIR/TFLM-M4.md): Invoke instructions, arena_used_bytes, flash text+data.
TFLM = {
    "kws_ref_model": {"short": "kws", "instructions": 7_696_396, "arena": 22_820, "flash": 142_344},
    "vww_96_int8": {"short": "vww", "instructions": 24_101_870, "arena": 100_708, "flash": 448_844},
    "pretrainedResnet_quant": {"short": "resnet", "instructions": 29_863_137, "arena": 54_996, "flash": 184_264},
    "ad01_int8": {"short": "ad", "instructions": 582_922, "arena": 2_580, "flash": 313_368},
}
GOAL_INSTR = {"kws_ref_model": 0.45}  # else 0.5


def models_dir(given: str | None) -> Path:
    for d in ([Path(given)] if given else []) + [DEFAULT_DIR, Path("/work/shared/mlperf-tiny")]:
        if (d / "TFLM-M4.md").exists():
            return d
    raise SystemExit("no MLPerf Tiny models found: pass --models DIR (the folder with TFLM-M4.md)")


def run_model(name: str, path: Path, out: Path, emu: Emulator, board: str, memory: str, samples: int) -> dict:
    graph = edgekit.load(path)
    gen_kwargs = {} if memory == "on" else {"memory_off": "all" if memory == "off" else memory.split(",")}
    record = edgekit.generate(graph, out, board=board, **gen_kwargs)
    built = edgekit.build(out, stack="auto")
    shape = graph.tensors[graph.inputs[0]].shape
    x = np.random.default_rng(0).integers(-128, 128, size=(samples, *shape[1:]), dtype=np.int64).astype(np.int8)
    flash_project(out, emu.url, show_progress=False)
    report = profile(emu.url, x, project_dir=out, int8=True, show_progress=False)
    if not report["bit_exact"]:
        raise SystemExit(f"{name}: outputs differ from the reference: {report['mismatches'][:3]}")
    with DeviceLink(emu.url) as link:
        link.reset()  # back to the bootloader for the next model
    return {"model": name, "instructions": report["total"]["median"], "layers": report["layers"],
            "macs": sum(l["macs"] for l in record["layers"]),
            "arena": record["arena_bytes"], "arena_lower_bound": record["arena_lower_bound"],
            "memory_report": record.get("memory", {}),
            "scratch": record["scratch_bytes"], "stack_bound": built["stack_bound"],
            "stack_high_water": report["stack_high_water"],
            "flash": built["sizes"]["flash"], "weights": record["weight_bytes"],
            "tflite_bytes": path.stat().st_size}


def ratio(a, b) -> str:
    return f"{a / b:.3f}x"


def table(rows: list[dict], board: str) -> str:
    lines = [f"MLPerf Tiny on {board}, {date.today()}, host {platform.machine()} ({platform.node()}), "
             "arm-none-eabi-gcc -O2, QEMU -icount; TFLM + CMSIS-NN figures from TFLM-M4.md.", "",
             "| model | MACs | instructions (TFLM) | ratio | instr/MAC | act. RAM = arena + scratch (TFLM arena) "
             "| ratio | arena lower bound | stack bound | peak RAM (ratio) | flash (TFLM) | ratio "
             "| non-weight flash (TFLM) | ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = TFLM[r["model"]]
        act = r["arena"] + r["scratch"]
        peak = act + r["stack_bound"]
        own_code, tflm_code = r["flash"] - r["weights"], t["flash"] - r["tflite_bytes"]
        lines.append(
            f"| {r['model']} | {r['macs']:,} | {r['instructions']:,.0f} ({t['instructions']:,}) | "
            f"{ratio(r['instructions'], t['instructions'])} | {r['instructions'] / r['macs']:.2f} | "
            f"{r['arena']:,} + {r['scratch']:,} = {act:,} ({t['arena']:,}) | {ratio(act, t['arena'])} | "
            f"{r['arena_lower_bound']:,} | {r['stack_bound']:,} | {peak:,} ({ratio(peak, t['arena'])}) | "
            f"{r['flash']:,} ({t['flash']:,}) | {ratio(r['flash'], t['flash'])} | "
            f"{own_code:,} ({tflm_code:,}) | {ratio(own_code, tflm_code)} |")
    lines.append("")
    for r in rows:
        total = sum(l["median"] for l in r["layers"])
        top = sorted(r["layers"], key=lambda l: -l["median"])[:6]
        shares = ", ".join(f"#{l['index']} {l['kind']} {100 * l['median'] / total:.1f} %"
                           + (f" ({l['median'] / l['macs']:.2f}/MAC)" if l["macs"] else "") for l in top)
        lines.append(f"- {r['model']}, top layers by share: {shares}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", help="folder with the four .tflite files and TFLM-M4.md")
    ap.add_argument("--board", default="mps2-an386")
    ap.add_argument("--only", help="comma-separated short names: kws, vww, resnet, ad")
    ap.add_argument("--memory", choices=("on", "off"), default="on",
                    help="off: today's greedy plan without the in-place / search techniques")
    ap.add_argument("--memory-off", help="comma-separated memory techniques to turn off (e.g. residual-bands)")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    folder = models_dir(args.models)
    wanted = [n for n, t in TFLM.items() if not args.only or t["short"] in args.only.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp, Emulator(args.board) as emu:
        for name in wanted:
            rows.append(run_model(name, folder / f"{name}.tflite", Path(tmp) / name, emu, args.board,
                                  args.memory_off or args.memory, args.samples))
            print(f"{name}: {rows[-1]['instructions']:,.0f} instructions, bit-exact", flush=True)
    print(table(rows, args.board))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=float))


if __name__ == "__main__":
    main()
