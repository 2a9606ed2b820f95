"""Post-training int8 quantization (the TFLite scheme) and the weight-only mode.

    ranges = calibrate(float_graph, samples, observer="minmax")
    q = quantize(float_graph, ranges)          # int8 graph, kernel params in op.attrs
    w = quantize_weights_only(float_graph)     # int8 weights, float activations

Activations are asymmetric per-tensor int8; conv / depthwise / fully connected
weights are symmetric per-channel int8 in [-127, 127]; biases int32 with scale
input_scale * weight_scale[c]. Ops that move data without arithmetic
(pooling, reshape, concat, a lone ReLU) share one set of parameters between
their inputs and output, as TFLite requires.
"""
from __future__ import annotations

import copy

import numpy as np

from .. import pointwise
from .. import quant_math as qm
from .. import reference
from ..errors import EdgekitError
from ..ir import Graph, Op, QuantParams, Tensor, nhwc
from ..progress import progress

WEIGHTED = ("conv2d", "depthwise_conv2d", "fully_connected", "transpose_conv2d")
SAME_PARAMS = ("max_pool2d", "avg_pool2d", "reshape", "concat", "relu", "relu6", "pad", "transpose", "split", "slice",
               "resize_nearest", "resize_bilinear", "reduce_max", "reduce_min", "clamp")
# Ops whose constant operands (a scalar, per-channel factors, a layer scale, PReLU slopes, a matmul's
# constant side) are quantized like activations: per-tensor asymmetric int8 from their own range.
CONSTANT_OPERANDS = ("mul", "add", "sub", "squared_difference", "prelu", "batch_matmul")
_MAX_SAMPLES_PER_TENSOR = 1 << 21


# ---------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------

def calibrate(graph: Graph, samples: np.ndarray, observer: str = "minmax", percentile: float = 99.99,
              batch_size: int = 64, show_progress: bool = False) -> dict[str, tuple[float, float]]:
    """Observe the real range of every activation tensor over ``samples``
    (NHWC, batched on axis 0). ``observer``: "minmax" or "percentile"."""
    if observer not in ("minmax", "percentile"):
        raise EdgekitError(f"unknown observer {observer!r}: use 'minmax' or 'percentile'")
    samples = np.asarray(samples)
    if samples.ndim == 0 or samples.shape[0] == 0:
        raise EdgekitError("the calibration set is empty: give at least one sample")
    expected = graph.tensors[graph.inputs[0]].shape[1:]
    if tuple(samples.shape[1:]) != tuple(expected):
        raise EdgekitError(f"calibration samples have shape {list(samples.shape[1:])}, "
                           f"the model expects {list(expected)} (NHWC)")
    if not np.all(np.isfinite(samples)):
        raise EdgekitError("the calibration set contains NaN or inf values")
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}
    kept: dict[str, list[np.ndarray]] = {}
    rng = np.random.default_rng(0)
    batches = range(0, samples.shape[0], batch_size)
    for start in progress(batches, "calibrating", enabled=show_progress):
        values = reference.run(graph, samples[start:start + batch_size], keep=True)
        _observe_lstm_cells(graph, values, lo, hi)
        for name, v in values.items():
            lo[name] = min(lo.get(name, np.inf), float(v.min()))
            hi[name] = max(hi.get(name, -np.inf), float(v.max()))
            if observer == "percentile":
                flat = v.reshape(-1)
                per_batch = _MAX_SAMPLES_PER_TENSOR // max(1, len(batches))
                if flat.size > per_batch:
                    flat = rng.choice(flat, per_batch, replace=False)
                kept.setdefault(name, []).append(flat)
    if observer == "percentile":
        for name, parts in kept.items():
            allv = np.concatenate(parts)
            lo[name] = float(np.percentile(allv, 100.0 - percentile))
            hi[name] = float(np.percentile(allv, percentile))
    return {name: (lo[name], hi[name]) for name in lo}


def lstm_cell_key(op: Op) -> str:
    """The calibration range key of an LSTM's cell state (not a graph tensor: the op keeps it inside)."""
    return f"{op.outputs[0]}::cell_state"


