"""What a search found: the Pareto front, the best trial within the constraints, and the files.

A row is one trial's model with one weight encoding: the trial's number, its choices (``config``, with the
encoding as ``weights``), its status and measurements (``trial.run_trial``); a failed trial is one row.
The front is the successful trials no other successful trial dominates on the four objectives (higher
accuracy; fewer instructions, less flash, less RAM). The best trial is, among those meeting every
constraint, the one with the least of ``prefer`` (ties: fewer instructions, then higher accuracy).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from ..errors import EdgekitError

PREFER = ("flash", "ram", "instructions", "weights", "accuracy")


def _objectives(row: dict) -> tuple:
    return (-row["accuracy"], row["instructions"], row["flash"], row["ram"])


def dominates(a: dict, b: dict) -> bool:
    oa, ob = _objectives(a), _objectives(b)
    return all(x <= y for x, y in zip(oa, ob)) and oa != ob


def front(rows: list[dict]) -> list[dict]:
    ok = [r for r in rows if r["status"] == "ok"]
    out, seen = [], set()
    for r in sorted((r for r in ok if not any(dominates(o, r) for o in ok)), key=lambda r: (r["flash"], r["number"])):
        if _objectives(r) not in seen:  # a point measured twice (a repeated configuration) is listed once
            seen.add(_objectives(r))
            out.append(r)
    return out


def fmt_bytes(n) -> str:
    return f"{int(n):,} B"


def violations(row: dict, constraints: dict, baseline: float) -> list[tuple[str, float, float, str]]:
    """(constraint, limit, value, unit) for each constraint the trial breaks."""
    out = []
    if constraints.get("max_drop") is not None:
        drop = (baseline - row["accuracy"]) * 100
        if drop > constraints["max_drop"] + 1e-9:
            out.append(("--max-drop", constraints["max_drop"], drop, "pp"))
    for key, flag in (("flash", "--max-flash"), ("ram", "--max-ram"), ("instructions", "--max-instructions")):
        limit = constraints.get(f"max_{key}")
        if limit is not None and row[key] > limit:
            out.append((flag, limit, row[key], "instructions" if key == "instructions" else "B"))
    return out


def _amount(v: float, unit: str) -> str:
    return f"{v:.2f} pp" if unit == "pp" else f"{v:,.0f} {unit}"


def _key(prefer: str):
    def key(r):
        first = {"accuracy": -r["accuracy"], "weights": r["weight_bytes"]}.get(prefer, r.get(prefer))
        return (first, r["instructions"], -r["accuracy"], r["number"])
    return key


def best(rows: list[dict], constraints: dict, baseline: float, prefer: str = "flash") -> dict | None:
    feasible = [r for r in rows if r["status"] == "ok" and not violations(r, constraints, baseline)]
    return min(feasible, key=_key(prefer)) if feasible else None


def counts(rows: list[dict]) -> tuple[int, int]:
    """(trials, failed trials): a trial is failed when none of its encodings ran."""
    numbers = {r["number"] for r in rows}
    ok = {r["number"] for r in rows if r["status"] == "ok"}
    return len(numbers), len(numbers - ok)


def no_fit_message(rows: list[dict], constraints: dict, baseline: float) -> str:
    """Why no trial fits: each constraint not even the best trial for it meets, by how much; or, when every
    constraint alone is met by some trial, the closest trial and what it breaks."""
    ok = [r for r in rows if r["status"] == "ok"]
    trials, failed = counts(rows)
    head = f"no trial meets every constraint ({trials} trials, {failed} failed)"
    if not ok:
        reasons = sorted({r["reason"].splitlines()[0] for r in rows if r["status"] != "ok"})
        return head + ": every trial failed: " + "; ".join(reasons[:3])
    lines = []
    for probe in ("max_drop", "max_flash", "max_ram", "max_instructions"):
        if constraints.get(probe) is None:
            continue
        single = {probe: constraints[probe]}
        closest = min(ok, key=lambda r: violations(r, single, baseline)[0][2] if violations(r, single, baseline) else -1)
        broken = violations(closest, single, baseline)
        if broken:
            flag, limit, value, unit = broken[0]
            what = {"pp": "the most accurate trial loses", "B": "the smallest trial needs",
                    "instructions": "the fastest trial needs"}[unit]
            lines.append(f"{flag} {_amount(limit, unit)}: {what} {_amount(value, unit)} (trial {closest['number']}), "
                         f"{_amount(value - limit, unit)} over")
    if not lines:  # each constraint alone can be met, but never all at once
        def excess(r):
            return sum((v - limit) / max(abs(limit), 1e-9) for _, limit, v, _ in violations(r, constraints, baseline))
        closest = min(ok, key=excess)
        lines.append(f"each constraint is met by some trial, but none meets all; the closest, trial "
                     f"{closest['number']}, breaks " + ", ".join(
                         f"{flag} {_amount(limit, unit)} by {_amount(v - limit, unit)}"
                         for flag, limit, v, unit in violations(closest, constraints, baseline)))
    return head + ":\n  " + "\n  ".join(lines)


def describe(config: dict) -> str:
    parts = []
    if config.get("prune_ratio", 0) > 0:
        parts.append(f"prune {config['prune_ratio']:g} {config.get('prune_criterion', 'l1')}/"
                     f"{config.get('prune_scope', 'layer')}")
    layers = {k.split(".", 1)[1]: v for k, v in config.items() if k.startswith("prune_layer.")}
    if layers:
        parts.append("prune " + ",".join(f"{k}={v:g}" for k, v in layers.items()))
    if config.get("sparsity", 0) > 0:
        parts.append(f"sparsify {config['sparsity']:g}")
    if config.get("cluster_bits", 0):
        parts.append(f"cluster {config['cluster_bits']} bits")
    if config.get("qat"):
        parts.append("qat")
    if config.get("distill") and (config.get("prune_ratio", 0) > 0 or config.get("sparsity", 0) > 0 or layers):
        parts.append("distilled")
    if config.get("weights"):
        parts.append(config["weights"])
    if config.get("exit_threshold") is not None:
        t = config["exit_threshold"]
        parts.append(f"exits {t}" if isinstance(t, str) else f"exits at {t:g}")
    return ", ".join(parts) or "as given"


def table(rows: list[dict], baseline: float, float_bytes: int, unit: str, chosen: dict | None = None) -> str:
    head = (f"{'trial':>5} {'accuracy':>9} {'drop pp':>7} {unit:>14} {'flash B':>10} {'RAM B':>9} "
            f"{'weights B':>10} {'x smaller':>9}  choices")
    lines = [head, "-" * len(head)]
    for r in rows:
        mark = " *" if chosen is not None and r["number"] == chosen["number"] else ""
        lines.append(f"{r['number']:>5} {r['accuracy'] * 100:8.2f}% {(baseline - r['accuracy']) * 100:7.2f} "
                     f"{r['instructions']:>14,.0f} {r['flash']:>10,} {r['ram']:>9,} {r['weight_bytes']:>10,} "
                     f"{float_bytes / max(r['weight_bytes'], 1):>8.1f}x  {describe(r['config'])}{mark}")
    return "\n".join(lines)


CSV_FIELDS = ["trial", "status", "accuracy", "drop_pp", "instructions", "flash_bytes", "ram_bytes", "weight_bytes",
              "x_smaller", "arena_bytes", "macs", "seconds", "choices", "config", "reason"]


def write_csv(rows: list[dict], path: Path, baseline: float, float_bytes: int) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for r in rows:
            ok = r["status"] == "ok"
            w.writerow([r["number"], r["status"], f"{r['accuracy']:.6f}" if ok else "",
                        f"{(baseline - r['accuracy']) * 100:.4f}" if ok else "",
                        f"{r['instructions']:.0f}" if ok else "", r["flash"] if ok else "", r["ram"] if ok else "",
                        r["weight_bytes"] if ok else "",
                        f"{float_bytes / max(r['weight_bytes'], 1):.2f}" if ok else "",
                        r["arena_bytes"] if ok else "", r["macs"] if ok else "", r["seconds"],
                        describe(r["config"]), json.dumps(r["config"], sort_keys=True), r["reason"]])


def write_outputs(summary: dict, out: Path) -> list[Path]:
    """pareto.csv, trials.csv, summary.json, pareto.png and report.html (the last two need matplotlib)."""
    rows, base, fb = summary["trials"], summary["baseline_accuracy"], summary["float_weight_bytes"]
    written = []
    write_csv(summary["front"], out / "pareto.csv", base, fb)
    write_csv(rows, out / "trials.csv", base, fb)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    written += [out / "pareto.csv", out / "trials.csv", out / "summary.json"]
    try:
        from .. import report
        from ..report import plots
        plots.require_matplotlib()
    except EdgekitError:
        return written  # the optional `report` extra is not installed: the tables are enough
    png = plots.pareto_front(
        [(r["flash"], r["accuracy"], r["instructions"]) for r in rows if r["status"] == "ok"],
        [(r["flash"], r["accuracy"], r["instructions"]) for r in summary["front"]],
        summary["best"] and (summary["best"]["flash"], summary["best"]["accuracy"]),
        summary["unit"], summary.get("constraints", {}).get("max_flash"))
    (out / "pareto.png").write_bytes(png)
    report.write(report.tune_page(summary, png), out / "report.html")
    return written + [out / "pareto.png", out / "report.html"]
