"""Weight encodings (issue 4): bytes, flash, accuracy and instructions per inference.

    .venv/bin/python bench/bench_encodings.py            # the table for BENCHMARKS.md
    .venv/bin/python bench/bench_encodings.py --json     # + the raw rows

The digits MLP 64-300-100-10 and the demo CNN, trained with a fixed seed, then
clustered (edgekit.cluster, fine-tuned), and pruned by magnitude + clustered:
for every weight encoding, the weight bytes (everything in model_weights.c)
against float32, the held-out accuracy of the C program's outputs (checked bit
for bit against the numpy reference), the host text size from the ELF, and
instructions per inference counted by callgrind inside ek_model_invoke
(deterministic), as ratios to dense in the same run.

The functions are meant for reuse (e.g. the full compression pipeline bench):
``magnitude_prune``, ``quantize_for_bench``, ``measure_encodings``,
``callgrind_instructions``.
"""
from __future__ import annotations

import copy
import json
import platform
import re
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import numpy as np
import torch
from torch import nn

import edgekit
from edgekit import datasets, models, train

ENCODINGS = ("dense", "codebook", "huffman", "sparse", "auto")


def magnitude_prune(model: nn.Module, sparsity, *, data=None, epochs: int = 0, lr: float = 1e-3,
                    seed: int = 0) -> nn.Module:
    """A copy of ``model`` with the smallest-magnitude weights of every Conv / Linear
    layer set to exactly zero (``sparsity``: a fraction, or {layer name: fraction}),
    optionally fine-tuned with the zeros held (torch.nn.utils.prune masks)."""
    from torch.nn.utils import prune

    model = copy.deepcopy(model).eval()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
    for name, m in layers:
        amount = sparsity.get(name, 0.0) if isinstance(sparsity, dict) else sparsity
        prune.l1_unstructured(m, "weight", amount=float(amount))
    if epochs:
        x, y = (data.x_train, data.y_train) if hasattr(data, "x_train") else data
        train.train_classifier(model, x, y, epochs=epochs, lr=lr, seed=seed, show_progress=False)
    for _, m in layers:
        prune.remove(m, "weight")
    return model.eval()


def quantize_for_bench(model, calib, *, one_scale_when_clustered: bool = True):
    """edgekit.quantize, with the choice of weight scales for clustered layers open
    (False: per-channel scales, and so per-channel codebooks)."""
    from edgekit.passes.fuse import prepare_float
    from edgekit.passes.quantize import calibrate, quantize

    float_graph = prepare_float(edgekit.load(model, example_input=calib[:1]))
    ranges = calibrate(float_graph, edgekit.api.to_ir_inputs(float_graph, calib))
    return quantize(float_graph, ranges, one_scale_when_clustered=one_scale_when_clustered)


def callgrind_instructions(project: Path, x: np.ndarray, graph) -> float:
    """Instructions per inference inside ek_model_invoke, counted by callgrind."""
    from edgekit import quant_math as qm

    x_ir = edgekit.api.to_ir_inputs(graph, x)
    p = graph.tensors[graph.inputs[0]].quant
    data = qm.quantize(x_ir, p.scale[0], p.zero_point[0])
    with tempfile.TemporaryDirectory() as tmp:
        src, dst, log = Path(tmp) / "in.bin", Path(tmp) / "out.bin", Path(tmp) / "callgrind.out"
        np.ascontiguousarray(data, dtype=np.int8).tofile(src)
        subprocess.run(["valgrind", "--tool=callgrind", "--toggle-collect=ek_model_invoke",
                        f"--callgrind-out-file={log}", str(project / "model_runner"), str(src), str(dst)],
                       check=True, capture_output=True, timeout=600)
        totals = re.search(r"^(?:summary|totals):\s+(\d+)", log.read_text(), re.MULTILINE)
    return int(totals.group(1)) / len(x)


