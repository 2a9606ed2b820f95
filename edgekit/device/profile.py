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
    return {"min": float(a.min()), "median": float(np.median(a)), "max": float(a.max())}


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
    totals, per_layer, per_sample, mismatches = [], [], np.zeros(n), []
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
            "per_sample": per_sample, "mismatches": mismatches}


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
    if full is not None:
        full_counts = full["per_sample"] if covered else full["per_sample"][:runs]
        report["full_mean_count"] = float(np.mean(full_counts))
        report["work_fraction"] = report["mean_count"] / report["full_mean_count"]
        if labels is not None and covered:
            report["full_accuracy"] = float((full["outputs"][-1].argmax(axis=1) == labels).mean())
    return report


def profile(port: str, inputs, *, project_dir=None, labels=None, runs: int | None = None, int8: bool = False,
            show_progress: bool = True, timeout: float = 5.0, link: DeviceLink | None = None,
            exit_threshold="project", full_network: bool = True) -> dict:
    """Run ``inputs`` on the device at ``port`` and measure them there (see the module's doc).

    A model with early exits runs at ``exit_threshold`` (a probability, "off", or "project": the value it
    was generated with; the device is set to it first). The report's ``exits`` part gives per exit the hit
    rate, the accuracy of its answers (with ``labels``) and the mean count; with ``full_network`` the same
    inputs run again with early exits off, for the full network's count and accuracy in the same run."""
    from ..passes.exits import EXITS_OFF, run_exits, threshold_to_int

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
            raw = exits_info["threshold"] if exit_threshold == "project" else threshold_to_int(exit_threshold)
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


def format_exits(ex: dict, unit: str) -> list[str]:
    thr = "off" if ex["threshold_real"] is None else f"{ex['threshold_real']:g}"
    lines = [f"early exits ({ex['criterion']}, threshold {thr} = {ex['threshold']}/256):",
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

def _layer_costs(graph, costs) -> np.ndarray:
    from ..codegen.project import layer_macs

    if isinstance(costs, str) and costs == "macs":
        return np.array([layer_macs(graph, op) for op in graph.ops], dtype=np.float64)
    if isinstance(costs, dict) and "layers" in costs:  # a profile report: each layer's largest count
        costs = {l["index"]: l["max"] for l in costs["layers"]}
    if isinstance(costs, dict):
        return np.array([float(costs.get(i, costs.get(str(i), 0.0))) for i in range(len(graph.ops))])
    raise EdgekitError("costs must be 'macs', a profile report, or {layer index: count}")


def _sweep_point(raw: int, index: np.ndarray, preds: np.ndarray, labels, exit_cost: np.ndarray,
                 full_cost: float, names: list[str]) -> dict:
    from ..passes.exits import threshold_to_real

    n = len(index)
    answers = preds[np.arange(n), index]
    work = float(exit_cost[index].mean())
    point = {"threshold": threshold_to_real(raw), "threshold_raw": int(raw),
             "hit_rates": [float((index == k).mean()) for k in range(len(names))],
             "work": work, "work_fraction": work / full_cost if full_cost else None}
    if labels is not None:
        point["accuracy"] = float((answers == labels).mean())
    return point


def sweep_reference(model, inputs, labels=None, thresholds=None, *, costs="macs", int8: bool = False) -> dict:
    """The accuracy / work curve of a multi-exit int8 graph (or generated project) on labelled inputs,
    from the numpy reference: bit-exact with the device, and fast. ``thresholds`` in real units (default:
    every distinct confidence the inputs produce, i.e. the exact curve); ``costs``: "macs" or the device's
    per-layer counts (a profile report). ``work`` is the mean cost per inference; ``work_fraction`` is it
    over the full network's (early exits off: the heads are skipped)."""
    from ..api import to_ir_inputs
    from ..passes.exits import EXITS_OFF, confidences, exit_index, head_only_ops, threshold_to_int

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
    conf = confidences(graph, values)
    preds = np.stack([values[o].reshape(len(x), -1).argmax(axis=1) for o in graph.outputs], axis=1)
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != len(x):
            raise EdgekitError(f"{len(labels)} labels for {len(x)} inputs")
    layer_cost = _layer_costs(graph, costs)
    cumulative = np.cumsum(layer_cost)
    positions = [i for i, op in enumerate(graph.ops) if op.kind == "exit"]
    exit_cost = np.array([cumulative[p] for p in positions] + [cumulative[-1]])
    heads = head_only_ops(graph)
    full_cost = float(sum(c for c, op in zip(layer_cost, graph.ops) if id(op) not in heads))
    if thresholds is None:
        raws = sorted(set(np.unique(conf).tolist()) | {0})
    else:
        raws = sorted({threshold_to_int(t) for t in thresholds} - {EXITS_OFF})
    names = list(info["names"])
    points = [_sweep_point(r, exit_index(conf, r), preds, labels, exit_cost, full_cost, names) for r in raws]
    off = _sweep_point(EXITS_OFF, exit_index(conf, EXITS_OFF), preds, labels, np.full(len(names), full_cost),
                       full_cost, names)
    return {"names": names, "criterion": info["criterion"], "costs": costs if isinstance(costs, str) else "measured",
            "samples": int(len(x)), "points": points, "full": off, "source": "reference"}


def sweep_device(port, inputs, labels, thresholds, *, project_dir=None, int8: bool = False,
                 show_progress: bool = True, timeout: float = 5.0, link: DeviceLink | None = None) -> dict:
    """The same curve measured on the device: every input run at every threshold (and once with early exits
    off), counts as the device counts them; every output checked bit for bit against the reference."""
    from ..passes.exits import threshold_to_int

    own_link = link is None
    link = link or DeviceLink(port, timeout=timeout)
    try:
        points, full, names, criterion, bit_exact, n = [], None, None, None, True, 0
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
                        **({"accuracy": ex["full_accuracy"]} if "full_accuracy" in ex else {})}
            points.append({"threshold": ex["threshold_real"], "threshold_raw": ex["threshold"],
                           "hit_rates": [row["hit_rate"] for row in ex["per_exit"]], "work": ex["mean_count"],
                           "work_fraction": ex["mean_count"] / full["work"],
                           **({"accuracy": ex["accuracy"]} if "accuracy" in ex else {})})
            unit = r["unit"]
        return {"names": names, "criterion": criterion, "costs": unit, "samples": n, "points": points,
                "full": full, "source": "device", "bit_exact": bit_exact}
    finally:
        if own_link:
            link.close()


