"""`edgekit profile`: run inferences on a device and measure them there.

Each run sends an input, invokes the model, reads the output and the
per-layer counts. Every output is compared bit for bit with the numpy
reference of the project the device runs (found by the model fingerprint the
device reports). Counts are what the device counts: cycles on hardware, and on
QEMU deterministic *emulated instructions*, never called milliseconds.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import layout
from .. import quant_math as qm
from .. import reference
from ..boards import project_board
from ..codegen.project import load_project
from ..errors import EdgekitError
from ..ir import Graph
from ..ir_io import load_graph
from ..progress import Progress
from ..targets.elf import section_sizes
from .protocol import DeviceLink


def count_unit(board, info) -> tuple[str, float]:
    """(unit name, divisor turning raw counts into that unit)."""
    if info.counter_kind == 2:  # QEMU icount: SysTick ticks -> instructions
        shift = int(board.get("icount_shift", 6)) if board else 6
        return "emulated instructions", (2 ** shift) * info.clock_hz / 1e9
    if info.counter_kind == 3:  # CLOCK_MONOTONIC of a Linux board (host, Raspberry Pi runner)
        return "nanoseconds", 1.0
    return "cycles", 1.0


def _prepare_inputs(project: dict, graph, inputs: np.ndarray, int8: bool) -> np.ndarray:
    rec = project["inputs"][0]
    sample_shape = rec["shape"][1:]
    if int8:
        x = np.asarray(inputs)
        if x.dtype != np.int8 or list(x.shape[1:]) != list(sample_shape):
            raise EdgekitError(f"--int8 inputs must be int8 samples of shape {sample_shape} (NHWC)")
        return x
    from ..safety import check_float_samples
    x = np.asarray(check_float_samples(inputs, "the inputs"), dtype=np.float32)
    if x.ndim == 0 or x.shape[0] == 0:
        raise EdgekitError("the inputs are empty")
    if not np.all(np.isfinite(x)):
        raise EdgekitError("the inputs contain NaN or inf values")
    x = layout.to_ir(x, rec["layout"], sample_shape)
    if project["mode"] == "weight_only":
        return x
    return qm.quantize(x, rec["scale"], rec["zero_point"])


def _stats(values) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"min": float(a.min()), "median": float(np.median(a)), "max": float(a.max()), "mean": float(a.mean())}


def _connect(link: DeviceLink, project_dir):
    """(device info, project dir, project record, graph) for the model the device runs."""
    info = link.identify()
    if project_dir is None:
        from .flash import project_for
        project_dir = project_for(info.fingerprint)
        if project_dir is None:
            raise EdgekitError(f"the device runs model {info.fingerprint}, which no local project records; "
                               "pass --project DIR (the `edgekit generate` output)")
    project_dir = Path(project_dir)
    project = load_project(project_dir)
    if project["fingerprint"] != info.fingerprint:
        raise EdgekitError(f"the device runs model {info.fingerprint}, but {project_dir} is model "
                           f"{project['fingerprint']}: flash it first (`edgekit flash {project_dir} --port ...`)")
    return info, project_dir, project, load_graph(project_dir)


def _inferences(link: DeviceLink, info, project: dict, samples: np.ndarray, expected: list[np.ndarray],
                expected_exit: np.ndarray, runs: int, divisor: float, unit: str, bar_label: str,
                show_progress: bool) -> dict:
    """``runs`` inferences cycling over ``samples``, every output and the answering exit compared with the
    reference. Returns counts, outputs, exits and mismatches."""
    n = samples.shape[0]
    weight_only = project["mode"] == "weight_only"
    dtype = np.float32 if weight_only else np.int8
    sizes = [int(np.prod(o["shape"])) for o in project["outputs"]]
    read = range(len(sizes)) if project.get("exits") else range(1)  # a plain model: output 0, as always
    outputs = [np.zeros((n, sizes[j]), dtype=dtype) for j in read]
    exits = np.zeros(n, np.int64)
    totals, per_layer, per_sample, mismatches, per_thread = [], [], np.zeros(n), [], []
    threads = project.get("threads", 1) > 1 or None  # the Pi runner reports each thread's CPU time
    bar = Progress(runs, bar_label, enabled=show_progress, unit=" runs")
    for r in range(runs):
        i = r % n
        link.set_input(0, samples[i].tobytes())
        status, total = link.invoke()
        differing, same = 0, status == expected_exit[i]
        for j in read:
            y = np.frombuffer(link.get_output(j, sizes[j] * np.dtype(dtype).itemsize), dtype=dtype)
            exp = expected[j][i].reshape(-1)
            ok = np.array_equal(y, exp) if not weight_only else np.allclose(y, exp, rtol=1e-4, atol=1e-4)
            if not ok:
                differing += int(np.sum(y != exp))
                same = False
            outputs[j][i] = y
        layers = link.layer_counts(info.num_layers)
        if threads:
            counts = link.thread_counts()
            threads = counts is not None
            if counts:
                per_thread.append(counts)
        if not same:
            mismatches.append({"run": r, "sample": i, "differing": differing,
                               **({"exit": int(status), "expected_exit": int(expected_exit[i])}
                                  if project.get("exits") else {})})
        exits[i] = status
        totals.append(total / divisor)
        per_sample[i] = totals[-1]
        per_layer.append([c / divisor for c in layers])
        bar.update(postfix=f"{totals[-1]:,.0f} {unit}")
    bar.close()
    return {"totals": totals, "per_layer": np.asarray(per_layer), "outputs": outputs, "exits": exits,
            "per_sample": per_sample, "mismatches": mismatches, "per_thread": np.asarray(per_thread, np.float64)}


def _layer_costs_from_passes(project: dict, early: np.ndarray, full: np.ndarray) -> list:
    """Each layer's count as the full network pays it, for ``edgekit thresholds --costs``: a backbone layer
    from the exits-off pass (where every input runs it), a head layer (skipped with exits off) from the runs
    of the exits-on pass that reached it (a layer that ran counts more than 0; the device zeroes the counts
    before each inference). None: a head no input reached."""
    heads = set(project["exits"].get("head_only_layers", []))
    costs = []
    for layer in project["layers"]:
        i = layer["index"]
        if not layer["kernel"]:
            costs.append(0.0)
        elif i in heads:
            ran = early[:, i][early[:, i] > 0]
            costs.append(float(np.median(ran)) if ran.size else None)
        else:
            costs.append(float(np.median(full[:, i])))
    return costs


def _exit_report(project: dict, early: dict, full: dict | None, labels, runs: int, n: int, raw: int) -> dict:
    from ..passes.exits import threshold_to_real

    info = project["exits"]
    names = info["names"]
    covered = runs >= n
    idx = early["exits"] if covered else early["exits"][:runs]
    counts = early["per_sample"] if covered else early["per_sample"][:runs]
    per_exit = []
    for k, name in enumerate(names):
        hit = idx == k
        row = {"exit": k, "name": name, "hits": int(hit.sum()), "hit_rate": float(hit.mean()),
               "mean_count": float(counts[hit].mean()) if hit.any() else None}
        if labels is not None and covered:
            pred = early["outputs"][k].argmax(axis=1)
            row["accuracy"] = float((pred[hit] == labels[hit]).mean()) if hit.any() else None
        per_exit.append(row)
    report = {"names": names, "criterion": info["criterion"], "threshold": raw,
              "threshold_real": threshold_to_real(raw), "per_exit": per_exit,
              "mean_count": float(np.mean(counts))}
    if labels is not None and covered:
        answers = np.stack([o.argmax(axis=1) for o in early["outputs"]], axis=1)[np.arange(n), idx]
        report["accuracy"] = float((answers == labels).mean())
        report["answers"] = answers.tolist()  # per sample, the class the device answered
    if full is not None:
        full_counts = full["per_sample"] if covered else full["per_sample"][:runs]
        report["full_mean_count"] = float(np.mean(full_counts))
        report["layer_costs"] = _layer_costs_from_passes(project, early["per_layer"], full["per_layer"])
        report["work_fraction"] = report["mean_count"] / report["full_mean_count"]
        if labels is not None and covered:
            from .operating_point import paired_counts
            full_answers = full["outputs"][-1].argmax(axis=1)
            report["full_accuracy"] = float((full_answers == labels).mean())
            report["full_answers"] = full_answers.tolist()
            report["worse"], report["better"] = paired_counts(answers, full_answers, labels)
    return report


def profile(port: str, inputs, *, project_dir=None, labels=None, runs: int | None = None, int8: bool = False,
            show_progress: bool = True, timeout: float = 5.0, link: DeviceLink | None = None,
            exit_threshold="project", full_network: bool = True) -> dict:
    """Run ``inputs`` on the device at ``port`` and measure them there (see the module's doc).

    A model with early exits runs at ``exit_threshold`` (a probability, "off", a list with one per early
    exit, or "project": the value it was generated with; the device is set to it first). The report's
    ``exits`` part gives per exit the hit rate, the accuracy of its answers (with ``labels``) and the mean
    count; with ``full_network`` the same inputs run again with early exits off, for the full network's
    count, accuracy and per-layer counts (``layer_costs``, what ``edgekit thresholds --costs`` reads)."""
    from ..passes.exits import EXITS_OFF, device_thresholds, run_exits

    own_link = link is None
    link = link or DeviceLink(port, timeout=timeout)
    try:
        info, project_dir, project, graph = _connect(link, project_dir)
        board = project_board(project_dir, project) if project.get("board") else None
        samples = _prepare_inputs(project, graph, inputs, int8)
        n = samples.shape[0]
        runs = n if runs is None else int(runs)
        if runs < 1:
            raise EdgekitError("--runs must be at least 1")
        if labels is not None:
            from ..safety import check_labels
            labels = check_labels(labels, n)
        weight_only = project["mode"] == "weight_only"
        exits_info = project.get("exits")
        unit, divisor = count_unit(board, info)
        raw = None
        if exits_info:
            from ..safety import check_exit_threshold
            check_exit_threshold(exit_threshold, exits_info.get("criterion", "softmax"))
            raw = exits_info["threshold"] if exit_threshold == "project" else \
                device_thresholds(exit_threshold, len(exits_info["names"]) - 1)
            link.set_exit_threshold(raw)
            expected, expected_exit = run_exits(graph, samples, raw)
        elif weight_only:
            from ..passes.quantize import dequantized_weights_graph
            expected = reference.run(dequantized_weights_graph(graph), samples)
            expected_exit = np.zeros(n, np.int64)
        else:
            expected = reference.run(graph, samples)
            expected_exit = np.zeros(n, np.int64)
        result = _inferences(link, info, project, samples, expected, expected_exit, runs, divisor, unit,
                             "profiling", show_progress)
        full = None
        if exits_info and full_network:
            expected_full, expected_full_exit = run_exits(graph, samples, EXITS_OFF)
            link.set_exit_threshold(EXITS_OFF)
            try:
                full = _inferences(link, info, project, samples, expected_full, expected_full_exit, runs, divisor,
                                   unit, "full network", show_progress)
            finally:
                link.set_exit_threshold(raw)  # leave the device as it was asked to run
        mismatches = result["mismatches"] + ([dict(m, full_network=True) for m in full["mismatches"]] if full else [])
        totals, layer_table, outputs = result["totals"], result["per_layer"], result["outputs"]
        stats = link.stats_()
        binary = next((p for p in (project_dir / "firmware.elf", project_dir / "model_runner") if p.exists()), None)
        if binary is not None:
            from ..targets.build_record import require_fresh
            require_fresh(project_dir, binary, "profile")  # sizes and stack of the program the device runs
        sizes = section_sizes(binary) if binary else {}
        stack_bound = None
        if binary is not None and binary.name == "firmware.elf":
            from ..targets.stack import worst_case_stack
            stack_bound = worst_case_stack(project_dir, binary, fpu=bool(project_board(project_dir, project).get("fpu"))).bytes
        report = {
            "board": info.board,
            "port": link.port_name,
            "project": str(project_dir),
            "fingerprint": info.fingerprint,
            "unit": unit,
            "runs": runs,
            "samples": n,
            "bit_exact": not mismatches,
            "mismatches": mismatches[:20],
            "total": _stats(totals),
            "layers": [
                {"index": l["index"], "name": l["name"], "kind": l["kind"], "macs": l["macs"],
                 **_stats(layer_table[:, l["index"]])}
                for l in project["layers"] if l["kernel"]
            ],
            "arena_bytes": info.arena_bytes,
            "stack_bytes": stats["stack_bytes"],
            "stack_high_water": stats["stack_high_water"],
            "stack_bound": stack_bound,  # static worst case (targets/stack.py), None where unknown
            "flash_bytes": sizes.get("flash"),
            "ram_bytes": sizes.get("ram"),
            "weight_bytes": project["weight_bytes"],
            "clock_hz": info.clock_hz,
            "link": {"requests": link.stats.requests, "retries": link.stats.retries,
                     "damaged_frames": link.stats.bad_frames, "timeouts": link.stats.timeouts},
        }
        if len(result["per_thread"]):
            # CPU time (not the counter's unit): thread 0 ran the whole inference, the others their shares
            report["threads"] = [{"thread": t, **_stats(result["per_thread"][:, t])}
                                 for t in range(result["per_thread"].shape[1])]
        if unit == "cycles" and info.clock_hz:
            report["latency_ms"] = {k: v / info.clock_hz * 1e3 for k, v in report["total"].items()}
        elif unit == "ns":
            report["latency_ms"] = {k: v / 1e6 for k, v in report["total"].items()}
        if exits_info:
            report["exits"] = _exit_report(project, result, full, labels, runs, n, raw)
            if "accuracy" in report["exits"]:
                report["accuracy"] = report["exits"]["accuracy"]
        elif labels is not None and runs >= n:
            report["accuracy"] = float((outputs[0].reshape(n, -1).argmax(axis=1) == labels).mean())
        return report
    finally:
        if own_link:
            link.close()


def format_report(report: dict) -> str:
    unit = report["unit"]
    lines = [f"board {report['board']}, model {report['fingerprint']}, {report['runs']} runs over "
             f"{report['samples']} samples",
             f"outputs bit-exact with the reference: {'yes' if report['bit_exact'] else 'NO'}"]
    t = report["total"]
    lines.append(f"per inference ({unit}): min {t['min']:,.0f}  median {t['median']:,.0f}  max {t['max']:,.0f}")
    if "latency_ms" in report:
        lines.append(f"latency at {report['clock_hz'] / 1e6:g} MHz: median {report['latency_ms']['median']:.3f} ms")
    if "accuracy" in report:
        lines.append(f"accuracy on the device: {report['accuracy'] * 100:.2f} %")
    if report.get("threads"):
        th = report["threads"]
        busiest = max(t["median"] for t in th[1:]) if len(th) > 1 else th[0]["median"]
        lines.append("CPU time per thread (ns, median): " + "  ".join(f"{t['thread']}: {t['median']:,.0f}" for t in th)
                     + f" (thread 0: the whole inference; the others: their shares; busiest worker / thread 0 "
                     f"{busiest / (th[0]['median'] or 1):.2f})")
    if "exits" in report:
        lines += [""] + format_exits(report["exits"], unit)
    lines.append(f"flash {report['flash_bytes'] or 0:,} B (weights {report['weight_bytes']:,} B), RAM "
                 f"{report['ram_bytes'] or 0:,} B (arena {report['arena_bytes']:,} B, stack used "
                 f"{report['stack_high_water']:,} of {report['stack_bytes']:,} B"
                 + (f", static bound {report['stack_bound']:,} B" if report.get("stack_bound") else "") + ")")
    lines.append("")
    lines.append(f"{'layer':28s} {'kind':18s} {'MACs':>10s} {'median ' + unit:>28s} {'share':>6s}")
    total = sum(l["median"] for l in report["layers"]) or 1
    for l in report["layers"]:
        lines.append(f"{l['name'][:28]:28s} {l['kind']:18s} {l['macs']:>10,} {l['median']:>28,.0f} "
                     f"{100 * l['median'] / total:5.1f}%")
    link = report["link"]
    if link["retries"]:
        lines.append(f"\nlink: {link['retries']} retries ({link['damaged_frames']} damaged frames, "
                     f"{link['timeouts']} timeouts), every answer CRC-checked")
    return "\n".join(lines)


def _pct(v) -> str:
    return "-" if v is None else f"{v * 100:.2f} %"


def describe_threshold(real, raw) -> str:
    """'0.898438 = 230/256', 'off', or per exit '0.8 = 205/256, off'."""
    if isinstance(raw, (list, tuple)):
        return ", ".join(describe_threshold(t, r) for t, r in zip(real, raw))
    return "off" if real is None else f"{real:g} = {raw}/256"


def format_exits(ex: dict, unit: str) -> list[str]:
    many = isinstance(ex["threshold"], (list, tuple))
    lines = [f"early exits ({ex['criterion']}, threshold{'s' if many else ''} "
             f"{describe_threshold(ex['threshold_real'], ex['threshold'])}):",
             f"  {'exit':24s} {'answers':>8s} {'share':>8s} {'accuracy':>9s} {'mean ' + unit:>30s}"]
    for row in ex["per_exit"]:
        mean = "-" if row["mean_count"] is None else f"{row['mean_count']:,.0f}"
        lines.append(f"  {row['exit']}: {row['name'][:21]:21s} {row['hits']:>8d} {_pct(row['hit_rate']):>8s} "
                     f"{_pct(row.get('accuracy')):>9s} {mean:>30s}")
    lines.append(f"  mean per inference: {ex['mean_count']:,.0f} {unit}" +
                 (f", accuracy {_pct(ex['accuracy'])}" if "accuracy" in ex else ""))
    if "full_mean_count" in ex:
        lines.append(f"  full network (exits off, same inputs): {ex['full_mean_count']:,.0f} {unit}" +
                     (f", accuracy {_pct(ex['full_accuracy'])}" if "full_accuracy" in ex else ""))
        lines.append(f"  work per inference: {ex['work_fraction']:.3f} of the full network's")
    return lines


# ---------------------------------------------------------------------------
# Threshold sweeps: the accuracy / work curve of an early-exit model
# ---------------------------------------------------------------------------

def _costs_from_report(graph, report: dict) -> dict:
    """Per-layer costs from an ``edgekit profile`` report, as the full network pays them whatever threshold
    the profile ran at: its exits-on pass only shows what the inputs that answered early ran, so the backbone
    comes from the exits-off pass (``exits.layer_costs``), and a report without one is refused."""
    if report.get("fingerprint") and report["fingerprint"] != graph.fingerprint():
        raise EdgekitError(f"--costs: the profile report is of model {report['fingerprint']}, not of this project "
                           f"({graph.fingerprint()})")
    ex = report.get("exits")
    if not ex:
        raise EdgekitError("--costs: the profile report has no early exits: profile this project's firmware")
    costs = ex.get("layer_costs")
    if costs is None:
        raise EdgekitError("--costs: the profile report has no exits-off pass, so its per-layer counts do not "
                           "describe the full network (layers behind an exit ran on only some inputs); run "
                           "`edgekit profile` again without --no-full")
    missing = [graph.ops[i].name for i, c in enumerate(costs) if c is None]
    if missing:
        raise EdgekitError(f"--costs: no input of the profile reached layer {missing[0]!r} (an early-exit head), "
                           "so its count is unknown; profile with --exit-threshold 1.0 (every head runs)")
    return {i: float(c) for i, c in enumerate(costs)}


def _layer_costs(graph, costs) -> np.ndarray:
    from ..cost import layer_macs

    if isinstance(costs, str) and costs == "macs":
        return np.array([layer_macs(graph, op) for op in graph.ops], dtype=np.float64)
    if isinstance(costs, dict) and "layers" in costs:  # a profile report
        costs = _costs_from_report(graph, costs)
    if isinstance(costs, dict):
        return np.array([float(costs.get(i, costs.get(str(i), 0.0))) for i in range(len(graph.ops))])
    raise EdgekitError("costs must be 'macs', a profile report, or {layer index: count}")


def _exit_model(model, inputs, labels=None, *, costs="macs", int8: bool = False) -> dict:
    """What every operating point of a multi-exit int8 graph is computed from, with one reference run: each
    early exit's confidence and every exit's answer per sample, and the work an answer at each exit costs."""
    from ..api import to_ir_inputs
    from ..passes.exits import head_exits, head_only_ops

    graph = model if isinstance(model, Graph) else load_graph(model)
    info = graph.meta.get("exits") or {}
    if not info.get("criterion"):
        raise EdgekitError("the model has no early exits (make one with edgekit.add_exits, then quantize it)")
    if int8:
        x = np.asarray(inputs)
    else:
        x = to_ir_inputs(graph, np.asarray(inputs, dtype=np.float32))
        q = graph.tensors[graph.inputs[0]].quant
        x = qm.quantize(x, q.scale[0], q.zero_point[0])
    values = reference.run(graph, x, keep=True)
    from ..passes.exits import confidences
    conf = confidences(graph, values)
    preds = np.stack([values[o].reshape(len(x), -1).argmax(axis=1) for o in graph.outputs], axis=1)
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != len(x):
            raise EdgekitError(f"{len(labels)} labels for {len(x)} inputs")
    layer_cost = _layer_costs(graph, costs)
    if np.any(layer_cost < 0) or not np.all(np.isfinite(layer_cost)):
        raise EdgekitError("the per-layer costs must be finite and non-negative")
    k = conf.shape[1]
    heads, needed_by = head_only_ops(graph), head_exits(graph)
    segment = np.cumsum([0] + [op.kind == "exit" for op in graph.ops])[:-1]  # exits met before each op
    head_layers = []  # (exits met before it, the early exits that need it, cost)
    backbone = np.zeros(k + 1)  # [answering exit j]: the backbone layers up to exit j
    for c, op, seg in zip(layer_cost, graph.ops, segment):
        if id(op) in heads:
            head_layers.append((int(seg), list(needed_by.get(id(op)) or range(k)), float(c)))
        else:
            backbone[seg:] += c
    return {"graph": graph, "names": list(info["names"]), "criterion": info["criterion"], "conf": conf,
            "preds": preds, "labels": labels, "backbone": backbone, "head_layers": head_layers,
            "full_cost": float(backbone[-1]), "costs": costs if isinstance(costs, str) else "measured",
            "samples": int(len(x))}


def _exit_costs(em: dict, raw) -> np.ndarray:
    """The work of an answer at each exit (early ones, then the final) at threshold(s) ``raw``: the backbone
    up to it plus the heads of the early exits that are on (an exit at EXITS_OFF skips its head)."""
    from ..passes.exits import EXITS_OFF, per_exit_thresholds

    on = per_exit_thresholds(raw, em["conf"].shape[1]) != EXITS_OFF
    costs = em["backbone"].copy()
    for seg, users, c in em["head_layers"]:
        if on[users].any():  # a head layer runs while one of the exits that need it is on
            costs[seg:] += c
    return costs


def evaluate_point(em: dict, raw) -> dict:
    """One operating point (``raw``: the device integer for every early exit, or a list with one per exit):
    the share each exit answers, the mean work, and with labels the accuracy and the paired counts."""
    from ..passes.exits import as_raw, exit_index, threshold_to_real
    from .operating_point import paired_counts

    raw = as_raw(raw) if isinstance(raw, (list, tuple, np.ndarray)) else int(raw)
    index = exit_index(em["conf"], raw)
    n = len(index)
    answers = em["preds"][np.arange(n), index]
    work = float(_exit_costs(em, raw)[index].mean())
    full_cost = em["full_cost"]
    point = {"threshold": threshold_to_real(raw), "threshold_raw": raw,
             "hit_rates": [float((index == k).mean()) for k in range(len(em["names"]))],
             "work": work, "work_fraction": work / full_cost if full_cost else None}
    if em["labels"] is not None:
        point["accuracy"] = float((answers == em["labels"]).mean())
        point["worse"], point["better"] = paired_counts(answers, em["preds"][:, -1], em["labels"])
    return point


def _sweep(em: dict, points: list[dict], order: str) -> dict:
    from ..passes.exits import EXITS_OFF

    full = evaluate_point(em, EXITS_OFF)
    return {"names": em["names"], "criterion": em["criterion"], "costs": em["costs"], "samples": em["samples"],
            "points": points, "full": full, "order": order, "source": "reference"}


def sweep_reference(model, inputs, labels=None, thresholds=None, *, costs="macs", int8: bool = False) -> dict:
    """The accuracy / work curve of a multi-exit int8 graph (or generated project) on labelled inputs,
    from the numpy reference: bit-exact with the device, and fast. ``thresholds`` in real units, one for
    every early exit (default: every distinct confidence the inputs produce, i.e. the exact curve);
    ``costs``: "macs", the device's per-layer counts (a profile report: its exits-off pass), or
    {layer index: count}. ``work`` is the mean cost per inference; ``work_fraction`` is it over the full
    network's (early exits off: the heads are skipped)."""
    from ..passes.exits import EXITS_OFF, threshold_to_int

    em = _exit_model(model, inputs, labels, costs=costs, int8=int8)
    if thresholds is None:
        raws = sorted(set(np.unique(em["conf"]).tolist()) | {0})
    else:
        raws = sorted({threshold_to_int(t) for t in thresholds} - {EXITS_OFF})
    return _sweep(em, [evaluate_point(em, r) for r in raws], "threshold, high to low")


def search_per_exit(model, inputs, *, costs="macs", int8: bool = False, levels: int = 64) -> list:
    """A path of per-exit thresholds from the full network to the most aggressive point, searched on
    ``inputs`` that are NOT the validation samples (e.g. the training split; no labels needed). From all
    exits off, each step lowers one exit's threshold by one candidate level (its confidence quantiles on
    these inputs; an exit that is off turns on at the highest level that saves work), the move with the
    least risk per unit of work saved (greedy coordinate descent). Risk: the answers that differ from the
    full network's, plus for each early answer 1 - its confidence (on the training split the heads are
    rarely wrong, so the counts alone tie; the confidences still rank the moves). The validation samples
    then test the points in this order (``sweep_path``)."""
    from ..passes.exits import EXITS_OFF, exit_index

    em = model if isinstance(model, dict) else _exit_model(model, inputs, None, costs=costs, int8=int8)
    conf, preds = em["conf"], em["preds"]
    n, k = conf.shape
    candidates = [sorted({int(v) for v in np.quantile(conf[:, e], np.linspace(0, 1, levels), method="lower")},
                  reverse=True) for e in range(k)]
    unsure = np.concatenate([1.0 - np.minimum(conf, 256) / 256.0, np.zeros((n, 1))], axis=1)

    def measure(state):
        index = exit_index(conf, state)
        answers = preds[np.arange(n), index]
        risk = float(np.sum(answers != preds[:, -1]) + unsure[np.arange(n), index].sum())
        return float(_exit_costs(em, state)[index].mean()), risk

    state = [EXITS_OFF] * k
    work, risk = measure(state)
    path = []
    while True:
        best = None
        for e in range(k):
            if state[e] == EXITS_OFF:
                moves = candidates[e]
            else:
                lower = [c for c in candidates[e] if c < state[e]]
                moves = lower[:1]
            for level in moves:
                trial = state[:e] + [level] + state[e + 1:]
                w, r = measure(trial)
                gain = work - w
                if gain <= 0:
                    continue
                key = ((r - risk) / gain, -gain)
                if best is None or key < best[0]:
                    best = (key, trial, w, r)
                if state[e] == EXITS_OFF:
                    break  # turning an exit on: at the highest level that saves work
        if best is None:
            return path
        _, state, work, risk = best
        path.append(list(state))


def sweep_path(model, inputs, labels, path: list, *, costs="macs", int8: bool = False) -> dict:
    """The operating points of a per-exit threshold ``path`` (``search_per_exit``) on labelled validation
    inputs, in the path's order (the order ``choose_threshold`` tests them in)."""
    em = model if isinstance(model, dict) else _exit_model(model, inputs, labels, costs=costs, int8=int8)
    return _sweep(em, [evaluate_point(em, raw) for raw in path], "path")


def sweep_device(port, inputs, labels, thresholds, *, project_dir=None, int8: bool = False,
                 show_progress: bool = True, timeout: float = 5.0, link: DeviceLink | None = None) -> dict:
    """The same curve measured on the device: every input run at every threshold (and once with early exits
    off), counts as the device counts them; every output checked bit for bit against the reference."""
    from ..passes.exits import threshold_to_int
    from .operating_point import paired_counts

    own_link = link is None
    link = link or DeviceLink(port, timeout=timeout)
    try:
        points, full, names, criterion, bit_exact, n = [], None, None, None, True, 0
        full_answers = None
        for i, t in enumerate(thresholds):
            r = profile(port, inputs, project_dir=project_dir, labels=labels, int8=int8, link=link,
                        exit_threshold=t, full_network=i == 0, show_progress=show_progress)
            if "exits" not in r:
                raise EdgekitError("the device's model has no early exits")
            ex = r["exits"]
            names, criterion, n = ex["names"], ex["criterion"], r["samples"]
            bit_exact &= r["bit_exact"]
            if i == 0:
                full = {"threshold": None, "threshold_raw": threshold_to_int("off"), "work": ex["full_mean_count"],
                        "work_fraction": 1.0, "hit_rates": [0.0] * (len(names) - 1) + [1.0],
                        **({"accuracy": ex["full_accuracy"], "worse": 0, "better": 0}
                           if "full_accuracy" in ex else {})}
                full_answers = ex.get("full_answers")
            point = {"threshold": ex["threshold_real"], "threshold_raw": ex["threshold"],
                     "hit_rates": [row["hit_rate"] for row in ex["per_exit"]], "work": ex["mean_count"],
                     "work_fraction": ex["mean_count"] / full["work"],
                     **({"accuracy": ex["accuracy"]} if "accuracy" in ex else {})}
            if full_answers is not None and "answers" in ex:
                point["worse"], point["better"] = paired_counts(np.asarray(ex["answers"]), np.asarray(full_answers),
                                                                np.asarray(labels).reshape(-1))
            points.append(point)
            unit = r["unit"]
        return {"names": names, "criterion": criterion, "costs": unit, "samples": n, "points": points,
                "full": full, "source": "device", "bit_exact": bit_exact, "order": "threshold, high to low"}
    finally:
        if own_link:
            link.close()


def _test_order(sweep: dict) -> list[dict]:
    if sweep.get("order") == "path":
        return list(sweep["points"])
    return sorted(sweep["points"], key=lambda p: -(p["threshold_raw"] if not isinstance(p["threshold_raw"], list)
                                                   else min(p["threshold_raw"])))


def choose_threshold(sweep: dict, max_drop: float = 0.01, confidence: float = 0.95,
                     test_samples: int | None = None) -> dict:
    """The operating point: the least work among the points whose accuracy drop against the full network
    is at most ``max_drop`` with ``confidence`` (an exact one-sided bound from the paired disagreements,
    the points tested in a fixed order: see ``device.operating_point``); the full network when none passes.
    ``test_samples``: promise the drop a test set of that many unseen samples will show (an exact
    prediction bound) instead of the population's. The returned point carries ``drop``, ``drop_bound`` and
    ``promise`` (what the sample size supports)."""
    from .operating_point import choose

    full = sweep["full"]
    if "accuracy" not in full:
        raise EdgekitError("choosing a threshold needs labels")
    return choose(_test_order(sweep), full, sweep["samples"], max_drop, confidence, test_samples)


def format_sweep(sweep: dict, chosen: dict | None = None, rows: int = 16) -> str:
    names = sweep["names"]
    # an operating point that does more work than the full network (its heads cost more than its early
    # answers save) is never a result: exits off is better
    points = [p for p in sweep["points"] if p["work_fraction"] is None or p["work_fraction"] <= 1.0]
    dropped = len(sweep["points"]) - len(points)
    if len(points) > rows:  # an even spread, always with the chosen point
        keep = set(np.linspace(0, len(points) - 1, rows).round().astype(int).tolist())
        points = [p for i, p in enumerate(points) if i in keep or p is chosen]
    hits = "  ".join(f"{n[:10]:>10s}" for n in names)
    bounds = "drop_bound" in sweep["full"]
    lines = [f"early-exit curve ({sweep['criterion']}, {sweep['samples']} samples, work in "
             f"{sweep['costs']}, from the {sweep['source']}):",
             f"  {'threshold':>10s} {'accuracy':>9s} " + (f"{'drop':>7s} {'bound':>7s} " if bounds else "") +
             f"{'work':>14s} {'fraction':>9s}  {hits}"]
    for p in points + [sweep["full"]]:
        if isinstance(p["threshold"], list):
            thr = "/".join("off" if t is None else f"{t:.3g}" for t in p["threshold"])
        else:
            thr = "off" if p["threshold"] is None else f"{p['threshold']:.4g}"
        mark = " <-" if chosen is not None and p is chosen else ""
        rates = "  ".join(f"{r * 100:9.1f}%" for r in p["hit_rates"])
        acc = f"{p['accuracy'] * 100:8.2f}%" if "accuracy" in p else f"{'-':>9s}"
        bound = ""
        if bounds:
            bound = f"{p.get('drop', 0) * 100:+6.2f}  {p.get('drop_bound', 0) * 100:5.2f}" + \
                ("" if p.get("passed", True) else "x") .ljust(1) + " "
        lines.append(f"  {thr:>10s} {acc} {bound}{p['work']:>14,.0f} {p['work_fraction']:>9.3f}  {rates}{mark}")
    if bounds:
        lines.append("  (drop and its bound in pp, the bound one-sided exact; x: not eligible, a point before it "
                     "in the test order broke the bound)")
    if dropped:
        lines.append(f"  ({dropped} point{'s' if dropped > 1 else ''} doing more work than the full network "
                     "not shown: their heads cost more than their early answers save)")
    return "\n".join(lines)
