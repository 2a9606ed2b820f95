"""Pointwise (unary) activations: their float functions and their int8 lookup tables.

An int8 unary op is a function of 256 possible inputs, so every one is a 256-entry
table computed at generate time, and the C kernel (``ek_lut_s8``) only looks values up.
Each table is computed the way tflite-runtime 2.14's reference kernels compute the op
(the oracle, checked op by op in tests/test_ops_pointwise.py):

- LOGISTIC, TANH, ELU, GELU: TFLite fills a table at Prepare time from the float
  function evaluated in float32 (``PopulateLookupTable``); so do we.
- HARD_SWISH: TFLite's 16-bit fixed-point reference arithmetic, element by element.
- LEAKY_RELU: two requantizations (identity for x >= 0, alpha for x < 0).
- RSQRT: TFLite's fixed-point Newton-Raphson inverse square root, then two requantizations
  (TFLite refuses inputs below the zero point at run time; the table gives them the maximum).

TensorFlow Lite Micro computes LOGISTIC and TANH in fixed point instead of a float
table; the two can differ by one step on a few inputs (docs/DESIGN-NOTES.md).
"""
from __future__ import annotations

import math

import numpy as np

from . import quant_math as qm

UNARY = ("logistic", "tanh", "hard_swish", "leaky_relu", "elu", "gelu", "rsqrt")
# Output parameters TFLite requires (int8): LOGISTIC 1/256 zero point -128, TANH 1/128 zero point 0.
FIXED_OUTPUT = {"logistic": (1.0 / 256.0, -128), "tanh": (1.0 / 128.0, 0)}


def _f32(x):
    return np.asarray(x, np.float32)


def _float_transform(kind: str, attrs: dict):
    """The float32 function TFLite's table is filled from (math in float64, rounded once)."""
    if kind == "logistic":
        return lambda v: _f32(1.0 / (1.0 + _f32(np.exp(-v.astype(np.float64)))))
    if kind == "tanh":
        return lambda v: _f32(np.tanh(v.astype(np.float64)))
    if kind == "elu":
        return lambda v: np.where(v < 0, _f32(_f32(np.exp(v.astype(np.float64))) - np.float32(1.0)), v)
    if kind == "gelu":
        if attrs.get("approximate", "none") == "tanh":
            k = np.float32(math.sqrt(2.0 / math.pi))

            def approx(v):
                inner = _f32(k * _f32(v + _f32(np.float32(0.044715) * v * v * v)))
                return _f32(np.float32(0.5) * v * _f32(np.float32(1.0) + _f32(np.tanh(inner.astype(np.float64)))))
            return approx
        erf = np.vectorize(math.erf, otypes=[np.float64])  # the C library's erf, as std::erf

        def exact(v):  # TFLite: 0.5f * x * (1.0f + erf(x * M_SQRT1_2)), the erf in double
            v64 = v.astype(np.float64)
            return _f32(np.float64(np.float32(0.5) * v) * (1.0 + erf(v64 * math.sqrt(0.5))))
        return exact
    raise ValueError(kind)


def float_function(kind: str, attrs: dict):
    """The op on float32 arrays (the float reference)."""
    if kind == "logistic":
        return lambda x: _f32(1.0 / (1.0 + np.exp(-x.astype(np.float64))))
    if kind == "tanh":
        return lambda x: _f32(np.tanh(x))
    if kind == "hard_swish":
        return lambda x: _f32(x * np.clip(x + 3.0, 0.0, 6.0) / 6.0)
    if kind == "leaky_relu":
        alpha = float(attrs["alpha"])
        return lambda x: _f32(np.where(x >= 0, x, x * alpha))
    if kind == "elu":
        return lambda x: _f32(np.where(x < 0, np.expm1(x.astype(np.float64)), x))
    if kind == "gelu":
        return _float_transform("gelu", attrs)
    if kind == "rsqrt":
        return lambda x: _f32(1.0 / np.sqrt(x.astype(np.float64)))
    raise ValueError(kind)