def _observe_lstm_cells(graph: Graph, values: dict, lo: dict, hi: dict) -> None:
    for op in graph.ops:
        if op.kind == "lstm":
            consts = [graph.tensors[n].data for n in op.inputs[1:]]
            _, cells = reference.lstm_float_states(op, graph, values[op.inputs[0]], *consts)
            key = lstm_cell_key(op)
            lo[key] = min(lo.get(key, np.inf), float(cells.min()))
            hi[key] = max(hi.get(key, -np.inf), float(cells.max()))


def lstm_cell_scale(lo: float, hi: float) -> int:
    """The int16 cell state's scale 2**cell_scale: the smallest power-of-two range 2**p >= max|c|,
    p in [0, 6] (TFLite's quantizer starts at a range of 1; its kernel needs cell_scale <= -9)."""
    extent = max(abs(lo), abs(hi))
    p = 0
    while p < 6 and 2.0 ** p < extent:
        p += 1
    return p - 15


# ---------------------------------------------------------------------------
# Weight quantization
# ---------------------------------------------------------------------------

def _channel_axis(kind: str) -> int:
    return 3 if kind == "depthwise_conv2d" else 0


def shares_values(w: np.ndarray) -> bool:
    """A clustered layer (weight sharing, e.g. ``edgekit.cluster``): at most 255
    distinct nonzero values, each used by 4 weights or more on average. Trained
    layers have (almost) all weights distinct; pruning alone does not change that."""
    nonzero = w[w != 0]
    if nonzero.size == 0:
        return False
    distinct = np.unique(nonzero).size
    return distinct <= 255 and nonzero.size >= 4 * distinct


def quantize_weight(w: np.ndarray, axis: int, per_tensor: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel int8 in [-127, 127]; returns (int8 data, float32 scales).
    With ``per_tensor`` every channel gets the layer's scale (still one per channel)."""
    moved = np.moveaxis(w.astype(np.float64), axis, 0).reshape(w.shape[axis], -1)
    max_abs = np.abs(moved).max(axis=1)
    if per_tensor:
        max_abs = np.full_like(max_abs, max_abs.max())
    scale = np.where(max_abs > 0, max_abs / 127.0, 1.0).astype(np.float32).astype(np.float64)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


def _recorded_weight(w: np.ndarray, axis: int, scales) -> tuple[np.ndarray, np.ndarray] | None:
    """A QDQ model's own weight scales (one per output channel), when the weights are still exactly
    those integers times them (not rescaled since, e.g. by a BatchNorm folded in) and symmetric int8."""
    if scales is None or len(scales) != w.shape[axis]:
        return None
    shape = [1] * w.ndim
    shape[axis] = -1
    scales = np.asarray(scales, np.float64)
    if np.any(scales <= 0):
        return None
    q = w.astype(np.float64) / scales.reshape(shape)
    rounded = np.round(q)
    if np.max(np.abs(q - rounded), initial=0.0) > 1e-3 or np.max(np.abs(rounded), initial=0.0) > 127:
        return None
    return rounded.astype(np.int8), scales.astype(np.float32).astype(np.float64)


class _Groups:
    """Union-find over tensor names that must share quantization parameters."""

    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, a: str) -> str:
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)


def _trained_params(graph: Graph, groups: "_Groups") -> dict[str, tuple[float, int]]:
    """Parameters a quantization-aware-trained model recorded (``edgekit.qat``), per group of tensors.

    A group with one recorded (scale, zero point) uses it exactly; differing records are merged
    into the union of their real ranges."""
    by_root: dict[str, set[tuple[float, int]]] = {}
    for name, (scale, zp) in graph.meta.get("activation_params", {}).items():
        if name in graph.tensors:
            by_root.setdefault(groups.find(name), set()).add((float(scale), int(zp)))
    out = {}
    for root, choices in by_root.items():
        if len(choices) == 1:
            out[root] = next(iter(choices))
        else:
            lo = min(s * (-128 - zp) for s, zp in choices)
            hi = max(s * (127 - zp) for s, zp in choices)
            out[root] = qm.choose_activation_params(lo, hi)
    return out


