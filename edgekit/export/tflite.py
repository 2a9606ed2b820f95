"""Quantized IR -> an int8 ``.tflite`` file, without TensorFlow.

    export_tflite(graph, "model.tflite")               # float I/O (QUANTIZE / DEQUANTIZE at the edges)
    export_tflite(graph, "model.tflite", io="int8")    # raw int8 I/O, exactly the tensors the C sees

Every op maps to the TFLite builtin with the same int8 semantics, so
tflite-runtime's reference kernels produce our numpy reference's outputs bit
for bit. TFLite knows only SAME and VALID padding; any other padding becomes
an explicit PAD (PADV2 with -128 in front of a max pool) and a VALID op.
What TFLite cannot express exactly is refused with the layer named.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import EdgekitError
from ..frontends import tflite_schema as S
from ..frontends.tflite_schema import Scalar, String, Vector, WTable
from ..ir import Graph, Op, QuantParams, nhwc

_ACTIVATION = {"none": S.ACT_NONE, "relu": S.ACT_RELU, "relu6": S.ACT_RELU6}
_TYPES = {"int8": S.INT8, "int32": S.INT32, "float32": S.FLOAT32, "int16": S.INT16}
# Operator versions as TensorFlow's converter writes them for int8 models.
_VERSIONS = {S.CONV_2D: 3, S.DEPTHWISE_CONV_2D: 3, S.FULLY_CONNECTED: 4, S.AVERAGE_POOL_2D: 2, S.MAX_POOL_2D: 2,
             S.ADD: 2, S.MUL: 2, S.CONCATENATION: 2, S.SOFTMAX: 2, S.PAD: 2, S.PADV2: 2, S.RESHAPE: 1, S.MEAN: 2,
             S.QUANTIZE: 2, S.DEQUANTIZE: 2, S.RELU: 2, S.RELU6: 2, S.SUB: 2, S.SQUARED_DIFFERENCE: 2,
             S.LOGISTIC: 2, S.TANH: 2, S.LEAKY_RELU: 2, S.MAXIMUM: 2, S.MINIMUM: 2, S.RSQRT: 2}
_VERSIONS.update({S.TRANSPOSE: 2, S.STRIDED_SLICE: 2, S.SPLIT: 2, S.SPLIT_V: 2, S.LOG_SOFTMAX: 2, S.SUM: 2,
                  S.REDUCE_MAX: 2, S.REDUCE_MIN: 2, S.RESIZE_NEAREST_NEIGHBOR: 3, S.RESIZE_BILINEAR: 3, S.TRANSPOSE_CONV: 3,
                  S.MIRROR_PAD: 2, S.BATCH_MATMUL: 2})
_UNARY_CODES = {"logistic": S.LOGISTIC, "tanh": S.TANH, "hard_swish": S.HARD_SWISH, "elu": S.ELU, "rsqrt": S.RSQRT}


def _quant_table(q: QuantParams | None):
    if q is None:
        return None
    return WTable({2: Vector("f", np.asarray(q.scale, np.float32)),
                   3: Vector("q", np.asarray(q.zero_point, np.int64)),
                   6: Scalar("i", int(q.axis) if not q.is_per_tensor else 0)})


class _Model:
    """Accumulates tensors, buffers, operator codes and operators of one subgraph."""

    def __init__(self):
        self.tensors: list[WTable] = []
        self.index: dict[str, int] = {}
        self.buffers: list[WTable] = [WTable()]  # buffer 0: the empty sentinel every model has
        self.codes: dict[int, int] = {}
        self.operators: list[WTable] = []

    def tensor(self, name: str, shape, dtype: str, quant: QuantParams | None = None, data=None,
               variable: bool = False) -> int:
        if name in self.index:
            return self.index[name]
        buffer = 0
        if data is not None:
            buffer = len(self.buffers)
            raw = np.ascontiguousarray(data, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()
            self.buffers.append(WTable({0: Vector("B", raw, align=16)}))
        fields = {0: Vector("i", np.asarray(shape, np.int32)), 1: Scalar("b", _TYPES[dtype]),
                  2: Scalar("I", buffer), 3: String(name)}
        qt = _quant_table(quant)
        if qt is not None:
            fields[4] = qt
        if variable:  # a state the interpreter keeps between invocations (an LSTM's h and c)
            fields[5] = Scalar("?", True)
        self.index[name] = len(self.tensors)
        self.tensors.append(WTable(fields))
        return self.index[name]

    def constant(self, name: str, data: np.ndarray, dtype: str, quant=None) -> int:
        return self.tensor(name, data.shape, dtype, quant, data)

    def op(self, code: int, inputs: list[int], outputs: list[int], options: str | None = None,
           fields: dict | None = None, intermediates: list[int] | None = None) -> None:
        if code not in self.codes:
            self.codes[code] = len(self.codes)
        f = {0: Scalar("I", self.codes[code]), 1: Vector("i", np.asarray(inputs, np.int32)),
             2: Vector("i", np.asarray(outputs, np.int32))}
        if options is not None:
            f[3] = Scalar("B", S.OPTIONS_TYPE[options])
            f[4] = WTable(fields or {})
        if intermediates:
            f[8] = Vector("i", np.asarray(intermediates, np.int32))
        self.operators.append(WTable(f))

    def serialize(self, inputs: list[int], outputs: list[int], description: str) -> bytes:
        opcodes = [WTable({0: Scalar("b", min(code, 127)), 2: Scalar("i", _VERSIONS.get(code, 1)),
                           3: Scalar("i", code)}) for code in self.codes]
        subgraph = WTable({0: Vector("table", self.tensors), 1: Vector("i", np.asarray(inputs, np.int32)),
                           2: Vector("i", np.asarray(outputs, np.int32)), 3: Vector("table", self.operators),
                           4: String("main")})
        model = WTable({0: Scalar("I", 3), 1: Vector("table", opcodes), 2: Vector("table", [subgraph]),
                        3: String(description), 4: Vector("table", self.buffers)})
        return S.write(model)


# ---------------------------------------------------------------------------
# Padding: SAME, VALID, or an explicit pad in front
# ---------------------------------------------------------------------------

def _same_pad(size: int, out: int, k: int, s: int, d: int) -> int | None:
    """TFLite's SAME padding before the data, or None when SAME gives another output size."""
    if out != (size + s - 1) // s:
        return None
    eff = (k - 1) * d + 1
    return max((out - 1) * s + eff - size, 0) // 2


