"""The numpy reference executor: the oracle for every generated C kernel.

``run(graph, inputs)`` executes a float graph in float32, or a quantized graph
in exact integer arithmetic with TFLite's reference-kernel semantics. Inputs
are batched on the first axis and already in the IR layout (NHWC); the
batch runs vectorised, each sample independent as on the device.
"""
from __future__ import annotations

import numpy as np

from . import pointwise
from . import quant_math as qm
from .errors import EdgekitError
from .ir import Graph, Op


def run(graph: Graph, inputs, *, keep: bool = False):
    """Execute ``graph``. ``inputs`` is an array (one graph input) or a dict.

    Returns a list of output arrays, or with ``keep=True`` the dict of every
    tensor's value (for calibration and debugging).
    """
    if not isinstance(inputs, dict):
        if len(graph.inputs) != 1:
            raise EdgekitError(f"the graph has {len(graph.inputs)} inputs; pass a dict")
        inputs = {graph.inputs[0]: inputs}
    quantized = graph.is_quantized()
    values: dict[str, np.ndarray] = {}
    for name in graph.inputs:
        x = np.asarray(inputs[name])
        expected = graph.tensors[name].shape[1:]
        if tuple(x.shape[1:]) != tuple(expected):
            raise EdgekitError(f"input {name!r}: expected samples of shape {list(expected)}, got {list(x.shape[1:])}")
        values[name] = x.astype(np.int8 if quantized else np.float32)
    table = INT8_KERNELS if quantized else FLOAT_KERNELS
    for op in graph.ops:
        fn = table.get(op.kind)
        if fn is None:
            raise EdgekitError(f"layer '{op.name}': no {'int8' if quantized else 'float'} reference for {op.kind}")
        args = [values[n] if n in values else graph.tensors[n].data for n in op.inputs]
        out = fn(op, graph, *args)
        out_name = op.outputs[0]
        values[out_name] = out.reshape((out.shape[0],) + tuple(graph.tensors[out_name].shape[1:]))
    if keep:
        return values
    return [values[n] for n in graph.outputs]


# ---------------------------------------------------------------------------
# Shared window helpers
# ---------------------------------------------------------------------------

def _pad_spatial(x: np.ndarray, top: int, bottom: int, left: int, right: int, value) -> np.ndarray:
    return np.pad(x, ((0, 0), (top, max(bottom, 0)), (left, max(right, 0)), (0, 0)), constant_values=value)


def _windows(xp: np.ndarray, kh: int, kw: int, sh: int, sw: int, dh: int, dw: int, oh: int, ow: int):
    """Yield (i, j, slice) for every kernel tap: slice is (N, OH, OW, C)."""
    for i in range(kh):
        for j in range(kw):
            yield i, j, xp[:, i * dh: i * dh + (oh - 1) * sh + 1: sh, j * dw: j * dw + (ow - 1) * sw + 1: sw, :]


def _conv_geometry(op: Op, graph: Graph, kh: int, kw: int):
    _, H, W, _ = graph.tensors[op.inputs[0]].shape
    _, OH, OW, _ = graph.tensors[op.outputs[0]].shape
    sh, sw = op.attrs.get("stride", (1, 1))
    dh, dw = op.attrs.get("dilation", (1, 1))
    top, _, left, _ = op.attrs.get("padding", (0, 0, 0, 0))
    # Pad enough on the far side for every window the output asks for.
    bottom = (OH - 1) * sh + (kh - 1) * dh + 1 - H - top
    right = (OW - 1) * sw + (kw - 1) * dw + 1 - W - left
    return (H, W, OH, OW, sh, sw, dh, dw, top, bottom, left, right)


def _pool_counts(op: Op, graph: Graph) -> np.ndarray:
    """Divisor of every output position of an average pool, shape (OH, OW, 1)."""
    kh, kw = op.attrs["kernel"]
    H, W, OH, OW, sh, sw, _, _, top, _, left, _ = _conv_geometry(op, graph, kh, kw)
    _, pad_bottom, _, pad_right = op.attrs["padding"]

    def counts(out, size, k, s, before, after):
        start = np.arange(out) * s - before
        if op.attrs.get("count_include_pad", False):
            return np.minimum(start + k, size + after) - start
        return np.minimum(start + k, size) - np.maximum(start, 0)

    ch = counts(OH, H, kh, sh, top, pad_bottom)
    cw = counts(OW, W, kw, sw, left, pad_right)
    return (ch[:, None] * cw[None, :])[:, :, None].astype(np.int64)


