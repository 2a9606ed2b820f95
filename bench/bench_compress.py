"""The compression pipeline (issue 4) on digits: weight storage, MACs and accuracy, stage by stage.

    .venv/bin/python bench/bench_compress.py            # the tables for BENCHMARKS.md
    .venv/bin/python bench/bench_compress.py --json     # + the raw rows

The float models are bench_encodings.trained() (fixed seed): the digits MLP
64-300-100-10 and the demo CNN. Each runs its recipe (bench/recipes/*.toml,
through edgekit.run_recipe, as `edgekit compress` does); the model after every
step is quantized, generated, built and run as C on the host with the encoding
that stage adds, in the manner of Deep Compression's table (pruning, then
quantization by weight sharing, then Huffman coding). Weight bytes are
everything in model_weights.c (filters, int32 biases, requantization
multipliers and shifts) against the float32 weights and biases of the model as
trained; accuracy is that of the C program's outputs on the held-out 20 %,
each checked bit for bit against the numpy reference executor.
"""
from __future__ import annotations

import json
import platform
import sys
import tempfile
from datetime import date
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import edgekit  # noqa: E402
from bench_encodings import trained  # noqa: E402  (the same float models as the encodings benchmark)
from edgekit import train  # noqa: E402
from edgekit.compress import fxgraph, report  # noqa: E402
from edgekit.compress.recipe import load_recipe  # noqa: E402

CALIB = 300
RECIPES = {"digits MLP 64-300-100-10": HERE / "recipes" / "mlp_deep_compression.toml",
           "digits CNN (demo)": HERE / "recipes" / "cnn_structured.toml"}
TARGETS = {"digits MLP 64-300-100-10": (50.0, 0.005), "digits CNN (demo)": (10.0, 0.01)}  # ratio, accuracy loss


def deploy(model, data, encoding: str, out: Path) -> dict:
    """Quantize, generate, build, run: bytes and accuracy from the C program."""
    graph = edgekit.quantize(model, data.x_train[:CALIB])
    record = edgekit.generate(graph, out, weights=encoding)
    built = edgekit.build(out)
    y_c = edgekit.run(out, data.x_test)
    y_ref = edgekit.reference_run(graph, data.x_test)
    return {"encoding": encoding, "weight_bytes": record["weight_bytes"],
            "accuracy": train.accuracy(y_c, data.y_test), "bit_exact": bool(np.array_equal(y_c, y_ref)),
            "text_bytes": built["sizes"]["text"],
            "layers": [l["encoding"] for l in record["layers"] if "encoding" in l]}


def describe(model, data) -> dict:
    return {"parameters": fxgraph.count_parameters(model), "nonzero_weights": fxgraph.nonzero_weights(model),
            "macs": report.macs(model, data.x_train[:1])}


def stages(name: str, model, data, tmp: Path) -> tuple[list[dict], dict]:
    """One row per stage: as trained (float32, then int8), then after each recipe step."""
    recipe = load_recipe(RECIPES[name])
    models = []
    _, rep = edgekit.run_recipe(model, recipe, data, deploy=False, show_progress=False, log=lambda *_: None,
                                on_step=lambda i, step, m: models.append((step, m)))
    float_bytes = rep["steps"][0]["weight_bytes"]["float32"]
    rows = [{"stage": "as trained, float32", "encoding": "-", "weight_bytes": float_bytes,
             "accuracy": train.accuracy(train.predict(model, data.x_test), data.y_test), "bit_exact": None,
             "text_bytes": None, "layers": [], **describe(model, data)}]
    rows.append({"stage": "as trained, int8", **deploy(model, data, "dense", tmp / "int8"), **describe(model, data)})
    for i, (step, m) in enumerate(models):
        if step["kind"] == "prune":
            label = f"+ structured pruning ({step['ratio'] * 100:.0f} % of channels, {step.get('criterion', 'l1')})"
            tries = ["dense"]
        elif step["kind"] == "sparsify":
            label = f"+ magnitude pruning ({step['sparsity'] * 100:.0f} % of weights)"
            tries = ["sparse"]
        elif step["kind"] == "cluster":
            label = f"+ weight sharing ({step['bits']}-bit k-means)"
            tries = ["sparse", "codebook"]
        else:
            label, tries = f"+ {step['kind']}", ["dense"]
        best = min((deploy(m, data, enc, tmp / f"s{i}_{enc}") for enc in tries), key=lambda r: r["weight_bytes"])
        rows.append({"stage": label, **best, **describe(m, data)})
        if step["kind"] == "cluster":
            rows.append({"stage": "+ Huffman coding (auto: per layer the smallest)",
                         **deploy(m, data, "auto", tmp / f"s{i}_auto"), **describe(m, data)})
    for r in rows:
        r["ratio"] = float_bytes / r["weight_bytes"]
    return rows, rep


def main():
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model, data) in trained().items():
            rows, rep = stages(name, model, data, Path(tmp) / name.split()[1])
            results[name] = {"rows": rows, "report": rep}
    print(f"# compression benchmark, {date.today()}, {platform.machine()} {platform.processor() or ''}, "
          f"python {platform.python_version()}, torch {torch.__version__}")
    for name, res in results.items():
        rows = res["rows"]
        print(f"\n{name} (recipe {RECIPES[name].relative_to(HERE.parent)})\n")
        print("| stage | encoding | parameters | nonzero weights | MACs | weight B | vs float32 | vs previous "
              "| acc (C) | C = reference | host text B |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        prev = None
        for r in rows:
            step_ratio = f"{prev / r['weight_bytes']:.2f}x" if prev else "-"
            exact = "-" if r["bit_exact"] is None else ("yes" if r["bit_exact"] else "NO")
            enc = r["encoding"] if not r["layers"] or len(set(r["layers"])) == 1 and r["encoding"] != "auto" \
                else f"{r['encoding']} ({' '.join(r['layers'])})"
            text = "-" if r["text_bytes"] is None else f"{r['text_bytes']:,}"
            print(f"| {r['stage']} | {enc} | {r['parameters']:,} | {r['nonzero_weights']:,} | {r['macs']:,} | "
                  f"{r['weight_bytes']:,} | {r['ratio']:.1f}x | {step_ratio} | {100 * r['accuracy']:.2f} % | "
                  f"{exact} | {text} |")
            prev = r["weight_bytes"]
        ratio_goal, loss_goal = TARGETS[name]
        base, final = rows[0], rows[-1]
        loss = base["accuracy"] - final["accuracy"]
        met = final["ratio"] >= ratio_goal and loss <= loss_goal + 1e-9 and all(r["bit_exact"] in (None, True) for r in rows)
        print(f"\nresult: {final['ratio']:.1f}x smaller weights, accuracy {100 * final['accuracy']:.2f} % vs float "
              f"{100 * base['accuracy']:.2f} % ({-100 * loss:+.2f} pp), MACs {base['macs']:,} -> {final['macs']:,}; "
              f"target >= {ratio_goal:.0f}x at <= {100 * loss_goal:.1f} pp loss: {'met' if met else 'NOT met'}")
    if "--json" in sys.argv:
        print(json.dumps({k: v["rows"] for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
