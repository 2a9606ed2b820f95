"""Static memory plan: every activation tensor gets an offset in one arena.

Tensors whose lifetimes (first write .. last read, in op order) overlap must
not overlap in memory, with two kinds of exceptions:

- A reshape is free: its output aliases its input.
- In place: an op may write its output over an input it is the last reader of, when the kernel's
  order of reads and writes makes it safe. Every convolution kernel (portable, dsp, x86, neon) writes
  output pixels in raster order, at most two at a time (PIXEL_GROUP: the pair kernels keep reading
  both windows while they write both pixels), so output pixel p may overwrite any input byte that no
  pixel of its group or later reads. With the output placed ``delta`` bytes below the input, that
  holds for every p when
  ``delta >= max_p (end of output pixel p) - (first input byte read by a pixel >= p's group's first)``
  (``conv_inplace_delta``). A depthwise 3x3 with stride 1 then needs one input row and two pixels
  more than its input (TinyEngine's in-place depthwise, without its buffer), a 1x1 convolution the
  larger of its two tensors plus one pixel. Elementwise kernels (add, relu) read element i before
  writing it (delta 0). Fully connected layers do not run in place: their kernels read the input
  until the last row (keeping a widened copy for that would cost more scratch than it saves).

Residual blocks in row bands (``residual-bands``): conv (stride 1) -> conv (stride 1) -> add with the
block's input x, whose intermediate tensors only the block reads, run band by band (``residual_blocks``):
the first convolution's output lives only as a band of rows (the rows the second one's window needs,
carried from band to band), the second's as one band, and the add writes its rows over x's. That is safe
when no later row of the first convolution reads x's rows a band has overwritten: the rows of the second
window below its centre cover the first's padding above (k_B - 1 - p_B >= p_A). The band height is the
largest whose footprint stays within the rest of the schedule's bound.

Operator order (``op-order``): a layer that reads a tensor other layers read too (a residual block's
shortcut) may run earlier or later within its dependencies; ``op_schedule`` moves such layers one at a
time to where the bytes alive per step, sorted from the largest, are least (so the peak first, then the
next highest steps), a bounded number of tries; kept only when the arena comes out smaller than in the
graph's order (plan_with_report). The generated code calls the layers in that order; the
layers keep their indices (names, per-layer counts). Graphs with early exits keep their order.

Placement: lowest feasible offset, buffer by buffer, in an order. Today's plan (``offset-search``
off) is greedy by size (largest first), TFLM's GreedyMemoryPlanner's order; the search tries a few
orders and then swaps pairs of buffers (seeded, bounded), and stops at the lower bound. Both are
computed at generate time so the device spends no instructions on allocation.
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field

import numpy as np

from ..ir import Graph, Op, nhwc

ALIAS_OPS = ("reshape",)
ELEMENTWISE_OPS = ("add", "relu", "relu6", "clamp")
# The techniques `edgekit generate --memory-off` can turn off, in the order they usually pay.
TECHNIQUES = ("inplace-depthwise", "inplace-conv", "inplace-elementwise", "op-order", "residual-bands", "offset-search")
SCHEDULE_TRIES = 200  # orders the op-order search evaluates at most per model
BAND_CONVS = ("conv2d", "depthwise_conv2d")
ANY_OVERLAP = -(1 << 40)  # a delta that allows every relative placement
NO_READ = 1 << 30  # the "first input pixel" of a window that reads none
# The most output pixels a convolution kernel computes together (dsp / x86 / neon: two), reading all their
# windows while it writes any of them.
PIXEL_GROUP = 2
SEARCH_STEPS = 600  # pair swaps the offset search tries per model (seeded: the plan is reproducible)


@dataclass
class Buffer:
    tensors: list[str]
    size: int
    first: int  # index of the op that writes it (-1: a graph input)
    last: int  # index of the last op that reads it (len(ops): a graph output)
    offset: int = 0


@dataclass
class InPlace:
    """``output`` may overlap ``input`` when input.offset - output.offset >= delta (or not at all)."""

    input: int  # index in MemoryPlan.buffers
    output: int
    delta: int
    op: int
    technique: str


@dataclass
class BandGroup:
    """A residual block run in row bands: ops ``first`` (conv A: x -> y), ``first + 1`` (conv B: y -> w)
    and ``first + 2`` (the add of w and x, written over x as z). ``rows``: output rows per band."""

    first: int
    x: str
    y: str
    w: str
    z: str
    height: int  # rows of x, w and z
    y_height: int  # rows of y
    row_bytes: int  # bytes of one row of x (= w = z)
    y_row_bytes: int
    kernel_b: int  # conv B's window rows
    pad_b: int  # conv B's padding above
    rows: int = 1

    @property
    def ops(self) -> tuple[int, int, int]:
        return self.first, self.first + 1, self.first + 2

    @property
    def y_rows(self) -> int:
        """Rows of y the band buffer holds: a band's rows of B's windows."""
        return min(self.y_height, self.rows + self.kernel_b - 1)

    def band_bytes(self, elem: int = 1) -> tuple[int, int]:
        return self.y_rows * self.y_row_bytes * elem, self.rows * self.row_bytes * elem


@dataclass
class MemoryPlan:
    offsets: dict[str, int] = field(default_factory=dict)  # tensor -> byte offset
    arena_bytes: int = 0
    buffers: list[Buffer] = field(default_factory=list)
    inplace: list[InPlace] = field(default_factory=list)  # the pairs this plan was allowed to overlap
    bands: list[BandGroup] = field(default_factory=list)  # residual blocks run in row bands
    schedule: list[int] = field(default_factory=list)  # the ops' indices in the order they run; steps are its positions
    not_banded: list[tuple[tuple[int, ...], str]] = field(default_factory=list)  # (ops, why not) of the others

    def live_bytes(self) -> dict[int, int]:
        """Bytes alive at each step (-1: the graph input, i: op i, len(ops): the outputs)."""
        if not self.buffers:
            return {}
        first = min(b.first for b in self.buffers)
        last = max(b.last for b in self.buffers)
        return {s: sum(b.size for b in self.buffers if b.first <= s <= b.last) for s in range(first, last + 1)}

    def lower_bound(self) -> int:
        """The largest set of buffers alive at one op, less what that op's in-place pair may share:
        no plan with this schedule can beat it."""
        return max(_step_values(self), default=0)


def _step_values(plan: MemoryPlan) -> list[int]:
    """Per step (from the first buffer's first to the last one's last), the bytes alive less what
    that step's in-place pair may share; one sweep over the buffers."""
    bufs = plan.buffers
    if not bufs:
        return []
    lo, hi = min(b.first for b in bufs), max(b.last for b in bufs)
    diff = [0] * (hi - lo + 2)
    for b in bufs:
        diff[b.first - lo] += b.size
        diff[b.last - lo + 1] -= b.size
    shared: dict[int, int] = {}
    for p in plan.inplace:
        shared[p.op] = max(shared.get(p.op, 0), _pair_saving(bufs[p.input], bufs[p.output], p.delta))
    values, live = [], 0
    for s in range(lo, hi + 1):
        live += diff[s - lo]
        values.append(live - shared.get(s, 0))
    return values