def _activation_params(graph: Graph, ranges: dict[str, tuple[float, float]]) -> dict[str, QuantParams]:
    groups = _Groups()
    for op in graph.ops:
        if op.kind in SAME_PARAMS:
            for name in op.inputs + op.outputs[1:]:  # split: every piece
                groups.union(name, op.outputs[0])
    # Tensors a frontend declared alike (an unrolled GRU's steps: the same gate at every step) share
    # one set of parameters, calibrated over all of them, so their kernels share tables and multipliers.
    for group in graph.meta.get("shared_quantization", []):
        for name in group[1:]:
            groups.union(group[0], name)
    fixed: dict[str, QuantParams] = {}
    for op in graph.ops:
        if op.kind == "softmax":
            fixed[op.outputs[0]] = QuantParams.per_tensor(1.0 / 256.0, -128)
        elif op.kind == "log_softmax":  # TFLite's int8 LOG_SOFTMAX: [-16, 0) in 1/16 steps
            fixed[op.outputs[0]] = QuantParams.per_tensor(16.0 / 256.0, 127)
        elif op.kind in pointwise.FIXED_OUTPUT:
            fixed[op.outputs[0]] = QuantParams.per_tensor(*pointwise.FIXED_OUTPUT[op.kind])
    merged: dict[str, tuple[float, float]] = {}
    names = [n for n in graph.tensors if not graph.tensors[n].is_constant]
    for name in names:
        if name not in ranges:
            raise EdgekitError(f"internal: tensor {name!r} was not calibrated")
        root = groups.find(name)
        lo, hi = ranges[name]
        old = merged.get(root, (np.inf, -np.inf))
        merged[root] = (min(old[0], lo), max(old[1], hi))
    trained = _trained_params(graph, groups)
    params: dict[str, QuantParams] = {}
    for name in names:
        if name in fixed:
            params[name] = fixed[name]
            continue
        root = groups.find(name)
        scale, zp = trained[root] if root in trained else qm.choose_activation_params(*merged[root])
        params[name] = QuantParams.per_tensor(scale, zp)
    for name, p in fixed.items():
        for other in names:
            if other != name and groups.find(other) == groups.find(name):
                raise EdgekitError(f"tensor {other!r} must share the fixed softmax output parameters; "
                                   "edgekit supports Softmax only as the model's last layer")
    return params


# ---------------------------------------------------------------------------
# Kernel parameters (TFLite's Prepare step)
# ---------------------------------------------------------------------------

def _scalar(p: QuantParams) -> tuple[float, int]:
    return float(p.scale[0]), int(p.zero_point[0])


def activation_range(activation: str, scale: float, zero_point: int) -> tuple[int, int]:
    lo, hi = -128, 127
    if activation in ("relu", "relu6"):
        lo = max(lo, zero_point)
    if activation == "relu6":
        hi = min(hi, zero_point + int(qm.round_half_away(np.float64(np.float32(6.0 / scale)))))
    return lo, hi


