"""RAM with the board's stack reserve against `edgekit build --stack auto` (the static worst case),
and the stack each model really used on the emulated Cortex-M4.

    .venv/bin/python bench/bench_stack.py [--board mps2-an386]

Same reference models as bench_cortex_m.py. The measured high-water mark comes from the device
(its painted stack, read back over the protocol) after profiling a few inputs.
"""
from __future__ import annotations

import argparse
import platform
import tempfile
from datetime import date
from pathlib import Path

import edgekit
from bench_cortex_m import TFLM, reference_models
from edgekit.device.emulator import Emulator
from edgekit.device.flash import flash_project
from edgekit.device.profile import profile
from edgekit.device.protocol import DeviceLink


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--board", default="mps2-an386")
    args = ap.parse_args()
    print(f"# stack and RAM on {args.board}, {date.today()}, {platform.machine()}, arm-none-eabi-gcc -O2")
    print("| model | stack reserved (board) | RAM B (board) | static bound B | RAM B (--stack auto) | "
          "measured high-water B | TFLM arena B |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp, Emulator(args.board) as emu:
        for name, model, calib, x in reference_models():
            out = Path(tmp) / name.split()[0]
            edgekit.generate(edgekit.quantize(model, calib), out, board=args.board)
            board = edgekit.build(out)
            auto = edgekit.build(out, stack="auto")
            flash_project(out, emu.url, show_progress=False)
            report = profile(emu.url, x, project_dir=out, show_progress=False)
            assert report["bit_exact"], f"{name}: outputs differ from the reference"
            with DeviceLink(emu.url) as link:
                link.reset()  # back to the bootloader for the next model
            print(f"| {name} | {board['stack_reserved']:,} | {board['sizes']['ram']:,} | {auto['stack_bound']:,} | "
                  f"{auto['sizes']['ram']:,} | {report['stack_high_water']:,} | {TFLM[name]['arena']:,} |")


if __name__ == "__main__":
    main()