def _pair_saving(inp: Buffer, out: Buffer, delta: int) -> int:
    """Bytes an in-place pair saves against side by side: out at 0, input at max(delta, 0)."""
    footprint = max(out.size, delta + inp.size) if delta > 0 else max(out.size, inp.size)
    return max(0, inp.size + out.size - footprint)


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def conv_inplace_delta(in_shape, out_shape, kernel, stride, dilation, pad_top, pad_left, group: int = PIXEL_GROUP) -> int:
    """The smallest input offset minus output offset (bytes, int8 NHWC) at which a convolution
    kernel that writes output pixels in raster order, each after reading its window, may write its
    output over its input (see the module's doc); ``group``: the pixels it finishes together."""
    _, in_h, in_w, in_c = nhwc(in_shape)  # a rank-3 (1, L, C) signal is (1, 1, L, C)
    _, out_h, out_w, out_c = nhwc(out_shape)
    kh, kw = kernel
    oy = np.arange(out_h)[:, None]
    ox = np.arange(out_w)[None, :]
    # the first input row / column a window reads: its first tap inside the image
    y0 = oy * stride[0] - pad_top
    x0 = ox * stride[1] - pad_left
    ky = np.where(y0 < 0, (-y0 + dilation[0] - 1) // dilation[0], 0)
    kx = np.where(x0 < 0, (-x0 + dilation[1] - 1) // dilation[1], 0)
    iy = y0 + ky * dilation[0]
    ix = x0 + kx * dilation[1]
    valid = (ky < kh) & (kx < kw) & (iy < in_h) & (ix < in_w)
    first = np.where(valid, iy * in_w + ix, NO_READ).reshape(-1)  # a window all in the padding reads nothing
    first_after = np.minimum.accumulate(first[::-1])[::-1]  # min over the pixels >= p
    pixels = np.arange(out_h * out_w)
    # pixel q is written while its group's windows are still read (pair kernels: pixels 2k, 2k + 1)
    group_start = pixels - pixels % group
    return max(ANY_OVERLAP, int(np.max((pixels + 1) * out_c - in_c * first_after[group_start])))


def _inplace_rule(graph: Graph, op: Op, variant: str | None) -> tuple[str, int] | None:
    """(technique, delta) when this op's kernel may write its output over its first input."""
    if op.kind in ELEMENTWISE_OPS:
        # element i is read before it is written, so only over an input of the output's own shape
        # (a broadcast operand is read at other positions)
        same = graph.tensors[op.inputs[0]].shape == graph.tensors[op.outputs[0]].shape
        return ("inplace-elementwise", 0) if same else None
    if op.kind == "depthwise_conv2d" and variant == "neon":
        return None  # the NEON depthwise walks all pixels per 16-channel group: not the raster-order contract
    if op.kind in ("conv2d", "depthwise_conv2d"):
        a = op.attrs
        w = nhwc(graph.tensors[op.inputs[1]].shape)  # a Conv1d's rank-3 tensors: height 1
        kernel = (w[1], w[2])
        # the NEON convolution (SDOT on rpi5) and the x86 one (its VNNI tile) finish four pixels together,
        # the others two
        group = 4 if op.kind == "conv2d" and variant in ("neon", "x86") else PIXEL_GROUP
        delta = conv_inplace_delta(nhwc(graph.tensors[op.inputs[0]].shape), nhwc(graph.tensors[op.outputs[0]].shape),
                                   kernel, a["stride"], a["dilation"], a["padding"][0], a["padding"][2], group)
        return ("inplace-depthwise" if op.kind == "depthwise_conv2d" else "inplace-conv"), delta
    return None


def residual_blocks(graph: Graph, allowed=None, off_reason: str | None = None):
    """The residual blocks conv -> conv -> add(x) that may run in row bands (BandGroup, rows = 1), and
    (ops, why not) for those that may not. ``allowed``: the ops that may write over their input
    (memory-plan's inplace_ops); ``off_reason``: why none may (e.g. the Pi's threads split rows)."""
    readers: dict[str, list[int]] = {}
    producer: dict[str, int] = {}
    for i, op in enumerate(graph.ops):
        for n in dict.fromkeys(op.inputs):
            readers.setdefault(n, []).append(i)
        for n in op.outputs:
            producer[n] = i
    groups: list[BandGroup] = []
    skipped: list[tuple[tuple[int, ...], str]] = []
    for k, add in enumerate(graph.ops):
        if add.kind != "add" or len(add.inputs) != 2 or len(add.outputs) != 1:
            continue
        match = None
        for w, x in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
            b = producer.get(w)
            if b is None or graph.ops[b].kind not in BAND_CONVS:
                continue
            a = producer.get(graph.ops[b].inputs[0])
            if a is not None and graph.ops[a].kind in BAND_CONVS and graph.ops[a].inputs[0] == x:
                match = (a, b, w, x)
                break
        if match is None:
            continue
        a, b, w, x = match
        y, z = graph.ops[b].inputs[0], add.outputs[0]
        why = _band_refusal(graph, (a, b, k), x, y, w, z, readers, allowed, off_reason)
        if why:
            skipped.append(((a, b, k), why))
            continue
        xs, ys = nhwc(graph.tensors[x].shape), nhwc(graph.tensors[y].shape)
        op_b = graph.ops[b]
        groups.append(BandGroup(a, x, y, w, z, height=xs[1], y_height=ys[1], row_bytes=xs[2] * xs[3],
                                y_row_bytes=ys[2] * ys[3], kernel_b=nhwc(graph.tensors[op_b.inputs[1]].shape)[1],
                                pad_b=op_b.attrs["padding"][0]))
    return groups, skipped


def _band_refusal(graph: Graph, ops, x, y, w, z, readers, allowed, off_reason) -> str | None:
    """Why the block conv A (x -> y), conv B (y -> w), add (w, x -> z) may not run in row bands."""
    a, b, k = ops
    t = graph.tensors
    if off_reason:
        return off_reason
    if allowed is not None and not all(i in allowed for i in ops):
        return "its layers may not write over their inputs (encoded weights, a float model or early exits)"
    if not (b == a + 1 and k == b + 1):
        return "its layers are not consecutive in the schedule"
    if not (t[x].shape == t[w].shape == t[z].shape) or len(t[x].shape) != 4 or t[x].dtype != t[y].dtype:
        return "the add broadcasts or the block is not a 2-D int8 image"
    for i in (a, b):
        op = graph.ops[i]
        if tuple(op.attrs["stride"]) != (1, 1) or tuple(op.attrs["dilation"]) != (1, 1):
            return (f"layer {op.name!r} has stride {tuple(op.attrs['stride'])}, dilation "
                    f"{tuple(op.attrs['dilation'])}: bands need stride 1 and no dilation")
    outputs = set(graph.outputs)
    if readers.get(y) != [b] or readers.get(w) != [k] or y in outputs or w in outputs:
        return "a tensor inside the block is read outside it"
    if sorted(readers.get(x, [])) != [a, k] or x in outputs:
        return "the block's input is read by other layers too: the add may not write over it"
    if nhwc(t[x].shape)[1] < 2:
        return "the block is one row high"
    kb = nhwc(t[graph.ops[b].inputs[1]].shape)[1]
    pb, pa = graph.ops[b].attrs["padding"][0], graph.ops[a].attrs["padding"][0]
    if kb - 1 - pb < pa:
        return (f"the second convolution's window reaches {kb - 1 - pb} row(s) below its centre, fewer than the "
                f"first's {pa} row(s) of padding above: a band would read input rows the add has overwritten")
    return None


def plan_memory(graph: Graph, align: int = 8, elem_bytes: dict[str, int] | None = None, *,
                techniques=(), kernel_variant: str | None = None, inplace_ops=None,
                bands_off_reason: str | None = None, schedule: list[int] | None = None) -> MemoryPlan:
    """Plan the arena. ``elem_bytes`` overrides bytes per element by dtype (the
    weight-only mode keeps activations in float32). ``techniques``: those of TECHNIQUES to use
    (none: today's greedy plan); ``kernel_variant``: the board's (in-place rules depend on it);
    ``inplace_ops``: the indices of the ops allowed to run in place (default: all);
    ``bands_off_reason``: no residual block runs in bands, for this reason; ``schedule``: the op order
    (default: op_schedule's with op-order on, else the graph's). The plan's steps (buffer lifetimes,
    in-place ops, bands) are positions in ``plan.schedule``."""
    techniques = set(techniques)
    if schedule is None:
        schedule = op_schedule(graph, align, elem_bytes, techniques, kernel_variant, inplace_ops) \
            if "op-order" in techniques else list(range(len(graph.ops)))
    view, allowed = _in_order(graph, schedule, inplace_ops)
    groups: list[BandGroup] = []
    skipped: list[tuple[tuple[int, ...], str]] = []
    rules: dict = {}
    if "residual-bands" in techniques:
        groups, skipped = residual_blocks(view, allowed, bands_off_reason)
        groups, dropped = _choose_bands(
            lambda bands: _buffers(view, align, elem_bytes, techniques, kernel_variant, allowed, bands, rules), groups)
        skipped += dropped
    plan = _buffers(view, align, elem_bytes, techniques, kernel_variant, allowed, groups, rules)
    plan.not_banded = sorted(skipped)
    plan.schedule = list(schedule)
    order = sorted(range(len(plan.buffers)), key=lambda k: (-plan.buffers[k].size, plan.buffers[k].first))
    offsets = _place(plan, order, align)
    if "offset-search" in techniques:
        offsets = _search(plan, order, offsets, align)
    for b, off in zip(plan.buffers, offsets):
        b.offset = off
    for b in plan.buffers:
        for name in b.tensors:
            plan.offsets[name] = b.offset
    plan.arena_bytes = _arena(plan.buffers, offsets, align)
    return plan


def _in_order(graph: Graph, schedule: list[int], inplace_ops):
    """The graph with its ops in ``schedule``'s order, and ``inplace_ops`` as positions in it."""
    if schedule == list(range(len(graph.ops))):
        return graph, inplace_ops
    view = dataclasses.replace(graph, ops=[graph.ops[i] for i in schedule])
    return view, None if inplace_ops is None else {p for p, i in enumerate(schedule) if i in inplace_ops}


def op_schedule(graph: Graph, align: int = 8, elem_bytes=None, techniques=(), kernel_variant=None,
                inplace_ops=None) -> list[int]:
    """A topological order of the ops with fewer bytes alive at its highest steps: the layers that read a
    tensor others read too are moved, one at a time, to the position within their dependencies that makes
    the steps' bytes (less in-place sharing, sorted from the largest) least, while that improves, at most
    SCHEDULE_TRIES orders. E.g. a shortcut convolution run before the main path's second convolution
    frees the block input sooner. Graphs with early exits keep their order (an exit returns mid-way)."""
    n = len(graph.ops)
    order = list(range(n))
    if any(op.kind == "exit" for op in graph.ops):
        return order
    readers: dict[str, int] = {}
    producer: dict[str, int] = {}
    for i, op in enumerate(graph.ops):
        for t in dict.fromkeys(op.inputs):
            if not graph.tensors[t].is_constant:
                readers[t] = readers.get(t, 0) + 1
        for t in op.outputs:
            producer[t] = i
    movable = [i for i, op in enumerate(graph.ops) if any(readers.get(t, 0) > 1 for t in op.inputs)]
    if not movable:
        return order
    consumers = [sorted({j for j, other in enumerate(graph.ops) for t in op.outputs if t in other.inputs})
                 for op in graph.ops]
    techniques = set(techniques) - {"residual-bands"}
    rules: dict = {}

    def key(o):
        view, allowed = _in_order(graph, o, inplace_ops)
        return sorted(_step_values(_buffers(view, align, elem_bytes, techniques, kernel_variant, allowed, [], rules)),
                      reverse=True)

    best, tries = key(order), 0
    while tries < SCHEDULE_TRIES:
        pos = {op: p for p, op in enumerate(order)}
        found = None
        for r in movable:
            p = pos[r]
            lo = max((pos[producer[t]] for t in graph.ops[r].inputs if t in producer), default=-1) + 1
            hi = min((pos[c] for c in consumers[r]), default=n) - 1
            for q in range(lo, hi + 1):
                if q == p or tries >= SCHEDULE_TRIES:
                    continue
                trial = order[:p] + order[p + 1:]
                trial.insert(q, r)
                k = key(trial)
                tries += 1
                if k < best:
                    best, found = k, trial
        if found is None:
            break
        order = found
    return order


def _choose_bands(build, groups: list[BandGroup]):
    """The blocks worth banding, each with its band height: a block whose banding (one row at a time)
    does not lower the schedule's bound is left as it is (its steps are not the peak); the others take
    the most rows per band (fewest kernel calls) that keep the bound of all of them at one row."""
    if not groups:
        return [], []
    for g in groups:
        g.rows = 1
    target = build(groups).lower_bound()
    chosen, dropped = [], []
    for g in groups:
        if build([c for c in groups if c is not g]).lower_bound() <= target:
            dropped.append((g.ops, "not at the arena's peak: banding it would not lower the bound"))
        else:
            chosen.append(g)
    if not chosen:
        return [], dropped
    target = build(chosen).lower_bound()
    for g in chosen:  # the bound grows with the band height: the largest height that keeps it
        lo, hi = 1, g.height
        while lo < hi:
            g.rows = (lo + hi + 1) // 2
            if build(chosen).lower_bound() <= target:
                lo = g.rows
            else:
                hi = g.rows - 1
        g.rows = lo
    return chosen, dropped


def _buffers(graph: Graph, align: int, elem_bytes, techniques, kernel_variant, inplace_ops,
             bands: list[BandGroup], rules: dict | None = None) -> MemoryPlan:
    """The buffers (tensors merged by aliasing, with their sizes and lifetimes) and the in-place pairs
    allowed, not yet placed. ``rules``: a cache of the ops' in-place rules (by op identity: they do not
    depend on the order), for callers that build many orders of one graph."""
    rules = {} if rules is None else rules
    if "sizes" not in rules:  # the tensors' bytes do not depend on the order either
        rules["sizes"] = {}
        for name, t in graph.tensors.items():
            if not t.is_constant:
                per = (elem_bytes or {}).get(t.dtype, t.nbytes // max(t.size, 1))
                rules["sizes"][name] = t.size * per
    sizes = rules["sizes"]
    # Union reshape outputs with their inputs: one buffer, several names.
    root: dict[str, str] = {}

    def find(n: str) -> str:
        while root.get(n, n) != n:
            n = root[n]
        return n

    for g in bands:  # a banded block's add writes its output over the block's input
        root[find(g.z)] = find(g.x)
    for op in graph.ops:
        if op.kind in ALIAS_OPS:
            root[find(op.outputs[0])] = find(op.inputs[0])
    buffers: dict[str, Buffer] = {}
    end = len(graph.ops)
    for name in sizes:
        r = find(name)
        buf = buffers.setdefault(r, Buffer([], sizes[r], end, -1))
        buf.tensors.append(name)
    for name in graph.inputs:
        buffers[find(name)].first = -1
    for i, op in enumerate(graph.ops):
        for name in op.outputs:
            b = buffers[find(name)]
            b.first = min(b.first, i)
        for name in op.inputs:
            if name in sizes:
                b = buffers[find(name)]
                b.last = max(b.last, i)
    for name in graph.outputs:
        buffers[find(name)].last = end
    for b in buffers.values():
        b.last = max(b.last, b.first)  # written but never read: still needs room while written
    banded = set()
    for g in bands:  # the two intermediate tensors: band buffers, alive while the block's bands run
        per = sizes[g.x] // (g.height * g.row_bytes)
        for name, size in zip((g.y, g.w), g.band_bytes(per)):
            b = buffers[find(name)]
            b.size, b.first, b.last = size, g.first, g.first + 2
        banded.update(g.ops)

    plan = MemoryPlan(buffers=list(buffers.values()), bands=list(bands))
    index = {id(b): i for i, b in enumerate(plan.buffers)}
    for i, op in enumerate(graph.ops):
        if op.kind in ALIAS_OPS or i in banded or (inplace_ops is not None and i not in inplace_ops):
            continue
        if id(op) not in rules:
            rules[id(op)] = _inplace_rule(graph, op, kernel_variant)
        rule = rules[id(op)]
        if rule is None or rule[0] not in techniques or len(op.outputs) != 1:
            continue
        technique, delta = rule
        out = buffers[find(op.outputs[0])]
        # elementwise kernels take any of their inputs; the others their data input only
        candidates = [n for n in op.inputs if n in sizes] if op.kind in ELEMENTWISE_OPS else op.inputs[:1]
        for name in dict.fromkeys(candidates):
            inp = buffers[find(name)]
            if inp is out or inp.last != i or out.first != i or name not in sizes:
                continue
            if op.kind in ELEMENTWISE_OPS and inp.size != out.size:
                continue  # a broadcast
            plan.inplace.append(InPlace(index[id(inp)], index[id(out)],
                                        delta if delta == ANY_OVERLAP else _align(delta, align), i, technique))
    return plan


def _arena(buffers, offsets, align) -> int:
    return _align(max((o + b.size for b, o in zip(buffers, offsets)), default=0), align)


def _neighbours(plan: MemoryPlan) -> list[list[tuple]]:
    """For each buffer k, the buffers j whose lifetimes overlap it, as (j, size of j, delta when k is
    j's in-place output, delta when k is j's in-place input): computed once a plan, since _search places
    hundreds of orders of the same buffers (an unrolled GRU has hundreds)."""
    bufs = plan.buffers
    pairs = {(p.input, p.output): p.delta for p in plan.inplace}
    by_first = sorted(range(len(bufs)), key=lambda k: bufs[k].first)
    together: list[list[tuple]] = [[] for _ in bufs]
    for a, k in enumerate(by_first):
        for j in by_first[a + 1:]:
            if bufs[j].first > bufs[k].last:
                break
            together[k].append((j, bufs[j].size, pairs.get((j, k)), pairs.get((k, j))))
            together[j].append((k, bufs[k].size, pairs.get((k, j)), pairs.get((j, k))))
    return together


def _place(plan: MemoryPlan, order, align: int, neighbours=None) -> list[int]:
    """Each buffer in ``order`` at the lowest aligned offset that keeps it apart from the placed
    buffers it lives with, or in the relation an in-place pair allows."""
    bufs = plan.buffers
    neighbours = neighbours if neighbours is not None else _neighbours(plan)
    offsets: list[int | None] = [None] * len(bufs)
    for k in order:
        size = bufs[k].size
        forbidden = []  # open intervals (lo, hi) of offsets b may not take
        for j, size_j, as_output, as_input in neighbours[k]:
            o = offsets[j]
            if o is None:
                continue
            lo, hi = o - size, o + size_j
            if as_output is not None:  # k is j's output: k.offset <= o - delta is allowed
                lo = max(lo, o - as_output)
            elif as_input is not None:  # k is j's input: k.offset >= o + delta is allowed
                hi = min(hi, o + as_input)
            if lo + 1 < hi:
                forbidden.append((lo, hi))
        # the lowest aligned offset inside no interval: intervals by their start, up past each that covers it
        # (an interval passed by is never reached again: the offset only grows)
        offset = 0
        for lo, hi in sorted(forbidden):
            if lo < offset < hi:
                offset = _align(hi, align)
        offsets[k] = offset
    return offsets  # type: ignore[return-value]


def _search(plan: MemoryPlan, greedy_order, greedy, align: int) -> list[int]:
    """Near-exact offsets: a few orders, then seeded pair swaps of the best order, kept when the
    arena does not grow; stops at the lower bound."""
    bufs = plan.buffers
    neighbours = _neighbours(plan)
    bound = _align(plan.lower_bound(), align)
    best_order, best = list(greedy_order), greedy
    best_arena = _arena(bufs, greedy, align)
    n = len(bufs)
    # latest first: an in-place output sits below its input, so a chain of them is laid from its end
    keys = [lambda k: (-bufs[k].first, -bufs[k].size), lambda k: (bufs[k].first, -bufs[k].size), lambda k: (-(bufs[k].last - bufs[k].first), -bufs[k].size),
            lambda k: (-bufs[k].size * (bufs[k].last - bufs[k].first + 1), bufs[k].first)]
    for key in keys:
        if best_arena <= bound:
            return best
        order = sorted(range(n), key=key)
        offsets = _place(plan, order, align, neighbours)
        arena = _arena(bufs, offsets, align)
        if arena < best_arena:
            best_order, best, best_arena = order, offsets, arena
    rng = random.Random(0)
    order = list(best_order)
    for _ in range(SEARCH_STEPS if n > 1 else 0):
        if best_arena <= bound:
            break
        i, j = rng.randrange(n), rng.randrange(n)
        order[i], order[j] = order[j], order[i]
        offsets = _place(plan, order, align, neighbours)
        arena = _arena(bufs, offsets, align)
        if arena <= best_arena:
            best, best_arena = offsets, arena
        else:
            order[i], order[j] = order[j], order[i]
    return best


def check_techniques(off) -> list[str]:
    """``off`` ("all", or names of TECHNIQUES) as a list of names; an unknown name is an error."""
    from ..errors import EdgekitError

    names = [off] if isinstance(off, str) else list(off or ())
    if "all" in names:
        return list(TECHNIQUES)
    unknown = [n for n in names if n not in TECHNIQUES]
    if unknown:
        raise EdgekitError(f"unknown memory technique {unknown[0]!r}; choose among all, {', '.join(TECHNIQUES)}")
    return names


def plan_with_report(graph: Graph, align: int = 8, *, kernel_variant: str | None = None, off=(),
                     inplace_ops=None, elem_bytes: dict[str, int] | None = None,
                     bands_off_reason: str | None = None) -> tuple[MemoryPlan, dict]:
    """The plan with every technique not in ``off``, and a report: its arena, its lower bound,
    today's greedy plan's arena and what each technique saved (the arena with it turned off, less
    the arena with all on; savings overlap, so they do not add up), the residual blocks run in row
    bands and why the others are not."""
    off = check_techniques(off)
    on = [t for t in TECHNIQUES if t not in off]
    plan = plan_memory(graph, align, elem_bytes, techniques=on, kernel_variant=kernel_variant,
                       inplace_ops=inplace_ops, bands_off_reason=bands_off_reason)
    saved = {}
    if "op-order" in on:
        # the graph's own order when the searched one does not make the arena smaller (the code then
        # keeps the model's order)
        without = plan_memory(graph, align, elem_bytes, techniques=on, kernel_variant=kernel_variant,
                              inplace_ops=inplace_ops, bands_off_reason=bands_off_reason,
                              schedule=list(range(len(graph.ops))))
        if without.arena_bytes <= plan.arena_bytes:
            plan = without
        saved["op-order"] = without.arena_bytes - plan.arena_bytes
    baseline = plan_memory(graph, align, elem_bytes).arena_bytes if on else plan.arena_bytes
    for t in on:
        if t == "op-order":
            continue
        without = plan_memory(graph, align, elem_bytes, techniques=[u for u in on if u != t],
                              kernel_variant=kernel_variant, inplace_ops=inplace_ops,
                              bands_off_reason=bands_off_reason, schedule=plan.schedule)  # the order searched once
        saved[t] = without.arena_bytes - plan.arena_bytes
    saved = {t: saved[t] for t in on}
    used = sorted({p.technique for p in plan.inplace if _overlaps(plan, p)})
    names = [op.name for op in graph.ops]
    layer = plan.schedule  # step (position in the schedule) -> layer index

    def layers(steps):
        return {"layers": [layer[s] for s in steps], "names": [names[layer[s]] for s in steps]}

    report = {"arena_bytes": plan.arena_bytes, "lower_bound": plan.lower_bound(), "greedy_arena_bytes": baseline,
              "techniques": on, "saved_bytes": saved, "in_place_layers": sorted({layer[p.op] for p in plan.inplace
                                                                                 if _overlaps(plan, p)}),
              "in_place_kinds": used,
              "reordered_layers": [i for p, i in enumerate(layer) if i != p],
              # halo rows are carried from band to band (not recomputed): no extra MACs
              "banded_blocks": [{**layers(g.ops), "rows": g.rows, "bands": -(-g.height // g.rows),
                                 "band_bytes": sum(g.band_bytes()), "extra_macs": 0} for g in plan.bands],
              "not_banded": [{**layers(ops), "reason": why} for ops, why in plan.not_banded]}
    return plan, report


def describe(plan: MemoryPlan) -> dict:
    """The placed buffers as edgekit_project.json records them (what reports draw): each buffer's
    tensors, offset, size and the steps it is alive (-1: the input, len(ops): the outputs), and the
    in-place pairs that do overlap (input and output buffer indices), and the order the layers run in
    (the steps are positions in it)."""
    return {"schedule": plan.schedule,
            "buffers": [{"tensors": b.tensors, "offset": b.offset, "size": b.size, "first": b.first, "last": b.last}
                        for b in plan.buffers],
            "in_place_pairs": [[p.input, p.output] for p in plan.inplace if _overlaps(plan, p)]}


def _overlaps(plan: MemoryPlan, p: InPlace) -> bool:
    a, b = plan.buffers[p.input], plan.buffers[p.output]
    return a.offset < b.offset + b.size and b.offset < a.offset + a.size
