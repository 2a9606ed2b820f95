"""An int8 ``.tflite`` file -> edgekit's quantized IR, without TensorFlow.

    graph = load_tflite("model.tflite")    # int8 graph, kernel parameters derived as TFLite's Prepare does

QUANTIZE at the inputs and DEQUANTIZE at the outputs mean float I/O: the graph
keeps the int8 tensors and their parameters, and ``edgekit run`` quantizes and
dequantizes with them exactly as those ops do. Every operator edgekit cannot
run is listed in one error, with its index and output tensor; a truncated or
corrupted file is a clear error, never a crash.
"""
from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EdgekitError
from ..ir import Graph, Op, QuantParams, Tensor
from ..pointwise import FIXED_OUTPUT
from ..passes.quantize import derive_kernel_params
from . import tflite_schema as S

SUPPORTED = ("CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED, AVERAGE_POOL_2D, MAX_POOL_2D, MEAN, ADD, MUL, PAD, PADV2, "
             "RESHAPE, CONCATENATION, SOFTMAX, RELU, RELU6, QUANTIZE (at inputs), DEQUANTIZE (at outputs), "
             "SUB, SQUARED_DIFFERENCE, LOGISTIC, TANH, HARD_SWISH, LEAKY_RELU, ELU, GELU, RSQRT, PRELU, "
             "MAXIMUM / MINIMUM with a constant (clamp)")
SUPPORTED += (", TRANSPOSE, SPLIT, SPLIT_V, STRIDED_SLICE, LOG_SOFTMAX, RESIZE_NEAREST_NEIGHBOR, TRANSPOSE_CONV, "
              "RESIZE_BILINEAR, REDUCE_MAX, REDUCE_MIN, MEAN over any axes")
SUPPORTED += (", BATCH_MATMUL, UNIDIRECTIONAL_SEQUENCE_LSTM (integer, no peephole / projection / "
              "layer norm)")
_ACTIVATIONS = {S.ACT_NONE: "none", S.ACT_RELU: "relu", S.ACT_RELU6: "relu6"}


@dataclass
class _Tensor:
    index: int
    name: str
    shape: tuple
    type: int
    data: np.ndarray | None
    scale: np.ndarray | None
    zero_point: np.ndarray | None
    axis: int


@dataclass
class _Operator:
    index: int
    code: int
    inputs: list[int]
    outputs: list[int]
    options: S.Table | None
    options_type: int


class _Unsupported(Exception):
    """One operator edgekit cannot run; collected so all are reported together."""


# ---------------------------------------------------------------------------
# Parsing the flatbuffer into plain records
# ---------------------------------------------------------------------------

def _parse(buf: bytes):
    model = S.root_table(buf)
    version = model.scalar(0, "I")
    if version != 3:
        raise S.FlatBufferError(f"schema version {version}; edgekit reads version 3")
    codes = []
    for oc in model.tables(1, "operator_codes"):
        deprecated = oc.scalar(0, "b", 0)
        code = max(int(deprecated), int(oc.scalar(3, "i", 0)))  # as TFLite's GetBuiltinCode
        if code == 32:  # CUSTOM
            code = ("CUSTOM", oc.string(1, "?"))
        codes.append(code)
    buffers = model.tables(4, "buffers")
    subgraphs = model.tables(2, "subgraphs")
    if not subgraphs:
        raise S.FlatBufferError("the model has no subgraph")
    sg = subgraphs[0]
    tensors = []
    for i, t in enumerate(sg.tables(0, "tensors")):
        shape = t.vector(0, "i", f"tensor {i} shape")
        ttype = t.scalar(1, "b", 0)
        bidx = t.scalar(2, "I", 0)
        name = t.string(3, f"tensor_{i}")
        data = None
        if bidx:
            if bidx >= len(buffers):
                raise S.FlatBufferError(f"tensor {i} ('{name}') refers to buffer {bidx} of {len(buffers)}")
            raw = buffers[bidx].vector(0, "B", f"buffer {bidx}")
            if raw is None and buffers[bidx].scalar(1, "Q", 0):
                raise S.FlatBufferError(f"tensor '{name}' keeps its data outside the flatbuffer (a >2 GB model)")
            if raw is not None and raw.size:
                data = raw
        scale = zp = None
        axis = 0
        q = t.table(4, f"tensor {i} quantization")
        if q is not None:
            scale = q.vector(2, "f", f"tensor {i} scales")
            zp = q.vector(3, "q", f"tensor {i} zero points")
            axis = q.scalar(6, "i", 0)
        tensors.append(_Tensor(i, name, tuple(int(d) for d in (shape if shape is not None else [])), int(ttype),
                               data, scale, zp, int(axis)))
    ops = []
    for i, o in enumerate(sg.tables(3, "operators")):
        ci = o.scalar(0, "I", 0)
        if ci >= len(codes):
            raise S.FlatBufferError(f"operator {i} uses operator code {ci} of {len(codes)}")
        ins = o.vector(1, "i", f"operator {i} inputs")
        outs = o.vector(2, "i", f"operator {i} outputs")
        ins = [int(v) for v in (ins if ins is not None else [])]
        outs = [int(v) for v in (outs if outs is not None else [])]
        for v in ins + outs:
            if v >= len(tensors) or v < -1:
                raise S.FlatBufferError(f"operator {i} refers to tensor {v} of {len(tensors)}")
        ops.append(_Operator(i, codes[ci], ins, outs, o.table(4, f"operator {i} options"), o.scalar(3, "B", 0)))
    inputs = [int(v) for v in (sg.vector(1, "i", "subgraph inputs") if sg.has(1) else [])]
    outputs = [int(v) for v in (sg.vector(2, "i", "subgraph outputs") if sg.has(2) else [])]
    for v in inputs + outputs:
        if not 0 <= v < len(tensors):
            raise S.FlatBufferError(f"the subgraph's inputs/outputs refer to tensor {v} of {len(tensors)}")
    return tensors, ops, inputs, outputs, len(subgraphs)


# ---------------------------------------------------------------------------
# Records -> IR
# ---------------------------------------------------------------------------

