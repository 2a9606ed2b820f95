"""C kernels added for imported TFLite models (MUL), against the numpy reference
and against TFLite's reference kernels, over random shapes and parameters."""
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from helpers import c_matches_reference, float_graph, quantize_with_random_data
from test_kernels_c import SETTINGS, activations, input_range
from test_tflite_reference import _check as tflite_check


@st.composite
def mul_case(draw):
    shape = draw(st.sampled_from([(1, 7), (1, 3, 5, 4), (1, 1, 1, 33), (1, 8, 8, 2), (1, 2, 3, 6)]))
    # The second operand broadcasts over any subset of the non-batch dimensions.
    other = tuple(1 if i > 0 and draw(st.booleans()) else d for i, d in enumerate(shape))
    return dict(shape=shape, other=other, act=draw(activations), r1=draw(input_range()), r2=draw(input_range()),
                const=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 31)))


def _mul_graph(case, rng):
    weights = {"k": rng.uniform(case["r2"][0], case["r2"][1], case["other"])} if case["const"] else None
    shapes = [case["shape"]] if case["const"] else [case["shape"], case["other"]]
    return float_graph("mul", shapes, dict(activation=case["act"]), weights, case["shape"])


@given(mul_case())
@SETTINGS
def test_mul_s8_c(cbuild, case):
    rng = np.random.default_rng(case["seed"])
    q = quantize_with_random_data(_mul_graph(case, rng), rng, {"x0": case["r1"], "x1": case["r2"]})
    inputs = {n: rng.integers(-128, 128, size=(12,) + q.tensors[n].shape[1:]).astype(np.int8) for n in q.inputs}
    with tempfile.TemporaryDirectory() as tmp:
        got, ref = c_matches_reference(q, Path(tmp), cbuild, inputs)
    assert int(np.sum(got != ref)) == 0


@given(mul_case())
@SETTINGS
def test_mul_matches_tflite(case):
    rng = np.random.default_rng(case["seed"])
    tflite_check(_mul_graph(case, rng), rng, {"x0": case["r1"], "x1": case["r2"]})
