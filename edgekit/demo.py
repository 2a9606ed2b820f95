"""`edgekit demo`: the whole path on real data, with a table at the end."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from . import api, datasets, models, train


class Stages:
    """Times each stage and prints what it is doing."""

    def __init__(self):
        self.times: list[tuple[str, float]] = []

    def run(self, label: str, fn, *args, **kwargs):
        print(f"==> {label}", flush=True)
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        self.times.append((label, time.perf_counter() - start))
        return result


def table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def _train_and_quantize(stages: Stages, epochs: int, seed: int):
    """The digits CNN trained (seeded before its initial weights, so a run repeats) and quantized."""
    data = datasets.digits()
    train.seed_everything(seed)
    model = models.DigitsCNN()
    stages.run("train the digits CNN (scikit-learn digits, 80/20 stratified split)", train.train_classifier,
               model, data.x_train, data.y_train, epochs=epochs, seed=seed)
    float_acc = train.accuracy(train.predict(model, data.x_test), data.y_test)
    graph = stages.run("quantize to int8 (calibrate on 256 training samples)", api.quantize, model,
                       data.x_train[:256])
    return data, float_acc, graph


def run_host_demo(out_dir: str | Path = "runs/demo-host", epochs: int = 30, seed: int = 0) -> dict:
    out_dir = Path(out_dir)
    stages = Stages()
    data, float_acc, graph = _train_and_quantize(stages, epochs, seed)
    record = stages.run(f"generate C into {out_dir}", api.generate, graph, out_dir, "host")
    built = stages.run("build with gcc -O2 -Wall -Wextra -Werror", api.build, out_dir)
    logits = stages.run(f"run the C program on the {len(data.x_test)} test images", api.run, out_dir, data.x_test)
    int8_acc = train.accuracy(logits, data.y_test)
    ref = api.reference_run(graph, data.x_test)
    bit_exact = bool(np.array_equal(ref, logits))
    rows = [
        ("float accuracy (PyTorch)", f"{float_acc * 100:.2f} %"),
        ("int8 accuracy (from the C outputs)", f"{int8_acc * 100:.2f} %"),
        ("C outputs equal the numpy reference", "yes, bit for bit" if bit_exact else "NO"),
        ("weights float32 -> int8", f"{record['float_weight_bytes']:,} B -> {record['weight_bytes']:,} B"),
        ("arena (all activations)", f"{record['arena_bytes']:,} B"),
        ("program text / data / bss", "{text:,} / {data:,} / {bss:,} B".format(**built["sizes"])),
    ] + [(f"time: {label.split(' (')[0]}", f"{t:.2f} s") for label, t in stages.times]
    print("\nedgekit demo, board host\n" + table(rows))
    return {"float_accuracy": float_acc, "int8_accuracy": int8_acc, "bit_exact": bit_exact, "record": record}


def run_device_demo(board_name: str = "mps2-an386", out_dir: str | Path | None = None, epochs: int = 30,
                    seed: int = 0, port: str | None = None) -> dict:
    """Train -> quantize -> generate -> build -> flash over serial -> profile, on a (by default emulated) board."""
    from .boards import load_board
    from .device.emulator import Emulator
    from .device.flash import flash_project
    from .device.profile import format_report, profile

    board = load_board(board_name)
    if board.kind != "cortex-m":
        raise api.EdgekitError(f"the device demo runs on Cortex-M boards; {board.name} is {board.kind}")
    emulated = bool(board.get("qemu"))
    if not emulated and not port:
        raise api.EdgekitError(f"{board.name} is real hardware: pass --port (its serial port), or use the "
                               "emulated default (edgekit demo)")
    out_dir = Path(out_dir or f"runs/demo-{board.name}")
    stages = Stages()
    data, float_acc, graph = _train_and_quantize(stages, epochs, seed)
    record = stages.run(f"generate C for {board.name} into {out_dir}", api.generate, graph, out_dir, board.name)
    # The stack reserve is the static worst case of the built code (targets/stack.py), not a guess.
    built = stages.run("build with arm-none-eabi-gcc -O2 -Wall -Wextra -Werror",
                       api.build, out_dir, stack="auto")
    emulator = Emulator(board) if emulated else None
    try:
        if emulator:
            stages.run(f"start the emulated {board.cpu} (QEMU {board['qemu']['machine']}, serial bootloader)",
                       emulator.start)
            port = emulator.url
        flashed = stages.run(f"flash over serial ({port}): erase, write, read back, verify, go", flash_project,
                             out_dir, port)
        report = stages.run(f"profile the {len(data.x_test)} test images on the device", profile, port,
                            data.x_test, labels=data.y_test)
    finally:
        if emulator:
            emulator.stop()
    print("\n" + format_report(report))
    unit = report["unit"]
    rows = [
        ("board", f"{board.name}: {board.description}"),
        ("float accuracy (PyTorch)", f"{float_acc * 100:.2f} %"),
        ("int8 accuracy (measured on the device)", f"{report['accuracy'] * 100:.2f} %"),
        ("device outputs equal the numpy reference", "yes, bit for bit" if report["bit_exact"] else "NO"),
        (f"per inference ({unit})", f"{report['total']['median']:,.0f}"),
        ("weights float32 -> int8", f"{record['float_weight_bytes']:,} B -> {record['weight_bytes']:,} B"),
        ("firmware flash (text + data)", f"{built['sizes']['flash']:,} B"),
        ("firmware RAM (data + bss + stack)", f"{built['sizes']['ram']:,} B"),
        ("arena", f"{record['arena_bytes']:,} B"),
        ("stack used / reserved (the static bound)", f"{report['stack_high_water']:,} B / {built['stack_reserved']:,} B"),
        ("flashed and verified", f"{flashed['bytes']:,} B in {flashed['blocks']} blocks"),
    ] + [(f"time: {label.split(' (')[0]}", f"{t:.2f} s") for label, t in stages.times]
    print(f"\nedgekit demo, board {board.name}\n" + table(rows))
    if unit == "emulated instructions":
        print("  (instructions executed by QEMU's emulated core: a deterministic count, not a time)")
    return {"float_accuracy": float_acc, "int8_accuracy": report["accuracy"], "bit_exact": report["bit_exact"],
            "record": record, "report": report}
