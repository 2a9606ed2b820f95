"""Integer arithmetic of the TFLite int8 scheme, in numpy, bit for bit.

These functions are the shared quantization helper: the reference executor
calls them, the quantizer uses them to derive kernel parameters, and the C
helpers in ``firmware_templates/include/ek_quant.h`` implement the same
operations. Arrays hold int32 values in int64 so intermediate products are
exact; every function returns values that fit int32.
"""
from __future__ import annotations

import math

import numpy as np

INT32_MIN = -(1 << 31)
INT32_MAX = (1 << 31) - 1


def _i64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.int64)


# ---------------------------------------------------------------------------
# Real multiplier -> (Q31 multiplier, shift), as TFLite's QuantizeMultiplier.
# ---------------------------------------------------------------------------

def quantize_multiplier(real: float) -> tuple[int, int]:
    """Return (multiplier, shift) with real ~= multiplier * 2**(shift - 31).

    ``shift`` > 0 means a left shift. Rounding is half away from zero
    (std::round), as in TFLite.
    """
    if real < 0:
        raise ValueError(f"negative requantization multiplier {real}")
    if real == 0.0:
        return 0, 0
    q, shift = math.frexp(real)
    q_fixed = math.floor(q * (1 << 31) + 0.5)
    if q_fixed == (1 << 31):
        q_fixed //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    if shift > 30:
        return INT32_MAX, 30
    return int(q_fixed), int(shift)


def fold_divisor(multiplier: int, shift: int, count: int) -> tuple[int, int]:
    """Fold a division by ``count`` into (multiplier, shift), as TFLite's integer
    MEAN does at prepare time: multiply by 2**k / count with k = floor(log2 count),
    clamped so the shift stays >= -31."""
    k = min(count.bit_length() - 1, 32, 31 + shift)
    return int((multiplier << k) // count), shift - k


def quantize_multiplier_smaller_than_one(real: float) -> tuple[int, int]:
    if not 0.0 < real < 1.0:
        raise ValueError(f"multiplier {real} must be in (0, 1)")
    multiplier, shift = quantize_multiplier(real)
    assert shift <= 0
    return multiplier, shift


def quantize_multiplier_greater_than_one(real: float) -> tuple[int, int]:
    if not real > 1.0:
        raise ValueError(f"multiplier {real} must be > 1")
    multiplier, shift = quantize_multiplier(real)
    assert shift >= 0
    return multiplier, shift


# ---------------------------------------------------------------------------
# Fixed-point primitives (gemmlowp semantics).
# ---------------------------------------------------------------------------

def saturating_rounding_doubling_high_mul(a, b) -> np.ndarray:
    a, b = _i64(a), _i64(b)
    ab = a * b
    nudged = ab + np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    # C integer division truncates toward zero; numpy's >> floors.
    high = np.where(nudged >= 0, nudged >> 31, -((-nudged) >> 31))
    overflow = (a == b) & (a == INT32_MIN)
    return np.where(overflow, INT32_MAX, high)


def rounding_divide_by_pot(x, exponent) -> np.ndarray:
    """Round-to-nearest arithmetic right shift, ties away from zero."""
    x, exponent = _i64(x), _i64(exponent)
    mask = (np.int64(1) << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> exponent) + (remainder > threshold)


def multiply_by_quantized_multiplier(x, multiplier, shift) -> np.ndarray:
    """TFLite's MultiplyByQuantizedMultiplier (double rounding)."""
    x, shift = _i64(x), _i64(shift)
    left = np.maximum(shift, 0)
    right = np.maximum(-shift, 0)
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(x << left, multiplier), right)


def saturating_rounding_multiply_by_pot(x, exponent: int) -> np.ndarray:
    x = _i64(x)
    if exponent == 0:
        return x
    if exponent < 0:
        return rounding_divide_by_pot(x, -exponent)
    threshold = (1 << (31 - exponent)) - 1
    result = x << exponent
    result = np.where(x > threshold, INT32_MAX, result)
    return np.where(x < -threshold, INT32_MIN, result)


