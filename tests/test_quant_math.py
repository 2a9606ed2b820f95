"""The fixed-point helpers against exact big-integer arithmetic."""
import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from edgekit import quant_math as qm

int32s = st.integers(min_value=qm.INT32_MIN, max_value=qm.INT32_MAX)


def srdhm_exact(a: int, b: int) -> int:
    if a == b == qm.INT32_MIN:
        return qm.INT32_MAX
    ab = a * b
    nudge = (1 << 30) if ab >= 0 else 1 - (1 << 30)
    q = ab + nudge
    return int(q / (1 << 31)) if abs(q) < (1 << 52) else (abs(q) >> 31) * (1 if q >= 0 else -1)


def rdbp_exact(x: int, e: int) -> int:
    # round half away from zero of x / 2**e
    from fractions import Fraction
    v = Fraction(x, 1 << e)
    r = math.floor(abs(v) + Fraction(1, 2))
    return r if v >= 0 else -r


@given(int32s, int32s)
@settings(max_examples=500)
def test_srdhm_matches_exact(a, b):
    assert int(qm.saturating_rounding_doubling_high_mul(a, b)) == srdhm_exact(a, b)


@given(int32s, st.integers(min_value=0, max_value=31))
@settings(max_examples=500)
def test_rounding_divide_by_pot_rounds_half_away(x, e):
    assert int(qm.rounding_divide_by_pot(x, e)) == rdbp_exact(x, e)


@given(st.floats(min_value=1e-9, max_value=1e3, allow_nan=False))
@settings(max_examples=300)
def test_quantize_multiplier_represents_real(real):
    m, s = qm.quantize_multiplier(real)
    assert (1 << 30) <= m <= qm.INT32_MAX
    assert abs(m * 2.0 ** (s - 31) - real) <= real * 2.0 ** -30


def test_quantize_multiplier_edge_cases():
    assert qm.quantize_multiplier(0.0) == (0, 0)
    assert qm.quantize_multiplier(0.5) == (1 << 30, 0)
    assert qm.quantize_multiplier(1.0) == (1 << 30, 1)
    assert qm.quantize_multiplier(1e-12) == (0, 0)  # shift below -31 flushes to zero, as in TFLite


def test_count_leading_zeros():
    xs = np.array([0, 1, 2, 3, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 20, (1 << 20) - 1])
    expected = [32, 31, 30, 30, 1, 0, 0, 11, 12]
    assert list(qm.count_leading_zeros_u32(xs)) == expected


def test_exp_on_negative_values_is_close_to_exp():
    x = np.linspace(-31.9, 0, 2001)
    raw = np.round(x * (1 << 26)).astype(np.int64)
    got = qm.exp_on_negative_values(raw, 5) / 2.0 ** 31
    assert np.max(np.abs(got - np.exp(x))) < 2e-6


def test_one_over_one_plus_x():
    x = np.linspace(0, 0.999, 500)
    raw = np.round(x * (1 << 31)).astype(np.int64)
    got = qm.one_over_one_plus_x_for_x_in_0_1(raw) / 2.0 ** 31
    assert np.max(np.abs(got - 1 / (1 + x))) < 1e-7


def test_quantize_rounds_half_away_from_zero():
    assert list(qm.quantize(np.array([0.5, -0.5, 1.5, -1.5, 300.0, -300.0]), 1.0, 0)) == [1, -1, 2, -2, 127, -128]
