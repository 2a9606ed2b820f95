"""Sequence architectures (issue 10, ops-sequence): trained on the synthetic keyword sequences of
tests/zoo/sequence_data.py (fixed seed), int8 accuracy against float, and the int8 model on every
runtime: the generated C (host), tflite-runtime's reference kernels and TFLite Micro on the exported
file, and the emulated Cortex-M4 (instructions per inference, flash, RAM).

    .venv/bin/python bench/bench_sequence.py [--epochs 12] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from datetime import date
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import edgekit  # noqa: E402
from edgekit import quant_math as qm  # noqa: E402
from edgekit import train  # noqa: E402
from edgekit.device.emulator import Emulator  # noqa: E402
from edgekit.device.flash import flash_project  # noqa: E402
from edgekit.device.profile import profile  # noqa: E402
from test_ops_sequence import run_stateful  # noqa: E402
from zoo.lstm_kws import LSTMKWS  # noqa: E402
from zoo.sequence_data import keyword_sequences, split  # noqa: E402

ARCHITECTURES = {
    "LSTM KWS (16 steps x 8 -> LSTM 16 -> all steps -> 4)": lambda: LSTMKWS(hidden=16, head="all"),
}
if {"logistic", "tanh", "sub"} <= set(__import__("edgekit.reference").reference.INT8_KERNELS):  # ops-pointwise
    from zoo.gru_kws import GRUKWS  # noqa: E402
    ARCHITECTURES["GRU KWS (16 steps x 8 -> GRU 16, unrolled -> all steps -> 4)"] = lambda: GRUKWS(head="all")
from zoo.kws_transformer import KeywordTransformer  # noqa: E402

ARCHITECTURES["Keyword transformer (16 steps x 8 -> 16-d tokens + class token, 1 pre-norm layer, 2 heads, GELU "
              "MLP 32 -> 4)"] = lambda: KeywordTransformer()
ARCHITECTURES["Keyword transformer, ReLU MLP (runs in TFLite Micro)"] = lambda: KeywordTransformer(activation="relu")
EPOCHS = {name: 40 for name in ARCHITECTURES if name.startswith("Keyword transformer")}  # trains slower than an RNN


def measure(name, make, data, epochs, work: Path, board: str) -> dict:
    xtr, ytr, xte, yte = data
    train.seed_everything(0)
    model = train.train_classifier(make(), xtr, ytr, epochs=epochs, show_progress=False)
    acc_float = train.accuracy(train.predict(model, xte), yte)
    q = edgekit.quantize(model, xtr[:200])
    acc_int8 = train.accuracy(edgekit.reference_run(q, xte), yte)
    p = q.tensors[q.inputs[0]].quant
    x_q = qm.quantize(edgekit.api.to_ir_inputs(q, xte), p.scale[0], p.zero_point[0])
    ref = edgekit.reference_run(q, x_q, int8=True)

    edgekit.generate(q, work / "host", board="host")
    edgekit.build(work / "host")
    y_c = edgekit.run(work / "host", x_q, int8=True)
    path = edgekit.export_tflite(q, work / "model.tflite", io="int8")
    y_tfl = run_stateful("tflite", path, x_q).reshape(ref.shape)
    try:
        y_tflm = run_stateful("tflm", path, x_q).reshape(ref.shape)
    except Exception:  # noqa: BLE001 - TFLite Micro has no kernel for an op (GELU): reported as n/a
        y_tflm = None

    record = edgekit.generate(q, work / board, board=board)
    built = edgekit.build(work / board)
    with Emulator(board) as emu:
        flash_project(work / board, emu.url, show_progress=False)
        report = profile(emu.url, xte[:20], project_dir=work / board, labels=yte[:20], show_progress=False)
    return {
        "model": name, "float": acc_float, "int8": acc_int8, "test_samples": int(len(yte)),
        "c_equal": int(np.sum(np.all(y_c == ref, axis=1))), "tflite_equal": int(np.sum(np.all(y_tfl == ref, axis=1))),
        "tflm_equal_logits": None if y_tflm is None else float(np.mean(y_tflm == ref)),
        "tflm_max_step": None if y_tflm is None else int(np.abs(y_tflm.astype(int) - ref).max()),
        "tflm_same_class": None if y_tflm is None else float(np.mean(y_tflm.argmax(1) == ref.argmax(1))),
        "weight_bytes": record["weight_bytes"], "arena_bytes": record["arena_bytes"],
        "scratch_bytes": record["scratch_bytes"], "flash": built["sizes"]["flash"], "ram": built["sizes"]["ram"],
        "m4_bit_exact": bool(report["bit_exact"]), "m4_instructions": int(report["total"]["median"]),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--board", default="mps2-an386")
    ap.add_argument("--json")
    ap.add_argument("--only", help="measure the architectures whose name contains this text")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = split(*keyword_sequences())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, make) in enumerate(ARCHITECTURES.items()):
            if args.only and args.only not in name:
                continue
            work = Path(tmp) / str(i)
            work.mkdir()
            rows.append(measure(name, make, data, EPOCHS.get(name, args.epochs), work, args.board))
    print(f"{date.today()}, {platform.machine()} {platform.processor() or ''}".strip())
    print("| model | float acc | int8 acc | C == reference | tflite-runtime == C | TFLM: equal logits, max step, "
          "same class | weights B | arena B | scratch B | M4 flash B | M4 RAM B | M4 instructions |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        n = r["test_samples"]
        tflm = "n/a (no GELU kernel)" if r["tflm_equal_logits"] is None else (
            f"{100 * r['tflm_equal_logits']:.1f} %, {r['tflm_max_step']}, {100 * r['tflm_same_class']:.1f} %")
        print(f"| {r['model']} | {100 * r['float']:.1f} % | {100 * r['int8']:.1f} % | {r['c_equal']}/{n} | "
              f"{r['tflite_equal']}/{n} | {tflm} | {r['weight_bytes']:,} | {r['arena_bytes']:,} | "
              f"{r['scratch_bytes']:,} | {r['flash']:,} | {r['ram']:,} | {r['m4_instructions']:,}"
              f"{'' if r['m4_bit_exact'] else ' (NOT bit-exact)'} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