def _valid_ok(size: int, out: int, k: int, s: int, d: int) -> bool:
    eff = (k - 1) * d + 1
    return size >= eff and out == (size - eff) // s + 1


def _padding_mode(graph: Graph, op: Op, kh: int, kw: int, dh: int = 1, dw: int = 1):
    """"SAME", "VALID", or (top, bottom, left, right) to pad explicitly before a VALID op."""
    _, H, W, _ = nhwc(graph.tensors[op.inputs[0]].shape)
    _, OH, OW, _ = nhwc(graph.tensors[op.outputs[0]].shape)
    sh, sw = op.attrs.get("stride", (1, 1))
    top, _, left, _ = op.attrs.get("padding", (0, 0, 0, 0))
    if top == 0 and left == 0 and _valid_ok(H, OH, kh, sh, dh) and _valid_ok(W, OW, kw, sw, dw):
        return "VALID"
    if _same_pad(H, OH, kh, sh, dh) == top and _same_pad(W, OW, kw, sw, dw) == left:
        return "SAME"
    bottom = (OH - 1) * sh + (kh - 1) * dh + 1 - H - top
    right = (OW - 1) * sw + (kw - 1) * dw + 1 - W - left
    bottom, right = max(bottom, 0), max(right, 0)
    if not (_valid_ok(H + top + bottom, OH, kh, sh, dh) and _valid_ok(W + left + right, OW, kw, sw, dw)):
        raise EdgekitError(f"layer '{op.name}' ({op.kind}): its padding has no TFLite equivalent")
    return (top, bottom, left, right)


