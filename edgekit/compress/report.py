"""Measurements of a model for the compression report.

Per model: parameters, non-zero weights, MACs (from edgekit's own graph of the
model, BatchNorm folded, as deployed), weight bytes as float32 and as int8 in
each requested flash encoding (from the generated C project's weight arrays),
and accuracy on the held-out split, in float and through the int8 reference
executor. ``deploy`` goes further for the final model: generate, build and run
the C program and measure accuracy from its outputs.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from torch import nn

from .. import api, train
from ..cost import graph_macs
from ..passes.fuse import prepare_float
from . import fxgraph


def float_graph(model: nn.Module, sample: np.ndarray):
    with fxgraph.eval_mode(model):  # torch.export wants eval mode; the caller's modes are restored
        return prepare_float(api.load(model, example_input=sample[:1]))


def macs(model: nn.Module, sample: np.ndarray) -> int:
    g = float_graph(model, sample)
    return graph_macs(g)


def _generate(graph, out: Path, encoding: str) -> dict:
    return api.generate(graph, out, "host", weights=encoding)


def _layer_encodings(record: dict) -> dict:
    return {layer["name"]: layer["encoding"] for layer in record["layers"] if "encoding" in layer}


def measure(model: nn.Module, split, *, calib_samples: int = 256, encodings=("dense",),
            int8_accuracy: bool = True) -> dict:
    """The report's numbers for one model."""
    with fxgraph.eval_mode(model):
        return _measure(model, split, calib_samples, encodings, int8_accuracy)


def _measure(model, split, calib_samples, encodings, int8_accuracy) -> dict:
    sample = split.x_train[:1]
    fg = float_graph(model, sample)
    row = {
        "parameters": fxgraph.count_parameters(model),
        "nonzero_weights": fxgraph.nonzero_weights(model),
        "macs": graph_macs(fg),
        "accuracy": train.accuracy(train.predict(model, split.x_test), split.y_test),
    }
    graph = api.quantize(fg, split.x_train[:calib_samples])
    bytes_by_encoding = {}
    row["weight_bytes"] = {"float32": int(fg.weight_bytes()), "int8": bytes_by_encoding}
    with tempfile.TemporaryDirectory() as tmp:
        for encoding in encodings:
            record = _generate(graph, Path(tmp) / encoding, encoding)
            bytes_by_encoding[encoding] = int(record["weight_bytes"])
            if encoding == "auto":
                row["auto_encodings"] = _layer_encodings(record)
    if int8_accuracy:
        row["int8_accuracy"] = train.accuracy(api.reference_run(graph, split.x_test), split.y_test)
    return row


def deploy(model: nn.Module, split, out_dir, *, weights: str = "dense", calib_samples: int = 256) -> dict:
    """Quantize, generate (``weights`` encoding), build and run on the host; accuracy from the C outputs."""
    model = model.eval()
    graph = api.quantize(model, split.x_train[:calib_samples])
    record = _generate(graph, Path(out_dir), weights)
    built = api.build(out_dir)
    y_c = api.run(out_dir, split.x_test)
    y_ref = api.reference_run(graph, split.x_test)
    result = {
        "weights": weights,
        "project": str(out_dir),
        "accuracy_c": train.accuracy(y_c, split.y_test),
        "accuracy_reference": train.accuracy(y_ref, split.y_test),
        "c_equals_reference": bool(np.array_equal(y_c, y_ref)),
        "weight_bytes": int(record["weight_bytes"]),
        "float_weight_bytes": int(record["float_weight_bytes"]),
        "arena_bytes": int(record["arena_bytes"]),
        "sizes": built.get("sizes", {}),
    }
    result["layer_encodings"] = _layer_encodings(record)
    return result


def table(report: dict) -> str:
    """The report's steps as a text table."""
    head = f"{'step':<22} {'params':>9} {'nonzero w':>9} {'MACs':>9} {'float32 B':>10} {'int8 B*':>9} " \
           f"{'acc %':>6} {'int8 %':>6}"
    lines = [head, "-" * len(head)]
    for s in report["steps"]:
        if "sensitivity" in s:
            scan = s["sensitivity"]
            lines.append(f"{s['label']:<22} (no model change) held-out accuracy when one layer alone loses a "
                         f"fraction of its channels, baseline {scan['baseline_accuracy'] * 100:.2f} %:")
            for row in scan["layers"]:
                accs = ", ".join(f"{r}: {a * 100:.1f} %" for r, a in row["accuracy"].items())
                lines.append(f"    {row['layer']} ({row['channels']} channels): {accs}; tolerates {row['tolerates']:g}")
            continue
        int8 = s["weight_bytes"]["int8"]
        best = min(int8.values())
        int8_acc = f"{s['int8_accuracy'] * 100:6.2f}" if "int8_accuracy" in s else "     -"
        lines.append(f"{s['label']:<22} {s['parameters']:>9,} {s['nonzero_weights']:>9,} {s['macs']:>9,} "
                     f"{s['weight_bytes']['float32']:>10,} {best:>9,} {s['accuracy'] * 100:6.2f} {int8_acc}")
    encodings = ", ".join(report["steps"][0]["weight_bytes"]["int8"])
    lines.append(f"* int8 B: the fewest weight bytes among the encodings measured ({encodings}); "
                 "acc: float model, int8: the int8 reference executor")
    final = report.get("final")
    if final:
        original = report["steps"][0]["weight_bytes"]["float32"]
        lines.append(f"final C program ({final['weights']} weights): accuracy {final['accuracy_c'] * 100:.2f} %, "
                     f"{'equal to' if final['c_equals_reference'] else 'DIFFERENT from'} the reference executor; "
                     f"weights {final['weight_bytes']:,} B ({original / max(1, final['weight_bytes']):.1f}x smaller "
                     f"than the input's float32), text {final['sizes'].get('text', 0):,} B")
    return "\n".join(lines)
