import numpy as np
import pytest

import edgekit
from edgekit import models
from edgekit.codegen.memory_plan import plan_memory


@pytest.mark.parametrize("make,shape", [(models.DigitsCNN, (1, 1, 8, 8)), (models.DigitsResCNN, (1, 1, 8, 8)),
                                        (models.ds_cnn_kws, (1, 1, 49, 10))])
def test_plan_never_overlaps_live_tensors(make, shape):
    x = np.random.default_rng(0).uniform(size=(8,) + shape[1:]).astype(np.float32)
    g = edgekit.quantize(make(), x)
    plan = plan_memory(g)
    bufs = plan.buffers
    for i, a in enumerate(bufs):
        for b in bufs[i + 1:]:
            live_together = not (a.last < b.first or b.last < a.first)
            apart = a.offset + a.size <= b.offset or b.offset + b.size <= a.offset
            assert apart or not live_together
    assert plan.lower_bound() <= plan.arena_bytes
    assert all(off % 8 == 0 for off in plan.offsets.values())
    # reshape costs nothing: its output shares its input's buffer
    for op in g.ops:
        if op.kind == "reshape":
            assert plan.offsets[op.inputs[0]] == plan.offsets[op.outputs[0]]


def test_each_placement_is_the_lowest_free_offset():
    """_place's sweep over the sorted intervals puts each buffer at the lowest aligned offset clear of every
    placed buffer it lives with (checked by trying 0 and every placed neighbour's aligned end), over random
    lifetimes, sizes and orders."""
    from edgekit.codegen.memory_plan import Buffer, MemoryPlan, _align, _place

    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 25))
        bufs = []
        for _ in range(n):
            first = int(rng.integers(-1, 20))
            bufs.append(Buffer([], int(rng.integers(1, 300)), first, first + int(rng.integers(0, 6))))
        order = [int(k) for k in rng.permutation(n)]
        offsets = _place(MemoryPlan(buffers=bufs), order, 8)
        for i, k in enumerate(order):
            b = bufs[k]
            placed = [j for j in order[:i] if not (bufs[j].last < b.first or b.last < bufs[j].first)]

            def clear(x):
                return all(x + b.size <= offsets[j] or x >= offsets[j] + bufs[j].size for j in placed)
            lowest = min(x for x in [0] + [_align(offsets[j] + bufs[j].size, 8) for j in placed] if clear(x))
            assert offsets[k] == lowest, (k, offsets[k], lowest)