def measure_encodings(graph, x_test, y_test, out_root: Path, encodings=ENCODINGS, *, calls: int = 20) -> list[dict]:
    """Generate, build and run ``graph`` once per weight encoding."""
    reference = edgekit.reference_run(graph, x_test)
    rows = []
    for encoding in encodings:
        out = Path(out_root) / encoding
        record = edgekit.generate(graph, out, weights=encoding)
        built = edgekit.build(out)
        y = edgekit.run(out, x_test)
        rows.append({
            "encoding": encoding,
            "weight_bytes": record["weight_bytes"],
            "float_weight_bytes": record["float_weight_bytes"],
            "arena_bytes": record["arena_bytes"],
            "text_bytes": built["sizes"]["text"],
            "accuracy": train.accuracy(y, y_test),
            "bit_exact": bool(np.array_equal(y, reference)),
            "instructions": callgrind_instructions(out, x_test[:calls], graph),
            "layers": [l["encoding"] for l in record["layers"] if "encoding" in l],
        })
    return rows


def trained(seed: int = 0):
    flat, img = datasets.digits(flat=True), datasets.digits()
    torch.manual_seed(seed)
    mlp = train.train_classifier(models.digits_mlp(), flat.x_train, flat.y_train, epochs=40, seed=seed,
                                 show_progress=False)
    torch.manual_seed(seed)
    cnn = train.train_classifier(models.DigitsCNN(), img.x_train, img.y_train, epochs=25, seed=seed,
                                 show_progress=False)
    return {"digits MLP 64-300-100-10": (mlp, flat), "digits CNN (demo)": (cnn, img)}


# Pruning for the benchmark: the big layers harder, the first and last lighter (Deep Compression's shape).
SPARSITY = {"digits MLP 64-300-100-10": {"1": 0.9, "3": 0.9, "5": 0.7},
            "digits CNN (demo)": {"conv1": 0.3, "conv2": 0.8, "dw": 0.5, "pw": 0.8, "fc": 0.5}}
BITS = 4


def variants(name, model, data, seed: int = 0):
    """(label, model) pairs: float as trained, clustered, pruned + clustered."""
    clustered = edgekit.cluster(model, BITS, data=data, epochs=5, seed=seed, show_progress=False)
    pruned = magnitude_prune(model, SPARSITY[name], data=data, epochs=10, seed=seed)
    pruned_clustered = edgekit.cluster(pruned, BITS, data=data, epochs=5, seed=seed, show_progress=False)
    return [("as trained", model), (f"clustered {BITS}-bit", clustered),
            (f"pruned + clustered {BITS}-bit", pruned_clustered)]


def main():
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model, data) in trained().items():
            float_acc = train.accuracy(train.predict(model, data.x_test), data.y_test)
            for label, variant in variants(name, model, data):
                graph = quantize_for_bench(variant, data.x_train[:300])
                for r in measure_encodings(graph, data.x_test, data.y_test, Path(tmp) / name / label):
                    rows.append({"model": name, "variant": label, "float_accuracy": float_acc, **r})
            # Per-layer codebooks (one weight scale) against per-channel ones, on the clustered model.
            clustered = edgekit.cluster(model, BITS, data=data, epochs=5, show_progress=False)
            for one_scale in (True, False):
                graph = quantize_for_bench(clustered, data.x_train[:300], one_scale_when_clustered=one_scale)
                for r in measure_encodings(graph, data.x_test, data.y_test, Path(tmp) / name / f"scale{one_scale}",
                                           encodings=("codebook", "huffman", "auto"), calls=2):
                    rows.append({"model": name, "variant": f"scales: {'one per layer' if one_scale else 'per channel'}",
                                 "float_accuracy": float_acc, **r})
    print(f"# weight encodings benchmark, {date.today()}, {platform.machine()} {platform.processor() or ''}, "
          f"python {platform.python_version()}, torch {torch.__version__}")
    print("| model | variant | encoding | weight B | vs float32 | held-out acc (C) | bit-exact | host text B "
          "| instr / inference | instr vs dense | layers |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    dense = {(r["model"], r["variant"]): r for r in rows if r["encoding"] == "dense"}
    for r in rows:
        base = dense.get((r["model"], r["variant"]))
        ratio = f"{r['instructions'] / base['instructions']:.2f}x" if base else "-"
        print(f"| {r['model']} | {r['variant']} | {r['encoding']} | {r['weight_bytes']:,} | "
              f"{r['float_weight_bytes'] / r['weight_bytes']:.1f}x | {100 * r['accuracy']:.2f} % "
              f"(float {100 * r['float_accuracy']:.2f} %) | {'yes' if r['bit_exact'] else 'NO'} | "
              f"{r['text_bytes']:,} | {r['instructions']:,.0f} | {ratio} | {' '.join(r['layers'])} |")
    if "--json" in sys.argv:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
