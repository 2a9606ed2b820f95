"""The structure-op architectures of issue 10 (tests/zoo/), trained small: int8 accuracy of the
generated C (bit-exact with the numpy reference, checked here) against the float model, on held-out
data, with the weights, arena and MACs of the int8 model.

    .venv/bin/python bench/bench_structure_architectures.py [row name prefixes, e.g. M5 ShuffleNetV2]

TC-ResNet, the IMU CNN and M5 train on the synthetic signal set of tests/zoo/signals.py (fixed seed);
ShuffleNetV2 on scikit-learn's digits upsampled to 16x16; the tiny U-Net segments the strokes of those
digits (pixel accuracy). Prints a markdown table for BENCHMARKS.md.
"""
from __future__ import annotations

import platform
import sys
import tempfile
from datetime import date
from pathlib import Path

import numpy as np

import edgekit
from edgekit import datasets, train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from zoo.imu_cnn import IMUCNN  # noqa: E402
from zoo.m5 import M5, m5_loss  # noqa: E402
from zoo.shufflenet_v2 import ShuffleNetV2  # noqa: E402
from zoo.signals import signals  # noqa: E402
from zoo.tc_resnet import TCResNet  # noqa: E402
from zoo.unet_tiny import UNetTiny  # noqa: E402


def digits16():
    d = datasets.digits()
    up = lambda x: np.ascontiguousarray(x.repeat(2, axis=2).repeat(2, axis=3))  # noqa: E731
    return up(d.x_train), d.y_train, up(d.x_test), d.y_test


def class_accuracy(logits, y):
    return train.accuracy(logits, y)


def pixel_accuracy(logits, masks):
    return float((np.asarray(logits).argmax(axis=1) == masks).mean())


def cases():
    x_tr, y_tr, x_te, y_te = digits16()
    masks = lambda x: (x[:, 0] > 0.3).astype(np.int64)  # noqa: E731
    yield "TC-ResNet (8x32 MFCC-like)", TCResNet, signals(8, 32), 12, class_accuracy, None
    yield "IMU 1-D CNN (6x64)", IMUCNN, signals(6, 64), 12, class_accuracy, None
    yield "M5 raw audio (1x256)", M5, signals(1, 256), 15, class_accuracy, m5_loss
    yield "ShuffleNetV2 (digits 16x16)", ShuffleNetV2, (x_tr, y_tr, x_te, y_te), 10, class_accuracy, None
    yield "U-Net tiny (digit strokes 16x16)", UNetTiny, (x_tr[:600], masks(x_tr[:600]), x_te, masks(x_te)), 4, \
        pixel_accuracy, None


def main():
    print(f"# structure architectures, {date.today()}, {platform.machine()}, host gcc -O2")
    print("| architecture | float acc | int8 acc (C) | C == reference | weights B | arena B | MACs |")
    print("|---|---|---|---|---|---|---|")
    only = sys.argv[1:]  # optional: names (prefixes) of the rows to run
    for name, make, (x_tr, y_tr, x_te, y_te), epochs, metric, loss in cases():
        if only and not any(name.startswith(o) for o in only):
            continue
        train.seed_everything(0)
        model = train.train_classifier(make(), x_tr, y_tr, epochs=epochs, show_progress=False, loss_fn=loss).eval()
        q = edgekit.quantize(model, x_tr[:200])
        with tempfile.TemporaryDirectory() as tmp:
            record = edgekit.generate(q, tmp)
            edgekit.build(tmp)
            y_c = edgekit.run(tmp, x_te)
        exact = bool(np.array_equal(y_c, edgekit.reference_run(q, x_te)))
        f_acc, q_acc = metric(train.predict(model, x_te), y_te), metric(y_c, y_te)
        macs = sum(layer["macs"] for layer in record["layers"])
        print(f"| {name} | {f_acc:.4f} | {q_acc:.4f} | {'yes' if exact else 'NO'} | {record['weight_bytes']:,} | "
              f"{record['arena_bytes']:,} | {macs:,} |", flush=True)


if __name__ == "__main__":
    main()