def choose_threshold(sweep: dict, max_drop: float = 0.01) -> dict:
    """The operating point: the least work whose accuracy is at most ``max_drop`` below the full
    network's (ties: the higher threshold)."""
    full = sweep["full"]
    if "accuracy" not in full:
        raise EdgekitError("choosing a threshold needs labels")
    ok = [p for p in sweep["points"] if p["accuracy"] >= full["accuracy"] - max_drop - 1e-12]
    if not ok:
        return full
    return min(ok, key=lambda p: (p["work"], -p["threshold_raw"]))


def format_sweep(sweep: dict, chosen: dict | None = None, rows: int = 16) -> str:
    names = sweep["names"]
    points = sweep["points"]
    if len(points) > rows:  # an even spread, always with the chosen point
        keep = set(np.linspace(0, len(points) - 1, rows).round().astype(int).tolist())
        points = [p for i, p in enumerate(points) if i in keep or p is chosen]
    hits = "  ".join(f"{n[:10]:>10s}" for n in names)
    lines = [f"early-exit curve ({sweep['criterion']}, {sweep['samples']} samples, work in "
             f"{sweep['costs']}, from the {sweep['source']}):",
             f"  {'threshold':>10s} {'accuracy':>9s} {'work':>14s} {'fraction':>9s}  {hits}"]
    for p in points + [sweep["full"]]:
        thr = "off" if p["threshold"] is None else f"{p['threshold']:.4g}"
        mark = " <-" if chosen is not None and p is chosen else ""
        rates = "  ".join(f"{r * 100:9.1f}%" for r in p["hit_rates"])
        acc = f"{p['accuracy'] * 100:8.2f}%" if "accuracy" in p else f"{'-':>9s}"
        lines.append(f"  {thr:>10s} {acc} {p['work']:>14,.0f} {p['work_fraction']:>9.3f}  {rates}{mark}")
    return "\n".join(lines)