def _code_name(code) -> str:
    return f"CUSTOM ({code[1]})" if isinstance(code, tuple) else S.operator_name(code)


class _Importer:
    def __init__(self, tensors: list[_Tensor], ops: list[_Operator]):
        self.t = tensors
        self.ops = ops
        self.g = Graph()
        self.names: dict[int, str] = {}  # tflite tensor index -> IR name
        self.alias: dict[int, int] = {}  # QUANTIZE output -> float input, DEQUANTIZE input -> float output
        self.pad_values: dict[str, int] = {}

    # tensors ---------------------------------------------------------------
    def _name(self, idx: int) -> str:
        if idx not in self.names:
            base = self.t[idx].name or f"tensor_{idx}"
            taken = set(self.names.values())
            name, i = base, 1
            while name in taken or name in self.g.tensors:
                name, i = f"{base}_{i}", i + 1
            self.names[idx] = name
        return self.names[idx]

    def _per_tensor(self, tt: _Tensor, what: str) -> QuantParams:
        if tt.scale is None or tt.scale.size == 0 or tt.zero_point is None or tt.zero_point.size == 0:
            raise _Unsupported(f"{what} '{tt.name}' has no quantization parameters")
        if tt.scale.size != 1:
            raise _Unsupported(f"{what} '{tt.name}' is quantized per channel")
        if not (np.isfinite(tt.scale[0]) and tt.scale[0] > 0) or not -128 <= tt.zero_point[0] <= 127:
            raise _Unsupported(f"{what} '{tt.name}' has scale {tt.scale[0]} and zero point {tt.zero_point[0]}")
        return QuantParams.per_tensor(float(tt.scale[0]), int(tt.zero_point[0]))

    def activation(self, idx: int, max_rank: int = 4) -> str:
        """The IR name of an int8 activation tensor, added on first use (layout ops pass views of
        rank up to 6 between them)."""
        if idx < 0:
            raise _Unsupported("a required input is missing")
        tt = self.t[idx]
        name = self._name(idx)
        if name in self.g.tensors:
            return name
        if tt.type != S.INT8:
            raise _Unsupported(f"tensor '{tt.name}' is {S.TENSOR_TYPE_NAMES.get(tt.type, tt.type)}; edgekit runs "
                               "int8 models (convert with full-integer quantization)")
        if tt.data is not None:
            raise _Unsupported(f"tensor '{tt.name}' is a constant where edgekit expects an activation")
        shape = tuple(tt.shape)
        if len(shape) == 2 and shape[0] != 1:  # (rows, features), e.g. a Dense on a sequence: IR (1, rows, C)
            shape = (1,) + shape
        if not 2 <= len(shape) <= max_rank or shape[0] != 1:
            raise _Unsupported(f"tensor '{tt.name}' has shape {list(tt.shape)}; edgekit takes batch-1 tensors of "
                               "rank 2 (N, C), 3 (N, L, C) or 4 (N, H, W, C)")
        self.g.add_tensor(Tensor(name, shape, "int8", quant=self._per_tensor(tt, "tensor")))
        return name

    def constant(self, idx: int, dtype, what: str) -> np.ndarray:
        if idx < 0:
            raise _Unsupported(f"the {what} is missing")
        tt = self.t[idx]
        want = {np.int8: S.INT8, np.int32: S.INT32}[dtype]
        if tt.type != want:
            raise _Unsupported(f"the {what} '{tt.name}' is {S.TENSOR_TYPE_NAMES.get(tt.type, tt.type)}, "
                               f"not {np.dtype(dtype).name}")
        if tt.data is None:
            raise _Unsupported(f"the {what} '{tt.name}' is not a constant")
        count = int(np.prod(tt.shape)) if tt.shape else 1
        itemsize = np.dtype(dtype).itemsize
        if tt.data.size != count * itemsize:
            raise _Unsupported(f"the {what} '{tt.name}' holds {tt.data.size} bytes; its shape "
                               f"{list(tt.shape)} needs {count * itemsize}")
        return np.frombuffer(tt.data.tobytes(), dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype).reshape(tt.shape)

    def weight(self, idx: int, channel_axis: int, channels: int) -> str:
        tt = self.t[idx] if idx >= 0 else None
        data = self.constant(idx, np.int8, "weights")
        if tt.scale is None or tt.scale.size == 0:
            raise _Unsupported(f"the weights '{tt.name}' have no quantization parameters")
        if tt.zero_point is not None and np.any(tt.zero_point != 0):
            raise _Unsupported(f"the weights '{tt.name}' are asymmetric (non-zero zero point)")
        scale = tt.scale.astype(np.float64)
        if not np.all(np.isfinite(scale) & (scale >= 0)):
            raise _Unsupported(f"the weights '{tt.name}' have invalid scales")
        if scale.size == 1:
            scale = np.repeat(scale, channels)
        elif scale.size != channels or tt.axis != channel_axis:
            raise _Unsupported(f"the weights '{tt.name}' have {scale.size} scales along axis {tt.axis}; "
                               f"expected {channels} along axis {channel_axis}")
        name = self._name(idx)
        if name not in self.g.tensors:
            self.g.add_tensor(Tensor(name, tuple(data.shape), "int8", data,
                                     QuantParams(scale, np.zeros(channels, np.int64), channel_axis)))
        return name

    def bias(self, idx: int, channels: int, op_name: str, in_scale: float, w_scale: np.ndarray) -> str:
        scales = np.array([float(np.float32(in_scale * float(np.float32(s)))) for s in w_scale])
        if idx < 0:
            name = self.g.unique_name(f"{op_name}.bias")
            data = np.zeros(channels, np.int32)
        else:
            name = self._name(idx)
            data = self.constant(idx, np.int32, "bias").reshape(-1)
            if data.size != channels:
                raise _Unsupported(f"the bias '{self.t[idx].name}' has {data.size} values for {channels} channels")
        if name not in self.g.tensors:
            self.g.add_tensor(Tensor(name, (channels,), "int32", data,
                                     QuantParams(scales, np.zeros(channels, np.int64), 0)))
        return name

    # ops ---------------------------------------------------------------------
    def add_op(self, kind: str, op: _Operator, inputs: list[str], attrs: dict) -> None:
        out = self.activation(op.outputs[0])
        self.g.ops.append(Op(kind, self.t[op.outputs[0]].name or f"op{op.index}", inputs, [out], attrs))

    def options(self, op: _Operator, expected: str) -> S.Table:
        if op.options is None:
            raise _Unsupported("its options are missing")
        if op.options_type not in (0, S.OPTIONS_TYPE[expected]):
            raise _Unsupported(f"its options are of union type {op.options_type}, not {expected}")
        return op.options

    @staticmethod
    def activation_of(code: int) -> str:
        if code not in _ACTIVATIONS:
            raise _Unsupported(f"fused activation {code} (edgekit fuses NONE, RELU, RELU6)")
        return _ACTIVATIONS[code]

    def padding(self, mode: int, op: _Operator, kh: int, kw: int, sh: int, sw: int, dh=1, dw=1):
        _, H, W, _ = self.t[op.inputs[0]].shape
        _, OH, OW, _ = self.t[op.outputs[0]].shape
        if mode == S.SAME:
            want = ((H + sh - 1) // sh, (W + sw - 1) // sw)
            ph = max((OH - 1) * sh + (kh - 1) * dh + 1 - H, 0)
            pw = max((OW - 1) * sw + (kw - 1) * dw + 1 - W, 0)
            pads = (ph // 2, ph - ph // 2, pw // 2, pw - pw // 2)
        elif mode == S.VALID:
            want = ((H - (kh - 1) * dh - 1) // sh + 1, (W - (kw - 1) * dw - 1) // sw + 1)
            pads = (0, 0, 0, 0)
        else:
            raise _Unsupported(f"padding mode {mode}")
        if (OH, OW) != want:
            raise _Unsupported(f"its output is {OH}x{OW}, but {'SAME' if mode == S.SAME else 'VALID'} "
                               f"padding gives {want[0]}x{want[1]}")
        return pads

    def conv(self, op: _Operator, depthwise: bool):
        o = self.options(op, "DepthwiseConv2DOptions" if depthwise else "Conv2DOptions")
        x = self.activation(op.inputs[0])
        wt = self.t[op.inputs[1]]
        if len(wt.shape) != 4:
            raise _Unsupported(f"the weights '{wt.name}' have shape {list(wt.shape)}")
        in_c = self.t[op.inputs[0]].shape[3]
        if depthwise:
            channels = wt.shape[3]
            if channels % in_c:
                raise _Unsupported(f"{channels} output channels are not a multiple of {in_c} input channels")
            w = self.weight(op.inputs[1], 3, channels)
            sw, sh, act = o.scalar(1, "i", 1), o.scalar(2, "i", 1), o.scalar(4, "b", 0)
            dw, dh = o.scalar(5, "i", 1), o.scalar(6, "i", 1)
        else:
            channels = wt.shape[0]
            if wt.shape[3] != in_c:
                raise _Unsupported(f"the weights take {wt.shape[3]} input channels, the input has {in_c} "
                                   "(grouped convolution)")
            w = self.weight(op.inputs[1], 0, channels)
            sw, sh, act = o.scalar(1, "i", 1), o.scalar(2, "i", 1), o.scalar(3, "b", 0)
            dw, dh = o.scalar(4, "i", 1), o.scalar(5, "i", 1)
        if min(sh, sw, dh, dw) < 1:
            raise _Unsupported(f"stride {sh}x{sw} / dilation {dh}x{dw}")
        kh, kw = wt.shape[1], wt.shape[2]
        pads = self.padding(o.scalar(0, "b", 0), op, kh, kw, sh, sw, dh, dw)
        in_scale = float(self.g.tensors[x].quant.scale[0])
        b = self.bias(op.inputs[2] if len(op.inputs) > 2 else -1, channels, f"op{op.index}", in_scale,
                      self.g.tensors[w].quant.scale)
        if self.t[op.outputs[0]].shape[3] != channels:
            raise _Unsupported(f"the output has {self.t[op.outputs[0]].shape[3]} channels, the weights {channels}")
        attrs = dict(stride=(sh, sw), dilation=(dh, dw), padding=pads, activation=self.activation_of(act))
        if depthwise:
            attrs["depth_multiplier"] = channels // in_c
        self.add_op("depthwise_conv2d" if depthwise else "conv2d", op, [x, w, b], attrs)

    def fully_connected(self, op: _Operator):
        o = self.options(op, "FullyConnectedOptions")
        if o.scalar(1, "b", 0) != 0:
            raise _Unsupported("shuffled weights format")
        x = self.activation(op.inputs[0])
        wt = self.t[op.inputs[1]]
        if len(wt.shape) != 2:
            raise _Unsupported(f"the weights '{wt.name}' have shape {list(wt.shape)}")
        channels, depth = wt.shape
        in_shape, out_shape = self.g.tensors[x].shape, self.g.tensors[self.activation(op.outputs[0])].shape
        rows = int(np.prod(in_shape)) // depth if depth else 0
        if len(in_shape) == 3 and len(out_shape) == 3 and in_shape[-1] == depth:  # keep_num_dims: every row
            if tuple(out_shape) != (1, in_shape[1], channels):
                raise _Unsupported(f"the output shape {list(out_shape)} is not (1, {in_shape[1]}, {channels})")
        elif int(np.prod(in_shape)) != depth:
            raise _Unsupported(f"the input has {int(np.prod(in_shape))} values per sample, "
                               f"the weights take {depth} (batched fully connected)")
        elif int(np.prod(out_shape)) != channels * max(rows, 1):
            raise _Unsupported(f"the output shape {list(out_shape)} does not hold {channels} values")
        w = self.weight(op.inputs[1], 0, channels)
        b = self.bias(op.inputs[2] if len(op.inputs) > 2 else -1, channels, f"op{op.index}",
                      float(self.g.tensors[x].quant.scale[0]), self.g.tensors[w].quant.scale)
        self.add_op("fully_connected", op, [x, w, b], dict(activation=self.activation_of(o.scalar(0, "b", 0))))

    def pool(self, op: _Operator, kind: str):
        o = self.options(op, "Pool2DOptions")
        x = self.activation(op.inputs[0])
        sw, sh, fw, fh = (o.scalar(i, "i", 1) for i in (1, 2, 3, 4))
        if min(sw, sh, fw, fh) < 1:
            raise _Unsupported(f"filter {fh}x{fw}, stride {sh}x{sw}")
        pads = self.padding(o.scalar(0, "b", 0), op, fh, fw, sh, sw)
        self.same_params(op, [op.inputs[0]])
        self.add_op(kind, op, [x], dict(kernel=(fh, fw), stride=(sh, sw), padding=pads, count_include_pad=False,
                                        activation=self.activation_of(o.scalar(5, "b", 0))))

    def same_params(self, op: _Operator, inputs: list[int]):
        """Data-movement ops: TFLite copies int8 values, so inputs and output must share parameters."""
        out = self._per_tensor(self.t[op.outputs[0]], "output")
        for i in inputs:
            p = self._per_tensor(self.t[i], "input")
            if np.float32(p.scale[0]) != np.float32(out.scale[0]) or p.zero_point[0] != out.zero_point[0]:
                raise _Unsupported(f"input '{self.t[i].name}' and the output have different quantization "
                                   "(a requantizing op)")

    def mean(self, op: _Operator):
        x = self.activation(op.inputs[0])
        in_shape = self.t[op.inputs[0]].shape
        rank = len(in_shape)
        axes = sorted({int(a) % rank for a in self.constant(op.inputs[1], np.int32, "axes").reshape(-1)})
        keep = bool(op.options.scalar(0, "?", False)) if op.options is not None else False
        if rank == 4 and axes == [1, 2] and keep:  # TFLite's integer mean over height and width
            self.add_op("mean", op, [x], {})
            return
        if not axes or 0 in axes:
            raise _Unsupported(f"mean over axes {axes} (edgekit reduces non-batch axes)")
        out_p = self._per_tensor(self.t[op.outputs[0]], "output")
        in_p = self.g.tensors[x].quant
        if not keep and np.float32(in_p.scale[0]) == np.float32(out_p.scale[0]) \
                and in_p.zero_point[0] == out_p.zero_point[0]:
            raise _Unsupported("keep_dims=false with identical input and output quantization takes TFLite's "
                               "truncating integer mean, which edgekit does not implement")
        self._reduce(op, x, "reduce_mean", axes, keep)

    def _reduce(self, op: _Operator, x: str, kind: str, axes: list[int], keep: bool):
        """A reduction with its dims kept in the IR; keep_dims=false adds a reshape to the file's shape."""
        if keep:
            self.add_op(kind, op, [x], dict(axes=tuple(axes)))
            return
        kept = tuple(1 if a in axes else s for a, s in enumerate(self.t[op.inputs[0]].shape))
        out = self.g.unique_name(f"{self.t[op.outputs[0]].name}.kept")
        y = self.activation(op.outputs[0])
        self.g.add_tensor(Tensor(out, kept, "int8", quant=self.g.tensors[y].quant))
        self.g.ops.append(Op(kind, out, [x], [out], dict(axes=tuple(axes))))
        self.g.ops.append(Op("reshape", self.t[op.outputs[0]].name or f"op{op.index}", [out], [y], {}))

    def binary(self, op: _Operator, kind: str):
        options = {"add": "AddOptions", "mul": "MulOptions", "sub": "SubOptions"}.get(kind)
        act = "none"
        if options is not None:
            act = self.activation_of(self.options(op, options).scalar(0, "b", 0))
        names, shapes = [], []
        for i in op.inputs[:2]:
            tt = self.t[i]
            if tt.data is not None:
                data = self.constant(i, np.int8, "constant operand")
                rank = len(self.t[op.outputs[0]].shape)
                if data.ndim > rank:
                    raise _Unsupported(f"constant operand of shape {list(data.shape)}")
                data = data.reshape((1,) * (rank - data.ndim) + data.shape)  # numpy-style broadcast from the right
                name = self._name(i)
                if name not in self.g.tensors:
                    self.g.add_tensor(Tensor(name, data.shape, "int8", data, self._per_tensor(tt, "operand")))
                names.append(name)
                shapes.append(data.shape)
                continue
            names.append(self.activation(i))
            shapes.append(self.t[i].shape)
        out_shape = self.t[op.outputs[0]].shape
        if all(self.t[i].data is not None for i in op.inputs[:2]):
            raise _Unsupported("both operands are constants")
        for s in shapes:
            ext = (1,) * (len(out_shape) - len(s)) + tuple(s)
            if len(s) > len(out_shape) or any(a not in (1, b) for a, b in zip(ext, out_shape)):
                raise _Unsupported(f"operand shape {list(s)} does not broadcast to {list(out_shape)}")
            if len(s) not in (len(out_shape),):
                raise _Unsupported(f"operand of rank {len(s)} with an output of rank {len(out_shape)}")
        self.add_op(kind, op, names, {} if kind == "squared_difference" else dict(activation=act))

    def unary(self, op: _Operator, kind: str):
        x = self.activation(op.inputs[0])
        attrs = {}
        if kind == "leaky_relu":
            attrs["alpha"] = float(op.options.scalar(0, "f", 0.0)) if op.options is not None else 0.0
            if attrs["alpha"] < 0:
                raise _Unsupported(f"alpha {attrs['alpha']} < 0")
        if kind == "gelu":
            approximate = bool(op.options.scalar(0, "?", False)) if op.options is not None else False
            attrs["approximate"] = "tanh" if approximate else "none"
        fixed = FIXED_OUTPUT.get(kind)
        if fixed is not None:
            out = self._per_tensor(self.t[op.outputs[0]], "output")
            if abs(float(out.scale[0]) - fixed[0]) > 1e-10 or int(out.zero_point[0]) != fixed[1]:
                raise _Unsupported(f"int8 {kind} needs output scale {fixed[0]} and zero point {fixed[1]}")
        self.add_op(kind, op, [x], attrs)

    def prelu(self, op: _Operator):
        x = self.activation(op.inputs[0])
        tt = self.t[op.inputs[1]]
        data = self.constant(op.inputs[1], np.int8, "slopes")
        rank = len(self.t[op.inputs[0]].shape)
        data = data.reshape((1,) * (rank - data.ndim) + data.shape)
        if data.ndim != rank or any(a not in (1, b) for a, b in zip(data.shape, self.t[op.inputs[0]].shape)):
            raise _Unsupported(f"slopes of shape {list(tt.shape)}")
        name = self._name(op.inputs[1])
        if name not in self.g.tensors:
            self.g.add_tensor(Tensor(name, data.shape, "int8", data, self._per_tensor(tt, "slopes")))
        self.add_op("prelu", op, [x, name], {})

    def bound(self, op: _Operator, which: str):
        """MAXIMUM / MINIMUM of a tensor and a constant with its parameters: a clamp."""
        consts = [i for i in op.inputs[:2] if self.t[i].data is not None]
        tensors = [i for i in op.inputs[:2] if self.t[i].data is None]
        if len(consts) != 1 or len(tensors) != 1:
            raise _Unsupported("only a tensor against one constant (a clamp) is supported")
        value = self.constant(consts[0], np.int8, "bound").reshape(-1)
        if value.size != 1:
            raise _Unsupported("the bound is not a single number")
        x = self.activation(tensors[0])
        self.same_params(op, [tensors[0], consts[0]])
        p = self.g.tensors[x].quant
        real = float(p.scale[0]) * (int(value[0]) - int(p.zero_point[0]))
        self.add_op("clamp", op, [x], dict(lo=real, hi=None) if which == "max" else dict(lo=None, hi=real))

    def pad(self, op: _Operator, v2: bool):
        x = self.activation(op.inputs[0])
        paddings = self.constant(op.inputs[1], np.int32, "paddings")
        if paddings.shape != (4, 2) or paddings[0].any() or paddings[3].any() or (paddings < 0).any():
            raise _Unsupported(f"paddings {paddings.tolist()} (edgekit pads height and width of NHWC)")
        self.same_params(op, [op.inputs[0]])
        value, q = 0.0, None
        if v2 and len(op.inputs) > 2 and op.inputs[2] >= 0:
            q = int(self.constant(op.inputs[2], np.int8, "pad value").reshape(-1)[0])
            p = self.g.tensors[x].quant
            value = float(p.scale[0]) * (q - int(p.zero_point[0]))
        (t, b), (l, r) = paddings[1].tolist(), paddings[2].tolist()
        self.add_op("pad", op, [x], dict(padding=(t, b, l, r), value=value))
        if q is not None:
            self.pad_values[self.g.ops[-1].outputs[0]] = q

    def reshape(self, op: _Operator):
        x = self.activation(op.inputs[0], 6)
        self.same_params(op, [op.inputs[0]])
        if int(np.prod(self.t[op.inputs[0]].shape)) != int(np.prod(self.t[op.outputs[0]].shape)):
            raise _Unsupported("input and output sizes differ")
        self.g.ops.append(Op("reshape", self.t[op.outputs[0]].name or f"op{op.index}", [x],
                             [self.activation(op.outputs[0], 6)], {}))

    # layout ops (issue 10, ops-structure) ----------------------------------------
    def transpose(self, op: _Operator):
        x = self.activation(op.inputs[0], 6)
        perm = [int(p) for p in self.constant(op.inputs[1], np.int32, "permutation").reshape(-1)]
        rank = len(self.t[op.inputs[0]].shape)
        if sorted(perm) != list(range(rank)) or perm[0] != 0:
            raise _Unsupported(f"permutation {perm} (edgekit keeps the batch axis first)")
        self.same_params(op, [op.inputs[0]])
        self.g.ops.append(Op("transpose", self.t[op.outputs[0]].name or f"op{op.index}", [x],
                             [self.activation(op.outputs[0], 6)], dict(perm=tuple(perm))))

    def split(self, op: _Operator, sizes_given: bool):
        x_idx, axis_idx = (op.inputs[0], op.inputs[2]) if sizes_given else (op.inputs[1], op.inputs[0])
        x = self.activation(x_idx, 6)
        rank = len(self.t[x_idx].shape)
        axis = int(self.constant(axis_idx, np.int32, "axis").reshape(-1)[0])
        axis = axis + rank if axis < 0 else axis
        if not 0 < axis < rank:
            raise _Unsupported(f"split along axis {axis}")
        outs = []
        for o in op.outputs:
            self.same_params(dataclasses.replace(op, outputs=[o]), [x_idx])
            outs.append(self.activation(o, 6))
        if sum(self.t[o].shape[axis] for o in op.outputs) != self.t[x_idx].shape[axis]:
            raise _Unsupported("the pieces do not add up to the input")
        self.g.ops.append(Op("split", self.t[op.outputs[0]].name or f"op{op.index}", [x], outs, dict(axis=axis)))

    def transpose_conv(self, op: _Operator):
        o = self.options(op, "TransposeConvOptions")
        if len(op.inputs) < 3:
            raise _Unsupported("it needs output_shape, weights and input")
        x = self.activation(op.inputs[2])
        wt = self.t[op.inputs[1]]
        if len(wt.shape) != 4:
            raise _Unsupported(f"the weights '{wt.name}' have shape {list(wt.shape)}")
        channels, kh, kw, depth = wt.shape
        _, H, W, C = self.t[op.inputs[2]].shape
        _, OH, OW, OC = self.t[op.outputs[0]].shape
        if depth != C or OC != channels:
            raise _Unsupported(f"weights {list(wt.shape)} for {C} input and {OC} output channels")
        w = self.weight(op.inputs[1], 0, channels)
        sw, sh = o.scalar(1, "i", 1), o.scalar(2, "i", 1)
        if min(sh, sw) < 1 or (len(op.inputs) > 4 and op.inputs[4] >= 0) or o.scalar(3, "b", 0) != S.ACT_NONE:
            raise _Unsupported(f"stride {sh}x{sw}, or a fused activation")
        same = o.scalar(0, "b", 0) == S.SAME

        def pad(out_size, k, s):
            computed = (out_size + s - 1) // s if same else (out_size - k + s) // s
            return max((computed - 1) * s + k - out_size, 0) // 2

        top, left = pad(OH, kh, sh), pad(OW, kw, sw)
        b = self.bias(op.inputs[3] if len(op.inputs) > 3 else -1, channels, f"op{op.index}",
                      float(self.g.tensors[x].quant.scale[0]), self.g.tensors[w].quant.scale)
        pads = (top, (H - 1) * sh + kh - OH - top, left, (W - 1) * sw + kw - OW - left)
        self.add_op("transpose_conv2d", op, [x, w, b], dict(stride=(sh, sw), padding=pads, activation="none"))

    def resize_bilinear(self, op: _Operator):
        x = self.activation(op.inputs[0])
        size = self.constant(op.inputs[1], np.int32, "size").reshape(-1).tolist()
        o = op.options
        align, half = (o.scalar(2, "?", False), o.scalar(3, "?", False)) if o is not None else (False, False)
        align, half = bool(align), bool(half)
        if len(self.t[op.inputs[0]].shape) != 4 or list(self.t[op.outputs[0]].shape[1:3]) != size:
            raise _Unsupported(f"resize of {list(self.t[op.inputs[0]].shape)} to {size}")
        self.same_params(op, [op.inputs[0]])
        self.add_op("resize_bilinear", op, [x], dict(align_corners=align, half_pixel_centers=half))

    def refuse_sum(self):
        raise _Unsupported("int8 SUM is not supported: tflite-runtime's kernel casts its float result to int8 "
                           "without saturating, which edgekit does not reproduce; edgekit writes a sum as MEAN "
                           "followed by MUL by the count")

    def reduce_max(self, op: _Operator, kind: str = "reduce_max"):
        x = self.activation(op.inputs[0])
        rank = len(self.t[op.inputs[0]].shape)
        axes = sorted({int(a) % rank for a in self.constant(op.inputs[1], np.int32, "axes").reshape(-1)})
        keep = bool(op.options.scalar(0, "?", False)) if op.options is not None else False
        if not axes or 0 in axes or axes != list(range(axes[0], axes[-1] + 1)):
            raise _Unsupported(f"{kind[7:]} over axes {axes} (edgekit reduces neighbouring non-batch axes)")
        self.same_params(op, [op.inputs[0]])
        self._reduce(op, x, kind, axes, keep)

    def resize_nearest(self, op: _Operator):
        x = self.activation(op.inputs[0])
        size = self.constant(op.inputs[1], np.int32, "size").reshape(-1).tolist()
        o = op.options
        align, half = (o.scalar(0, "?", False), o.scalar(1, "?", False)) if o is not None else (False, False)
        align, half = bool(align), bool(half)
        if align:
            raise _Unsupported("align_corners=true (edgekit resizes with align_corners off)")
        if len(self.t[op.inputs[0]].shape) != 4 or list(self.t[op.outputs[0]].shape[1:3]) != size:
            raise _Unsupported(f"resize of {list(self.t[op.inputs[0]].shape)} to {size}")
        self.same_params(op, [op.inputs[0]])
        self.add_op("resize_nearest", op, [x], dict(half_pixel_centers=half))

    def log_softmax(self, op: _Operator):
        x = self.activation(op.inputs[0])
        out = self._per_tensor(self.t[op.outputs[0]], "output")
        if abs(float(out.scale[0]) - 16.0 / 256) > 1e-8 or int(out.zero_point[0]) != 127:
            raise _Unsupported("int8 log_softmax needs output scale 16/256 and zero point 127")
        self.add_op("log_softmax", op, [x], {})

    def strided_slice(self, op: _Operator):
        x = self.activation(op.inputs[0], 6)
        shape = self.t[op.inputs[0]].shape
        begin, end, strides = (self.constant(i, np.int32, w).reshape(-1).astype(int).tolist()
                               for i, w in zip(op.inputs[1:4], ("begin", "end", "strides")))
        o = op.options
        masks = [o.scalar(i, "i", 0) if o is not None else 0 for i in range(5)]
        if any(masks[2:]) or (o is not None and o.scalar(5, "?", False)):
            raise _Unsupported("ellipsis, new-axis, shrink-axis masks or offset (edgekit slices with begin / end "
                               "masks)")
        if not len(begin) == len(end) == len(strides) == len(shape) or min(strides) < 1:
            raise _Unsupported(f"begin {begin}, end {end}, strides {strides} (positive strides, every axis)")
        for k, size in enumerate(shape):
            b = 0 if masks[0] >> k & 1 else (begin[k] + size if begin[k] < 0 else begin[k])
            e = size if masks[1] >> k & 1 else (end[k] + size if end[k] < 0 else end[k])
            begin[k], end[k] = min(max(b, 0), size), min(max(e, 0), size)
        if (begin[0], end[0], strides[0]) != (0, 1, 1):
            raise _Unsupported("slicing the batch axis")
        self.same_params(op, [op.inputs[0]])
        self.g.ops.append(Op("slice", self.t[op.outputs[0]].name or f"op{op.index}", [x],
                             [self.activation(op.outputs[0], 6)],
                             dict(begin=tuple(begin), end=tuple(end), strides=tuple(strides))))

    def concat(self, op: _Operator):
        o = self.options(op, "ConcatenationOptions")
        if o.scalar(1, "b", 0) != S.ACT_NONE:
            raise _Unsupported("a fused activation on concatenation")
        xs = []
        for i in op.inputs:  # a constant part (a class token): int8 data with the shared parameters
            if self.t[i].data is None:
                xs.append(self.activation(i))
                continue
            name = self._name(i)
            if name not in self.g.tensors:
                data = self.constant(i, np.int8, "constant part")
                self.g.add_tensor(Tensor(name, (1,) * (len(self.t[op.outputs[0]].shape) - data.ndim) + data.shape,
                                         "int8", data, self._per_tensor(self.t[i], "constant part")))
            xs.append(name)
        self.same_params(op, op.inputs)
        rank = len(self.t[op.outputs[0]].shape)
        axis = o.scalar(0, "i", 0)
        axis = axis + rank if axis < 0 else axis
        if not 0 < axis < rank:
            raise _Unsupported(f"concatenation along axis {axis}")
        self.add_op("concat", op, xs, dict(axis=axis))

    def softmax(self, op: _Operator):
        o = self.options(op, "SoftmaxOptions")
        x = self.activation(op.inputs[0])
        out = self._per_tensor(self.t[op.outputs[0]], "output")
        if abs(float(out.scale[0]) - 1.0 / 256) > 1e-8 or int(out.zero_point[0]) != -128:
            raise _Unsupported("int8 softmax needs output scale 1/256 and zero point -128")
        self.add_op("softmax", op, [x], dict(beta=float(o.scalar(0, "f", 1.0))))

    def batch_matmul(self, op: _Operator):
        o = self.options(op, "BatchMatMulOptions")
        names = []
        for i in op.inputs[:2]:
            tt = self.t[i]
            if tt.data is None:
                names.append(self.activation(i))
                continue
            data = self.constant(i, np.int8, "constant operand")
            name = self._name(i)
            if name not in self.g.tensors:
                self.g.add_tensor(Tensor(name, data.shape, "int8", data, self._per_tensor(tt, "operand")))
            names.append(name)
        if self.t[op.inputs[0]].data is not None:
            raise _Unsupported("a constant left operand")
        self.add_op("batch_matmul", op, names, dict(adj_x=bool(o.scalar(0, "?", False)),
                                                    adj_y=bool(o.scalar(1, "?", False))))

    def lstm(self, op: _Operator):
        """UNIDIRECTIONAL_SEQUENCE_LSTM, integer 8x8->16: the gate matrices and biases gathered into
        the IR's (4H, .) tensors in torch's gate order, one weight scale per gate matrix."""
        o = self.options(op, "UnidirectionalSequenceLSTMOptions")
        ins = list(op.inputs) + [-1] * (24 - len(op.inputs))
        if o.scalar(0, "b", 0) != S.ACT_TANH or o.scalar(1, "f", 0.0) or o.scalar(2, "f", 0.0) or o.scalar(3, "?", 0):
            raise _Unsupported("only tanh cells without clipping, batch-major, are supported")
        if any(ins[k] >= 0 for k in (9, 10, 11, 16, 17, 20, 21, 22, 23)):
            raise _Unsupported("peephole, projection or layer-norm LSTMs are not supported")
        if any(ins[k] < 0 for k in range(1, 9)):
            raise _Unsupported("a CIFG LSTM (no input gate) is not supported")
        x = self.activation(ins[0])
        in_q = self.g.tensors[x].quant
        hidden = self.t[ins[5]].shape[0]

        def gathered(positions, what):
            datas, scales = [], []
            for k in (ins[p] for p in positions):
                tt = self.t[k]
                datas.append(self.constant(k, np.int8, what))
                scales.append(np.repeat(self._per_tensor(tt, what).scale, tt.shape[0]))
                if tt.zero_point is not None and np.any(tt.zero_point != 0):
                    raise _Unsupported(f"the {what} '{tt.name}' are asymmetric")
            scale = np.concatenate(scales)
            data = np.concatenate(datas)
            name = self.g.unique_name(f"{self.t[op.outputs[0]].name}.{what.replace(' ', '_')}")
            self.g.add_tensor(Tensor(name, data.shape, "int8", data, QuantParams(scale, np.zeros(scale.size, np.int64))))
            return name, scale

        w_ih, x_scales = gathered(range(1, 5), "input weights")
        w_hh, _ = gathered(range(5, 9), "recurrent weights")
        bias = np.concatenate([self.constant(ins[p], np.int32, "gate bias").reshape(-1) for p in range(12, 16)])
        b_scales = np.array([float(np.float32(float(in_q.scale[0]) * float(np.float32(s)))) for s in x_scales])
        b_name = self.g.unique_name(f"{self.t[op.outputs[0]].name}.bias")
        self.g.add_tensor(Tensor(b_name, bias.shape, "int32", bias, QuantParams(b_scales, np.zeros(bias.size, np.int64))))
        cell = self.t[ins[19]]
        if cell.type != S.INT16 or cell.scale is None or cell.scale.size != 1:
            raise _Unsupported("the cell state is not an int16 tensor with one scale")
        cell_scale = int(round(float(np.log2(cell.scale[0]))))
        if abs(2.0 ** cell_scale - float(cell.scale[0])) > 1e-9 * float(cell.scale[0]) or not -15 <= cell_scale <= -9:
            raise _Unsupported(f"the cell state's scale {cell.scale[0]} is not a power of two in [2^-15, 2^-9]")
        out_q = self._per_tensor(self.t[op.outputs[0]], "output")
        state_q = self._per_tensor(self.t[ins[18]], "output state")
        if (float(state_q.scale[0]), int(state_q.zero_point[0])) != (float(out_q.scale[0]), int(out_q.zero_point[0])):
            raise _Unsupported("the output state and the output have different quantization parameters")
        self.add_op("lstm", op, [x, w_ih, w_hh, b_name], dict(hidden=hidden, cell_scale=cell_scale))

    def relu(self, op: _Operator, kind: str):
        x = self.activation(op.inputs[0])
        self.same_params(op, [op.inputs[0]])
        self.add_op(kind, op, [x], {})

    def run(self, op: _Operator):
        c = op.code
        if not op.outputs or not op.inputs:
            raise _Unsupported("it has no inputs or outputs")
        handlers = {S.CONV_2D: lambda: self.conv(op, False), S.DEPTHWISE_CONV_2D: lambda: self.conv(op, True),
                    S.FULLY_CONNECTED: lambda: self.fully_connected(op),
                    S.AVERAGE_POOL_2D: lambda: self.pool(op, "avg_pool2d"),
                    S.MAX_POOL_2D: lambda: self.pool(op, "max_pool2d"), S.MEAN: lambda: self.mean(op),
                    S.ADD: lambda: self.binary(op, "add"), S.MUL: lambda: self.binary(op, "mul"),
                    S.PAD: lambda: self.pad(op, False), S.PADV2: lambda: self.pad(op, True),
                    S.RESHAPE: lambda: self.reshape(op), S.CONCATENATION: lambda: self.concat(op),
                    S.SOFTMAX: lambda: self.softmax(op), S.RELU: lambda: self.relu(op, "relu"),
                    S.RELU6: lambda: self.relu(op, "relu6"),
                    S.SUB: lambda: self.binary(op, "sub"),
                    S.SQUARED_DIFFERENCE: lambda: self.binary(op, "squared_difference"),
                    S.LOGISTIC: lambda: self.unary(op, "logistic"), S.TANH: lambda: self.unary(op, "tanh"),
                    S.HARD_SWISH: lambda: self.unary(op, "hard_swish"), S.ELU: lambda: self.unary(op, "elu"),
                    S.GELU: lambda: self.unary(op, "gelu"), S.RSQRT: lambda: self.unary(op, "rsqrt"), S.LEAKY_RELU: lambda: self.unary(op, "leaky_relu"),
                    S.PRELU: lambda: self.prelu(op), S.MAXIMUM: lambda: self.bound(op, "max"),
                    S.MINIMUM: lambda: self.bound(op, "min")}
        handlers.update({S.TRANSPOSE: lambda: self.transpose(op), S.SPLIT: lambda: self.split(op, False),
                         S.SPLIT_V: lambda: self.split(op, True), S.STRIDED_SLICE: lambda: self.strided_slice(op),
                         S.LOG_SOFTMAX: lambda: self.log_softmax(op),
                         S.RESIZE_NEAREST_NEIGHBOR: lambda: self.resize_nearest(op),
                         S.TRANSPOSE_CONV: lambda: self.transpose_conv(op),
                         S.RESIZE_BILINEAR: lambda: self.resize_bilinear(op),
                         S.REDUCE_MAX: lambda: self.reduce_max(op),
                         S.REDUCE_MIN: lambda: self.reduce_max(op, "reduce_min"),
                         S.SUM: lambda: self.refuse_sum(),
                         S.BATCH_MATMUL: lambda: self.batch_matmul(op),
                         S.UNIDIRECTIONAL_SEQUENCE_LSTM: lambda: self.lstm(op)})
        if c not in handlers:
            raise _Unsupported("edgekit has no kernel for it")
        handlers[c]()


def _describe(op: _Operator, tensors: list[_Tensor]) -> str:
    out = tensors[op.outputs[0]].name if op.outputs else "?"
    return f"operator {op.index} {_code_name(op.code)} (output '{out}')"


def load_tflite(path) -> Graph:
    """Read an int8 ``.tflite`` file into a quantized IR graph."""
    path = Path(path)
    if not path.exists():
        raise EdgekitError(f"model file not found: {path}")
    buf = path.read_bytes()
    try:
        tensors, ops, inputs, outputs, num_subgraphs = _parse(buf)
    except (S.FlatBufferError, struct.error, ValueError, OverflowError, MemoryError) as exc:
        raise EdgekitError(f"{path} is not a valid .tflite file (truncated or corrupted?): {exc}") from None
    if num_subgraphs > 1:
        raise EdgekitError(f"{path}: the model has {num_subgraphs} subgraphs (control flow); edgekit runs one")

    imp = _Importer(tensors, ops)
    # QUANTIZE of a float graph input / DEQUANTIZE to a graph output are the float edges.
    graph_in, graph_out = list(inputs), list(outputs)
    body = []
    problems = []
    for op in ops:
        if op.code == S.QUANTIZE and len(op.inputs) == 1 and op.inputs[0] in inputs \
                and tensors[op.inputs[0]].type == S.FLOAT32:
            graph_in[graph_in.index(op.inputs[0])] = op.outputs[0]
        elif op.code == S.DEQUANTIZE and len(op.outputs) == 1 and op.outputs[0] in outputs \
                and tensors[op.outputs[0]].type == S.FLOAT32:
            graph_out[graph_out.index(op.outputs[0])] = op.inputs[0]
        elif op.code in (S.QUANTIZE, S.DEQUANTIZE):
            problems.append(f"{_describe(op, tensors)}: {_code_name(op.code)} inside the graph "
                            "(edgekit takes QUANTIZE only at inputs and DEQUANTIZE only at outputs)")
        else:
            body.append(op)
    try:
        for idx in graph_in:
            imp.g.inputs.append(imp.activation(idx))
    except _Unsupported as exc:
        problems.append(f"graph input: {exc}")
    for op in body:
        try:
            imp.run(op)
        except _Unsupported as exc:
            problems.append(f"{_describe(op, tensors)}: {exc}")
        except (ValueError, IndexError, KeyError, TypeError, OverflowError, struct.error, S.FlatBufferError) as exc:
            problems.append(f"{_describe(op, tensors)}: malformed ({type(exc).__name__}: {exc})")
    if problems:
        raise EdgekitError(f"{path}: {len(problems)} operator(s) edgekit cannot run:\n  " + "\n  ".join(problems) +
                           f"\nSupported: {SUPPORTED}.")
    g = imp.g
    produced = {o for op in g.ops for o in op.outputs} | set(g.inputs)
    for op in g.ops:
        for n in op.inputs:
            if n not in produced and not g.tensors[n].is_constant:
                raise EdgekitError(f"{path}: layer '{op.name}' reads '{n}' before any operator writes it "
                                   "(operators out of order)")
    for idx in graph_out:
        name = imp.names.get(idx)
        if name is None or name not in produced:
            raise EdgekitError(f"{path}: graph output '{tensors[idx].name}' is not produced by any operator")
        g.outputs.append(name)
    for name in g.inputs + g.outputs:
        g.source_layouts[name] = {4: "NHWC", 3: "NLC"}.get(len(g.tensors[name].shape), "NC")
    g.meta["source"] = "tflite"
    try:
        derive_kernel_params(g)
    except (ValueError, OverflowError, ZeroDivisionError) as exc:
        raise EdgekitError(f"{path}: quantization parameters out of range: {exc}") from None
    for op in g.ops:
        if op.kind == "pad" and op.outputs[0] in imp.pad_values:
            op.attrs["pad_value"] = imp.pad_values[op.outputs[0]]
    return g