def rounding_half_sum(a, b) -> np.ndarray:
    total = _i64(a) + _i64(b)
    total = total + np.where(total >= 0, 1, -1)
    return np.where(total >= 0, total // 2, -((-total) // 2))


def exp_on_interval_between_negative_one_quarter_and_0_excl(a) -> np.ndarray:
    """exp(a) for a in [-1/4, 0), Q0.31 in and out (Taylor series around -1/8)."""
    srdhm = saturating_rounding_doubling_high_mul
    constant_term = 1895147668  # exp(-1/8)
    one_third = 715827883
    x = _i64(a) + (1 << 28)
    x2 = srdhm(x, x)
    x3 = srdhm(x2, x)
    x4 = srdhm(x2, x2)
    x4_over_4 = saturating_rounding_multiply_by_pot(x4, -2)
    poly = saturating_rounding_multiply_by_pot(srdhm(x4_over_4 + x3, one_third) + x2, -1)
    return constant_term + srdhm(constant_term, x + poly)


# exp(-2**k) in Q0.31, for the barrel shifter over the integer bits.
_EXP_BARREL = ((-2, 1672461947), (-1, 1302514674), (0, 790015084), (1, 290630308),
               (2, 39332535), (3, 720401), (4, 242))


def exp_on_negative_values(a, integer_bits: int) -> np.ndarray:
    """exp(a) for a <= 0 given in Q(integer_bits).(31-integer_bits); result Q0.31."""
    a = _i64(a)
    fractional_bits = 31 - integer_bits
    one_quarter = 1 << (fractional_bits - 2)
    a_mod_quarter_minus_one_quarter = (a & (one_quarter - 1)) - one_quarter
    result = exp_on_interval_between_negative_one_quarter_and_0_excl(
        saturating_rounding_multiply_by_pot(a_mod_quarter_minus_one_quarter, integer_bits))
    remainder = a_mod_quarter_minus_one_quarter - a
    for exponent, multiplier in _EXP_BARREL:
        if integer_bits > exponent:
            bit = 1 << (fractional_bits + exponent)
            result = np.where((remainder & bit) != 0,
                              saturating_rounding_doubling_high_mul(result, multiplier), result)
    if integer_bits > 5:
        clamp = -(1 << (36 - integer_bits))
        result = np.where(a < clamp, 0, result)
    return np.where(a == 0, INT32_MAX, result)


def one_over_one_plus_x_for_x_in_0_1(a) -> np.ndarray:
    """1 / (1 + a) for a in [0, 1), Q0.31 in and out (Newton-Raphson)."""
    srdhm = saturating_rounding_doubling_high_mul
    half_denominator = rounding_half_sum(a, INT32_MAX)
    x = 1515870810 + srdhm(half_denominator, -1010580540)  # 48/17 - 32/17 * d, Q2.29
    for _ in range(3):
        one_minus_half_denominator_times_x = (1 << 29) - srdhm(half_denominator, x)
        x = x + saturating_rounding_multiply_by_pot(srdhm(x, one_minus_half_denominator_times_x), 2)
    return saturating_rounding_multiply_by_pot(x, 1)


def count_leading_zeros_u32(x) -> np.ndarray:
    x = _i64(x) & 0xFFFFFFFF
    _, bit_length = np.frexp(x.astype(np.float64))  # exact below 2**53
    return 32 - bit_length.astype(np.int64)


# ---------------------------------------------------------------------------
# Real-valued quantization helpers.
# ---------------------------------------------------------------------------

MIN_RANGE = 1e-3  # smallest real span an activation tensor is given


def choose_activation_params(lo: float, hi: float, qmin: int = -128, qmax: int = 127) -> tuple[float, int]:
    """Asymmetric (scale, zero_point) for a real range, nudged so 0.0 is exact."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if hi - lo < MIN_RANGE:  # a dead tensor (e.g. ReLU of negatives): keep multipliers sane
        hi = lo + MIN_RANGE
    scale = float(np.float32((hi - lo) / (qmax - qmin)))
    zero_point = qmin - lo / scale
    zero_point = int(np.clip(math.floor(zero_point + 0.5), qmin, qmax))
    return scale, zero_point


def round_half_away(x: np.ndarray) -> np.ndarray:
    """std::round: ties away from zero (numpy's round ties to even)."""
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def quantize(x: np.ndarray, scale, zero_point, qmin: int = -128, qmax: int = 127) -> np.ndarray:
    """Float -> int8 as TFLite's QUANTIZE does it: float32 division, std::round."""
    scaled = np.asarray(x, np.float32) / np.asarray(scale, np.float32)
    q = round_half_away(scaled.astype(np.float64)) + np.asarray(zero_point)
    return np.clip(q, qmin, qmax).astype(np.int8)


def dequantize(q: np.ndarray, scale, zero_point) -> np.ndarray:
    return ((np.asarray(q, np.float64) - np.asarray(zero_point)) * np.asarray(scale, np.float64)).astype(np.float32)


# ---------------------------------------------------------------------------
# 16-bit fixed point (gemmlowp's FixedPoint<int16_t, IntegerBits>), as TFLite's
# integer LSTM uses it for its gates: Q3.12 in, Q0.15 out. Raw int16 adds and
# negations wrap as C's int16 casts do; multiplies round and saturate.
# ---------------------------------------------------------------------------

INT16_MIN, INT16_MAX = -(1 << 15), (1 << 15) - 1


def _wrap16(x) -> np.ndarray:
    return ((_i64(x) + (1 << 15)) & 0xFFFF) - (1 << 15)


def srdhm16(a, b) -> np.ndarray:
    """SaturatingRoundingDoublingHighMul for int16."""
    a, b = _i64(a), _i64(b)
    ab = a * b
    nudged = ab + np.where(ab >= 0, 1 << 14, 1 - (1 << 14))
    high = np.where(nudged >= 0, nudged >> 15, -((-nudged) >> 15))  # C division truncates
    return np.where((a == b) & (a == INT16_MIN), INT16_MAX, high)


def saturating_rounding_multiply_by_pot16(x, exponent: int) -> np.ndarray:
    x = _i64(x)
    if exponent == 0:
        return x
    if exponent < 0:
        return rounding_divide_by_pot(x, -exponent)
    threshold = (1 << (15 - exponent)) - 1
    result = _wrap16(x << exponent)
    result = np.where(x > threshold, INT16_MAX, result)
    return np.where(x < -threshold, INT16_MIN, result)


def _constant16(raw32: int) -> int:
    """gemmlowp's int32 constant rescaled to int16 (RescaleConstantInitializer)."""
    return int(rounding_divide_by_pot(raw32, 16))


def _exp_quarter16(a) -> np.ndarray:
    """exp(a) for a in [-1/4, 0), Q0.15 in and out."""
    constant_term = _constant16(1895147668)
    one_third = _constant16(715827883)
    x = _wrap16(_i64(a) + (1 << 12))
    x2 = srdhm16(x, x)
    x3 = srdhm16(x2, x)
    x4 = srdhm16(x2, x2)
    x4_over_4 = saturating_rounding_multiply_by_pot16(x4, -2)
    poly = saturating_rounding_multiply_by_pot16(_wrap16(srdhm16(_wrap16(x4_over_4 + x3), one_third) + x2), -1)
    return np.clip(constant_term + srdhm16(constant_term, _wrap16(x + poly)), INT16_MIN, INT16_MAX)


def exp_on_negative_values16(a, integer_bits: int) -> np.ndarray:
    """exp(a) for a <= 0 in Q(integer_bits).(15 - integer_bits); result Q0.15."""
    a = _i64(a)
    fractional_bits = 15 - integer_bits
    one_quarter = 1 << (fractional_bits - 2)
    a_mod_quarter_minus_one_quarter = _wrap16((a & (one_quarter - 1)) - one_quarter)
    result = _exp_quarter16(saturating_rounding_multiply_by_pot16(a_mod_quarter_minus_one_quarter, integer_bits))
    remainder = _wrap16(a_mod_quarter_minus_one_quarter - a)
    for exponent, multiplier in _EXP_BARREL:
        if integer_bits > exponent:
            bit = 1 << (fractional_bits + exponent)
            result = np.where((remainder & bit) != 0, srdhm16(result, _constant16(multiplier)), result)
    if integer_bits > 5:
        clamp = _constant16(-(1 << (36 - integer_bits)))
        result = np.where(a < clamp, 0, result)
    return np.where(a == 0, INT16_MAX, result)


def _newton_reciprocal16(half_denominator) -> np.ndarray:
    """x ~ 1 / half_denominator... as gemmlowp's two 16-bit divisions: Q2.13."""
    x = _wrap16(_constant16(1515870810) + srdhm16(half_denominator, _constant16(-1010580540)))
    for _ in range(3):
        one_minus = _wrap16((1 << 13) - srdhm16(half_denominator, x))
        x = _wrap16(x + saturating_rounding_multiply_by_pot16(srdhm16(x, one_minus), 2))
    return x


def _rounding_half_sum16(a, b) -> np.ndarray:
    total = _i64(a) + _i64(b)
    total = total + np.where(total >= 0, 1, -1)
    return _wrap16(np.where(total >= 0, total // 2, -((-total) // 2)))


def logistic16(a, integer_bits: int = 3) -> np.ndarray:
    """gemmlowp::logistic on FixedPoint<int16_t, integer_bits>; Q0.15 out."""
    a = _i64(a)
    positive = a > 0
    abs_input = np.where(positive, a, _wrap16(-a))
    exp = exp_on_negative_values16(_wrap16(-abs_input), integer_bits)
    half_denominator = _rounding_half_sum16(exp, INT16_MAX)
    result_if_positive = saturating_rounding_multiply_by_pot16(_newton_reciprocal16(half_denominator), 1)
    result_if_negative = _wrap16(INT16_MAX - result_if_positive)
    out = np.where(positive, result_if_positive, result_if_negative)
    return np.where(a == 0, _constant16(1 << 30), out)


def tanh16(a, integer_bits: int) -> np.ndarray:
    """gemmlowp::tanh on FixedPoint<int16_t, integer_bits>; Q0.15 out."""
    a = _i64(a)
    negative = a < 0
    n = np.where(negative, a, _wrap16(-a))
    exp = exp_on_negative_values16(n, integer_bits + 1)  # ExactMulByPot<1>: the same raw, one more integer bit
    half_denominator = _rounding_half_sum16(exp, INT16_MAX)
    x = _newton_reciprocal16(half_denominator)
    t = saturating_rounding_multiply_by_pot16(_wrap16(x - (1 << 13)), 2)
    out = np.where(negative, _wrap16(-t), t)
    return np.where(a == 0, 0, out)