def derive_kernel_params(graph: Graph) -> None:
    """Fill each op's attrs with the integer parameters its int8 kernel uses."""
    for op in graph.ops:
        t = graph.tensors
        out_s, out_zp = _scalar(t[op.outputs[0]].quant)
        act = op.attrs.get("activation", "none")
        if op.kind in ("relu", "relu6"):
            act = op.kind
        op.attrs["act_min"], op.attrs["act_max"] = activation_range(act, out_s, out_zp)
        if op.kind == "clamp":  # the bounds quantized as TFLite's MAXIMUM / MINIMUM constants are
            for key, bound in (("act_min", op.attrs.get("lo")), ("act_max", op.attrs.get("hi"))):
                if bound is not None:
                    op.attrs[key] = int(qm.quantize(np.array([bound], np.float32), out_s, out_zp)[0])
        if op.kind in WEIGHTED:
            in_s, in_zp = _scalar(t[op.inputs[0]].quant)
            w_scales = t[op.inputs[1]].quant.scale
            mults, shifts = zip(*(qm.quantize_multiplier(float(np.float32(in_s)) * float(np.float32(ws))
                                                         / float(np.float32(out_s))) for ws in w_scales))
            op.attrs.update(input_offset=-in_zp, output_offset=out_zp,
                            multiplier=np.array(mults, np.int32), shift=np.array(shifts, np.int32))
        elif op.kind in ("max_pool2d", "avg_pool2d"):
            op.attrs["zero_point"] = out_zp
        elif op.kind == "pad":
            op.attrs["pad_value"] = int(qm.quantize(np.array([op.attrs.get("value", 0.0)]), out_s, out_zp)[0])
        elif op.kind == "mean":
            in_s, in_zp = _scalar(t[op.inputs[0]].quant)
            m, s = qm.quantize_multiplier(float(np.float32(in_s)) / float(np.float32(out_s)))
            _, h, w, _ = nhwc(t[op.inputs[0]].shape)
            m, s = qm.fold_divisor(m, s, h * w)
            op.attrs.update(input_offset=-in_zp, output_offset=out_zp, multiplier=m, shift=s)
        elif op.kind == "reduce_mean":
            op.attrs.update(reduce_mean_params(t[op.inputs[0]], (out_s, out_zp), op.attrs["axes"]))
        elif op.kind in pointwise.UNARY:
            in_s, in_zp = _scalar(t[op.inputs[0]].quant)
            op.attrs["table"] = pointwise.int8_table(op.kind, op.attrs, in_s, in_zp, out_s, out_zp)
        elif op.kind == "prelu":
            in_s, in_zp = _scalar(t[op.inputs[0]].quant)
            a_s, a_zp = _scalar(t[op.inputs[1]].quant)
            m1, s1 = qm.quantize_multiplier(float(np.float32(np.float32(in_s) / np.float32(out_s))))
            m2, s2 = qm.quantize_multiplier(float(np.float32(np.float32(in_s) * np.float32(a_s) / np.float32(out_s))))
            op.attrs.update(input_offset=-in_zp, alpha_offset=-a_zp, output_offset=out_zp, identity_multiplier=m1,
                            identity_shift=s1, alpha_multiplier=m2, alpha_shift=s2)
        elif op.kind == "squared_difference":
            s1, zp1 = _scalar(t[op.inputs[0]].quant)
            s2, zp2 = _scalar(t[op.inputs[1]].quant)
            left_shift = 7
            twice_max = 2.0 * max(float(np.float32(s1)), float(np.float32(s2)))
            m1, sh1 = qm.quantize_multiplier_smaller_than_one(float(np.float32(s1)) / twice_max)
            m2, sh2 = qm.quantize_multiplier_smaller_than_one(float(np.float32(s2)) / twice_max)
            mo, sho = qm.quantize_multiplier(twice_max * twice_max / ((1 << 2 * left_shift) * float(np.float32(out_s))))
            op.attrs.update(input1_offset=-zp1, input2_offset=-zp2, output_offset=out_zp, left_shift=left_shift,
                            input1_multiplier=m1, input1_shift=sh1, input2_multiplier=m2, input2_shift=sh2,
                            output_multiplier=mo, output_shift=sho)
        elif op.kind in ("add", "sub"):  # TFLite's SUB prepares exactly as ADD
            s1, zp1 = _scalar(t[op.inputs[0]].quant)
            s2, zp2 = _scalar(t[op.inputs[1]].quant)
            left_shift = 20
            twice_max = 2.0 * max(float(np.float32(s1)), float(np.float32(s2)))
            m1, sh1 = qm.quantize_multiplier_smaller_than_one(float(np.float32(s1)) / twice_max)
            m2, sh2 = qm.quantize_multiplier_smaller_than_one(float(np.float32(s2)) / twice_max)
            real_out = twice_max / ((1 << left_shift) * float(np.float32(out_s)))
            mo, sho = qm.quantize_multiplier_smaller_than_one(real_out)
            op.attrs.update(input1_offset=-zp1, input2_offset=-zp2, output_offset=out_zp, left_shift=left_shift,
                            input1_multiplier=m1, input1_shift=sh1, input2_multiplier=m2, input2_shift=sh2,
                            output_multiplier=mo, output_shift=sho)
        elif op.kind == "mul":
            s1, zp1 = _scalar(t[op.inputs[0]].quant)
            s2, zp2 = _scalar(t[op.inputs[1]].quant)
            # TFLite's Prepare multiplies the float scales in float, then widens to double.
            real = float(np.float32(np.float32(np.float32(s1) * np.float32(s2)) / np.float32(out_s)))
            mo, sho = qm.quantize_multiplier(real)
            op.attrs.update(input1_offset=-zp1, input2_offset=-zp2, output_offset=out_zp,
                            output_multiplier=mo, output_shift=sho)
        elif op.kind == "batch_matmul":
            s1, zp1 = _scalar(t[op.inputs[0]].quant)
            s2, zp2 = _scalar(t[op.inputs[1]].quant)
            # TFLite's GetQuantizedConvolutionMultipler: the input product in float, then double.
            real = float(np.float32(np.float32(s1) * np.float32(s2))) / float(np.float32(out_s))
            mo, sho = qm.quantize_multiplier(real)
            op.attrs.update(input1_offset=-zp1, input2_offset=-zp2, output_offset=out_zp,
                            output_multiplier=mo, output_shift=sho)
        elif op.kind == "lstm":
            op.attrs.update(lstm_kernel_params(graph, op))
        elif op.kind == "softmax":
            in_s, _ = _scalar(t[op.inputs[0]].quant)
            beta = float(op.attrs.get("beta", 1.0))
            integer_bits = 5
            real = min(beta * float(np.float32(in_s)) * (1 << (31 - integer_bits)), float((1 << 31) - 1))
            m, left_shift = qm.quantize_multiplier_greater_than_one(real)
            max_rescaled = 1.0 * ((1 << integer_bits) - 1) * (1 << (31 - integer_bits)) / (1 << left_shift)
            op.attrs.update(input_multiplier=m, input_left_shift=left_shift, diff_min=-int(np.floor(max_rescaled)))
        elif op.kind == "log_softmax":
            in_s, _ = _scalar(t[op.inputs[0]].quant)
            integer_bits = 5
            real = min(float(np.float32(in_s)) * (1 << (31 - integer_bits)), float((1 << 31) - 1))
            m, left_shift = qm.quantize_multiplier_greater_than_one(real)
            # TFLite's PreprocessLogSoftmaxScalingExp: the reverse of the input scaling, for the cut-off
            rm, rs = qm.quantize_multiplier((1 << (31 - left_shift)) / float(m))
            if rs > 0:
                raise EdgekitError(f"layer '{op.name}': the input scale {in_s:g} is too small for int8 log_softmax")
            max_rescaled = 1.0 * ((1 << integer_bits) - 1) * (1 << (31 - integer_bits)) / (1 << left_shift)
            op.attrs.update(input_multiplier=m, input_left_shift=left_shift, reverse_multiplier=rm, reverse_shift=rs,
                            diff_min=-int(np.floor(max_rescaled)))


