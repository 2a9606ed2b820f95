"""ONNX -> float IR: the same ops, layouts and weights the PyTorch frontend produces.

Nodes are walked in the file's (topological) order. Activations change layout on the way in, as in
``frontends/pytorch.py``: NCHW becomes NHWC, NCL becomes (1, 1, L, C); conv weights become OHWI
(depthwise: 1HWO). A Flatten of a spatial tensor keeps NHWC order in memory and the Gemm / MatMul
that reads it gets its weight columns permuted instead.

Constant subgraphs (what exporters emit to compute a pad or a reshape target: Constant, Shape of a
static tensor, Gather, Concat, Cast, ...) are evaluated here with onnx's own reference evaluator, so
only the ops that compute on activations need a handler: one small function per ONNX op, registered
with ``@handles("OpType")``.

A QDQ model (onnxruntime.quantization's ``quantize_static``) keeps its own quantization: a
QuantizeLinear -> DequantizeLinear pair on an activation records its scale and zero point
(``graph.meta["activation_params"]``, uint8 shifted to int8 with the same real values), and a
dequantized int8 weight records its scales (``graph.meta["weight_params"]``); the quantizer then uses
them instead of the calibrated ones.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import EdgekitError
from ..ir import Graph, Op, Tensor, conv_output_size

SUPPORTED_OPS = (
    "Conv (1-D and 2-D; groups 1 or depthwise), Gemm, MatMul (+ Add of a bias), BatchNormalization, Relu, "
    "Clip (0..6, 0..inf), MaxPool, AveragePool, GlobalAveragePool, Pad (constant), Flatten / Reshape (to "
    "(N, features)), Add, Concat, Softmax, Dropout, Identity, QuantizeLinear / DequantizeLinear (QDQ models), "
    "and constant subgraphs (Constant, Shape, Gather, Concat, Cast, ...: evaluated at load time)"
)

HANDLERS: dict[str, Callable] = {}


def handles(*op_types: str):
    """Register a function converting the named ONNX op(s): ``fn(converter, node)``."""
    def register(fn):
        for t in op_types:
            HANDLERS[t] = fn
        return fn
    return register


# Ops whose output is known at load time although their input is an activation (static shapes).
STATIC_OUTPUT = ("Shape",)


class _Value:
    """An activation: its IR tensor, the rank it has in ONNX (4: NCHW, 3: NCL, 2: NC) and, for a
    flattened spatial tensor, the permutation IR position -> ONNX position."""

    def __init__(self, name: str, rank: int, perm: np.ndarray | None = None):
        self.name, self.rank, self.perm = name, rank, perm


def load_onnx(path) -> Graph:
    """Read an ``.onnx`` file (or an ``onnx.ModelProto``) into a float IR graph."""
    import onnx

    if isinstance(path, (str, Path)):
        path = Path(path)
        if not path.exists():
            raise EdgekitError(f"model file not found: {path}")
        try:
            model = onnx.load(str(path))
        except Exception as exc:  # protobuf raises several kinds
            raise EdgekitError(f"{path} is not a readable ONNX model: {str(exc).splitlines()[0] if str(exc) else exc}") \
                from None
    else:
        model = path
    return _Converter(model).run()


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def layer_name(node) -> str:
    """The source layer of a node: exporters name nodes by module path ("/stem/stem.0/Conv" -> "stem.0")."""
    parts = [p for p in node.name.split("/") if p]
    if len(parts) >= 2:
        return parts[-2]
    if parts:  # an op outside any module ("/Add_1"): named like torch names it ("add_1")
        return parts[0].lower()
    return node.output[0] if node.output else node.op_type.lower()


class _Converter:
    def __init__(self, model):
        from onnx import numpy_helper

        self.model = model
        self.onnx_graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        self.graph = Graph()
        self.values: dict[str, _Value] = {}
        self.consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in self.onnx_graph.initializer}
        self.const_quant: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}  # dequantized constant -> (s, zp, axis)
        self.quantized: dict[str, tuple[_Value, float, int]] = {}  # QuantizeLinear output -> (value, s, zp)
        self.producer: dict[str, Op] = {}

    # -- errors ------------------------------------------------------------
    def unsupported(self, node, why: str) -> EdgekitError:
        return EdgekitError(f"ONNX node '{node.name or node.output[0]}' ({node.op_type}) {why}.\n"
                            f"edgekit supports: {SUPPORTED_OPS}.")

    def _check_supported(self):
        """Every op that computes on activations needs a handler: list all that have none, at once."""
        known = set(self.consts) | {""}
        unsupported = []
        for node in self.onnx_graph.node:
            if all(i in known for i in node.input) or node.op_type in STATIC_OUTPUT:
                known.update(node.output)  # evaluated at load time
            elif node.op_type not in HANDLERS:
                unsupported.append(f"{node.op_type} ('{node.name or node.output[0]}')")
        if unsupported:
            raise EdgekitError(f"the ONNX model uses {len(unsupported)} unsupported operation"
                               f"{'s' if len(unsupported) > 1 else ''}: {', '.join(unsupported)}.\n"
                               f"edgekit supports: {SUPPORTED_OPS}.")

    # -- values ------------------------------------------------------------
    def value(self, name: str, node) -> _Value:
        v = self.values.get(name)
        if v is None:
            if name in self.quantized:
                raise self.unsupported(node, "reads a QuantizeLinear output directly (edgekit reads QDQ pairs)")
            raise self.unsupported(node, f"reads '{name}', which is not an activation edgekit computes")
        return v

    def const(self, name: str, node, what: str) -> np.ndarray | None:
        if name == "":
            return None
        if name not in self.consts:
            raise self.unsupported(node, f"has its {what} computed at run time, not a constant")
        data = self.consts[name]
        if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
            raise EdgekitError(f"ONNX node '{node.name}' has {int(np.sum(~np.isfinite(data)))} NaN or inf values in "
                               f"its {what}; fix the model before deploying")
        return data

    def is_const(self, name: str) -> bool:
        return name == "" or name in self.consts

    def shape(self, v: _Value) -> tuple[int, ...]:
        return self.graph.tensors[v.name].shape

    def onnx_shape(self, v: _Value) -> list[int]:
        s = self.shape(v)
        return {4: [1, s[3], s[1], s[2]], 3: [1, s[3], s[2]]}.get(v.rank, list(s))

    def new_tensor(self, base: str, shape, data=None) -> str:
        name = self.graph.unique_name(base)
        self.graph.add_tensor(Tensor(name, tuple(int(s) for s in shape), "float32",
                                     None if data is None else np.ascontiguousarray(data, dtype=np.float32)))
        return name

    def add_op(self, kind: str, node, inputs, out_shape, rank: int, attrs=None, perm=None) -> _Value:
        layer = layer_name(node)
        out = self.new_tensor(layer, out_shape)
        op = Op(kind, layer, list(inputs), [out], dict(attrs or {}))
        self.graph.ops.append(op)
        self.producer[out] = op
        v = _Value(out, rank, perm)
        self.values[node.output[0]] = v
        return v

    def alias(self, node, v: _Value) -> None:
        self.values[node.output[0]] = v

    def require_plain(self, v: _Value, node) -> None:
        if v.perm is not None:
            raise self.unsupported(node, "reads the flattened output of a spatial tensor; edgekit keeps NHWC order "
                                         "and can remap it only into a Gemm / MatMul")

    def ir_axis(self, v: _Value, axis: int, node) -> int:
        axis = axis % v.rank
        if v.rank == 4:
            return {0: 0, 1: 3, 2: 1, 3: 2}[axis]
        if v.rank == 3:
            return {0: 0, 1: 3, 2: 2}[axis]
        if v.rank == 2:
            return axis
        raise self.unsupported(node, f"works on a rank-{v.rank} tensor")

    def weight_params(self, onnx_name: str, ir_name: str, channels: int, channel_axis: int) -> None:
        """Keep a QDQ weight's own scales (per output channel) for the quantizer."""
        if onnx_name not in self.const_quant:
            return
        scale, zp, axis = self.const_quant[onnx_name]
        if np.any(zp != 0):
            return  # asymmetric weights: edgekit's weights are symmetric, it chooses its own scales
        if scale.size == 1:
            scale = np.full(channels, float(scale.reshape(-1)[0]))
        elif axis != channel_axis or scale.size != channels:
            return  # scales along another axis than the output channels: edgekit chooses its own
        self.graph.meta.setdefault("weight_params", {})[ir_name] = np.asarray(scale, np.float64).reshape(-1)

    # -- the walk ----------------------------------------------------------
    def run(self) -> Graph:
        self._check_supported()
        initializers = set(self.consts)
        for inp in self.onnx_graph.input:
            if inp.name not in initializers:
                self._input(inp)
        for node in self.onnx_graph.node:
            if all(self.is_const(i) for i in node.input) and node.op_type != "DequantizeLinear":
                self._fold(node)
            else:
                HANDLERS[node.op_type](self, node)
        for out in self.onnx_graph.output:
            v = self.values.get(out.name)
            if v is None:
                raise EdgekitError(f"the ONNX model's output '{out.name}' is a constant or is not computed by "
                                   "supported operations")
            if v.perm is not None:
                raise EdgekitError(f"the ONNX model's output '{out.name}' is a flattened spatial tensor; "
                                   "edgekit returns only (N, features) from a Gemm / MatMul or NCHW tensors")
            self.graph.outputs.append(v.name)
            self.graph.source_layouts[v.name] = {4: "NCHW", 3: "NCL", 2: "NC"}[v.rank]
        return self.graph

    def _input(self, inp):
        dims = inp.type.tensor_type.shape.dim
        shape = [d.dim_value if d.HasField("dim_value") else None for d in dims]
        if len(shape) and shape[0] is None:
            shape[0] = 1  # a symbolic batch size: edgekit runs one sample at a time
        if any(s is None or s < 1 for s in shape[1:]):
            raise EdgekitError(f"the ONNX model's input '{inp.name}' has shape {shape}: edgekit needs fixed sizes "
                               "except the batch")
        if len(shape) == 4:
            ir_shape, layout = (1, shape[2], shape[3], shape[1]), "NCHW"
        elif len(shape) == 3:
            ir_shape, layout = (1, 1, shape[2], shape[1]), "NCL"
        elif len(shape) == 2:
            ir_shape, layout = (1, shape[1]), "NC"
        else:
            raise EdgekitError(f"the ONNX model's input '{inp.name}' has shape {shape}; edgekit takes (N, C, H, W), "
                               "(N, C, L) or (N, features)")
        name = self.new_tensor(inp.name, ir_shape)
        self.graph.inputs.append(name)
        self.graph.source_layouts[name] = layout
        self.values[inp.name] = _Value(name, len(shape))

    def _fold(self, node):
        """A node on constants only: evaluate it now with onnx's reference implementation."""
        from onnx.reference import ReferenceEvaluator

        try:
            inputs = {i: self.consts[i] for i in node.input if i}
            results = ReferenceEvaluator(node, opsets={"": self.opset}).run(None, inputs)
        except Exception as exc:
            raise self.unsupported(node, f"computes on constants and could not be evaluated: {exc}") from None
        for name, data in zip(node.output, results):
            self.consts[name] = np.asarray(data)


