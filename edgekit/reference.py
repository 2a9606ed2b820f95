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
from .ir import Graph, Op, nhwc


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
    batch = values[graph.inputs[0]].shape[0]
    for op in graph.ops:
        fn = table.get(op.kind)
        if fn is None:
            raise EdgekitError(f"layer '{op.name}': no {'int8' if quantized else 'float'} reference for {op.kind}")
        args = [values[n] if n in values else graph.tensors[n].data for n in op.inputs]
        if op.kind in _SPATIAL:  # a (N, L, C) signal is an image of height 1 to these kernels
            args[0] = args[0].reshape((args[0].shape[0],) + nhwc(graph.tensors[op.inputs[0]].shape)[1:])
        outs = fn(op, graph, *args)
        for out_name, out in zip(op.outputs, outs if isinstance(outs, tuple) else (outs,)):  # split: several
            values[out_name] = out.reshape((batch,) + tuple(graph.tensors[out_name].shape[1:]))
    if keep:
        return values
    return [values[n] for n in graph.outputs]


# Kernels that read their input as NHWC (rank-3 / rank-2 tensors through ir.nhwc).
_SPATIAL = ("conv2d", "depthwise_conv2d", "max_pool2d", "avg_pool2d", "mean", "pad", "transpose_conv2d")


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
    _, H, W, _ = nhwc(graph.tensors[op.inputs[0]].shape)
    _, OH, OW, _ = nhwc(graph.tensors[op.outputs[0]].shape)
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
    y = x.reshape(-1, w.shape[1]).astype(np.float32) @ w.T  # rank 3: every row of (L, I)
    if b is not None:
        y = y + b
    return _apply_activation(y.astype(np.float32), op.attrs.get("activation", "none"))