def _populate(transform, in_scale: float, in_zp: int, out_scale: float, out_zp: int) -> np.ndarray:
    """TFLite's PopulateLookupTable<int8_t>, in float32."""
    q = np.arange(-128, 128, dtype=np.int32)
    dequantized = np.float32(in_scale) * (q - in_zp).astype(np.float32)
    transformed = transform(dequantized)
    inverse_scale = np.float32(1.0) / np.float32(out_scale)
    rescaled = qm.round_half_away(_f32(transformed * inverse_scale).astype(np.float64))
    return np.clip(rescaled + out_zp, -128, 127).astype(np.int8)


def _i16_srdhm(a, b):
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    ab = a * b
    nudge = np.where(ab >= 0, 1 << 14, 1 - (1 << 14))
    s = ab + nudge
    high = np.where(s >= 0, s >> 15, -((-s) >> 15))  # C division truncates
    return np.where((a == b) & (a == -32768), 32767, high)


def _i16_doubling_high_mul(a, b):
    ab = np.asarray(a, np.int64) * np.asarray(b, np.int64)
    high = np.where(ab >= 0, ab >> 15, -((-ab) >> 15))
    return np.where((np.asarray(a) == b) & (np.asarray(a) == -32768), 32767, high)


def _i16_saturating_left_shift(x, amount: int):
    return np.clip(np.asarray(x, np.int64) * (1 << amount), -32768, 32767)


def _downscale_to_int16(multiplier: int) -> int:
    if multiplier >= qm.INT32_MAX - (1 << 15):
        return 32767
    return (multiplier + (1 << 15)) >> 16


def hard_swish_params(in_scale: float, in_zp: int, out_scale: float, out_zp: int) -> dict:
    """TFLite's HardSwishPrepare (float32 scale arithmetic, 16-bit multipliers)."""
    hires_input_scale = np.float32(np.float32(1.0 / 128.0) * np.float32(in_scale))
    reluish_scale = np.float32(3.0 / 32768.0)
    out_mult, out_exp = qm.quantize_multiplier(float(np.float32(hires_input_scale / np.float32(out_scale))))
    relu_mult, relu_exp = qm.quantize_multiplier(float(np.float32(hires_input_scale / reluish_scale)))
    return dict(input_zero_point=in_zp, output_zero_point=out_zp,
                output_multiplier=_downscale_to_int16(out_mult), output_exponent=out_exp,
                reluish_multiplier=_downscale_to_int16(relu_mult), reluish_exponent=relu_exp)


def _hard_swish(q: np.ndarray, p: dict) -> np.ndarray:
    """TFLite's reference_ops::HardSwish<int8_t>, element by element."""
    x = q.astype(np.int64) - p["input_zero_point"]
    hires = x * (1 << 7)
    preshift_output = _i16_srdhm(hires, p["output_multiplier"])
    reluish = hires
    e = p["reluish_exponent"]
    if e > 0:
        reluish = _i16_saturating_left_shift(reluish, e - 1)
    reluish = _i16_srdhm(reluish, p["reluish_multiplier"])
    if e > 0:
        reluish = _i16_saturating_left_shift(reluish, 1)
    if e < 0:
        reluish = qm.rounding_divide_by_pot(reluish, -e)
    reluish = (reluish + (1 << 15)) >> 1
    out = _i16_doubling_high_mul(reluish, preshift_output)
    out = qm.rounding_divide_by_pot(out, -p["output_exponent"]) + p["output_zero_point"]
    return np.clip(out, -128, 127).astype(np.int8)


def leaky_relu_params(in_scale: float, in_zp: int, out_scale: float, out_zp: int, alpha: float) -> dict:
    """TFLite's LeakyReluPrepare: the alpha and identity multipliers from float32 scales."""
    a = qm.quantize_multiplier(float(np.float32(np.float32(in_scale) * np.float32(alpha) / np.float32(out_scale))))
    i = qm.quantize_multiplier(float(np.float32(np.float32(in_scale) / np.float32(out_scale))))
    return dict(input_zero_point=in_zp, output_zero_point=out_zp, alpha_multiplier=a[0], alpha_shift=a[1],
                identity_multiplier=i[0], identity_shift=i[1])