class _Exporter:
    def __init__(self, graph: Graph):
        self.g = graph
        self.m = _Model()
        self.nhwc_views: dict[str, int] = {}  # rank-3 tensor -> its RESHAPE to rank 4

    def t(self, name: str) -> int:
        t = self.g.tensors[name]
        if t.is_constant:
            return self.m.constant(name, t.data, t.dtype, t.quant)
        return self.m.tensor(name, t.shape, t.dtype, t.quant)

    def fresh(self, base: str, shape, like: str) -> int:
        name = base
        i = 1
        while name in self.g.tensors or name in self.m.index:
            name = f"{base}_{i}"
            i += 1
        return self.m.tensor(name, shape, "int8", self.g.tensors[like].quant)

    def explicit_pad(self, op: Op, pads, value: int | None) -> int:
        """PAD (zero point) or PADV2 (``value``) of the op's input; returns the padded tensor."""
        x = op.inputs[0]
        xi = self.spatial_in(x)
        n, h, w, c = nhwc(self.g.tensors[x].shape)
        t, b, l, r = pads
        out = self.fresh(f"{op.name}.pad", (n, h + t + b, w + l + r, c), x)
        paddings = self.m.constant(f"{op.outputs[0]}.paddings", np.array([[0, 0], [t, b], [l, r], [0, 0]], np.int32),
                                   "int32")
        if value is None:
            self.m.op(S.PAD, [xi, paddings], [out], "PadOptions")
        else:
            cv = self.m.constant(f"{op.outputs[0]}.pad_value", np.array([value], np.int8), "int8",
                                 self.g.tensors[x].quant)
            self.m.op(S.PADV2, [xi, paddings, cv], [out], "PadV2Options")
        return out

    # TFLite's spatial ops take rank-4 tensors: a rank-3 (1, L, C) one goes in and out through RESHAPE to
    # (1, 1, L, C), as Keras writes a Conv1D.
    def spatial_in(self, name: str) -> int:
        shape = self.g.tensors[name].shape
        if len(shape) != 3:
            return self.t(name)
        if name not in self.nhwc_views:
            out = self.fresh(f"{name}.nhwc", nhwc(shape), name)
            self._reshape_tensors(self.t(name), out, nhwc(shape), f"{name}.nhwc")
            self.nhwc_views[name] = out
        return self.nhwc_views[name]

    def spatial_out(self, name: str, then: list) -> int:
        """The rank-4 tensor a spatial op writes; ``then`` collects the RESHAPE back to rank 3."""
        shape = self.g.tensors[name].shape
        if len(shape) != 3:
            return self.t(name)
        out = self.fresh(f"{name}.nhwc", nhwc(shape), name)
        then.append(lambda: self._reshape_tensors(out, self.t(name), shape, f"{name}.rank3"))
        return out

    def _reshape_tensors(self, src: int, dst: int, shape, base: str) -> None:
        shape = np.array(shape, np.int32)
        st = self.m.constant(f"{base}.shape", shape, "int32")
        self.m.op(S.RESHAPE, [src, st], [dst], "ReshapeOptions", {0: Vector("i", shape)})

    def _exit(self, op):
        """An early exit's decision has no TFLite form: the exported model computes every exit's output."""

    def export(self, io: str) -> tuple[list[int], list[int]]:
        for op in self.g.ops:
            handler = getattr(self, f"_{op.kind}", None)
            if handler is None:
                raise EdgekitError(f"layer '{op.name}': {op.kind} has no TFLite export")
            handler(op)
        ins = [self.t(n) for n in self.g.inputs]
        outs = [self.t(n) for n in self.g.outputs]
        if io == "float":
            body, self.m.operators = self.m.operators, []
            f_ins, f_outs = [], []
            for name, idx in zip(self.g.inputs, ins):
                f_ins.append(self.m.tensor(f"{name}_float", self.g.tensors[name].shape, "float32"))
                self.m.op(S.QUANTIZE, [f_ins[-1]], [idx])
            self.m.operators += body
            for name, idx in zip(self.g.outputs, outs):
                f_outs.append(self.m.tensor(f"{name}_float", self.g.tensors[name].shape, "float32"))
                self.m.op(S.DEQUANTIZE, [idx], [f_outs[-1]])
            return f_ins, f_outs
        return ins, outs

    # weighted ops ---------------------------------------------------------
    def _conv(self, op: Op, depthwise: bool):
        a = op.attrs
        w = self.g.tensors[op.inputs[1]]
        kh, kw = (w.shape[1], w.shape[2])
        dh, dw = a.get("dilation", (1, 1))
        mode = _padding_mode(self.g, op, kh, kw, dh, dw)
        x = self.spatial_in(op.inputs[0])
        if isinstance(mode, tuple):
            x, mode = self.explicit_pad(op, mode, None), "VALID"
        pad = S.SAME if mode == "SAME" else S.VALID
        sh, sw = a.get("stride", (1, 1))
        act = _ACTIVATION[a.get("activation", "none")]
        ins = [x, self.t(op.inputs[1]), self.t(op.inputs[2])]
        then: list = []
        out = [self.spatial_out(op.outputs[0], then)]
        if depthwise:
            self.m.op(S.DEPTHWISE_CONV_2D, ins, out, "DepthwiseConv2DOptions",
                      {0: Scalar("b", pad), 1: Scalar("i", sw), 2: Scalar("i", sh),
                       3: Scalar("i", a.get("depth_multiplier", 1)), 4: Scalar("b", act),
                       5: Scalar("i", dw), 6: Scalar("i", dh)})
        else:
            self.m.op(S.CONV_2D, ins, out, "Conv2DOptions",
                      {0: Scalar("b", pad), 1: Scalar("i", sw), 2: Scalar("i", sh), 3: Scalar("b", act),
                       4: Scalar("i", dw), 5: Scalar("i", dh)})
        for step in then:
            step()

    def _conv2d(self, op):
        self._conv(op, depthwise=False)

    def _depthwise_conv2d(self, op):
        self._conv(op, depthwise=True)

    def _fully_connected(self, op):
        act = _ACTIVATION[op.attrs.get("activation", "none")]
        x, y = op.inputs[0], op.outputs[0]
        if len(self.g.tensors[x].shape) == 3:
            # (1, L, I): rows as a batch, through RESHAPE to (L, I) and back, as TensorFlow's converter writes a
            # Dense on a sequence (tflite-runtime 2.14's per-channel reference kernel ignores keep_num_dims).
            _, rows, depth = self.g.tensors[x].shape
            x2 = self.fresh(f"{x}.rows", (rows, depth), x)
            self._reshape_tensors(self.t(x), x2, (rows, depth), f"{x}.rows")
            y2 = self.fresh(f"{y}.rows", (rows, self.g.tensors[y].shape[-1]), y)
            self.m.op(S.FULLY_CONNECTED, [x2] + [self.t(n) for n in op.inputs[1:]], [y2],
                      "FullyConnectedOptions", {0: Scalar("b", act)})
            self._reshape_tensors(y2, self.t(y), self.g.tensors[y].shape, f"{y}.rank3")
            return
        self.m.op(S.FULLY_CONNECTED, [self.t(n) for n in op.inputs], [self.t(op.outputs[0])],
                  "FullyConnectedOptions", {0: Scalar("b", act)})

    # pooling ---------------------------------------------------------------
    def _pool(self, op: Op, code: int, pad_value):
        a = op.attrs
        kh, kw = a["kernel"]
        mode = _padding_mode(self.g, op, kh, kw)
        x = self.spatial_in(op.inputs[0])
        if op.kind == "avg_pool2d" and a.get("count_include_pad", False) and mode == "SAME" \
                and _needs_padding(self.g, op, kh, kw):
            mode = _explicit(self.g, op, kh, kw)  # SAME averages only real values; this op counts the padding
        if isinstance(mode, tuple):
            if op.kind == "avg_pool2d":
                _check_avg_explicit(op, mode)
            x, mode = self.explicit_pad(op, mode, pad_value), "VALID"
        act = _ACTIVATION[a.get("activation", "none")]
        then: list = []
        self.m.op(code, [x], [self.spatial_out(op.outputs[0], then)], "Pool2DOptions",
                  {0: Scalar("b", S.SAME if mode == "SAME" else S.VALID), 1: Scalar("i", a["stride"][1]),
                   2: Scalar("i", a["stride"][0]), 3: Scalar("i", kw), 4: Scalar("i", kh), 5: Scalar("b", act)})
        for step in then:
            step()

    def _max_pool2d(self, op):
        self._pool(op, S.MAX_POOL_2D, -128)  # -128 never wins a max: every window holds a real value

    def _avg_pool2d(self, op):
        self._pool(op, S.AVERAGE_POOL_2D, None)

    # the rest --------------------------------------------------------------
    def _mean(self, op):
        axes = self.m.constant(f"{op.name}.axes", np.array([1, 2], np.int32), "int32")
        then: list = []
        out = self.spatial_out(op.outputs[0], then)
        keep = len(self.g.tensors[op.outputs[0]].shape) >= 3
        self.m.op(S.MEAN, [self.spatial_in(op.inputs[0]), axes], [out], "ReducerOptions", {0: Scalar("?", keep)})
        for step in then:
            step()

    def _add(self, op):
        self.m.op(S.ADD, [self.t(n) for n in op.inputs], [self.t(op.outputs[0])], "AddOptions",
                  {0: Scalar("b", _ACTIVATION[op.attrs.get("activation", "none")])})

    def _mul(self, op):
        self.m.op(S.MUL, [self.t(n) for n in op.inputs], [self.t(op.outputs[0])], "MulOptions",
                  {0: Scalar("b", _ACTIVATION[op.attrs.get("activation", "none")])})

    def _sub(self, op):
        self.m.op(S.SUB, [self.t(n) for n in op.inputs], [self.t(op.outputs[0])], "SubOptions",
                  {0: Scalar("b", _ACTIVATION[op.attrs.get("activation", "none")])})

    def _squared_difference(self, op):
        self.m.op(S.SQUARED_DIFFERENCE, [self.t(n) for n in op.inputs], [self.t(op.outputs[0])])

    def _prelu(self, op):
        self.m.op(S.PRELU, [self.t(n) for n in op.inputs], [self.t(op.outputs[0])])

    def _unary(self, op):
        self.m.op(_UNARY_CODES[op.kind], [self.t(op.inputs[0])], [self.t(op.outputs[0])])

    _logistic = _tanh = _hard_swish = _elu = _rsqrt = _unary

    def _leaky_relu(self, op):
        self.m.op(S.LEAKY_RELU, [self.t(op.inputs[0])], [self.t(op.outputs[0])], "LeakyReluOptions",
                  {0: Scalar("f", float(op.attrs["alpha"]))})

    def _gelu(self, op):
        self.m.op(S.GELU, [self.t(op.inputs[0])], [self.t(op.outputs[0])], "GeluOptions",
                  {0: Scalar("?", op.attrs.get("approximate", "none") == "tanh")})

    def _clamp(self, op):
        """clamp(lo, hi): MAXIMUM with lo, then MINIMUM with hi, the bounds as int8 constants on the
        tensor's own parameters (input and output share them)."""
        x = op.inputs[0]
        t = self.g.tensors[x]
        steps = [(S.MAXIMUM, "act_min", op.attrs.get("lo")), (S.MINIMUM, "act_max", op.attrs.get("hi"))]
        steps = [s for s in steps if s[2] is not None]
        current = self.t(x)
        for i, (code, key, _) in enumerate(steps):
            bound = self.m.constant(f"{op.name}.{key}", np.full((1,) * len(t.shape), op.attrs[key], np.int8),
                                    "int8", t.quant)
            out = self.t(op.outputs[0]) if i == len(steps) - 1 else self.fresh(f"{op.name}.max", t.shape, x)
            self.m.op(code, [current, bound], [out], "MaximumMinimumOptions", {})
            current = out

    def _concat(self, op):
        self.m.op(S.CONCATENATION, [self.t(n) for n in op.inputs], [self.t(op.outputs[0])], "ConcatenationOptions",
                  {0: Scalar("i", op.attrs["axis"]), 1: Scalar("b", S.ACT_NONE)})

    def _reshape(self, op):
        shape = np.array(self.g.tensors[op.outputs[0]].shape, np.int32)
        st = self.m.constant(f"{op.outputs[0]}.shape", shape, "int32")
        self.m.op(S.RESHAPE, [self.t(op.inputs[0]), st], [self.t(op.outputs[0])], "ReshapeOptions",
                  {0: Vector("i", shape)})

    def _pad(self, op):
        x = self.spatial_in(op.inputs[0])
        zp = int(self.g.tensors[op.inputs[0]].quant.zero_point[0])
        t, b, l, r = op.attrs["padding"]
        paddings = self.m.constant(f"{op.outputs[0]}.paddings", np.array([[0, 0], [t, b], [l, r], [0, 0]], np.int32),
                                   "int32")
        then: list = []
        out = self.spatial_out(op.outputs[0], then)
        if op.attrs["pad_value"] == zp:
            self.m.op(S.PAD, [x, paddings], [out], "PadOptions")
        else:
            cv = self.m.constant(f"{op.outputs[0]}.pad_value", np.array([op.attrs["pad_value"]], np.int8), "int8",
                                 self.g.tensors[op.inputs[0]].quant)
            self.m.op(S.PADV2, [x, paddings, cv], [out], "PadV2Options")
        for step in then:
            step()

    def _relu(self, op):
        self.m.op(S.RELU, [self.t(op.inputs[0])], [self.t(op.outputs[0])])

    def _relu6(self, op):
        self.m.op(S.RELU6, [self.t(op.inputs[0])], [self.t(op.outputs[0])])

    def _batch_matmul(self, op):
        self.m.op(S.BATCH_MATMUL, [self.t(n) for n in op.inputs], [self.t(op.outputs[0])], "BatchMatMulOptions",
                  {0: Scalar("?", bool(op.attrs.get("adj_x", False))),
                   1: Scalar("?", bool(op.attrs.get("adj_y", False)))})

    def _lstm(self, op):
        """UNIDIRECTIONAL_SEQUENCE_LSTM, integer 8x8->16 as TFLite's quantizer writes it: 24 inputs
        (per-gate weight matrices and biases; no peephole, projection or layer norm), the int8 hidden
        and int16 cell states as variable tensors, and the 5 intermediates the kernel reads (gate
        scales 2**-12 and the hidden state's parameters, here the output's)."""
        g, a = self.g, op.attrs
        x, w_ih, w_hh, bias = (g.tensors[n] for n in op.inputs)
        out = g.tensors[op.outputs[0]]
        hidden = w_hh.shape[1]

        def part(tensor, gate, suffix):
            rows = slice(gate * hidden, (gate + 1) * hidden)
            data = tensor.data[rows]
            scale = float(tensor.quant.scale[gate * hidden])
            dtype = "int8" if tensor.dtype == "int8" else "int32"
            return self.m.constant(f"{op.outputs[0]}.{suffix}", data, dtype, QuantParams.per_tensor(scale, 0))

        names = ("input_gate", "forget_gate", "cell_gate", "output_gate")
        ins = [self.t(op.inputs[0])]
        ins += [part(w_ih, k, f"input_to_{n}_weights") for k, n in enumerate(names)]
        ins += [part(w_hh, k, f"recurrent_to_{n}_weights") for k, n in enumerate(names)]
        ins += [-1, -1, -1]
        ins += [part(bias, k, f"{n}_bias") for k, n in enumerate(names)]
        ins += [-1, -1]
        ins.append(self.m.tensor(f"{op.outputs[0]}.output_state", (1, hidden), "int8", out.quant, variable=True))
        ins.append(self.m.tensor(f"{op.outputs[0]}.cell_state", (1, hidden), "int16",
                                 QuantParams.per_tensor(2.0 ** a["cell_scale"], 0), variable=True))
        ins += [-1, -1, -1, -1]
        inter = [self.m.tensor(f"{op.outputs[0]}.intermediate_{k}", (0,), "int16", QuantParams.per_tensor(2.0 ** -12, 0))
                 for k in range(4)]
        inter.append(self.m.tensor(f"{op.outputs[0]}.intermediate_hidden", (0,), "int8", out.quant))
        self.m.op(S.UNIDIRECTIONAL_SEQUENCE_LSTM, ins, [self.t(op.outputs[0])], "UnidirectionalSequenceLSTMOptions",
                  {0: Scalar("b", S.ACT_TANH), 3: Scalar("?", False)}, intermediates=inter)

    def _softmax(self, op):
        self.m.op(S.SOFTMAX, [self.t(op.inputs[0])], [self.t(op.outputs[0])], "SoftmaxOptions",
                  {0: Scalar("f", float(op.attrs.get("beta", 1.0)))})


    # layout ops (issue 10, ops-structure) ------------------------------------
    def _i32(self, name: str, values) -> int:
        return self.m.constant(name, np.asarray(values, np.int32), "int32")

    def _transpose(self, op):
        perm = self._i32(f"{op.outputs[0]}.perm", op.attrs["perm"])
        self.m.op(S.TRANSPOSE, [self.t(op.inputs[0]), perm], [self.t(op.outputs[0])], "TransposeOptions", {})

    def _split(self, op):
        axis = op.attrs["axis"]
        sizes = [self.g.tensors[n].shape[axis] for n in op.outputs]
        outs = [self.t(n) for n in op.outputs]
        axis_t = self._i32(f"{op.outputs[0]}.axis", [axis])
        if len(set(sizes)) == 1:
            self.m.op(S.SPLIT, [axis_t, self.t(op.inputs[0])], outs, "SplitOptions", {0: Scalar("i", len(outs))})
        else:
            self.m.op(S.SPLIT_V, [self.t(op.inputs[0]), self._i32(f"{op.outputs[0]}.sizes", sizes), axis_t], outs,
                      "SplitVOptions", {0: Scalar("i", len(outs))})

    def _transpose_conv2d(self, op):
        """TRANSPOSE_CONV with TFLite's own padding (SAME or VALID) when it crops what the op crops; else the
        VALID full output, then STRIDED_SLICE (torch's padding=1, output_padding=1 has no TFLite padding)."""
        a = op.attrs
        _, H, W, _ = self.g.tensors[op.inputs[0]].shape
        out_shape = self.g.tensors[op.outputs[0]].shape
        _, OH, OW, O = out_shape
        O_, KH, KW, _ = self.g.tensors[op.inputs[1]].shape
        sh, sw = a["stride"]
        top, _, left, _ = a["padding"]

        def tflite_pad(out_size, k, s, same):
            computed = (out_size + s - 1) // s if same else (out_size - k + s) // s
            return max((computed - 1) * s + k - out_size, 0) // 2

        mode = next((m for m in (S.VALID, S.SAME) if tflite_pad(OH, KH, sh, m == S.SAME) == top
                     and tflite_pad(OW, KW, sw, m == S.SAME) == left), None)
        full = ((H - 1) * sh + KH, (W - 1) * sw + KW)
        if mode is None and (top + OH > full[0] or left + OW > full[1]):
            raise EdgekitError(f"layer '{op.name}' (transpose_conv2d): output_padding larger than padding has no "
                               "TFLite equivalent")
        y = op.outputs[0]
        target = (1,) + (full if mode is None else (OH, OW)) + (O,)
        conv_out = self.t(y) if mode is not None else self.fresh(f"{y}.full", target, y)
        shape_t = self._i32(f"{y}.output_shape", target)
        ins = [shape_t, self.t(op.inputs[1]), self.t(op.inputs[0])] + [self.t(n) for n in op.inputs[2:]]
        self.m.op(S.TRANSPOSE_CONV, ins, [conv_out], "TransposeConvOptions",
                  {0: Scalar("b", S.VALID if mode is None else mode), 1: Scalar("i", sw), 2: Scalar("i", sh)})
        if mode is None:
            begin = self._i32(f"{y}.begin", [0, top, left, 0])
            end = self._i32(f"{y}.end", [1, top + OH, left + OW, O])
            strides = self._i32(f"{y}.strides", [1, 1, 1, 1])
            self.m.op(S.STRIDED_SLICE, [conv_out, begin, end, strides], [self.t(y)], "StridedSliceOptions", {})

    def _resize_nearest(self, op):
        _, OH, OW, _ = nhwc(self.g.tensors[op.outputs[0]].shape)
        size = self._i32(f"{op.outputs[0]}.size", [OH, OW])
        then: list = []
        self.m.op(S.RESIZE_NEAREST_NEIGHBOR, [self.spatial_in(op.inputs[0]), size],
                  [self.spatial_out(op.outputs[0], then)], "ResizeNearestNeighborOptions",
                  {0: Scalar("?", False), 1: Scalar("?", bool(op.attrs.get("half_pixel_centers", False)))})
        for step in then:
            step()

    def _resize_bilinear(self, op):
        _, OH, OW, _ = nhwc(self.g.tensors[op.outputs[0]].shape)
        size = self._i32(f"{op.outputs[0]}.size", [OH, OW])
        a = op.attrs
        self.m.op(S.RESIZE_BILINEAR, [self.t(op.inputs[0]), size], [self.t(op.outputs[0])], "ResizeBilinearOptions",
                  {2: Scalar("?", bool(a.get("align_corners"))), 3: Scalar("?", bool(a.get("half_pixel_centers")))})

    def _reduce_max(self, op):
        axes = self._i32(f"{op.outputs[0]}.axes", op.attrs["axes"])
        self.m.op(S.REDUCE_MAX, [self.t(op.inputs[0]), axes], [self.t(op.outputs[0])], "ReducerOptions",
                  {0: Scalar("?", True)})

    def _reduce_min(self, op):
        axes = self._i32(f"{op.outputs[0]}.axes", op.attrs["axes"])
        self.m.op(S.REDUCE_MIN, [self.t(op.inputs[0]), axes], [self.t(op.outputs[0])], "ReducerOptions",
                  {0: Scalar("?", True)})

    def _reduce_mean(self, op):
        """MEAN over the IR axes, dims kept (a rank-4 (1, 2) mean is the `mean` op, TFLite's other kernel)."""
        axes = self._i32(f"{op.outputs[0]}.axes", op.attrs["axes"])
        self.m.op(S.MEAN, [self.t(op.inputs[0]), axes], [self.t(op.outputs[0])], "ReducerOptions",
                  {0: Scalar("?", True)})

    def _log_softmax(self, op):
        self.m.op(S.LOG_SOFTMAX, [self.t(op.inputs[0])], [self.t(op.outputs[0])], "LogSoftmaxOptions", {})

    def _slice(self, op):
        a = op.attrs
        y = op.outputs[0]
        ins = [self.t(op.inputs[0]), self._i32(f"{y}.begin", a["begin"]), self._i32(f"{y}.end", a["end"]),
               self._i32(f"{y}.strides", a["strides"])]
        self.m.op(S.STRIDED_SLICE, ins, [self.t(op.outputs[0])], "StridedSliceOptions", {})


