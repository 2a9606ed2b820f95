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
from ..boards import load_board
from ..codegen.project import load_project
from ..errors import EdgekitError
from ..ir_io import load_graph
from ..progress import Progress
from ..targets.elf import section_sizes
from .protocol import DeviceLink


def count_unit(board, info) -> tuple[str, float]:
    """(unit name, divisor turning raw counts into that unit)."""
    if info.counter_kind == 2:  # QEMU icount: SysTick ticks -> instructions
        shift = int(board.get("icount_shift", 6)) if board else 6
        return "emulated instructions", (2 ** shift) * info.clock_hz / 1e9
    if info.counter_kind == 3:
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
    x = np.asarray(inputs, dtype=np.float32)
    if x.ndim == 0 or x.shape[0] == 0:
        raise EdgekitError("the inputs are empty")
    x = layout.to_ir(x, rec["layout"], sample_shape)
    if project["mode"] == "weight_only":
        return x
    return qm.quantize(x, rec["scale"], rec["zero_point"])


def _stats(values) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"min": float(a.min()), "median": float(np.median(a)), "max": float(a.max())}


def profile(port: str, inputs, *, project_dir=None, labels=None, runs: int | None = None, int8: bool = False,
            show_progress: bool = True, timeout: float = 5.0, link: DeviceLink | None = None) -> dict:
    own_link = link is None
    link = link or DeviceLink(port, timeout=timeout)
    try:
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
        graph = load_graph(project_dir)
        board = load_board(project["board"]) if project.get("board") else None
        samples = _prepare_inputs(project, graph, inputs, int8)
        n = samples.shape[0]
        runs = n if runs is None else int(runs)
        if runs < 1:
            raise EdgekitError("--runs must be at least 1")
        if labels is not None:
            labels = np.asarray(labels).reshape(-1)
            if labels.shape[0] != n:
                raise EdgekitError(f"{labels.shape[0]} labels for {n} inputs")
        weight_only = project["mode"] == "weight_only"
        if weight_only:
            from ..passes.quantize import dequantized_weights_graph
            expected = reference.run(dequantized_weights_graph(graph), samples)[0]
        else:
            expected = reference.run(graph, samples)[0]
        out_elems = int(np.prod(project["outputs"][0]["shape"]))
        dtype = np.float32 if weight_only else np.int8
        unit, divisor = count_unit(board, info)
        totals, per_layer, mismatches = [], [], []
        outputs = np.zeros((n, out_elems), dtype=dtype)
        bar = Progress(runs, "profiling", enabled=show_progress, unit=" runs")
        for r in range(runs):
            i = r % n
            link.set_input(0, samples[i].tobytes())
            status, total = link.invoke()
            y = np.frombuffer(link.get_output(0, out_elems * np.dtype(dtype).itemsize), dtype=dtype)
            layers = link.layer_counts(info.num_layers)
            exp = expected[i].reshape(-1)
            same = np.array_equal(y, exp) if not weight_only else np.allclose(y, exp, rtol=1e-4, atol=1e-4)
            if not same:
                mismatches.append({"run": r, "sample": i, "differing": int(np.sum(y != exp))})
            outputs[i] = y
            totals.append(total / divisor)
            per_layer.append([c / divisor for c in layers])
            bar.update(postfix=f"{totals[-1]:,.0f} {unit}")
        bar.close()
        stats = link.stats_()
        binary = next((p for p in (project_dir / "firmware.elf", project_dir / "model_runner") if p.exists()), None)
        sizes = section_sizes(binary) if binary else {}
        layer_table = np.asarray(per_layer)
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
            "flash_bytes": sizes.get("flash"),
            "ram_bytes": sizes.get("ram"),
            "weight_bytes": project["weight_bytes"],
            "clock_hz": info.clock_hz,
            "link": {"requests": link.stats.requests, "retries": link.stats.retries,
                     "damaged_frames": link.stats.bad_frames, "timeouts": link.stats.timeouts},
        }
        if unit == "cycles" and info.clock_hz:
            report["latency_ms"] = {k: v / info.clock_hz * 1e3 for k, v in report["total"].items()}
        if labels is not None and runs >= n:
            report["accuracy"] = float((outputs.reshape(n, -1).argmax(axis=1) == labels).mean())
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
    lines.append(f"flash {report['flash_bytes'] or 0:,} B (weights {report['weight_bytes']:,} B), RAM "
                 f"{report['ram_bytes'] or 0:,} B (arena {report['arena_bytes']:,} B, stack used "
                 f"{report['stack_high_water']:,} of {report['stack_bytes']:,} B)")
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
