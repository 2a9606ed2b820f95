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