def _valid_counts(op: Op, graph: Graph) -> np.ndarray:
    kh, kw = op.attrs["kernel"]
    H, W, OH, OW, sh, sw, _, _, top, _, left, _ = _conv_geometry(op, graph, kh, kw)
    sh_ = np.arange(OH) * sh - top
    sw_ = np.arange(OW) * sw - left
    ch = np.minimum(sh_ + kh, H) - np.maximum(sh_, 0)
    cw = np.minimum(sw_ + kw, W) - np.maximum(sw_, 0)
    return (ch[:, None] * cw[None, :])[:, :, None].astype(np.int64)


# ---------------------------------------------------------------------------
# Float kernels
# ---------------------------------------------------------------------------

def _apply_activation(y: np.ndarray, activation: str) -> np.ndarray:
    if activation == "relu":
        return np.maximum(y, 0)
    if activation == "relu6":
        return np.clip(y, 0, 6)
    return y


def _f_conv2d(op, graph, x, w, b=None):
    O, KH, KW, I = w.shape
    H, W, OH, OW, sh, sw, dh, dw, t, bo, l, r = _conv_geometry(op, graph, KH, KW)
    xp = _pad_spatial(x.astype(np.float32), t, bo, l, r, 0.0)
    cols = np.stack([s for _, _, s in _windows(xp, KH, KW, sh, sw, dh, dw, OH, OW)], axis=3)  # N,OH,OW,K,I
    y = cols.reshape(x.shape[0], OH, OW, KH * KW * I) @ w.reshape(O, -1).T
    if b is not None:
        y = y + b
    return _apply_activation(y.astype(np.float32), op.attrs.get("activation", "none"))


def _f_depthwise_conv2d(op, graph, x, w, b=None):
    _, KH, KW, O = w.shape
    m = op.attrs.get("depth_multiplier", 1)
    H, W, OH, OW, sh, sw, dh, dw, t, bo, l, r = _conv_geometry(op, graph, KH, KW)
    xp = _pad_spatial(np.repeat(x.astype(np.float32), m, axis=3), t, bo, l, r, 0.0)
    y = np.zeros((x.shape[0], OH, OW, O), np.float32)
    for i, j, s in _windows(xp, KH, KW, sh, sw, dh, dw, OH, OW):
        y += s * w[0, i, j, :]
    if b is not None:
        y = y + b
    return _apply_activation(y, op.attrs.get("activation", "none"))


def _f_fully_connected(op, graph, x, w, b=None):
    y = x.reshape(x.shape[0], -1).astype(np.float32) @ w.T
    if b is not None:
        y = y + b
    return _apply_activation(y.astype(np.float32), op.attrs.get("activation", "none"))


def _f_max_pool2d(op, graph, x):
    kh, kw = op.attrs["kernel"]
    H, W, OH, OW, sh, sw, dh, dw, t, bo, l, r = _conv_geometry(op, graph, kh, kw)
    xp = _pad_spatial(x, t, bo, l, r, -np.inf)
    y = np.max(np.stack([s for _, _, s in _windows(xp, kh, kw, sh, sw, 1, 1, OH, OW)]), axis=0)
    return _apply_activation(y, op.attrs.get("activation", "none"))


def _f_avg_pool2d(op, graph, x):
    kh, kw = op.attrs["kernel"]
    H, W, OH, OW, sh, sw, dh, dw, t, bo, l, r = _conv_geometry(op, graph, kh, kw)
    xp = _pad_spatial(x, t, bo, l, r, 0.0)
    total = np.sum(np.stack([s for _, _, s in _windows(xp, kh, kw, sh, sw, 1, 1, OH, OW)]), axis=0)
    y = (total / _pool_counts(op, graph)).astype(np.float32)
    return _apply_activation(y, op.attrs.get("activation", "none"))


def _f_mean(op, graph, x):
    return x.mean(axis=(1, 2), keepdims=True, dtype=np.float64).astype(np.float32)


def _f_add(op, graph, a, b):
    return _apply_activation((a + b).astype(np.float32), op.attrs.get("activation", "none"))


def _f_mul(op, graph, a, b):
    return _apply_activation((a * b).astype(np.float32), op.attrs.get("activation", "none"))


def _f_concat(op, graph, *xs):
    return np.concatenate(xs, axis=op.attrs["axis"])


def _f_reshape(op, graph, x):
    return x


def _f_pad(op, graph, x):
    t, b, l, r = op.attrs["padding"]
    return _pad_spatial(x, t, b, l, r, np.float32(op.attrs.get("value", 0.0)))


def _f_relu(op, graph, x):
    return np.maximum(x, 0)


def _f_relu6(op, graph, x):
    return np.clip(x, 0, 6)


