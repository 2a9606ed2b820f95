"""The report's figures, drawn with matplotlib (Agg, no display) and returned as PNG bytes.

Each function takes plain numbers (no edgekit objects beyond the memory plan) and draws one figure.
Figures are made with ``matplotlib.figure.Figure`` directly, not pyplot: no global state, nothing
left open between reports.
"""
from __future__ import annotations

import io

from ..errors import EdgekitError

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.ticker
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
except ImportError:  # the optional `report` extra
    Figure = None

# One palette for every figure: readable on white, distinct in greyscale order.
BLUE, ORANGE, GREEN, RED, GREY = "#3b6ea8", "#e08a2c", "#4c9a52", "#c0392b", "#8a8f98"
CYCLE = ["#3b6ea8", "#e08a2c", "#4c9a52", "#8e5ea2", "#c4a23a", "#3aa6a0", "#b5536b", "#6c7a89"]


def require_matplotlib() -> None:
    if Figure is None:
        raise EdgekitError("HTML reports draw their plots with matplotlib, which is not installed: "
                           "pip install 'edgekit[report]'")


def _figure(width: float, height: float):
    require_matplotlib()
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, facecolor="white")
    return buf.getvalue()


def _compact(v: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:g}"


def _short(name: str, n: int = 28) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


def layer_bars(names: list[str], values: list[float], unit: str, macs: list[int] | None = None,
               title: str = "") -> bytes:
    """One horizontal bar per layer (network order, top to bottom), its share of the total written at
    its end; with ``macs``, a second panel with the layer's multiply-accumulates."""
    n = len(names)
    fig = _figure(10, 1.2 + 0.32 * max(n, 3))
    axes = fig.subplots(1, 2 if macs else 1, sharey=True, squeeze=False, width_ratios=[3, 1] if macs else [1])[0]
    ys = list(range(n))
    total = sum(values) or 1.0
    ax = axes[0]
    ax.barh(ys, values, color=BLUE, height=0.7)
    for y, v in zip(ys, values):
        ax.text(v, y, f" {100 * v / total:.1f} %", va="center", fontsize=8, color="#333")
    ax.set_yticks(ys, [_short(s) for s in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(unit)
    ax.set_xlim(0, max(values or [1]) * 1.18)
    ax.ticklabel_format(axis="x", style="plain")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title or f"per layer ({unit}, median)", fontsize=10, loc="left")
    if macs:
        m = axes[1]
        m.barh(ys, macs, color=ORANGE, height=0.7)
        m.set_xlabel("MACs")
        m.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(3))
        m.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: _compact(v)))
        m.grid(axis="x", alpha=0.3)
        m.set_title("multiply-accumulates", fontsize=10, loc="left")
    return _png(fig)


def memory_lifetimes(buffers: list[dict], steps: list[str], live: dict[int, int], arena_bytes: int) -> bytes:
    """The arena over time: each buffer a box from the step that writes it to the last that reads it, at its
    byte offsets; under it, the bytes alive at each step with the peak marked. ``buffers``: name, offset,
    size, first, last (steps: -1 the input, i op i, len(ops) the outputs); ``steps``: a label per step
    from -1 on."""
    n = len(steps)
    fig = _figure(10, 6.2)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    xs = list(range(-1, n - 1))
    for k, b in enumerate(sorted(buffers, key=lambda b: (b["first"], b["offset"]))):
        color = CYCLE[k % len(CYCLE)]
        x0, width = b["first"] - 0.45, b["last"] - b["first"] + 0.9
        top.add_patch(Rectangle((x0, b["offset"]), width, b["size"], facecolor=color, alpha=0.75,
                                edgecolor="white", linewidth=0.8))
        if b["size"] > 0.06 * arena_bytes:  # name the boxes large enough to hold a label
            top.text(x0 + width / 2, b["offset"] + b["size"] / 2, _short(b["name"], 18) + f"\n{b['size']:,} B",
                     ha="center", va="center", fontsize=8, color="white", clip_on=True)
    top.axhline(arena_bytes, color=RED, linewidth=1, linestyle="--")
    top.text(xs[0] - 0.4, arena_bytes, f" arena {arena_bytes:,} B", va="bottom", fontsize=8, color=RED)
    top.set_ylim(0, arena_bytes * 1.1 or 1)
    top.set_ylabel("arena offset (bytes)")
    top.set_title("memory plan: what is alive when, and where", fontsize=10, loc="left")
    top.grid(axis="y", alpha=0.3)
    values = [live.get(x, 0) for x in xs]
    peak = max(values or [0])
    peak_at = [x for x, v in zip(xs, values) if v == peak]
    bottom.bar(xs, values, color=[RED if x in peak_at else GREY for x in xs], width=0.8)
    bottom.axhline(arena_bytes, color=RED, linewidth=1, linestyle="--")
    bottom.set_ylabel("alive (bytes)")
    bottom.set_ylim(0, max(arena_bytes, peak) * 1.25 or 1)
    if peak_at:
        bottom.annotate(f"peak {peak:,} B at {_short(steps[peak_at[0] + 1], 24)}", (peak_at[0], peak),
                        xytext=(0, 4), textcoords="offset points", ha="center", fontsize=8, color=RED)
    bottom.set_xlim(-1.6, n - 1.4)
    bottom.set_xticks(xs, [_short(s, 22) for s in steps], rotation=60, ha="right", fontsize=7)
    bottom.grid(axis="y", alpha=0.3)
    return _png(fig)