def reduce_mean_params(x: Tensor, out: tuple[float, int], axes) -> dict:
    """tflite-runtime's int8 MEAN over general axes (dims kept): the spatial mean's arithmetic, 1/count
    folded into the multiplier, also when input and output share parameters."""
    in_s, in_zp = _scalar(x.quant)
    out_s, out_zp = out
    count = int(np.prod([x.shape[a] for a in axes]))
    m, s = qm.quantize_multiplier(float(np.float32(in_s)) / float(np.float32(out_s)))
    m, s = qm.fold_divisor(m, s, count)
    return dict(input_offset=-in_zp, output_offset=out_zp, multiplier=m, shift=s, count=count)


def lstm_kernel_params(graph: Graph, op: Op) -> dict:
    """TFLite's PopulateQuantizedLstmParams8x8_16 (no peephole, projection or layer norm): per gate
    the input and recurrent effective scales (weight scale x input or state scale / 2**-12, in float
    as TFLite computes them), the hidden scale 2**-15 x 2**-15 / output scale, and the zero points
    folded into the biases (input: bias - zp_x * row sums; recurrent: - zp_h * row sums)."""
    t = graph.tensors
    in_s, in_zp = _scalar(t[op.inputs[0]].quant)
    out_s, out_zp = _scalar(t[op.outputs[0]].quant)
    w_ih, w_hh, bias = (t[n] for n in op.inputs[1:4])
    hidden = w_hh.shape[1]
    f32 = np.float32
    gate_scale = f32(2.0 ** -12)
    params = {"input_multiplier": [], "input_shift": [], "recurrent_multiplier": [], "recurrent_shift": []}
    for g in range(4):
        for prefix, w, s in (("input", w_ih, in_s), ("recurrent", w_hh, out_s)):
            effective = f32(f32(f32(w.quant.scale[g * hidden]) * f32(s)) / gate_scale)
            m, sh = qm.quantize_multiplier(float(effective))
            params[f"{prefix}_multiplier"].append(m)
            params[f"{prefix}_shift"].append(sh)
    params = {k: np.array(v, np.int32) for k, v in params.items()}
    hidden_scale = f32(2.0 ** -15 / float(f32(out_s)) * 2.0 ** -15)
    params["hidden_multiplier"], params["hidden_shift"] = qm.quantize_multiplier(float(hidden_scale))
    row_sums_x = w_ih.data.astype(np.int64).sum(axis=1)
    row_sums_h = w_hh.data.astype(np.int64).sum(axis=1)
    params["input_effective_bias"] = (bias.data.astype(np.int64) - in_zp * row_sums_x).astype(np.int32)
    params["recurrent_effective_bias"] = (-out_zp * row_sums_h).astype(np.int32)
    params.update(input_offset=-in_zp, output_offset=out_zp)
    return params