def _f_batch_norm(op, graph, x, scale, offset):
    return (x * scale + offset).astype(np.float32)


def _f_softmax(op, graph, x):
    z = (x - x.max(axis=-1, keepdims=True)) * op.attrs.get("beta", 1.0)
    e = np.exp(z.astype(np.float64))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def _f_sub(op, graph, a, b):
    return _apply_activation((a - b).astype(np.float32), op.attrs.get("activation", "none"))


def _f_squared_difference(op, graph, a, b):
    return np.square(a - b).astype(np.float32)


def _f_prelu(op, graph, x, alpha):
    return np.where(x >= 0, x, x * alpha).astype(np.float32)


def _f_clamp(op, graph, x):
    lo, hi = op.attrs.get("lo"), op.attrs.get("hi")
    return np.clip(x, -np.inf if lo is None else lo, np.inf if hi is None else hi).astype(np.float32)


def _f_unary(op, graph, x):
    return pointwise.float_function(op.kind, op.attrs)(x)


FLOAT_KERNELS = {
    "conv2d": _f_conv2d, "depthwise_conv2d": _f_depthwise_conv2d, "fully_connected": _f_fully_connected,
    "max_pool2d": _f_max_pool2d, "avg_pool2d": _f_avg_pool2d, "mean": _f_mean, "add": _f_add, "mul": _f_mul,
    "concat": _f_concat, "reshape": _f_reshape, "pad": _f_pad, "relu": _f_relu, "relu6": _f_relu6,
    "batch_norm": _f_batch_norm, "softmax": _f_softmax,
    "sub": _f_sub, "squared_difference": _f_squared_difference, "prelu": _f_prelu, "clamp": _f_clamp,
    **{kind: _f_unary for kind in pointwise.UNARY},
}


# ---------------------------------------------------------------------------
# int8 kernels (TFLite reference semantics)
# ---------------------------------------------------------------------------

def _clamp_s8(acc: np.ndarray, op: Op) -> np.ndarray:
    return np.clip(acc, op.attrs["act_min"], op.attrs["act_max"]).astype(np.int8)


def _requantize_per_channel(acc: np.ndarray, op: Op) -> np.ndarray:
    acc = qm.multiply_by_quantized_multiplier(acc, op.attrs["multiplier"], op.attrs["shift"])
    return _clamp_s8(acc + op.attrs["output_offset"], op)


def _q_conv2d(op, graph, x, w, b=None):
    O, KH, KW, I = w.shape
    H, W, OH, OW, sh, sw, dh, dw, t, bo, l, r = _conv_geometry(op, graph, KH, KW)
    # Padding holds the input zero point, so it adds nothing to the sum.
    xp = _pad_spatial(x.astype(np.int64) + op.attrs["input_offset"], t, bo, l, r, 0)
    cols = np.stack([s for _, _, s in _windows(xp, KH, KW, sh, sw, dh, dw, OH, OW)], axis=3)
    # float64 products and sums are exact: |acc| < 2**31 is proved at generate time.
    acc = cols.reshape(x.shape[0], OH, OW, KH * KW * I).astype(np.float64) @ w.reshape(O, -1).T.astype(np.float64)
    acc = acc.astype(np.int64)
    if b is not None:
        acc = acc + b.astype(np.int64)
    return _requantize_per_channel(acc, op)


def _q_depthwise_conv2d(op, graph, x, w, b=None):
    _, KH, KW, O = w.shape
    m = op.attrs.get("depth_multiplier", 1)
    H, W, OH, OW, sh, sw, dh, dw, t, bo, l, r = _conv_geometry(op, graph, KH, KW)
    xs = np.repeat(x.astype(np.int64) + op.attrs["input_offset"], m, axis=3)
    xp = _pad_spatial(xs, t, bo, l, r, 0)
    acc = np.zeros((x.shape[0], OH, OW, O), np.int64)
    w64 = w.astype(np.int64)
    for i, j, s in _windows(xp, KH, KW, sh, sw, dh, dw, OH, OW):
        acc += s * w64[0, i, j, :]
    if b is not None:
        acc = acc + b.astype(np.int64)
    return _requantize_per_channel(acc, op)


def _q_fully_connected(op, graph, x, w, b=None):
    xs = x.reshape(x.shape[0], -1).astype(np.float64) + op.attrs["input_offset"]
    acc = (xs @ w.T.astype(np.float64)).astype(np.int64)
    if b is not None:
        acc = acc + b.astype(np.int64)
    return _requantize_per_channel(acc, op)


