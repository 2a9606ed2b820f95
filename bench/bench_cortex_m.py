"""Emulated instructions per inference on the Cortex-M4 (QEMU mps2-an386, deterministic -icount),
per layer, with flash and RAM from the ELF, for the reference models.

    .venv/bin/python bench/bench_cortex_m.py [--board mps2-an386] [--json out.json]

The TFLM numbers it prints for comparison are the ones in the design card (TFLM + CMSIS-NN, -O2,
same emulated board, measured on this kind of machine); they are not re-measured here.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
from datetime import date
from pathlib import Path

import numpy as np
import torch

import edgekit
from edgekit import datasets, models, train
from edgekit.device.emulator import Emulator
from edgekit.device.flash import flash_project
from edgekit.device.protocol import DeviceLink
from edgekit.device.profile import profile

TFLM = {  # design card: TFLM with CMSIS-NN kernels on mps2-an386
    "digits MLP 64-300-100-10": {"instructions": 119_448, "arena": 5_824, "flash": 101_032},
    "digits CNN (demo)": {"instructions": 905_650, "arena": 5_972, "flash": 98_904},
    "DS-CNN keyword spotting": {"instructions": 7_694_691, "arena": 22_716, "flash": 130_576},
}


def reference_models():
    data, flat = datasets.digits(), datasets.digits(flat=True)
    torch.manual_seed(0)
    mlp = train.train_classifier(models.digits_mlp(), flat.x_train, flat.y_train, epochs=20, show_progress=False)
    cnn = train.train_classifier(models.DigitsCNN(), data.x_train, data.y_train, epochs=20, show_progress=False)
    ds = models.ds_cnn_kws().eval()  # untrained: instruction counts do not depend on the weights' values
    rng = np.random.default_rng(0)
    return [("digits MLP 64-300-100-10", mlp, flat.x_train[:200], flat.x_test[:10]),
            ("digits CNN (demo)", cnn, data.x_train[:200], data.x_test[:10]),
            ("DS-CNN keyword spotting", ds, rng.normal(size=(32, 1, 49, 10)).astype(np.float32),
             rng.normal(size=(3, 1, 49, 10)).astype(np.float32))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--board", default="mps2-an386")
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, Emulator(args.board) as emu:
        for name, model, calib, x in reference_models():
            out = Path(tmp) / name.split()[0]
            graph = edgekit.quantize(model, calib)
            record = edgekit.generate(graph, out, board=args.board)
            built = edgekit.build(out)
            flash_project(out, emu.url, show_progress=False)
            report = profile(emu.url, x, project_dir=out, show_progress=False)
            assert report["bit_exact"], name
            with DeviceLink(emu.url) as link:
                link.reset()
            rows.append({"model": name, "instructions": report["total"]["median"], "layers": report["layers"],
                         "flash": built["sizes"]["flash"], "ram": built["sizes"]["ram"],
                         "arena": record["arena_bytes"], "weights": record["weight_bytes"],
                         "stack_high_water": report["stack_high_water"],
                         "macs": sum(l["macs"] for l in record["layers"])})
    print(f"## Cortex-M ({args.board}), {date.today()}, host {platform.machine()}, "
          f"arm-none-eabi-gcc -O2, QEMU -icount shift=6\n")
    print("| model | MACs | emulated instructions / inference | TFLM+CMSIS-NN | ratio | instr/MAC | arena B "
          "(TFLM) | flash B (TFLM) | RAM B | stack used B |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = TFLM[r["model"]]
        print(f"| {r['model']} | {r['macs']:,} | {r['instructions']:,.0f} | {t['instructions']:,} | "
              f"{r['instructions'] / t['instructions']:.2f}x | {r['instructions'] / r['macs']:.2f} | "
              f"{r['arena']:,} ({t['arena']:,}) | {r['flash']:,} ({t['flash']:,}) | {r['ram']:,} | "
              f"{r['stack_high_water']:,} |")
    for r in rows:
        print(f"\n{r['model']}, per layer (emulated instructions, median):\n")
        print("| layer | kind | MACs | instructions | share |")
        print("|---|---|---|---|---|")
        total = sum(l["median"] for l in r["layers"])
        for l in r["layers"]:
            print(f"| {l['name']} | {l['kind']} | {l['macs']:,} | {l['median']:,.0f} | "
                  f"{100 * l['median'] / total:.1f} % |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