def _quantize_lstm(g: Graph, op: Op, ranges: dict) -> None:
    """Weights symmetric int8 with one scale per gate matrix (TFLite's integer LSTM takes per-tensor
    weights: 8 matrices), the bias int32 in units of input scale x input weight scale, the cell
    state's power-of-two scale from its calibrated range."""
    x_scale = float(np.float32(g.tensors[op.inputs[0]].quant.scale[0]))
    hidden = g.tensors[op.inputs[2]].shape[1]
    scales = {}
    for name in op.inputs[1:3]:
        w = g.tensors[name]
        per_gate = w.data.reshape(4, -1)
        data, gate_scales = quantize_weight(per_gate, 0)
        rows = np.repeat(gate_scales, hidden)
        w.data, w.dtype = data.reshape(w.shape), "int8"
        w.quant = QuantParams(rows, np.zeros(rows.size, np.int64), 0)
        scales[name] = rows
    b = g.tensors[op.inputs[3]]
    bias_scales = np.array([float(np.float32(x_scale * float(np.float32(s)))) for s in scales[op.inputs[1]]])
    b.data = np.clip(np.round(b.data.astype(np.float64) / bias_scales), qm.INT32_MIN, qm.INT32_MAX).astype(np.int32)
    b.dtype, b.quant = "int32", QuantParams(bias_scales, np.zeros(bias_scales.size, np.int64), 0)
    key = lstm_cell_key(op)
    if key not in ranges:
        raise EdgekitError(f"layer '{op.name}' (lstm): its cell state was not calibrated; calibrate with "
                           "passes.quantize.calibrate")
    op.attrs["cell_scale"] = lstm_cell_scale(*ranges[key])


# ---------------------------------------------------------------------------
# The quantizer
# ---------------------------------------------------------------------------

