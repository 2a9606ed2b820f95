"""HTML reports people look at: one self-contained page per `edgekit profile`, `compress` and
`thresholds` run.

Python gathers the numbers (the profile / compression / sweep report, the project's memory plan
recomputed by the planner that placed it, the built binary's sections from its ELF) and draws the
figures with matplotlib; a Jinja2 template (``report/templates/``) only lays them out. The page
needs nothing outside itself: figures are inline PNGs (base64 data URLs), the style is inline, and
there is no script.
"""
from __future__ import annotations

import base64
import datetime
from pathlib import Path

import jinja2
import numpy as np

from ..errors import EdgekitError
from . import plots

TEMPLATES = Path(__file__).parent / "templates"
_env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                          undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)

# The binaries a project's build leaves, in the order `edgekit profile` looks for them.
BINARIES = ("firmware.elf", "model_runner", "edgekit_runner")


def _image(png: bytes, alt: str) -> dict:
    return {"src": "data:image/png;base64," + base64.b64encode(png).decode("ascii"), "alt": alt}


def _count(v) -> str:
    return "-" if v is None else f"{v:,.0f}"


def _pct(v) -> str:
    return "-" if v is None else f"{v * 100:.2f} %"


def _bytes(v) -> str:
    return "-" if v is None else f"{int(v):,} B"


def _section(heading: str, intro: str = "", image: dict | None = None, columns=None, rows=None,
             notes: list[str] | None = None) -> dict:
    return {"heading": heading, "intro": intro, "image": image, "columns": columns or [], "rows": rows or [],
            "notes": notes or []}


def _render(title: str, subtitle: str, facts: list[tuple[str, str]], verdict: dict | None,
            sections: list[dict]) -> str:
    from .. import __version__

    return _env.get_template("report.html.j2").render(
        title=title, subtitle=subtitle, facts=facts, verdict=verdict, sections=sections,
        made=f"edgekit {__version__}, {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}")


def check_output(path) -> Path:
    """Fail before any work on an HTML path edgekit will not write, or without matplotlib."""
    plots.require_matplotlib()
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):
        raise EdgekitError(f"the HTML report {path} must be an .html file")
    return path