def _transpose_conv_sum(op, graph, x, w, acc_dtype):
    """Every input pixel scatters its taps into the output (torch / TFLite TRANSPOSE_CONV), padding
    cropped from the front: out[y * s - pad + ky] += x[y] * w[ky]."""
    O, KH, KW, I = w.shape
    _, H, W, _ = nhwc(graph.tensors[op.inputs[0]].shape)
    _, OH, OW, _ = nhwc(graph.tensors[op.outputs[0]].shape)
    sh, sw = op.attrs["stride"]
    top, _, left, _ = op.attrs["padding"]
    full = np.zeros((x.shape[0], (H - 1) * sh + KH, (W - 1) * sw + KW, O), acc_dtype)
    wt = w.reshape(O, KH, KW, I).astype(acc_dtype)
    for ky in range(KH):
        for kx in range(KW):
            taps = x.astype(acc_dtype) @ wt[:, ky, kx, :].T
            full[:, ky:ky + (H - 1) * sh + 1:sh, kx:kx + (W - 1) * sw + 1:sw, :] += taps
    pad_h = max(top + OH - full.shape[1], 0)
    pad_w = max(left + OW - full.shape[2], 0)
    full = np.pad(full, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    return full[:, top:top + OH, left:left + OW, :]


def _f_transpose_conv2d(op, graph, x, w, b=None):
    y = _transpose_conv_sum(op, graph, x, w, np.float64)
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
    n = max(x.shape[0] for x in xs)  # a constant part (a class token) has no batch: the same for every sample
    return np.concatenate([np.broadcast_to(x, (n,) + x.shape[1:]) for x in xs], axis=op.attrs["axis"])


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


def _matmul_operands(op, a, b):
    """(.., M, K) and (.., K, N) views of a batch matmul's operands (adj_x / adj_y: stored transposed)."""
    if op.attrs.get("adj_x", False):
        a = np.swapaxes(a, -1, -2)
    if op.attrs.get("adj_y", False):
        b = np.swapaxes(b, -1, -2)
    return a, b


def _f_batch_matmul(op, graph, a, b):
    a, b = _matmul_operands(op, a.astype(np.float32), b.astype(np.float32))
    return np.matmul(a, b).astype(np.float32)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def lstm_float_states(op, graph, x, w_ih, w_hh, bias):
    """The float LSTM (zero initial state, gates i, f, g, o as torch orders them): every step's
    hidden state and cell state, each (N, L, H), in float64."""
    n, steps, _ = x.shape
    hidden = w_hh.shape[1]
    h = np.zeros((n, hidden))
    c = np.zeros((n, hidden))
    hs, cs = [], []
    for t in range(steps):
        z = x[:, t].astype(np.float64) @ w_ih.T.astype(np.float64) + h @ w_hh.T.astype(np.float64) + bias
        i, f, g, o = np.split(z, 4, axis=1)
        c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
        h = _sigmoid(o) * np.tanh(c)
        hs.append(h)
        cs.append(c)
    return np.stack(hs, axis=1), np.stack(cs, axis=1)


def _f_lstm(op, graph, x, w_ih, w_hh, bias):
    return lstm_float_states(op, graph, x, w_ih, w_hh, bias)[0].astype(np.float32)


# Data movement (the same in float and int8: the output shares the input's parameters) --------------

def _transpose(op, graph, x):
    return np.ascontiguousarray(np.transpose(x, op.attrs["perm"]))  # perm[0] == 0: the batch stays first


def _split(op, graph, x):
    """Consecutive pieces along ``axis`` (torch.chunk / split, TFLite SPLIT / SPLIT_V)."""
    axis = op.attrs["axis"]
    sizes = [graph.tensors[n].shape[axis] for n in op.outputs]
    return tuple(np.split(x, np.cumsum(sizes)[:-1], axis=axis))


def _resize_nearest(op, graph, x):
    from .ir import nearest_source_index
    _, H, W, _ = nhwc(graph.tensors[op.inputs[0]].shape)
    _, OH, OW, _ = nhwc(graph.tensors[op.outputs[0]].shape)
    hp = op.attrs.get("half_pixel_centers", False)
    x = x.reshape((x.shape[0], H, W, -1))
    return x[:, nearest_source_index(H, OH, hp)][:, :, nearest_source_index(W, OW, hp)]


def _f_resize_bilinear(op, graph, x):
    """torch's bilinear interpolation (align_corners or half-pixel centres clamped at 0)."""
    _, H, W, _ = nhwc(graph.tensors[op.inputs[0]].shape)
    _, OH, OW, _ = nhwc(graph.tensors[op.outputs[0]].shape)
    x = x.reshape((x.shape[0], H, W, -1)).astype(np.float64)

    def taps(n, o):
        if op.attrs.get("align_corners"):
            src = np.arange(o) * ((n - 1) / (o - 1) if o > 1 else 0.0)
        else:
            src = np.maximum((np.arange(o) + 0.5) * n / o - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(np.int64), n - 1)
        return i0, np.minimum(i0 + 1, n - 1), src - i0

    y0, y1, wy = taps(H, OH)
    x0, x1, wx = taps(W, OW)
    rows = x[:, y0] * (1 - wy)[None, :, None, None] + x[:, y1] * wy[None, :, None, None]
    out = rows[:, :, x0] * (1 - wx)[None, None, :, None] + rows[:, :, x1] * wx[None, None, :, None]
    return out.astype(np.float32)


def _q_resize_bilinear(op, graph, x):
    """TFLite's ResizeBilinearInteger: 10-bit fractional weights, an int64 sum, rounded half away from
    zero over 2^20, then cast to int8 (wrapping, as the C++ static_cast does)."""
    from .ir import bilinear_taps
    _, H, W, _ = nhwc(graph.tensors[op.inputs[0]].shape)
    _, OH, OW, _ = nhwc(graph.tensors[op.outputs[0]].shape)
    ac, hp = bool(op.attrs.get("align_corners")), bool(op.attrs.get("half_pixel_centers"))
    y0, y1, wy = bilinear_taps(H, OH, ac, hp)
    x0, x1, wx = bilinear_taps(W, OW, ac, hp)
    x = x.reshape((x.shape[0], H, W, -1)).astype(np.int64)
    wy, wx = wy[None, :, None, None], wx[None, None, :, None]
    acc = (x[:, y0][:, :, x0] * ((1 << 10) - wy) * ((1 << 10) - wx) + x[:, y1][:, :, x0] * wy * ((1 << 10) - wx)
           + x[:, y0][:, :, x1] * ((1 << 10) - wy) * wx + x[:, y1][:, :, x1] * wy * wx)
    num = acc + np.where(acc > 0, 1 << 19, -(1 << 19))
    q = np.where(num >= 0, num // (1 << 20), -((-num) // (1 << 20)))
    return (((q + 128) & 0xFF) - 128).astype(np.int8)


def _reduce_max(op, graph, x):
    return x.max(axis=tuple(op.attrs["axes"]), keepdims=True)


def _reduce_min(op, graph, x):
    return x.min(axis=tuple(op.attrs["axes"]), keepdims=True)


def _f_reduce_mean(op, graph, x):
    return x.astype(np.float64).mean(axis=tuple(op.attrs["axes"]), keepdims=True).astype(np.float32)


def _q_reduce_mean(op, graph, x):
    """tflite-runtime 2.14's int8 MEAN over any axes other than NHWC's (1, 2) (reference_ops::
    QuantizedMeanOrSum, dims kept): sum of (q - zp_in) in int32, 1/count folded into the multiplier as
    the spatial mean does, requantized."""
    a = op.attrs
    acc = np.sum(x.astype(np.int64) + a["input_offset"], axis=tuple(a["axes"]), keepdims=True)
    acc = qm.multiply_by_quantized_multiplier(acc, a["multiplier"], a["shift"])
    return np.clip(acc + a["output_offset"], -128, 127).astype(np.int8)


def _slice(op, graph, x):
    """x[begin:end:step] per axis (STRIDED_SLICE); the batch axis is kept whole."""
    index = (slice(None),) + tuple(slice(b, e, s) for b, e, s in
                                   zip(op.attrs["begin"][1:], op.attrs["end"][1:], op.attrs["strides"][1:]))
    return np.ascontiguousarray(x[index])


def _f_log_softmax(op, graph, x):
    z = x.astype(np.float64) - x.max(axis=-1, keepdims=True)
    return (z - np.log(np.exp(z).sum(axis=-1, keepdims=True))).astype(np.float32)


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
    "batch_norm": _f_batch_norm, "softmax": _f_softmax, "batch_matmul": _f_batch_matmul, "lstm": _f_lstm,
    "transpose": _transpose, "split": _split, "slice": _slice, "log_softmax": _f_log_softmax,
    "resize_nearest": _resize_nearest, "transpose_conv2d": _f_transpose_conv2d,
    "resize_bilinear": _f_resize_bilinear, "reduce_max": _reduce_max, "reduce_min": _reduce_min,
    "reduce_mean": _f_reduce_mean,
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
    xs = x.reshape(-1, w.shape[1]).astype(np.float64) + op.attrs["input_offset"]  # rank 3: every row
    acc = (xs @ w.T.astype(np.float64)).astype(np.int64)
    if b is not None:
        acc = acc + b.astype(np.int64)
    return _requantize_per_channel(acc, op)


def _q_transpose_conv2d(op, graph, x, w, b=None):
    """TFLite's reference int8 TRANSPOSE_CONV: (x + input_offset) * w scattered in int32, then the bias,
    then per-channel requantization."""
    acc = _transpose_conv_sum(op, graph, x.astype(np.int64) + op.attrs["input_offset"], w, np.int64)
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


_q_concat = _f_concat


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


def _wrap32(x):
    """int32 addition as the fixed-point code does it (gemmlowp adds raw values)."""
    return ((np.asarray(x, np.int64) + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)


def _sat_pot(x, exponent):
    """gemmlowp's SaturatingRoundingMultiplyByPOT with a per-element exponent."""
    x, e = np.broadcast_arrays(np.asarray(x, np.int64), np.asarray(exponent, np.int64))
    pos = np.minimum(np.maximum(e, 0), 31)
    threshold = (np.int64(1) << (31 - pos)) - 1
    left = np.where(x > threshold, qm.INT32_MAX, np.where(x < -threshold, qm.INT32_MIN, x << pos))
    right = qm.rounding_divide_by_pot(x, np.maximum(-e, 0))
    return np.where(e > 0, left, np.where(e < 0, right, x))


def _log_q12_to_q5(z):
    """gemmlowp-style log(x) for x >= 1: Q12.19 in, Q5.26 out (TFLite's log_x_for_x_greater_than_or_equal_to_1
    with 5 output integer bits and a 6-bit accumulator)."""
    srdhm = qm.saturating_rounding_doubling_high_mul
    log_2, sqrt_sqrt_half, sqrt_half = 1488522236, 1805811301, 1518500250
    alpha_n, alpha_d, alpha_i, alpha_f = 117049297, 127690142, 1057819769, 638450708
    shifted_quarter = int(_sat_pot(536870912, -6))
    clz_a = qm.count_leading_zeros_u32(z)
    r_a = _sat_pot(srdhm(_sat_pot(z, clz_a - 1), sqrt_half), 1)
    z_a_adj = np.clip(_sat_pot(12 - clz_a, 25) + shifted_quarter, qm.INT32_MIN, qm.INT32_MAX)
    z_b_headroom = qm.count_leading_zeros_u32(srdhm(z, sqrt_half)) - 1
    r_b = _sat_pot(z, z_b_headroom)
    z_b_adj = np.clip(_sat_pot(12 - z_b_headroom, 25) - shifted_quarter, qm.INT32_MIN, qm.INT32_MAX)
    r = np.minimum(r_a, r_b)
    z_adj = np.maximum(z_a_adj, z_b_adj)
    p = qm.rounding_half_sum(r, sqrt_sqrt_half)
    q = _wrap32(2 * _wrap32(r - sqrt_sqrt_half))
    common_sq = srdhm(q, q)
    num = _wrap32(srdhm(q, r) + srdhm(srdhm(q, common_sq), alpha_n))
    denom_minus_one = _wrap32(srdhm(p, _wrap32(alpha_i + q + srdhm(alpha_d, common_sq))) + srdhm(alpha_f, q))
    recip = qm.one_over_one_plus_x_for_x_in_0_1(denom_minus_one)
    total = _wrap32(srdhm(z_adj, log_2) + srdhm(_sat_pot(num, -6), recip))
    return _sat_pot(total, 1)


def _q_log_softmax(op, graph, x):
    """TFLite's reference int8 log-softmax over the last axis: output scale 16/256, zero point 127."""
    a = op.attrs
    x = x.astype(np.int64)
    diff = x - x.max(axis=-1, keepdims=True)
    scaled = qm.multiply_by_quantized_multiplier(diff, a["input_multiplier"], a["input_left_shift"])
    exps = qm.rounding_divide_by_pot(qm.exp_on_negative_values(scaled, 5), 12)
    sum_of_exps = np.sum(np.where(diff >= a["diff_min"], exps, 0), axis=-1, keepdims=True)
    log_sum = _log_q12_to_q5(sum_of_exps)
    reach = qm.rounding_divide_by_pot(qm.saturating_rounding_doubling_high_mul(log_sum + qm.INT32_MIN,
                                                                                a["reverse_multiplier"]),
                                      -a["reverse_shift"])
    adjusted_diff_min = np.maximum(a["diff_min"] - 1, reach)
    out = qm.rounding_divide_by_pot(_wrap32(scaled - log_sum), 22) + 127
    return np.where(diff > adjusted_diff_min, np.clip(out, -128, 127), -128).astype(np.int8)


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


def _q_batch_matmul(op, graph, a, b):
    """TFLite's int8 BATCH_MATMUL: sum of (a - zp_a)(b - zp_b) in int32, one per-tensor multiplier."""
    a, b = _matmul_operands(op, a.astype(np.int64) + op.attrs["input1_offset"],
                            b.astype(np.int64) + op.attrs["input2_offset"])
    acc = np.matmul(a, b)  # int64, exact; |acc| < 2**31 is proved at generate time
    out = qm.multiply_by_quantized_multiplier(acc, op.attrs["output_multiplier"], op.attrs["output_shift"])
    return _clamp_s8(out + op.attrs["output_offset"], op)


def _lstm_gate(op, g, x_t, h, w_ih, w_hh):
    """One gate's int16 pre-activation in Q3.12, as TFLite's integer LSTM sums it: the input
    product requantized and saturated to int16, then the recurrent one added and saturated again."""
    a = op.attrs
    rows = slice(g * w_hh.shape[1], (g + 1) * w_hh.shape[1])
    acc = x_t @ w_ih[rows].T.astype(np.int64) + a["input_effective_bias"][rows]
    gate = np.clip(qm.multiply_by_quantized_multiplier(acc, a["input_multiplier"][g], a["input_shift"][g]),
                   qm.INT16_MIN, qm.INT16_MAX)
    acc = h @ w_hh[rows].T.astype(np.int64) + a["recurrent_effective_bias"][rows]
    gate = qm.multiply_by_quantized_multiplier(acc, a["recurrent_multiplier"][g], a["recurrent_shift"][g]) + gate
    return np.clip(gate, qm.INT16_MIN, qm.INT16_MAX)


def _q_lstm(op, graph, x, w_ih, w_hh, bias):
    """TFLite's UNIDIRECTIONAL_SEQUENCE_LSTM, integer 8x8->16 (lstm_eval's EvalInteger8x8_16): int8
    input and hidden state, int16 cell state with a power-of-two scale, gates in Q3.12 -> Q0.15
    through gemmlowp's 16-bit logistic and tanh. The bias is folded into the effective biases."""
    a = op.attrs
    n, steps, _ = x.shape
    hidden = w_hh.shape[1]
    cell_scale = a["cell_scale"]
    h = np.full((n, hidden), a["output_offset"], np.int64)  # the state starts at real 0
    c = np.zeros((n, hidden), np.int64)
    out = np.zeros((n, steps, hidden), np.int8)
    for t in range(steps):
        x_t = x[:, t].astype(np.int64)
        i = qm.logistic16(_lstm_gate(op, 0, x_t, h, w_ih, w_hh), 3)
        f = qm.logistic16(_lstm_gate(op, 1, x_t, h, w_ih, w_hh), 3)
        g = qm.tanh16(_lstm_gate(op, 2, x_t, h, w_ih, w_hh), 3)
        o = qm.logistic16(_lstm_gate(op, 3, x_t, h, w_ih, w_hh), 3)
        c = qm.rounding_divide_by_pot(f * c, 15) + qm.rounding_divide_by_pot(i * g, 30 + cell_scale)
        c = np.clip(c, qm.INT16_MIN, qm.INT16_MAX)
        prod = o * qm.tanh16(c, 15 + cell_scale)
        hid = qm.multiply_by_quantized_multiplier(prod, a["hidden_multiplier"], a["hidden_shift"])
        h = np.clip(hid + a["output_offset"], -128, 127)
        out[:, t] = h
    return out


INT8_KERNELS = {
    "conv2d": _q_conv2d, "depthwise_conv2d": _q_depthwise_conv2d, "fully_connected": _q_fully_connected,
    "max_pool2d": _q_max_pool2d, "avg_pool2d": _q_avg_pool2d, "mean": _q_mean, "add": _q_add, "mul": _q_mul,
    "concat": _q_concat, "reshape": _q_reshape, "pad": _q_pad, "relu": _q_clamp, "relu6": _q_clamp,
    "softmax": _q_softmax, "exit": _q_exit, "batch_matmul": _q_batch_matmul, "lstm": _q_lstm,
    "transpose": _transpose, "split": _split, "slice": _slice, "log_softmax": _q_log_softmax,
    "resize_nearest": _resize_nearest, "transpose_conv2d": _q_transpose_conv2d,
    "resize_bilinear": _q_resize_bilinear, "reduce_max": _reduce_max, "reduce_min": _reduce_min,
    "reduce_mean": _q_reduce_mean,
    "sub": _q_sub, "squared_difference": _q_squared_difference, "prelu": _q_prelu, "clamp": _q_clamp,
    **{kind: _q_lut for kind in pointwise.UNARY},
}