def _needs_padding(graph: Graph, op: Op, kh: int, kw: int) -> bool:
    """Whether SAME padding pads anything for this op (then count_include_pad matters)."""
    _, H, W, _ = nhwc(graph.tensors[op.inputs[0]].shape)
    _, OH, OW, _ = nhwc(graph.tensors[op.outputs[0]].shape)
    sh, sw = op.attrs["stride"]
    return max((OH - 1) * sh + kh - H, 0) > 0 or max((OW - 1) * sw + kw - W, 0) > 0


def _explicit(graph: Graph, op: Op, kh: int, kw: int):
    _, H, W, _ = nhwc(graph.tensors[op.inputs[0]].shape)
    _, OH, OW, _ = nhwc(graph.tensors[op.outputs[0]].shape)
    sh, sw = op.attrs["stride"]
    top, _, left, _ = op.attrs["padding"]
    return (top, max((OH - 1) * sh + kh - H - top, 0), left, max((OW - 1) * sw + kw - W - left, 0))


def _check_avg_explicit(op: Op, pads) -> None:
    """PAD + VALID average counts every padded position: right only when the op counts its padding
    and no window reaches past the padding it declares (ceil_mode overhang)."""
    t, b, l, r = op.attrs["padding"]
    if not op.attrs.get("count_include_pad", False) or pads[1] > b or pads[3] > r:
        raise EdgekitError(f"layer '{op.name}' (avg_pool2d): this padding (count_include_pad="
                           f"{op.attrs.get('count_include_pad', False)}, windows past the padding) has no exact "
                           "TFLite equivalent; use padding=0 or a SAME-style padding")


def export_tflite(graph: Graph, path, io: str = "float") -> Path:
    """Write an int8 graph as a ``.tflite`` file. ``io``: "float" (QUANTIZE / DEQUANTIZE
    at the edges, what TensorFlow's converter writes by default) or "int8"."""
    if io not in ("float", "int8"):
        raise EdgekitError(f"io must be 'float' or 'int8', not {io!r}")
    if graph.meta.get("weight_only") or not graph.is_quantized():
        raise EdgekitError("export to .tflite needs an int8 graph: quantize the model first (not weight-only)")
    ex = _Exporter(graph)
    ins, outs = ex.export(io)
    data = ex.m.serialize(ins, outs, f"edgekit int8 model {graph.fingerprint()}")
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path