def sections_bars(sections: list[dict]) -> bytes:
    """ELF sections by size, coloured by where they live: flash only, flash and RAM, RAM only. Sections
    under 1 % of the total are drawn as one bar per kind."""
    total = sum(s["size"] for s in sections) or 1
    rows = sorted((s for s in sections if s["size"] >= 0.01 * total), key=lambda s: -s["size"])
    for kind in ("text", "data", "bss"):
        small = [s for s in sections if s["size"] < 0.01 * total and s["kind"] == kind]
        if small:
            rows.append({"name": f"{len(small)} smaller", "size": sum(s["size"] for s in small), "kind": kind})
    fig = _figure(10, 1.2 + 0.3 * max(len(rows), 3))
    ax = fig.subplots()
    colors = {"text": BLUE, "data": ORANGE, "bss": GREEN}
    ys = range(len(rows))
    ax.barh(ys, [s["size"] for s in rows], color=[colors[s["kind"]] for s in rows], height=0.7)
    for y, s in zip(ys, rows):
        ax.text(s["size"], y, f" {s['size']:,} B", va="center", fontsize=8)
    ax.set_yticks(list(ys), [s["name"] for s in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max([s["size"] for s in rows] or [1]) * 1.2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.set_xlabel("bytes")
    ax.grid(axis="x", alpha=0.3)
    handles = [Rectangle((0, 0), 1, 1, color=colors[k]) for k in ("text", "data", "bss")]
    ax.legend(handles, ["flash (code, constants)", "flash + RAM (initialised data)", "RAM (zeroed)"],
              fontsize=8, loc="lower right")
    ax.set_title("the built binary by section", fontsize=10, loc="left")
    return _png(fig)


def compression_steps(labels: list[str], accuracy: list[float], int8_accuracy: list[float | None],
                      float_bytes: list[int], int8_bytes: list[int], macs: list[int]) -> bytes:
    """Per recipe step: held-out accuracy (float, int8), weight bytes (log scale) and MACs."""
    fig = _figure(10, 3.6)
    acc_ax, size_ax, mac_ax = fig.subplots(1, 3)
    xs = list(range(len(labels)))
    ticks = [_short(s, 16) for s in labels]
    acc_ax.plot(xs, [a * 100 for a in accuracy], marker="o", color=BLUE, label="float")
    if any(a is not None for a in int8_accuracy):
        acc_ax.plot([x for x, a in zip(xs, int8_accuracy) if a is not None],
                    [a * 100 for a in int8_accuracy if a is not None], marker="s", color=ORANGE, label="int8")
    acc_ax.set_title("held-out accuracy (%)", fontsize=10, loc="left")
    acc_ax.legend(fontsize=8)
    width = 0.38
    size_ax.bar([x - width / 2 for x in xs], float_bytes, width, color=GREY, label="float32")
    bars = size_ax.bar([x + width / 2 for x in xs], int8_bytes, width, color=BLUE, label="int8 (best encoding)")
    size_ax.bar_label(bars, [_compact(b) for b in int8_bytes], fontsize=7, padding=2)
    size_ax.set_ylim(0, max(float_bytes + int8_bytes + [1]) * 1.3)
    size_ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: _compact(v)))
    size_ax.set_title("weight bytes", fontsize=10, loc="left")
    size_ax.legend(fontsize=8, loc="upper right")
    bars = mac_ax.bar(xs, macs, color=ORANGE)
    mac_ax.bar_label(bars, [_compact(m) for m in macs], fontsize=7, padding=2)
    mac_ax.set_ylim(0, max(macs + [1]) * 1.15)
    mac_ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: _compact(v)))
    mac_ax.set_title("MACs per inference", fontsize=10, loc="left")
    for ax in (acc_ax, size_ax, mac_ax):
        ax.set_xticks(xs, ticks, rotation=35, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def exit_curve(points: list[dict], full: dict, chosen: dict | None, names: list[str], work_label: str) -> bytes:
    """Early exits: accuracy against the work fraction over thresholds (the operating point marked), and
    how the answers split between the exits at each threshold."""
    fig = _figure(10, 4.2)
    curve, shares = fig.subplots(1, 2)
    fractions = [p["work_fraction"] for p in points]
    if all("accuracy" in p for p in points):
        curve.plot(fractions, [p["accuracy"] * 100 for p in points], marker=".", color=BLUE, label="early exits")
        if "accuracy" in full:
            curve.scatter([1.0], [full["accuracy"] * 100], color=GREY, zorder=3, label="full network (exits off)")
        if chosen is not None and "accuracy" in chosen:
            thr = "off" if chosen["threshold"] is None else (
                " / ".join("off" if t is None else f"{t:.3g}" for t in chosen["threshold"])
                if isinstance(chosen["threshold"], list) else f"{chosen['threshold']:.3g}")
            curve.scatter([chosen["work_fraction"]], [chosen["accuracy"] * 100], s=90, facecolor="none",
                          edgecolor=RED, linewidth=2, zorder=4, label=f"operating point (threshold {thr})")
        curve.set_ylabel("accuracy (%)")
        curve.legend(fontsize=8, loc="lower right")
    curve.set_xlabel(f"work per inference, fraction of the full network's ({work_label})")
    curve.set_title("accuracy against work", fontsize=10, loc="left")
    curve.grid(alpha=0.3)
    thresholds = [p["threshold"] for p in points]
    per_exit = any(isinstance(t, list) for t in thresholds)  # a per-exit search path: plot it by step
    if per_exit:
        thresholds = list(range(len(points)))
    bottoms = [0.0] * len(points)
    for k, name in enumerate(names):
        rates = [p["hit_rates"][k] * 100 for p in points]
        shares.fill_between(thresholds, bottoms, [b + r for b, r in zip(bottoms, rates)], step="mid",
                            color=CYCLE[k % len(CYCLE)], alpha=0.8, label=name)
        bottoms = [b + r for b, r in zip(bottoms, rates)]
    if chosen is not None and chosen["threshold"] is not None and not per_exit:
        shares.axvline(chosen["threshold"], color=RED, linestyle="--", linewidth=1.2, label="operating point")
    shares.set_xlabel("step of the per-exit search" if per_exit else "threshold")
    shares.set_ylabel("answered by (%)")
    shares.set_ylim(0, 100)
    shares.set_title("which exit answers", fontsize=10, loc="left")
    shares.legend(fontsize=8, loc="upper left")
    return _png(fig)


def pareto_front(points: list[tuple], front: list[tuple], best: tuple | None, unit: str,
                 max_flash: int | None = None) -> bytes:
    """`edgekit tune`: every successful trial (flash, accuracy, instructions) as a dot, the Pareto front
    joined, the best trial within the constraints ringed; right, instructions against flash."""
    fig = _figure(10, 4.2)
    acc, work = fig.subplots(1, 2)
    for ax, ys, label in ((acc, [p[1] * 100 for p in points], "accuracy (%)"),
                          (work, [p[2] for p in points], unit)):
        ax.scatter([p[0] for p in points], ys, color=GREY, s=18, label="trial")
        ax.set_xlabel("flash (bytes)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: _compact(v)))
        if max_flash is not None:
            ax.axvline(max_flash, color=RED, linestyle="--", linewidth=1, label="--max-flash")
    # The front is over four objectives: a trial on it may look dominated in one projection, so dots, no line.
    acc.scatter([p[0] for p in front], [p[1] * 100 for p in front], color=BLUE, s=24, label="Pareto front")
    work.scatter([p[0] for p in front], [p[2] for p in front], color=BLUE, s=24, label="Pareto front")
    work.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: _compact(v)))
    if best:
        acc.scatter([best[0]], [best[1] * 100], s=110, facecolor="none", edgecolor=RED, linewidth=2, zorder=4,
                    label="best within the constraints")
    acc.set_title("accuracy against flash", fontsize=10, loc="left")
    work.set_title("work per inference against flash", fontsize=10, loc="left")
    acc.legend(fontsize=8, loc="lower right")
    return _png(fig)