# ---------------------------------------------------------------------------
# One function per ONNX op
# ---------------------------------------------------------------------------

def _conv_pads(pads, n: int) -> list[int]:
    """ONNX pads: the begins of the ``n`` spatial axes, then their ends."""
    return list(pads) if pads else [0] * (2 * n)


def _auto_pads(node, auto_pad, sizes, kernel, stride, dilation) -> list[int] | None:
    """Explicit pads (begins then ends) for SAME_UPPER / SAME_LOWER / VALID."""
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("NOTSET", ""):
        return None
    if auto_pad == "VALID":
        return [0] * (2 * len(sizes))
    begins, ends = [], []
    for size, k, s, d in zip(sizes, kernel, stride, dilation):
        out = -(-size // s)
        total = max(0, (out - 1) * s + d * (k - 1) + 1 - size)
        small, large = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return begins + ends


@handles("Conv")
def _conv(c: _Converter, node):
    a = _attrs(node)
    v = c.value(node.input[0], node)
    c.require_plain(v, node)
    weight = c.const(node.input[1], node, "weight").astype(np.float32)
    bias = c.const(node.input[2], node, "bias") if len(node.input) > 2 else None
    if weight.ndim == 3:  # Conv1d: (O, I, K) over (N, C, L), held as a 1 x L image
        if v.rank != 3:
            raise c.unsupported(node, "is a 1-D convolution of a tensor that is not (N, C, L)")
        k = list(a.get("kernel_shape", weight.shape[2:]))
        s, d = list(a.get("strides", [1])), list(a.get("dilations", [1]))
        pads = _auto_pads(node, a.get("auto_pad", "NOTSET"), [c.shape(v)[2]], k, s, d) or _conv_pads(a.get("pads"), 1)
        weight, stride, dilation, pads = weight[:, :, None, :], (1, s[0]), (1, d[0]), (0, 0, pads[0], pads[1])
    elif weight.ndim == 4:
        if v.rank != 4:
            raise c.unsupported(node, "is a 2-D convolution of a tensor that is not (N, C, H, W)")
        k = list(a.get("kernel_shape", weight.shape[2:]))
        s, d = list(a.get("strides", [1, 1])), list(a.get("dilations", [1, 1]))
        p = _auto_pads(node, a.get("auto_pad", "NOTSET"), list(c.shape(v)[1:3]), k, s, d) \
            or _conv_pads(a.get("pads"), 2)
        stride, dilation, pads = tuple(s), tuple(d), (p[0], p[2], p[1], p[3])  # (t, b, l, r)
    else:
        raise c.unsupported(node, f"has a {weight.ndim}-D weight (only 1-D and 2-D convolutions)")
    _, H, W, C = c.shape(v)
    O, I, KH, KW = weight.shape
    OH = conv_output_size(H, KH, stride[0], dilation[0], pads[0], pads[1])
    OW = conv_output_size(W, KW, stride[1], dilation[1], pads[2], pads[3])
    if OH < 1 or OW < 1:
        raise c.unsupported(node, f"has a {KH}x{KW} kernel that does not fit the {H}x{W} input")
    groups = int(a.get("group", 1))
    attrs = dict(stride=stride, dilation=dilation, padding=pads, activation="none")
    if groups == 1:
        kind, ir_weight, axis = "conv2d", weight.transpose(0, 2, 3, 1), 0  # OHWI
    elif groups == C and I == 1 and O % C == 0:
        kind, ir_weight, axis = "depthwise_conv2d", weight.transpose(1, 2, 3, 0), 3  # 1HWO
        attrs["depth_multiplier"] = O // C
    else:
        raise c.unsupported(node, f"is a grouped convolution with group={groups} (only 1 or depthwise, {C})")
    base = layer_name(node)
    w_name = c.new_tensor(f"{base}.weight", ir_weight.shape, ir_weight)
    c.weight_params(node.input[1], w_name, O, 0)
    inputs = [v.name, w_name]
    if bias is not None:
        inputs.append(c.new_tensor(f"{base}.bias", bias.shape, bias))
    c.add_op(kind, node, inputs, (1, OH, OW, O), v.rank, attrs)


def _fully_connected(c: _Converter, node, v: _Value, weight: np.ndarray, bias, weight_source: str | None,
                     out_axis: int):
    """x (N, I) times ``weight`` (O, I); ``out_axis``: the source weight's output-channel axis."""
    if v.rank != 2:
        raise c.unsupported(node, f"multiplies a rank-{v.rank} tensor; flatten it to (N, features) first")
    if weight.shape[1] != c.shape(v)[1]:
        raise c.unsupported(node, f"has a weight for {weight.shape[1]} inputs but reads {c.shape(v)[1]}")
    if v.perm is not None:
        weight = weight[:, v.perm]
    base = layer_name(node)
    w_name = c.new_tensor(f"{base}.weight", weight.shape, weight)
    if weight_source is not None:
        c.weight_params(weight_source, w_name, weight.shape[0], out_axis)
    inputs = [v.name, w_name]
    if bias is not None:
        inputs.append(c.new_tensor(f"{base}.bias", bias.shape, np.broadcast_to(bias, (weight.shape[0],))))
    c.add_op("fully_connected", node, inputs, (1, weight.shape[0]), 2, dict(activation="none"))


@handles("Gemm")
def _gemm(c: _Converter, node):
    a = _attrs(node)
    if a.get("transA", 0):
        raise c.unsupported(node, "transposes its input (transA=1)")
    v = c.value(node.input[0], node)
    b = c.const(node.input[1], node, "weight").astype(np.float32)
    weight = (b if a.get("transB", 0) else b.T) * float(a.get("alpha", 1.0))
    bias = c.const(node.input[2], node, "bias") if len(node.input) > 2 else None
    if bias is not None:
        bias = (bias.astype(np.float32) * float(a.get("beta", 1.0))).reshape(-1)
    honour = node.input[1] if float(a.get("alpha", 1.0)) == 1.0 else None
    _fully_connected(c, node, v, weight, bias, honour, 0 if a.get("transB", 0) else 1)


@handles("MatMul")
def _matmul(c: _Converter, node):
    v = c.value(node.input[0], node)
    w = c.const(node.input[1], node, "weight (the second operand)").astype(np.float32)
    if w.ndim != 2:
        raise c.unsupported(node, "multiplies by a weight that is not a matrix")
    _fully_connected(c, node, v, w.T, None, node.input[1], 1)


@handles("Add")
def _add(c: _Converter, node):
    a, b = node.input
    if c.is_const(a) or c.is_const(b):  # a bias after a MatMul
        v = c.value(b if c.is_const(a) else a, node)
        bias = c.const(a if c.is_const(a) else b, node, "addend").astype(np.float32).reshape(-1)
        prev = c.producer.get(v.name)
        if prev is None or prev.kind != "fully_connected" or len(prev.inputs) != 2 or \
                bias.size not in (1, c.shape(v)[1]) or sum(v.name in op.inputs for op in c.graph.ops) > 0:
            raise c.unsupported(node, "adds a constant that is not the bias of a MatMul")
        prev.inputs.append(c.new_tensor(f"{prev.name}.bias", (c.shape(v)[1],),
                                        np.broadcast_to(bias, (c.shape(v)[1],))))
        c.alias(node, v)
        return
    va, vb = c.value(a, node), c.value(b, node)
    c.require_plain(va, node)
    c.require_plain(vb, node)
    if c.shape(va) != c.shape(vb):
        raise c.unsupported(node, f"adds shapes {c.onnx_shape(va)} and {c.onnx_shape(vb)} (broadcasting)")
    c.add_op("add", node, [va.name, vb.name], c.shape(va), va.rank, dict(activation="none"))


@handles("BatchNormalization")
def _batch_norm(c: _Converter, node):
    v = c.value(node.input[0], node)
    c.require_plain(v, node)
    gamma, beta, mean, var = (c.const(n, node, w).astype(np.float64)
                              for n, w in zip(node.input[1:5], ("scale", "bias", "mean", "variance")))
    scale = gamma / np.sqrt(var + float(_attrs(node).get("epsilon", 1e-5)))
    offset = beta - mean * scale
    base = layer_name(node)
    inputs = [v.name, c.new_tensor(f"{base}.scale", scale.shape, scale),
              c.new_tensor(f"{base}.offset", offset.shape, offset)]
    c.add_op("batch_norm", node, inputs, c.shape(v), v.rank)


@handles("Relu")
def _relu(c: _Converter, node):
    v = c.value(node.input[0], node)
    c.add_op("relu", node, [v.name], c.shape(v), v.rank, perm=v.perm)


@handles("Clip")
def _clip(c: _Converter, node):
    v = c.value(node.input[0], node)
    if c.opset < 11:
        a = _attrs(node)
        lo, hi = a.get("min", -np.inf), a.get("max", np.inf)
    else:
        lo = float(c.const(node.input[1], node, "min")) if len(node.input) > 1 and node.input[1] else -np.inf
        hi = float(c.const(node.input[2], node, "max")) if len(node.input) > 2 and node.input[2] else np.inf
    kinds = {(0.0, 6.0): "relu6", (0.0, np.inf): "relu"}
    if (float(lo), float(hi)) not in kinds:
        raise c.unsupported(node, f"clips to [{lo}, {hi}] (only [0, 6] = ReLU6 and [0, inf] = ReLU)")
    c.add_op(kinds[(float(lo), float(hi))], node, [v.name], c.shape(v), v.rank, perm=v.perm)


def _pool(c: _Converter, node, kind: str):
    a = _attrs(node)
    v = c.value(node.input[0], node)
    c.require_plain(v, node)
    if v.rank != 4:
        raise c.unsupported(node, "pools a tensor that is not (N, C, H, W)")
    if list(a.get("dilations", [1, 1])) != [1, 1]:
        raise c.unsupported(node, "is a dilated pooling")
    if len(node.output) > 1 and node.output[1]:
        raise c.unsupported(node, "also returns the indices")
    _, H, W, C = c.shape(v)
    kh, kw = a["kernel_shape"]
    sh, sw = a.get("strides", [1, 1])
    ceil_mode = bool(a.get("ceil_mode", 0))
    p = _auto_pads(node, a.get("auto_pad", "NOTSET"), [H, W], [kh, kw], [sh, sw], [1, 1]) \
        or _conv_pads(a.get("pads"), 2)
    top, left, bottom, right = p

    def out_size(size, k, s, before, after):
        n = size + before + after - k
        o = (-(-n // s) if ceil_mode else n // s) + 1
        if ceil_mode and (o - 1) * s >= size + before:  # a last window starting in the padding is dropped
            o -= 1
        return o

    OH, OW = out_size(H, kh, sh, top, bottom), out_size(W, kw, sw, left, right)
    if OH < 1 or OW < 1:
        raise c.unsupported(node, f"has a {kh}x{kw} window that does not fit the {H}x{W} input")
    attrs = dict(kernel=(kh, kw), stride=(sh, sw), padding=(top, bottom, left, right), activation="none")
    if kind == "avg_pool2d":
        attrs["count_include_pad"] = bool(a.get("count_include_pad", 0))
    c.add_op(kind, node, [v.name], (1, OH, OW, C), 4, attrs)


@handles("MaxPool")
def _max_pool(c: _Converter, node):
    _pool(c, node, "max_pool2d")


@handles("AveragePool")
def _average_pool(c: _Converter, node):
    _pool(c, node, "avg_pool2d")


@handles("GlobalAveragePool")
def _global_average_pool(c: _Converter, node):
    v = c.value(node.input[0], node)
    c.require_plain(v, node)
    if v.rank != 4:
        raise c.unsupported(node, "pools a tensor that is not (N, C, H, W)")
    c.add_op("mean", node, [v.name], (1, 1, 1, c.shape(v)[3]), 4)


@handles("Pad")
def _pad(c: _Converter, node):
    a = _attrs(node)
    v = c.value(node.input[0], node)
    c.require_plain(v, node)
    mode = a.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "constant":
        raise c.unsupported(node, f"pads in mode {mode!r} (only constant)")
    if c.opset < 11:
        pads, value = list(a["pads"]), float(a.get("value", 0.0))
    else:
        pads = [int(p) for p in c.const(node.input[1], node, "pads")]
        value = float(c.const(node.input[2], node, "value")) if len(node.input) > 2 and node.input[2] else 0.0
    if len(node.input) > 3 and node.input[3]:
        raise c.unsupported(node, "pads selected axes (the axes input)")
    if v.rank != 4 or len(pads) != 8 or any(pads[i] for i in (0, 1, 4, 5)) or any(p < 0 for p in pads):
        raise c.unsupported(node, "pads other than the height and width of an (N, C, H, W) tensor, or crops")
    top, left, bottom, right = pads[2], pads[3], pads[6], pads[7]
    _, H, W, C = c.shape(v)
    c.add_op("pad", node, [v.name], (1, H + top + bottom, W + left + right, C), 4,
             dict(padding=(top, bottom, left, right), value=value))


def _flatten(c: _Converter, node, v: _Value):
    """(N, C, H, W) or (N, C, L) -> (N, features): a reshape in NHWC order; the permutation goes to the
    Gemm that reads it."""
    if v.rank == 2:
        c.alias(node, v)
        return
    _, H, W, C = c.shape(v)
    perm = None
    if H * W > 1 and C > 1:
        h, w, ch = np.meshgrid(np.arange(H), np.arange(W), np.arange(C), indexing="ij")
        perm = (ch * H * W + h * W + w).reshape(-1)
    out = c.new_tensor(layer_name(node), (1, H * W * C))
    op = Op("reshape", layer_name(node), [v.name], [out], {})
    c.graph.ops.append(op)
    c.producer[out] = op
    c.values[node.output[0]] = _Value(out, 2, perm)


@handles("Flatten")
def _flatten_op(c: _Converter, node):
    v = c.value(node.input[0], node)
    if int(_attrs(node).get("axis", 1)) % v.rank != 1 and v.rank != 2:
        raise c.unsupported(node, "flattens from an axis other than 1")
    _flatten(c, node, v)


@handles("Reshape")
def _reshape(c: _Converter, node):
    v = c.value(node.input[0], node)
    target = [int(s) for s in c.const(node.input[1], node, "shape")]
    current = c.onnx_shape(v)
    size = int(np.prod(current))
    if len(target) == 2 and target[0] in (0, 1, -1) and target[1] in (-1, size):
        _flatten(c, node, v)
    elif len(target) == len(current) and all(t in (cur, 0) for t, cur in zip(target, current)):
        c.alias(node, v)
    else:
        raise c.unsupported(node, f"reshapes {current} to {target} (only flattening to (N, features))")


@handles("Concat")
def _concat(c: _Converter, node):
    parts = [c.value(n, node) for n in node.input]
    for p in parts:
        c.require_plain(p, node)
    axis = c.ir_axis(parts[0], int(_attrs(node)["axis"]), node)
    if axis == 0:
        raise c.unsupported(node, "concatenates along the batch dimension")
    shape = list(c.shape(parts[0]))
    for p in parts[1:]:
        s = c.shape(p)
        if len(s) != len(shape) or any(s[i] != shape[i] for i in range(len(s)) if i != axis):
            raise c.unsupported(node, "concatenates tensors that differ in a dimension other than the joined one")
    shape[axis] = sum(c.shape(p)[axis] for p in parts)
    c.add_op("concat", node, [p.name for p in parts], tuple(shape), parts[0].rank, dict(axis=axis))


@handles("Softmax")
def _softmax(c: _Converter, node):
    v = c.value(node.input[0], node)
    c.require_plain(v, node)
    axis = int(_attrs(node).get("axis", -1 if c.opset >= 13 else 1))
    if c.ir_axis(v, axis, node) != len(c.shape(v)) - 1 or (c.opset < 13 and v.rank != 2):
        raise c.unsupported(node, "is a softmax over another axis than the channels / features")
    c.add_op("softmax", node, [v.name], c.shape(v), v.rank, dict(beta=1.0))


@handles("Dropout", "Identity")
def _identity(c: _Converter, node):
    c.alias(node, c.value(node.input[0], node))


@handles("Shape")
def _shape(c: _Converter, node):
    a = _attrs(node)
    shape = np.array(c.onnx_shape(c.value(node.input[0], node)), np.int64)
    c.consts[node.output[0]] = shape[a.get("start", 0):a.get("end", len(shape))]


# QDQ: a QuantizeLinear -> DequantizeLinear pair on an activation is its quantization parameters.

def _qparams(c: _Converter, node) -> tuple[np.ndarray, np.ndarray]:
    scale = c.const(node.input[1], node, "scale").astype(np.float64)
    zp = c.const(node.input[2], node, "zero point") if len(node.input) > 2 and node.input[2] else \
        np.zeros(scale.shape, np.int8)
    if zp.dtype == np.uint8:  # the same real values as int8 with the zero point moved by 128
        zp = zp.astype(np.int64) - 128
    elif zp.dtype != np.int8 and zp.dtype != np.int32:
        raise c.unsupported(node, f"quantizes to {zp.dtype} (edgekit runs int8)")
    return scale, zp.astype(np.int64)


@handles("QuantizeLinear")
def _quantize_linear(c: _Converter, node):
    v = c.value(node.input[0], node)
    scale, zp = _qparams(c, node)
    if scale.size != 1:
        raise c.unsupported(node, "quantizes an activation per channel (edgekit: one scale per activation)")
    c.quantized[node.output[0]] = (v, float(scale.reshape(-1)[0]), int(zp.reshape(-1)[0]))


@handles("DequantizeLinear")
def _dequantize_linear(c: _Converter, node):
    source = node.input[0]
    if c.is_const(source):  # a quantized weight or bias: its real values, and its scales for the quantizer
        q = c.const(source, node, "quantized data")
        scale, zp = _qparams(c, node)
        axis = int(_attrs(node).get("axis", 1))
        shape = [1] * q.ndim
        if scale.size > 1:
            shape[axis % q.ndim] = -1
        raw_zp = zp + (128 if q.dtype == np.uint8 else 0)
        c.consts[node.output[0]] = ((q.astype(np.float64) - raw_zp.reshape(shape)) * scale.reshape(shape)
                                    ).astype(np.float32)
        c.const_quant[node.output[0]] = (scale.reshape(-1), zp.reshape(-1), axis % max(q.ndim, 1))
        return
    if source not in c.quantized:
        raise c.unsupported(node, "dequantizes a tensor that no QuantizeLinear produced")
    v, scale, zp = c.quantized[source]
    if zp < -128 or zp > 127:
        raise c.unsupported(node, f"uses zero point {zp}, outside int8")
    c.graph.meta.setdefault("activation_params", {})[v.name] = (scale, zp)
    c.alias(node, v)
