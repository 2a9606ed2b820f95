"""`edgekit tune` (issue 15): what a search finds, how long it takes, how it scales.

    nice -n 5 .venv/bin/python bench/bench_tune.py --part mlp        # >= 50x at <= 0.5 pp, no recipe given
    nice -n 5 .venv/bin/python bench/bench_tune.py --part cnn        # the front against cnn_structured.toml
    nice -n 5 .venv/bin/python bench/bench_tune.py --part scaling    # 1 vs 2 local workers vs a 2-node Ray cluster
    ... --json out.json                                              # + the raw summaries

mlp: the digits MLP 64-300-100-10 trained with another seed (7) and schedule (25 epochs, lr 2e-3, batch 32)
than the model bench/recipes were tuned on (bench_encodings.trained: seed 0, 40 epochs, lr 3e-3, batch 64);
`tune` with the default space on the host (callgrind instructions), --max-drop 0.5, --prefer weights.
cnn: the demo CNN as bench_compress compresses it (bench_encodings.trained, seed 0) on the emulated
Cortex-M4 (mps2-an386); the hand recipe cnn_structured.toml is the search's first trial (space.ANCHORS; the
MLP recipe's sparsity 0.9 is outside a convolutional model's default space), so it is measured the same way;
every trial's model is measured with every encoding, and the rows that beat the hand recipe (its `auto`
row) on flash and instructions at equal or better accuracy are listed, with those of other trainings. scaling: one small search (tiny training budget) three ways.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from edgekit import datasets, models, train  # noqa: E402
from edgekit.compress import fxgraph  # noqa: E402
from edgekit.tune import pareto  # noqa: E402
from edgekit.tune.search import run_search  # noqa: E402

SCALING_SPACE = """
[space]
prune_ratio = [0.0, 0.5, 0.6]
sparsity = [0.0, 0.8, 0.9]
cluster_bits = [0, 4]
qat = [false]
[train]
prune_steps = 2
prune_epochs = 6
sparsify_steps = 2
sparsify_epochs = 6
cluster_epochs = 2
"""


def machine() -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    return f"{date.today()}, {platform.machine()} {cpu}, Python {platform.python_version()}, torch {torch.__version__}"


def mlp_model(path: Path) -> Path:
    d = datasets.digits(flat=True)
    torch.manual_seed(7)
    m = train.train_classifier(models.digits_mlp(), d.x_train, d.y_train, epochs=25, lr=2e-3, batch_size=32, seed=7,
                               show_progress=False)
    fxgraph.export_model(m, (64,), path)
    return path


def cnn_model(path: Path) -> Path:
    img = datasets.digits()
    torch.manual_seed(0)  # as bench_encodings.trained(): the model cnn_structured.toml was tuned on
    m = train.train_classifier(models.DigitsCNN(), img.x_train, img.y_train, epochs=25, seed=0, show_progress=False)
    fxgraph.export_model(m, (1, 8, 8), path)
    return path


def show(summary: dict, title: str) -> None:
    rows = summary["trials"]
    trials, failed = pareto.counts(rows)
    print(f"\n## {title}: {trials} trials ({failed} failed; {len(rows)} rows: one per encoding) in "
          f"{summary['seconds'] / 60:.1f} min, {summary['workers']} at a time; input model "
          f"{summary['baseline_accuracy'] * 100:.2f} % float, {summary['float_weight_bytes']:,} B float32")
    print(pareto.table(rows, summary["baseline_accuracy"], summary["float_weight_bytes"], summary["unit"],
                       summary["best"]))
    b = summary["best"]
    if b:
        print(f"best within the constraints: trial {b['number']}, "
              f"{summary['float_weight_bytes'] / b['weight_bytes']:.1f}x smaller weights than float32 at "
              f"{(summary['baseline_accuracy'] - b['accuracy']) * 100:+.2f} pp drop")
    else:
        print(pareto.no_fit_message(rows, summary["constraints"], summary["baseline_accuracy"]))


def part_mlp(tmp: Path, trials: int, workers: int) -> dict:
    s = run_search(mlp_model(tmp / "mlp.pt2"), data="digits", board="host", out_dir=tmp / "mlp", trials=trials,
                   workers=workers, max_drop=0.5, prefer="weights", seed=0)
    show(s, "digits MLP 64-300-100-10 (seed 7), host")
    return s


# cnn_structured.toml's choices as a trial's config (space.ANCHORS; the encoding it names: auto).
HAND_CNN = {"prune_ratio": 0.5, "prune_criterion": "apoz", "prune_scope": "layer", "sparsity": 0.5, "cluster_bits": 4,
            "distill": True, "qat": False, "weights": "auto"}


def part_cnn(tmp: Path, trials: int, workers: int) -> dict:
    s = run_search(cnn_model(tmp / "cnn.pt2"), data="digits", board="mps2-an386", out_dir=tmp / "cnn",
                   trials=trials, workers=workers, max_drop=1.0, seed=0)
    show(s, "demo CNN, mps2-an386")
    hand = next((r for r in s["trials"] if r["status"] == "ok" and r["config"] == HAND_CNN), None)
    if hand:
        better = [r for r in s["trials"] if r["status"] == "ok" and r is not hand and r["flash"] < hand["flash"]
                  and r["instructions"] < hand["instructions"] and r["accuracy"] >= hand["accuracy"]]
        print(f"hand recipe cnn_structured.toml (trial {hand['number']}, auto): {hand['accuracy'] * 100:.2f} %, "
              f"flash {hand['flash']:,} B, {hand['instructions']:,.0f} instructions; rows with less flash and fewer "
              f"instructions at equal or better accuracy: "
              f"{[(r['number'], r['config']['weights']) for r in better] or 'none'}; of other trainings: "
              f"{[(r['number'], r['config']['weights']) for r in better if r['number'] != hand['number']] or 'none'}")
        s["dominating_hand"] = [(r["number"], r["config"]["weights"]) for r in better]
    return s


def _per_trial(s: dict) -> dict:
    """One row per trial (a trial has a row per encoding): its config without the encoding, its seconds."""
    first = {}
    for r in s["trials"]:
        first.setdefault(r["number"], r)
    return {n: ({k: v for k, v in r["config"].items() if k != "weights"}, r["seconds"]) for n, r in sorted(first.items())}


def _scaling_row(setup: str, s: dict) -> dict:
    trials = _per_trial(s)
    return {"setup": setup, "seconds": s["seconds"], "trials": len(trials),
            "trial_seconds": sum(sec for _, sec in trials.values()) / len(trials),
            "configs": [c for c, _ in trials.values()]}


def part_scaling(tmp: Path, trials: int) -> list[dict]:
    from ray.cluster_utils import Cluster

    model = mlp_model(tmp / "mlp-scaling.pt2")
    (tmp / "space.toml").write_text(SCALING_SPACE)
    out = []
    for label, kwargs in (("1 local worker", {"workers": 1}), ("2 local workers", {"workers": 2}),
                          ("2 local workers, --unbatched", {"workers": 2, "batched": False})):
        s = run_search(model, out_dir=tmp / label.replace(" ", "-"), trials=trials, space=tmp / "space.toml",
                       quiet=True, **kwargs)
        out.append(_scaling_row(label, s))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        for label, kwargs in (("Ray cluster of 2 one-CPU nodes (--address)", {}),
                              ("Ray cluster of 2 one-CPU nodes (--address), --unbatched", {"batched": False})):
            s = run_search(model, out_dir=tmp / f"cluster{len(out)}", trials=trials, space=tmp / "space.toml",
                           quiet=True, address=cluster.address, **kwargs)
            out.append(_scaling_row(label, s))
    finally:
        cluster.shutdown()
    print(f"\n## scaling: {trials} trials of a small search (digits MLP, 2 x 6 epochs per step, "
          f"every encoding measured per trial)")
    print("| setup | wall s | trials/min | mean s per trial (inside the trial) |\n|---|---|---|---|")
    for r in out:
        print(f"| {r['setup']} | {r['seconds']:.0f} | {r['trials'] / r['seconds'] * 60:.2f} | {r['trial_seconds']:.1f} |")
    same = out[1]["configs"] == out[3]["configs"]
    print(f"2 local workers and the 2-node cluster (both batched) asked for the same trials: {same}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["mlp", "cnn", "scaling"], required=True)
    ap.add_argument("--trials", type=int)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    print(machine())
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.part == "mlp":
            result = part_mlp(tmp, args.trials or 24, args.workers)
        elif args.part == "cnn":
            result = part_cnn(tmp, args.trials or 12, args.workers)
        else:
            result = part_scaling(tmp, args.trials or 8)
    print(f"\n(bench wall time {(time.monotonic() - start) / 60:.1f} min)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