def write(html: str, path) -> Path:
    path = check_output(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------
# What every page about a generated project shows: its memory plan and its binary
# ---------------------------------------------------------------------------

def memory_plan(project_dir) -> dict:
    """The arena of a generated project as the planner placed it (recorded by generate): buffers (name,
    offset, size, the first and last step they are alive), step labels, bytes alive per step, the arena
    and its peak (the schedule's lower bound: bytes alive at once, less what an in-place layer shares)."""
    from ..codegen.project import load_project
    from ..ir_io import load_graph

    graph = load_graph(project_dir)
    record = load_project(project_dir)
    memory = record.get("memory") or {}
    if "buffers" not in memory:
        raise EdgekitError(f"{project_dir} records no memory plan (an older edgekit generated it); "
                           "generate the project again")
    buffers = []
    for b in memory["buffers"]:
        name = b["tensors"][0] + (f" (+{len(b['tensors']) - 1} reshaped)" if len(b["tensors"]) > 1 else "")
        buffers.append({"name": name, "offset": b["offset"], "size": b["size"], "first": b["first"],
                        "last": b["last"]})
    schedule = memory.get("schedule") or list(range(len(graph.ops)))  # the order the layers run in
    steps = ["input"] + [f"{i} {graph.ops[i].name}" for i in schedule] + ["outputs"]
    live = {}
    if buffers:
        for s in range(min(b["first"] for b in buffers), max(b["last"] for b in buffers) + 1):
            live[s] = sum(b["size"] for b in buffers if b["first"] <= s <= b["last"])
    peak = int(record.get("arena_lower_bound", max(live.values(), default=0)))
    top = max(live.values(), default=0)
    return {"buffers": buffers, "steps": steps, "live": live, "arena_bytes": record["arena_bytes"], "peak": peak,
            "peak_steps": [s for s, v in live.items() if v == top],
            "in_place_pairs": [tuple(p) for p in memory.get("in_place_pairs", [])]}


def _step_name(steps: list[str], step: int) -> str:
    return steps[step + 1]


def memory_section(project_dir) -> dict:
    plan = memory_plan(project_dir)
    steps = plan["steps"]
    image = _image(plots.memory_lifetimes(plan["buffers"], steps, plan["live"], plan["arena_bytes"]),
                   "memory plan: tensor lifetimes over the arena")
    rows = [[b["name"], f"{b['offset']:,}", f"{b['size']:,}", _step_name(steps, b["first"]),
             _step_name(steps, b["last"])]
            for b in sorted(plan["buffers"], key=lambda b: (b["first"], b["offset"]))]
    peak_at = ", ".join(_step_name(steps, s) for s in plan["peak_steps"])
    intro = (f"One static arena of {plan['arena_bytes']:,} B, planned at generate time. Each box is a tensor, "
             f"from the layer that writes it to the last layer that reads it; tensors alive at the same time share "
             f"bytes only where a layer writes its output over its own input (in place, {len(plan['in_place_pairs'])} "
             f"such layers). The most bytes alive at once is at {peak_at}; with the in-place sharing no plan of this "
             f"schedule can use less than {plan['peak']:,} B, and this one uses "
             f"{plan['arena_bytes'] / max(plan['peak'], 1):.2f}x that.")
    return _section("Memory plan", intro, image, ["tensor", "offset (B)", "size (B)", "written by", "last read by"],
                    rows)


def find_binary(project_dir) -> Path | None:
    return next((p for p in (Path(project_dir) / b for b in BINARIES) if p.exists()), None)


def flash_section(project_dir, weight_bytes: int | None = None) -> dict | None:
    from ..targets.elf import section_sizes, sections

    binary = find_binary(project_dir)
    if binary is None:
        return None
    secs = sections(binary)
    totals = section_sizes(binary)
    rows = [[s["name"], f"{s['size']:,}", "yes" if s["flash"] else "", "yes" if s["ram"] else ""]
            for s in sorted(secs, key=lambda s: -s["size"])]
    intro = (f"{binary.name}: flash {totals['flash']:,} B (code and constants {totals['text']:,} B, initialised "
             f"data {totals['data']:,} B), RAM {totals['ram']:,} B (data {totals['data']:,} B, zeroed "
             f"{totals['bss']:,} B), read from the ELF's section headers.")
    if weight_bytes is not None:
        intro += f" The model's weights are {weight_bytes:,} B of it."
    return _section("Flash and RAM by section", intro, _image(plots.sections_bars(secs), "sections of the binary"),
                    ["section", "bytes", "in flash", "in RAM"], rows)


def _project_sections(project_dir, weight_bytes=None) -> list[dict]:
    if project_dir is None or not Path(project_dir).exists():
        return []
    found = [memory_section(project_dir)]
    flash = flash_section(project_dir, weight_bytes)
    if flash:
        found.append(flash)
    return found


# ---------------------------------------------------------------------------
# The three pages
# ---------------------------------------------------------------------------

def profile_page(report: dict, project_dir=None) -> str:
    """The page for an `edgekit profile` report (``device.profile.profile``)."""
    plots.require_matplotlib()
    project_dir = project_dir or report.get("project")
    unit = report["unit"]
    t = report["total"]
    facts = [("board", report["board"]), ("model", report["fingerprint"]),
             ("runs", f"{report['runs']:,} over {report['samples']:,} samples"),
             (f"per inference ({unit})", f"median {_count(t['median'])} (min {_count(t['min'])}, "
                                         f"max {_count(t['max'])})")]
    if "latency_ms" in report:
        facts.append(("latency", f"median {report['latency_ms']['median']:.3f} ms"))
    if "accuracy" in report:
        facts.append(("accuracy on the device", _pct(report["accuracy"])))
    facts += [("flash", f"{_bytes(report.get('flash_bytes'))} (weights {_bytes(report['weight_bytes'])})"),
              ("RAM", f"{_bytes(report.get('ram_bytes'))} (arena {_bytes(report['arena_bytes'])})")]
    if report.get("stack_bytes"):  # a Linux runner has no painted stack to measure
        facts.append(("stack", f"{report['stack_high_water']:,} B used of {report['stack_bytes']:,} B"
                               + (f" (static bound {report['stack_bound']:,} B)" if report.get("stack_bound") else "")))
    if report["bit_exact"]:
        verdict = {"ok": True, "text": f"Every output of the {report['runs']:,} runs equals the numpy reference, "
                                      "bit for bit."}
    else:
        verdict = {"ok": False, "text": f"{len(report['mismatches'])} runs differ from the numpy reference "
                                       "(the first are listed below)."}
    layers = report["layers"]
    total = sum(l["median"] for l in layers) or 1.0
    image = _image(plots.layer_bars([l["name"] for l in layers], [l["median"] for l in layers], unit,
                                    [l["macs"] for l in layers]), f"per-layer {unit}")
    rows = [[l["name"], l["kind"], f"{l['macs']:,}", _count(l["median"]), _count(l["min"]), _count(l["max"]),
             f"{100 * l['median'] / total:.1f} %"] for l in layers]
    notes = []
    if unit == "emulated instructions":
        notes.append("QEMU counts executed instructions (deterministic); they are not a time.")
    sections = [_section(f"Per layer ({unit})", "The device's own count for each layer, median over the runs.",
                         image, ["layer", "kind", "MACs", "median", "min", "max", "share"], rows, notes)]
    if "exits" in report:
        ex = report["exits"]
        rows = [[f"{r['exit']}: {r['name']}", f"{r['hits']:,}", _pct(r["hit_rate"]), _pct(r.get("accuracy")),
                 _count(r["mean_count"])] for r in ex["per_exit"]]
        thr = "off" if ex["threshold_real"] is None else f"{ex['threshold_real']:g}"
        intro = f"{ex['criterion']} confidence, threshold {thr}; mean {_count(ex['mean_count'])} {unit} per inference"
        if "work_fraction" in ex:
            intro += f", {ex['work_fraction']:.3f} of the full network's {_count(ex['full_mean_count'])}"
        sections.append(_section("Early exits", intro + ".", None,
                                 ["exit", "answers", "share", "accuracy", f"mean {unit}"], rows))
    if report["mismatches"]:
        rows = [[m["run"], m["sample"], m["differing"]] for m in report["mismatches"]]
        sections.append(_section("Outputs that differ from the reference", "", None,
                                 ["run", "sample", "differing values"], rows))
    sections += _project_sections(project_dir, report["weight_bytes"])
    return _render("edgekit profile", f"{report['board']} over {report['port']}", facts, verdict, sections)


def compress_page(report: dict, project_dir=None) -> str:
    """The page for an `edgekit compress` report (``compress.recipe.run_recipe``)."""
    plots.require_matplotlib()
    steps = [s for s in report["steps"] if "sensitivity" not in s]
    final = report.get("final")
    if project_dir is None and final:
        project_dir = final.get("project")
    first, last = steps[0], steps[-1]
    best = [min(s["weight_bytes"]["int8"].values()) for s in steps]
    facts = [("input", str(report.get("input", "-"))), ("output", str(report.get("output", "-"))),
             ("steps", str(len(report["steps"]))),
             ("accuracy", f"{_pct(first['accuracy'])} -> {_pct(last['accuracy'])} (float, held out)"),
             ("MACs", f"{first['macs']:,} -> {last['macs']:,} ({first['macs'] / max(last['macs'], 1):.2f}x fewer)"),
             ("weights", f"{first['weight_bytes']['float32']:,} B float32 -> {best[-1]:,} B int8 "
                         f"({first['weight_bytes']['float32'] / max(best[-1], 1):.1f}x smaller)")]
    verdict = None
    if final:
        facts.append(("final C program", f"accuracy {_pct(final['accuracy_c'])}, weights "
                                         f"{final['weight_bytes']:,} B ({final['weights']}), arena "
                                         f"{final['arena_bytes']:,} B"))
        verdict = {"ok": bool(final["c_equals_reference"]),
                   "text": "The final model's C program, built and run on the held-out inputs, equals the int8 "
                           "reference executor bit for bit." if final["c_equals_reference"] else
                           "The final model's C program DIFFERS from the int8 reference executor."}
    image = _image(plots.compression_steps([s["label"] for s in steps], [s["accuracy"] for s in steps],
                                           [s.get("int8_accuracy") for s in steps],
                                           [s["weight_bytes"]["float32"] for s in steps], best,
                                           [s["macs"] for s in steps]), "accuracy, size and MACs per step")
    rows = [[s["label"], f"{s['parameters']:,}", f"{s['nonzero_weights']:,}", f"{s['macs']:,}",
             f"{s['weight_bytes']['float32']:,}", f"{b:,}", _pct(s["accuracy"]), _pct(s.get("int8_accuracy"))]
            for s, b in zip(steps, best)]
    encodings = ", ".join(first["weight_bytes"]["int8"])
    sections = [_section("Per step", "Each recipe step's model, measured on the held-out split.", image,
                         ["step", "parameters", "nonzero weights", "MACs", "float32 B", "int8 B*", "accuracy",
                          "int8 accuracy"], rows,
                         [f"* int8 B: the fewest weight bytes among the encodings measured ({encodings})."])]
    for s in report["steps"]:
        if "sensitivity" in s:
            scan = s["sensitivity"]
            rows = [[r["layer"], r["channels"], ", ".join(f"{k}: {v * 100:.1f} %" for k, v in r["accuracy"].items()),
                     f"{r['tolerates']:g}"] for r in scan["layers"]]
            sections.append(_section(f"{s['label']}: sensitivity", "Held-out accuracy when one layer alone loses a "
                                     f"fraction of its channels (baseline {_pct(scan['baseline_accuracy'])}).", None,
                                     ["layer", "channels", "accuracy by ratio", "tolerates"], rows))
    sections += _project_sections(project_dir, final["weight_bytes"] if final else None)
    return _render("edgekit compress", str(report.get("recipe", "")) or "compression recipe", facts, verdict,
                   sections)


def threshold_text(threshold) -> str:
    """A threshold as the page shows it: "off", a number, or one per exit (per-exit search)."""
    if threshold is None:
        return "off"
    if isinstance(threshold, (list, tuple)):
        return " / ".join(threshold_text(t) for t in threshold)
    return f"{threshold:.4g}"


def thresholds_page(sweep: dict, chosen: dict, project_dir=None, rows: int = 24) -> str:
    """The page for an `edgekit thresholds` sweep (``device.profile.sweep_reference`` / ``sweep_device``)."""
    plots.require_matplotlib()
    names, full = sweep["names"], sweep["full"]
    work_label = sweep["costs"]
    image = _image(plots.exit_curve(sweep["points"], full, chosen, names, work_label), "early-exit curve")
    thr = threshold_text(chosen["threshold"])
    facts = [("exits", ", ".join(names)), ("criterion", sweep["criterion"]), ("samples", f"{sweep['samples']:,}"),
             ("work measured in", work_label), ("from", sweep["source"]),
             ("operating point", f"threshold {thr}: accuracy {_pct(chosen.get('accuracy'))}, work "
                                 f"{chosen['work_fraction']:.3f} of the full network's")]
    if "accuracy" in full:
        facts.append(("full network", f"accuracy {_pct(full['accuracy'])}"))
    verdict = None
    if sweep.get("bit_exact") is not None:
        verdict = {"ok": bool(sweep["bit_exact"]),
                   "text": "Every device output at every threshold equals the numpy reference, bit for bit."
                   if sweep["bit_exact"] else "Some device outputs DIFFER from the numpy reference."}
    points = sweep["points"]
    if len(points) > rows:  # an even spread, always with the chosen point
        keep = set(np.linspace(0, len(points) - 1, rows).round().astype(int).tolist())
        points = [p for i, p in enumerate(points) if i in keep or p.get("threshold") == chosen["threshold"]]
    rows_shown = points + [full] if all(p.get("threshold") is not None for p in points) else points
    marked = next((p for p in rows_shown if p.get("threshold") == chosen["threshold"]), None)
    table = [[("off (full network)" if p.get("threshold") is None else threshold_text(p["threshold"]))
              + ("  (operating point)" if p is marked else ""), _pct(p.get("accuracy")), _count(p["work"]),
              f"{p['work_fraction']:.3f}", *[_pct(r) for r in p["hit_rates"]]] for p in rows_shown]
    intro = ("Each point is one threshold: the higher it is, the fewer inputs an early exit answers, the more "
             "work and (usually) the better the accuracy.")
    sections = [_section("Accuracy and work over thresholds", intro, image,
                         ["threshold", "accuracy", f"work ({work_label})", "fraction", *[f"answered by {n}"
                                                                                       for n in names]], table)]
    sections += _project_sections(project_dir)
    return _render("edgekit thresholds", "early-exit operating curve", facts, verdict, sections)


def tune_page(summary: dict, png: bytes) -> str:
    """The page for an `edgekit tune` search (``tune.search.run_search``'s summary)."""
    from ..tune.pareto import counts, describe, no_fit_message

    base, fb, unit = summary["baseline_accuracy"], summary["float_weight_bytes"], summary["unit"]
    rows, best = summary["trials"], summary["best"]
    failed = [r for r in rows if r["status"] != "ok"]
    c = summary["constraints"]
    limits = ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in c.items() if v is not None) or "none"
    facts = [("model", str(summary["model"])), ("board", summary["board"]), ("data", summary["data"]),
             ("trials", "{} ({} failed), {} at a time; each trial's model measured with every weight encoding of "
                        "the space".format(*counts(rows), summary["workers"])),
             ("input model", f"accuracy {_pct(base)} (float), weights {fb:,} B float32"),
             ("constraints", limits), ("sampler", summary["sampler"])]
    if best:
        facts.append(("best within the constraints", f"trial {best['number']}: accuracy {_pct(best['accuracy'])}, "
                      f"{_count(best['instructions'])} {unit}, flash {_bytes(best['flash'])}, RAM "
                      f"{_bytes(best['ram'])}, weights {fb / max(best['weight_bytes'], 1):.1f}x smaller"))
        verdict = {"ok": True, "text": f"Trial {best['number']} meets every constraint: {describe(best['config'])}. "
                                       "Saved as best.pt2 with its recipe best.toml."}
    else:
        verdict = {"ok": False, "text": no_fit_message(rows, c, base)}

    def line(r):
        return [str(r["number"]), _pct(r["accuracy"]), f"{(base - r['accuracy']) * 100:.2f}", _count(r["instructions"]),
                _bytes(r["flash"]), _bytes(r["ram"]), _bytes(r["weight_bytes"]),
                f"{fb / max(r['weight_bytes'], 1):.1f}x", describe(r["config"])]
    columns = ["trial", "accuracy", "drop (pp)", unit, "flash", "RAM", "weights", "smaller", "choices"]
    sections = [_section("Pareto front", "The trials no other trial beats on accuracy, instructions, flash and RAM "
                         "at once. Every trial was compiled, run as C on the held-out split and measured on the "
                         "board.", _image(png, "Pareto front"), columns, [line(r) for r in summary["front"]])]
    if failed:
        sections.append(_section("Failed trials", "Recorded, not retried: the search went on without them (a "
                                 "trial's encoding that failed, e.g. too big for the board, is listed here too).", None,
                                 ["trial", "choices", "reason"],
                                 [[str(r["number"]), describe(r["config"]), r["reason"]] for r in failed]))
    return _render("edgekit tune", f"{summary['model']} on {summary['board']}", facts, verdict, sections)
