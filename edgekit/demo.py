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


def run_host_demo(out_dir: str | Path = "runs/demo-host", epochs: int = 30, seed: int = 0) -> dict:
    out_dir = Path(out_dir)
    data = datasets.digits()
    stages = Stages()
    model = models.DigitsCNN()
    train.seed_everything(seed)
    stages.run("train the digits CNN (scikit-learn digits, 80/20 stratified split)", train.train_classifier,
               model, data.x_train, data.y_train, epochs=epochs, seed=seed)
    float_acc = train.accuracy(train.predict(model, data.x_test), data.y_test)
    graph = stages.run("quantize to int8 (calibrate on 256 training samples)", api.quantize, model,
                       data.x_train[:256])
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