def quantize(graph: Graph, ranges: dict[str, tuple[float, float]], one_scale_when_clustered: bool = True) -> Graph:
    """Float graph (BN folded, activations fused) + calibrated ranges -> int8 graph.

    A clustered layer (``shares_values``) gets one weight scale for all its
    channels, so its k shared values stay k int8 values: one codebook for the
    layer, one requantization multiplier (see docs/DESIGN-NOTES.md)."""
    for op in graph.ops:
        if op.kind == "batch_norm":
            raise EdgekitError("fold BatchNorm before quantizing (passes.fuse.prepare_float)")
    g = copy.deepcopy(graph)
    g.meta.setdefault("float_weight_bytes", graph.weight_bytes())
    params = _activation_params(g, ranges)
    for name, p in params.items():
        t = g.tensors[name]
        t.dtype, t.quant = "int8", p
    for op in g.ops:
        for name in op.inputs if op.kind in CONSTANT_OPERANDS else ():
            c = g.tensors[name]
            if c.is_constant and c.dtype == "float32":  # a constant factor: per-tensor asymmetric int8
                scale, zp = qm.choose_activation_params(float(c.data.min()), float(c.data.max()))
                c.data, c.dtype = qm.quantize(c.data, scale, zp), "int8"
                c.quant = QuantParams.per_tensor(scale, zp)
        if op.kind == "concat":  # a constant part (a class token) takes the parameters every part shares
            for name in op.inputs:
                c = g.tensors[name]
                if c.is_constant and c.dtype == "float32":
                    scale, zp = _scalar(g.tensors[op.outputs[0]].quant)
                    c.data, c.dtype = qm.quantize(c.data, scale, zp), "int8"
                    c.quant = QuantParams.per_tensor(scale, zp)
        if op.kind == "lstm":
            _quantize_lstm(g, op, ranges)
        if op.kind not in WEIGHTED:
            continue
        w = g.tensors[op.inputs[1]]
        axis = _channel_axis(op.kind)
        if w.dtype == "int8":  # shared with an op quantized before (an unrolled GRU's steps): quantized once
            w_scales = w.quant.scale
        else:
            recorded = _recorded_weight(w.data, axis, g.meta.get("weight_params", {}).get(op.inputs[1]))
            data, w_scales = recorded or quantize_weight(w.data, axis,
                                                         one_scale_when_clustered and shares_values(w.data))
            w.data, w.dtype, w.quant = data, "int8", QuantParams(w_scales, np.zeros_like(w_scales, np.int64), axis)
        in_scale = float(np.float32(g.tensors[op.inputs[0]].quant.scale[0]))
        bias_scales = np.array([float(np.float32(in_scale * float(np.float32(s)))) for s in w_scales])
        if len(op.inputs) > 2:
            b = g.tensors[op.inputs[2]]
            b.data = np.clip(np.round(b.data.astype(np.float64) / bias_scales), qm.INT32_MIN, qm.INT32_MAX
                             ).astype(np.int32)
        else:  # give every weighted op a bias: one kernel signature, and TFLite expects one anyway
            name = g.unique_name(f"{op.name}.bias")
            b = g.add_tensor(Tensor(name, (len(w_scales),), "int32", np.zeros(len(w_scales), np.int32)))
            op.inputs.append(name)
        b.dtype, b.quant = "int32", QuantParams(bias_scales, np.zeros(len(w_scales), np.int64), 0)
    derive_kernel_params(g)
    return g


def quantize_weights_only(graph: Graph) -> Graph:
    """Weight-only ("fake") quantization: int8 weights with per-channel scales,
    float activations and biases. For targets with an FPU."""
    g = copy.deepcopy(graph)
    g.meta.setdefault("float_weight_bytes", graph.weight_bytes())
    g.meta["weight_only"] = True
    for op in g.ops:
        if op.kind in WEIGHTED:
            w = g.tensors[op.inputs[1]]
            data, scales = quantize_weight(w.data, _channel_axis(op.kind))
            w.data, w.dtype = data, "int8"
            w.quant = QuantParams(scales, np.zeros_like(scales, np.int64), _channel_axis(op.kind))
    return g


def dequantized_weights_graph(graph: Graph) -> Graph:
    """A float graph with the weight-only graph's int8 weights expanded back:
    the reference the weight-only C code is checked against."""
    g = copy.deepcopy(graph)
    for t in g.tensors.values():
        if t.is_constant and t.dtype == "int8":
            shape = [1] * t.data.ndim
            shape[t.quant.axis] = -1
            t.data = (t.data.astype(np.float32) * t.quant.scale.astype(np.float32).reshape(shape)).astype(np.float32)
            t.dtype, t.quant = "float32", None
    g.meta.pop("weight_only", None)
    return g