def _q_max_pool2d(op, graph, x):
    kh, kw = op.attrs["kernel"]
    H, W, OH, OW, sh, sw, dh, dw, t, bo, l, r = _conv_geometry(op, graph, kh, kw)
    xp = _pad_spatial(x.astype(np.int16), t, bo, l, r, -129)  # never wins: every window has a real tap
    y = np.max(np.stack([s for _, _, s in _windows(xp, kh, kw, sh, sw, 1, 1, OH, OW)]), axis=0)
    return _clamp_s8(y, op)


def _rounded_div(acc: np.ndarray, count: np.ndarray) -> np.ndarray:
    """TFLite's average: round half away from zero, C division."""
    half = count // 2
    num = np.where(acc > 0, acc + half, acc - half)
    q = np.abs(num) // count
    return np.where(num < 0, -q, q)


def _q_avg_pool2d(op, graph, x):
    kh, kw = op.attrs["kernel"]
    H, W, OH, OW, sh, sw, dh, dw, t, bo, l, r = _conv_geometry(op, graph, kh, kw)
    xp = _pad_spatial(x.astype(np.int64), t, bo, l, r, 0)
    acc = np.sum(np.stack([s for _, _, s in _windows(xp, kh, kw, sh, sw, 1, 1, OH, OW)]), axis=0)
    count = _pool_counts(op, graph)
    # Padding inside the counted region is a real zero: the zero point in int8.
    acc = acc + (count - _valid_counts(op, graph)) * op.attrs["zero_point"]
    return _clamp_s8(_rounded_div(acc, count), op)


def _q_mean(op, graph, x):
    """TFLite's integer mean: 1/count is folded into the multiplier at prepare time."""
    acc = np.sum(x.astype(np.int64) + op.attrs["input_offset"], axis=(1, 2), keepdims=True)
    acc = qm.multiply_by_quantized_multiplier(acc, op.attrs["multiplier"], op.attrs["shift"])
    return _clamp_s8(acc + op.attrs["output_offset"], op)


def _q_add(op, graph, a, b):
    a_ = (a.astype(np.int64) + op.attrs["input1_offset"]) << op.attrs["left_shift"]
    b_ = (b.astype(np.int64) + op.attrs["input2_offset"]) << op.attrs["left_shift"]
    a_ = qm.multiply_by_quantized_multiplier(a_, op.attrs["input1_multiplier"], op.attrs["input1_shift"])
    b_ = qm.multiply_by_quantized_multiplier(b_, op.attrs["input2_multiplier"], op.attrs["input2_shift"])
    out = qm.multiply_by_quantized_multiplier(a_ + b_, op.attrs["output_multiplier"], op.attrs["output_shift"])
    return _clamp_s8(out + op.attrs["output_offset"], op)


def _q_mul(op, graph, a, b):
    """TFLite's int8 MUL; either input may broadcast (size-1 dimensions)."""
    prod = (a.astype(np.int64) + op.attrs["input1_offset"]) * (b.astype(np.int64) + op.attrs["input2_offset"])
    out = qm.multiply_by_quantized_multiplier(prod, op.attrs["output_multiplier"], op.attrs["output_shift"])
    return _clamp_s8(out + op.attrs["output_offset"], op)


def _q_sub(op, graph, a, b):
    """TFLite's int8 SUB: ADD's arithmetic with the rescaled second input subtracted."""
    a_ = (a.astype(np.int64) + op.attrs["input1_offset"]) << op.attrs["left_shift"]
    b_ = (b.astype(np.int64) + op.attrs["input2_offset"]) << op.attrs["left_shift"]
    a_ = qm.multiply_by_quantized_multiplier(a_, op.attrs["input1_multiplier"], op.attrs["input1_shift"])
    b_ = qm.multiply_by_quantized_multiplier(b_, op.attrs["input2_multiplier"], op.attrs["input2_shift"])
    out = qm.multiply_by_quantized_multiplier(a_ - b_, op.attrs["output_multiplier"], op.attrs["output_shift"])
    return _clamp_s8(out + op.attrs["output_offset"], op)


def _q_squared_difference(op, graph, a, b):
    """TFLite's int8 SQUARED_DIFFERENCE: inputs rescaled with 7 bits of headroom, the difference squared."""
    a_ = (a.astype(np.int64) + op.attrs["input1_offset"]) << op.attrs["left_shift"]
    b_ = (b.astype(np.int64) + op.attrs["input2_offset"]) << op.attrs["left_shift"]
    a_ = qm.multiply_by_quantized_multiplier(a_, op.attrs["input1_multiplier"], op.attrs["input1_shift"])
    b_ = qm.multiply_by_quantized_multiplier(b_, op.attrs["input2_multiplier"], op.attrs["input2_shift"])
    d = a_ - b_
    out = qm.multiply_by_quantized_multiplier(d * d, op.attrs["output_multiplier"], op.attrs["output_shift"])
    return _clamp_s8(out + op.attrs["output_offset"], op)