def _leaky_relu(q: np.ndarray, p: dict) -> np.ndarray:
    x = q.astype(np.int64) - p["input_zero_point"]
    pos = qm.multiply_by_quantized_multiplier(x, p["identity_multiplier"], p["identity_shift"])
    neg = qm.multiply_by_quantized_multiplier(x, p["alpha_multiplier"], p["alpha_shift"])
    return np.clip(np.where(x >= 0, pos, neg) + p["output_zero_point"], -128, 127).astype(np.int8)


def _inv_sqrt_multiplier(value: int) -> tuple[int, int]:
    """TFLite's GetInvSqrtQuantizedMultiplierExp(value, kReverseShift): 1/sqrt(value) as a Q0.31
    multiplier and a left shift, by five Newton-Raphson steps in Q3.28."""
    srdhm = lambda a, b: int(qm.saturating_rounding_doubling_high_mul(a, b))  # noqa: E731
    pot = lambda x, e: int(qm.saturating_rounding_multiply_by_pot(x, e))  # noqa: E731
    if value <= 1:
        return qm.INT32_MAX, 0
    shift = 11
    while value >= (1 << 29):
        value //= 4
        shift += 1
    max_left_shift_bits = int(qm.count_leading_zeros_u32(value)) - 1
    left_shift_bit_pairs = max_left_shift_bits // 2 - 1
    shift -= left_shift_bit_pairs
    value <<= 2 * left_shift_bit_pairs
    x_input = value >> 1                       # Q3.28
    half_input = pot(x_input, -1)
    half_three = (1 << 28) + (1 << 27)         # 1.5 in Q3.28
    x = 1 << 28                                # 1.0
    for _ in range(5):
        x3 = pot(srdhm(srdhm(x, x), x), 6)     # Q9 -> Q3
        x = pot(srdhm(half_three, x) - srdhm(half_input, x3), 3)  # Q6 -> Q3
    x = srdhm(x, 1518500250)                   # * sqrt(2) / 2
    if shift < 0:
        x <<= -shift
        shift = 0
    return x, -shift


def _rsqrt(q: np.ndarray, in_scale: float, in_zp: int, out_scale: float, out_zp: int) -> np.ndarray:
    """TFLite's RsqrtEvalQuantized (int8), element by element."""
    real = 1.0 / float(np.float32(np.sqrt(np.float32(in_scale)) * np.float32(out_scale)))
    multiplier, shift = qm.quantize_multiplier(real)
    out = []
    for v in q.astype(np.int64) - in_zp:
        if v <= 0:  # zero: TFLite's maximum; negative: TFLite refuses the input
            out.append(127)
            continue
        m, s = _inv_sqrt_multiplier(int(v))
        data = int(qm.multiply_by_quantized_multiplier(1, m, s + 20))
        out.append(int(qm.multiply_by_quantized_multiplier(data, multiplier, shift - 20)) + out_zp)
    return np.clip(np.array(out), -128, 127).astype(np.int8)


def int8_table(kind: str, attrs: dict, in_scale: float, in_zp: int, out_scale: float, out_zp: int) -> np.ndarray:
    """The op's output for every int8 input, indexed by input + 128."""
    q = np.arange(-128, 128)
    if kind == "hard_swish":
        return _hard_swish(q, hard_swish_params(in_scale, in_zp, out_scale, out_zp))
    if kind == "rsqrt":
        return _rsqrt(q, in_scale, in_zp, out_scale, out_zp)
    if kind == "rsqrt":
        return _rsqrt(q, in_scale, in_zp, out_scale, out_zp)
    if kind == "leaky_relu":
        alpha = float(attrs["alpha"])
        if alpha < 0:
            raise ValueError(f"LeakyReLU with a negative slope ({alpha}) has no int8 TFLite kernel")
        return _leaky_relu(q, leaky_relu_params(in_scale, in_zp, out_scale, out_zp, alpha))
    return _populate(_float_transform(kind, attrs), in_scale, in_zp, out_scale, out_zp)
