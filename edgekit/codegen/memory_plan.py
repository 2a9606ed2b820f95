"""Static memory plan: every activation tensor gets an offset in one arena.

Tensors whose lifetimes (first write .. last read, in op order) overlap must
not overlap in memory. A reshape is free: its output aliases its input. The
placement is greedy by size (largest buffer first, lowest offset that fits),
the baseline TFLM's GreedyMemoryPlanner also uses, but computed here at
generate time so the device spends no instructions on it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..ir import Graph

ALIAS_OPS = ("reshape",)


@dataclass
class Buffer:
    tensors: list[str]
    size: int
    first: int  # index of the op that writes it (-1: a graph input)
    last: int  # index of the last op that reads it (len(ops): a graph output)
    offset: int = 0


@dataclass
class MemoryPlan:
    offsets: dict[str, int] = field(default_factory=dict)  # tensor -> byte offset
    arena_bytes: int = 0
    buffers: list[Buffer] = field(default_factory=list)

    def live_bytes(self) -> dict[int, int]:
        """Bytes alive at each step (-1: the graph input, i: op i, len(ops): the outputs)."""
        if not self.buffers:
            return {}
        first = min(b.first for b in self.buffers)
        last = max(b.last for b in self.buffers)
        return {s: sum(b.size for b in self.buffers if b.first <= s <= b.last) for s in range(first, last + 1)}

    def lower_bound(self) -> int:
        """The largest set of buffers alive at one op: no plan can beat this."""
        return max(self.live_bytes().values(), default=0)


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def plan_arena(graph: Graph) -> MemoryPlan:
    """The plan a generated project uses (8-byte aligned; weight-only graphs keep float32 activations)."""
    weight_only = bool(graph.meta.get("weight_only"))
    return plan_memory(graph, align=8, elem_bytes={"int8": 4, "float32": 4} if weight_only else None)


def plan_memory(graph: Graph, align: int = 8, elem_bytes: dict[str, int] | None = None) -> MemoryPlan:
    """Plan the arena. ``elem_bytes`` overrides bytes per element by dtype (the
    weight-only mode keeps activations in float32)."""
    sizes = {}
    for name, t in graph.tensors.items():
        if not t.is_constant:
            per = (elem_bytes or {}).get(t.dtype, t.nbytes // max(t.size, 1))
            sizes[name] = t.size * per
    # Union reshape outputs with their inputs: one buffer, several names.
    root: dict[str, str] = {}

    def find(n: str) -> str:
        while root.get(n, n) != n:
            n = root[n]
        return n

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

    placed: list[Buffer] = []
    for b in sorted(buffers.values(), key=lambda b: (-b.size, b.first)):
        live = sorted((p for p in placed if not (p.last < b.first or b.last < p.first)), key=lambda p: p.offset)
        offset = 0
        for p in live:
            if offset + b.size <= p.offset:
                break
            offset = max(offset, _align(p.offset + p.size, align))
        b.offset = offset
        placed.append(b)
    plan = MemoryPlan(buffers=list(buffers.values()))
    for b in plan.buffers:
        for name in b.tensors:
            plan.offsets[name] = b.offset
    plan.arena_bytes = _align(max((b.offset + b.size for b in plan.buffers), default=0), align)
    return plan