def _q_prelu(op, graph, x, alpha):
    """TFLite's int8 PRELU: x >= 0 rescaled, x < 0 times the int8 alpha (broadcast) rescaled."""
    xs = x.astype(np.int64) + op.attrs["input_offset"]
    al = alpha.astype(np.int64) + op.attrs["alpha_offset"]
    pos = qm.multiply_by_quantized_multiplier(xs, op.attrs["identity_multiplier"], op.attrs["identity_shift"])
    neg = qm.multiply_by_quantized_multiplier(xs * al, op.attrs["alpha_multiplier"], op.attrs["alpha_shift"])
    return _clamp_s8(np.where(xs >= 0, pos, neg) + op.attrs["output_offset"], op)


def _q_lut(op, graph, x):
    """A unary activation: its 256-entry table (edgekit/pointwise.py), indexed by input + 128."""
    return op.attrs["table"][x.astype(np.int64) + 128]


def _q_concat(op, graph, *xs):
    return np.concatenate(xs, axis=op.attrs["axis"])


def _q_reshape(op, graph, x):
    return x


def _q_pad(op, graph, x):
    t, b, l, r = op.attrs["padding"]
    return _pad_spatial(x, t, b, l, r, np.int8(op.attrs["pad_value"]))


def _q_clamp(op, graph, x):
    return _clamp_s8(x.astype(np.int64), op)


def _q_softmax(op, graph, x):
    """TFLite's reference int8 softmax (gemmlowp fixed point, output scale 1/256)."""
    scaled_diff_integer_bits, accumulation_integer_bits = 5, 12
    x = x.astype(np.int64)
    diff = x - x.max(axis=-1, keepdims=True)
    valid = diff >= op.attrs["diff_min"]
    rescaled = qm.saturating_rounding_doubling_high_mul(diff << op.attrs["input_left_shift"],
                                                        op.attrs["input_multiplier"])
    exps = qm.exp_on_negative_values(rescaled, scaled_diff_integer_bits)
    exps_acc = qm.rounding_divide_by_pot(exps, accumulation_integer_bits)
    sum_of_exps = np.sum(np.where(valid, exps_acc, 0), axis=-1, keepdims=True)
    headroom_plus_one = qm.count_leading_zeros_u32(sum_of_exps)
    num_bits_over_unit = accumulation_integer_bits - headroom_plus_one
    shifted_sum_minus_one = ((sum_of_exps << headroom_plus_one) & 0xFFFFFFFF) - (1 << 31)
    shifted_scale = qm.one_over_one_plus_x_for_x_in_0_1(shifted_sum_minus_one)
    prob = qm.saturating_rounding_doubling_high_mul(shifted_scale, exps)
    out = qm.rounding_divide_by_pot(prob, num_bits_over_unit + 31 - 8) - 128
    out = np.where(valid, np.clip(out, -128, 127), -128)
    return out.astype(np.int8)


def _q_exit(op, graph, x):
    """An early exit's confidence (see passes/exits.py), in units of 1/256: the top int8 softmax
    probability + 128, or the top-two logit margin scaled by an integer multiplier."""
    x = x.reshape(x.shape[0], -1)
    if op.attrs["criterion"] == "softmax":
        conf = _q_softmax(op, graph, x).astype(np.int64).max(axis=-1) + 128
    else:
        top = np.sort(x.astype(np.int64), axis=-1)
        conf = qm.multiply_by_quantized_multiplier(top[:, -1] - top[:, -2], op.attrs["multiplier"],
                                                   op.attrs["shift"])
    return conf.reshape(-1, 1).astype(np.int32)


INT8_KERNELS = {
    "conv2d": _q_conv2d, "depthwise_conv2d": _q_depthwise_conv2d, "fully_connected": _q_fully_connected,
    "max_pool2d": _q_max_pool2d, "avg_pool2d": _q_avg_pool2d, "mean": _q_mean, "add": _q_add, "mul": _q_mul,
    "concat": _q_concat, "reshape": _q_reshape, "pad": _q_pad, "relu": _q_clamp, "relu6": _q_clamp,
    "softmax": _q_softmax, "exit": _q_exit,
    "sub": _q_sub, "squared_difference": _q_squared_difference, "prelu": _q_prelu, "clamp": _q_clamp,
    **{kind: _q_lut for kind in pointwise.UNARY},
}
