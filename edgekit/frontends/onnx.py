"""ONNX -> float IR, through the PyTorch frontend's own lowering.

An ONNX node is the ATen op torch.onnx.export made it from, with its attributes spelled differently. So
each ONNX op here only translates its attributes into the arguments of the matching ATen op and hands
the node, dressed as a torch.fx node (``_Node``), to the PyTorch frontend's handler for it
(``frontends/pytorch.py``): the same layouts (NCHW -> NHWC, an (N, C, L) signal -> (1, L, C), a
permute as a relabelling, a flattened spatial tensor read by a Linear through permuted weight columns),
the same IR ops, the same checks and messages. A model gives the same graph from ``.onnx`` as from
``torch.export``; what differs is only what ONNX spells as several nodes (an LSTM's time-major layout, a
chunk as slices, GELU as an Erf formula, x @ W + b), which is put back together here.

Constant subgraphs (what exporters emit to compute a pad or a reshape target: Constant, Shape of a
static tensor, Gather, Concat, Cast, ...) are evaluated with onnx's own reference evaluator, so only the
ops that compute on activations need a handler: one small function per ONNX op, ``@handles("OpType")``.

A QDQ model (onnxruntime.quantization's ``quantize_static``) keeps its own quantization: a
QuantizeLinear -> DequantizeLinear pair on an activation records its scale and zero point
(``graph.meta["activation_params"]``, uint8 shifted to int8 with the same real values), and a
dequantized int8 weight records its scales (``graph.meta["weight_params"]``); the quantizer then uses
them instead of the calibrated ones.
"""
from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np

from ..errors import EdgekitError
from ..ir import Graph, Op
from ..passes.fuse import _FUSES_ACTIVATION  # the ops whose kernels apply a fused ReLU
from . import pytorch as pt

SUPPORTED_OPS = (
    "Conv (1-D, 2-D; any groups, uneven pads), ConvTranspose (2-D), Gemm, MatMul (+ Add of a bias; and between "
    "activations), BatchNormalization, Relu, Clip, Sigmoid, Tanh, HardSwish, HardSigmoid, LeakyRelu, Elu, PRelu, "
    "Gelu (and its erf and tanh formulas), Sqrt + Reciprocal / Div (rsqrt), Add / Sub / Mul / Div (broadcasting, "
    "constants), Pow (** 2), MaxPool, AveragePool (1-D, 2-D), GlobalAveragePool, GlobalMaxPool, ReduceMean, ReduceMax, ReduceSum, ReduceMin, "
    "LayerNormalization, InstanceNormalization, GroupNormalization (and torch's exported form of it), "
    "Pad (constant, reflect, edge), Flatten, Reshape, Squeeze, Unsqueeze, Transpose, Concat, Split, Slice, "
    "SplitToSequence + SequenceAt, Gather (one index), Resize (nearest, linear), Softmax and LogSoftmax (any axis), "
    "LSTM and GRU (one way, zero initial state), nn.MultiheadAttention as torch.onnx exports it (recognised as a "
    "whole; no masks), Dropout, Identity, Cast / CastLike to float, QuantizeLinear / DequantizeLinear (QDQ "
    "models), and constant subgraphs (Constant, Shape, Gather, Concat, Cast, ...: evaluated at load time)"
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
# ONNX ops that read a rank-3 tensor channels first: a rank-3 model input they read is an (N, C, L)
# signal, else an (N, L, C) sequence (as in the PyTorch frontend).
_READS_NCL = ("Conv", "MaxPool", "AveragePool", "BatchNormalization", "GlobalAveragePool", "GlobalMaxPool",
              "Pad", "Resize", "ConvTranspose", "InstanceNormalization")
_VIEWS = ("Unsqueeze", "Squeeze", "Reshape", "Identity", "Dropout", "QuantizeLinear", "DequantizeLinear")


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

    out = {}
    for a in node.attribute:
        value = helper.get_attribute_value(a)
        out[a.name] = value.decode() if isinstance(value, bytes) else value
    return out


def layer_name(node) -> str:
    """The module path of a node, as torch names it. torch.onnx.export names a node by its scopes, each a
    child's name relative to its parent, a Sequential's children as "parent.index", then the op:
    "/features/features.1/block/block.0/block.0.0/Conv" is the layer "features.1.block.0.0". The dynamo
    exporter names nodes "node_Conv_0" and records the module paths, then the fx node's name, in the node's
    metadata ("pkg.torch.onnx.name_scopes": ['', 'features', 'features.1', ..., 'conv2d'])."""
    scopes = _name_scopes(node)
    if scopes:
        rules = next((p.value for p in node.metadata_props if p.key == "pkg.onnxscript.rewriter.rule_name"), "")
        if "FuseBatchNorm" in rules and len(node.input) > 1 and node.input[1].endswith(".weight"):
            return node.input[1][:-len(".weight")]  # a convolution the optimizer folded a BatchNorm into: its
            # scopes are the BatchNorm's, its weight keeps the convolution's name
        return scopes[-2] if len(scopes) >= 2 and scopes[-2] else scopes[-1]
    parts = [p for p in node.name.split("/") if p]
    if len(parts) >= 2:
        path, prev = "", ""
        for scope in parts[:-1]:
            if prev and scope.startswith(prev + "."):
                path += scope[len(prev):]  # a Sequential's child: "block" -> "block.0"
            else:
                path = f"{path}.{scope}" if path else scope
            prev = scope
        return path
    if parts:  # an op outside any module ("/Add_1"): named like torch names it ("add_1")
        return parts[0].lower()
    return node.output[0] if node.output else node.op_type.lower()


def _name_scopes(node) -> list[str]:
    """The dynamo exporter's module scopes of a node ([] for other exporters)."""
    import ast

    for prop in getattr(node, "metadata_props", ()):
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return []
            return [str(x) for x in scopes] if isinstance(scopes, list) else []
    return []


def _module_type(node) -> str:
    """The class of the module the dynamo exporter made a node in ("AdaptiveMaxPool1d"; "" for others)."""
    import ast

    for prop in getattr(node, "metadata_props", ()):
        if prop.key == "pkg.torch.onnx.class_hierarchy":
            try:
                hierarchy = ast.literal_eval(prop.value)
                return str(hierarchy[-2]).rsplit(".", 1)[-1] if len(hierarchy) >= 2 else ""
            except (ValueError, SyntaxError, TypeError):
                return ""
    return ""


def _in_module(node) -> bool:
    """Whether a node comes from inside a module (not the model's own forward)."""
    scopes = _name_scopes(node)
    if scopes:
        return len(scopes) >= 2 and bool(scopes[-2])
    return len([p for p in node.name.split("/") if p]) >= 2


def _f32(value) -> float:
    """An ONNX float attribute as the number it was written as (0.1, not float32's 0.10000000149)."""
    return float(str(np.float32(value)))


class _Target:
    """What a torch.fx node's ``target`` tells the handlers: its name (``conv2d.default``)."""

    def __init__(self, op: str):
        self.__name__ = f"{op}.default"

    def __str__(self):
        return f"aten.{self.__name__}"


class _Ref:
    """An fx-like argument: the name of a value or constant, and which ONNX nodes read it."""

    def __init__(self, name: str, users=()):
        self.name, self.users = name, list(users)

    def __repr__(self):
        return self.name


class _Node:
    """An ONNX node dressed as the torch.fx node of the ATen op ``op`` for the PyTorch frontend's handlers."""

    def __init__(self, onnx_node, name: str, op: str, args, kwargs=None, val=None):
        self.onnx = onnx_node
        self.name = name
        self.target = _Target(op)
        self.args, self.kwargs = tuple(args), dict(kwargs or {})
        self.meta = {"nn_module_stack": {"": (layer_name(onnx_node), onnx_node.op_type)}, "val": val}
        self.users: list = []


def _shaped(shape):
    """A stand-in for an fx node's ``meta["val"]``: something with a ``.shape``."""
    return SimpleNamespace(shape=tuple(int(s) for s in shape))


class _Seq:
    """An ONNX LSTM / GRU output Y, (L, directions, N, H), of the batch-first sequence ``value`` (N, L, H):
    the TorchScript exporter squeezes the directions away next; the dynamo exporter transposes Y to
    (L, N, directions, H) and reshapes that to (L, N, H)."""

    def __init__(self, value, shape, swapped: bool = False):
        self.value, self.shape, self.swapped = value, list(shape), swapped


class _Converter(pt._Converter):
    def __init__(self, model):
        from onnx import numpy_helper

        super().__init__(None)
        self.model = model
        self.onnx_graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        self.names: dict[str, str] = {}  # ONNX tensor name -> identifier (values, constants, IR tensors)
        self.idents: set[str] = set()
        self.users: dict[str, list] = {}  # ONNX tensor name -> the nodes that read it
        self.onnx_slices: set[str] = set()  # IR tensors cut by ONNX Slice nodes (perhaps one split)
        self.absorbed: set[int] = set()  # nodes already converted with an earlier one (a MatMul's bias Add)
        self.const_quant: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}  # dequantized constant -> (s, zp, axis)
        self.quantized: dict[str, tuple[pt._Value, float, int]] = {}  # QuantizeLinear output -> (value, s, zp)
        for init in self.onnx_graph.initializer:
            self.consts[self.ident(init.name)] = numpy_helper.to_array(init)
        # exported nn.MultiheadAttention blocks, each one node (their members, by its name) converted whole
        nodes, self.attention_members = _attention_blocks(list(self.onnx_graph.node), self.onnx_graph)
        self.nodes = _fuse_patterns(nodes, *self._constant_values())
        for node in self.nodes:
            for i in node.input:
                self.users.setdefault(i, []).append(node)

    def _constant_values(self) -> tuple[dict[str, np.ndarray], set[str]]:
        """The initializers, Constant nodes and small reshapes of them (an Unsqueeze of a constant) by ONNX
        name, for recognising patterns before the walk; and which of them are the model's parameters (the
        initializers and their reshapes)."""
        from onnx import numpy_helper

        found = {i.name: numpy_helper.to_array(i) for i in self.onnx_graph.initializer}
        parameters = set(found)
        for node in self.onnx_graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                found[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
            elif node.op_type == "DequantizeLinear" and len(node.input) > 1 and node.input[0] in found and \
                    node.input[1] in found and found[node.input[1]].size == 1:  # a QDQ model's scalar constant
                zp = found.get(node.input[2], 0) if len(node.input) > 2 else 0
                found[node.output[0]] = ((found[node.input[0]].astype(np.float64) - np.float64(zp)) *
                                         np.float64(found[node.input[1]])).astype(np.float32)
            elif node.op_type == "Constant" or (node.op_type in ("Unsqueeze", "Reshape", "Identity", "Concat",
                                                                  "QuantizeLinear") and
                                                 all(i in found for i in node.input if i)):  # value_ints, ...
                try:
                    out = _evaluate(node, {i: found[i] for i in node.input if i}, self.opset)
                except Exception:  # noqa: BLE001 - not evaluable here: the walk will say why
                    continue
                found[node.output[0]] = np.asarray(out[0])
                if node.input and node.input[0] in parameters:
                    parameters.add(node.output[0])
        return found, parameters

    # -- names -------------------------------------------------------------
    def ident(self, onnx_name: str) -> str:
        """A stable identifier for an ONNX tensor name ("/stem/Conv_output_0" -> "stem_Conv_output_0")."""
        if onnx_name not in self.names:
            base = re.sub(r"\W+", "_", onnx_name).strip("_") or "t"
            name, i = base, 1
            while name in self.idents:
                name, i = f"{base}_{i}", i + 1
            self.idents.add(name)
            self.names[onnx_name] = name
        return self.names[onnx_name]

    def ref(self, onnx_name: str) -> _Ref | None:
        if onnx_name == "":
            return None
        return _Ref(self.ident(onnx_name), self.users.get(onnx_name, ()))

    def const_ref(self, data, base: str) -> _Ref:
        """A constant made here (a reordered weight) as an argument."""
        name = self.ident(f"{base}.edgekit_const")
        self.consts[name] = np.asarray(data)
        return _Ref(name)

    def is_const(self, onnx_name: str) -> bool:
        return onnx_name == "" or self.ident(onnx_name) in self.consts

    def cval(self, node, index: int, what: str, default=None):
        """The constant value of ONNX input ``index`` (``default`` when absent)."""
        if index >= len(node.input) or node.input[index] == "":
            return default
        name = self.ident(node.input[index])
        if name not in self.consts:
            raise self.unsupported(node, f"its {what} is computed at run time, not a constant")
        data = self.consts[name]
        if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
            raise EdgekitError(f"ONNX node '{node.name}' has {int(np.sum(~np.isfinite(data)))} NaN or inf values in "
                               f"its {what}; fix the model before deploying")
        return data

    def fake(self, node, op: str, *args, val=None, **kwargs) -> _Node:
        return _Node(node, self.ident(node.output[0]), op, args, kwargs, val)

    def finish(self, node, fake: _Node) -> None:
        """Spread a handler's tuple result over the node's ONNX outputs; refuse read outputs it lacks."""
        result = self.values.get(fake.name)
        if not isinstance(result, tuple):
            result = (result,)
        for i, out in enumerate(node.output):
            if not out:
                continue
            got = result[i] if i < len(result) else None
            if got is None:
                if self.users.get(out) or out in {o.name for o in self.onnx_graph.output}:
                    raise self.unsupported(node, f"its output {i} ('{out}') is not supported")
                continue
            self.values[self.ident(out)] = got

    def onnx_value(self, onnx_name: str, node) -> pt._Value:
        v = self.values.get(self.ident(onnx_name))
        if v is pt._POISON:
            raise pt._Poisoned()
        if isinstance(v, _Seq):
            raise self.unsupported(node, "it reads an LSTM / GRU output other than through the exporter's Squeeze")
        if not isinstance(v, pt._Value):
            if self.ident(onnx_name) in self.quantized:
                raise self.unsupported(node, "it reads a QuantizeLinear output directly (edgekit reads QDQ pairs)")
            raise self.unsupported(node, f"it reads '{onnx_name}', which is not an activation edgekit computes")
        return v

    # -- errors ------------------------------------------------------------
    def unsupported(self, node, why: str) -> EdgekitError:
        onnx_node = getattr(node, "onnx", node)
        name = onnx_node.name or (onnx_node.output[0] if onnx_node.output else onnx_node.op_type)
        return EdgekitError(f"ONNX node '{name}' ({onnx_node.op_type}): {why}.\nedgekit supports: {SUPPORTED_OPS}.")

    # -- the walk ----------------------------------------------------------
    def run(self) -> Graph:
        """Convert every node; a node that cannot be converted is recorded and the walk goes on, so one error
        lists every unsupported node (nodes that only read its result are not listed again)."""
        initializers = {i.name for i in self.onnx_graph.initializer}
        for inp in self.onnx_graph.input:
            if inp.name not in initializers:
                self._model_input(inp)
        problems: list[str] = []
        for node in self.nodes:
            if id(node) in self.absorbed:
                continue
            if all(self.is_const(i) for i in node.input) and node.op_type != "DequantizeLinear":
                self._fold(node, problems)
                continue
            if any(self.values.get(self.ident(i)) is pt._POISON for i in node.input if i):
                self._poison(node)
                continue
            handler = HANDLERS.get(node.op_type)
            try:
                if handler is None:
                    raise self.unsupported(node, "this operation is not supported")
                handler(self, node)
            except pt._Poisoned:
                self._poison(node)
            except EdgekitError as exc:
                self._poison(node)
                text = str(exc).split("\nedgekit supports:")[0]
                name = node.name or node.output[0]
                problems.append(text if text.startswith("ONNX node") else
                                f"ONNX node '{name}' ({node.op_type}): {text}")
        if len(problems) == 1:
            raise EdgekitError(f"{problems[0]}\nedgekit supports: {SUPPORTED_OPS}.")
        if problems:
            lines = "\n  ".join(problems)
            raise EdgekitError(f"{len(problems)} operations of this ONNX model are not supported:\n  {lines}"
                               f"\nedgekit supports: {SUPPORTED_OPS}.")
        self._outputs()
        self._drop_dead_reshapes()
        _slices_to_split(self.graph, self.onnx_slices)
        return self.graph

    def _poison(self, node):
        for out in node.output:
            if out:
                self.values[self.ident(out)] = pt._POISON

    def _model_input(self, inp):
        dims = inp.type.tensor_type.shape.dim
        shape = [d.dim_value if d.HasField("dim_value") else None for d in dims]
        if len(shape) and shape[0] is None:
            shape[0] = 1  # a symbolic batch size: edgekit runs one sample at a time
        elif len(shape) and shape[0] != 1:  # else the first Reshape / Flatten would fail far from the cause
            raise EdgekitError(f"the ONNX model's input '{inp.name}' has a fixed batch of {shape[0]} (shape {shape}): "
                               "edgekit runs one sample at a time; export with a batch of 1 or a dynamic batch")
        if any(s is None or s < 1 for s in shape[1:]):
            raise EdgekitError(f"the ONNX model's input '{inp.name}' has shape {shape}: edgekit needs fixed sizes "
                               "except the batch")
        if len(shape) not in (2, 3, 4):
            raise EdgekitError(f"the ONNX model's input '{inp.name}' has shape {shape}; edgekit takes (N, C, H, W), "
                               "(N, C, L), (N, L, C) or (N, features)")
        dims = pt.CHANNELS_FIRST[len(shape)]
        if len(shape) == 3 and not self._reads_channels_first(inp.name):
            dims = (0, 1, 2)  # a sequence (N, L, C), as LSTM / MatMul read it
        readers = self.users.get(inp.name, [])
        if len(shape) == 4 and readers and all(u.op_type == "Transpose" and list(_attrs(u).get("perm", [])) ==
                                               [0, 3, 1, 2] for u in readers):
            dims = (0, 1, 2, 3)  # an NHWC input (TensorFlow / Keras exports): as it is, no TRANSPOSE
        name = self.new_tensor(self.ident(inp.name), (1,) + tuple(shape[d] for d in dims[1:]))
        self.graph.inputs.append(name)
        self.graph.source_layouts[name] = pt.LAYOUT_NAMES[dims]
        self.values[self.ident(inp.name)] = pt._Value(name, dims)

    def _reads_channels_first(self, onnx_name: str, depth: int = 0) -> bool:
        for user in self.users.get(onnx_name, ()):
            if user.op_type in _READS_NCL:
                return True
            if user.op_type in _VIEWS and depth < 4 and self._reads_channels_first(user.output[0], depth + 1):
                return True
        return False

    def _outputs(self):
        refs = []
        for out in self.onnx_graph.output:
            v = self.values.get(self.ident(out.name))
            if not isinstance(v, pt._Value):
                raise EdgekitError(f"the ONNX model's output '{out.name}' is a constant or is not computed by "
                                   "supported operations")
            refs.append(self.ref(out.name))
        node = SimpleNamespace(name="output", op_type="Output", output=["output"], input=[])
        try:
            self._output(_Node(node, "output", "output", (refs,)))
        except EdgekitError as exc:
            raise EdgekitError(str(exc).replace("ONNX node 'output' (Output): ", "the ONNX model's output: ")) \
                from None

    def _fold(self, node, problems: list[str]):
        """A node on constants only: evaluate it now with onnx's reference implementation."""
        try:
            inputs = {i: self.consts[self.ident(i)] for i in node.input if i}
            results = _evaluate(node, inputs, self.opset)
        except Exception as exc:  # noqa: BLE001 - any failure of the evaluator is the model's
            problems.append(f"ONNX node '{node.name}' ({node.op_type}): computes on constants and could not be "
                            f"evaluated: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
            self._poison(node)
            return
        for name, data in zip(node.output, results):
            self.consts[self.ident(name)] = np.asarray(data)

    # -- QDQ -----------------------------------------------------------------
    def weight_params(self, onnx_name: str, ir_name: str, channels: int, channel_axis: int) -> None:
        """Keep a QDQ weight's own scales (per output channel) for the quantizer."""
        key = self.ident(onnx_name)
        if key not in self.const_quant:
            return
        scale, zp, axis = self.const_quant[key]
        if np.any(zp != 0):
            return  # asymmetric weights: edgekit's weights are symmetric, it chooses its own scales
        if scale.size == 1:
            scale = np.full(channels, float(scale.reshape(-1)[0]))
        elif axis != channel_axis or scale.size != channels:
            return  # scales along another axis than the output channels: edgekit chooses its own
        self.graph.meta.setdefault("weight_params", {})[ir_name] = np.asarray(scale, np.float64).reshape(-1)

    def producer_of(self, onnx_name: str) -> Op | None:
        v = self.values.get(self.ident(onnx_name))
        if not isinstance(v, pt._Value):
            return None
        return next((op for op in reversed(self.graph.ops) if v.name in op.outputs), None)


# ---------------------------------------------------------------------------
# Patterns exporters spell as several nodes, put back together before the walk
# ---------------------------------------------------------------------------

def _evaluate(node, inputs: dict, opset: int) -> list:
    """One node on constants, by onnx's reference implementation of the model's opset (a node alone would be
    run with the newest: Unsqueeze's axes moved from an attribute to an input in opset 13)."""
    import onnx
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    graph = helper.make_graph([node], "fold", [helper.make_value_info(i, onnx.TypeProto()) for i in inputs],
                              [helper.make_value_info(o, onnx.TypeProto()) for o in node.output if o])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return ReferenceEvaluator(model).run(None, inputs)


def _fuse_patterns(nodes: list, consts: dict, parameters: set[str]) -> list:
    """GELU's formulas (erf, and the tanh approximation; in the orders exporters write them) become one
    Gelu node; Reciprocal(Sqrt(x)) and 1 / Sqrt(x) become one Rsqrt node (edgekit's RSQRT); x * HardSigmoid(x)
    (Hardswish before opset 14) becomes one HardSwish; torch's exported GroupNorm (Reshape ->
    InstanceNormalization -> Reshape -> Mul -> Add) becomes one GroupNormalization."""
    from onnx import helper

    users: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            users.setdefault(i, []).append(n)

    def only_user(name):
        u = users.get(name, [])
        return u[0] if len(u) == 1 else None

    def scalar(name, value, tol=1e-4):
        data = consts.get(name)
        return data is not None and data.size == 1 and abs(float(data.reshape(-1)[0]) - value) <= tol

    def other(n, name):
        return n.input[1] if n.input[0] == name else n.input[0]

    def producer(name):
        return next((n for n in nodes if name in n.output), None)

    def times(n, value):
        """The other operand of a Mul by the constant ``value`` (None if ``n`` is not one)."""
        if n is None or n.op_type != "Mul":
            return None
        return n.input[1] if scalar(n.input[0], value) else n.input[0] if scalar(n.input[1], value) else None

    def after(name):
        """The tensor a QDQ model's Q -> DQ pair right after ``name`` gives, and the pair ([] when none)."""
        q = only_user(name)
        dq = only_user(q.output[0]) if q is not None and q.op_type == "QuantizeLinear" else None
        if dq is not None and dq.op_type == "DequantizeLinear":
            return dq.output[0], [q, dq]
        return name, []

    def tail(first, x):
        """The common end of both GELU formulas, from the Erf / Tanh node ``first``: + 1, then * x and * 0.5 in
        either order (a QDQ model's Q/DQ pairs between them dropped). The nodes and the last output, or None."""
        out, pair = after(first.output[0])
        add = only_user(out)
        if add is None or add.op_type != "Add" or not scalar(other(add, out), 1.0):
            return None
        chain, last, seen_x, seen_half = pair + [add], add.output[0], False, False
        while not (seen_x and seen_half):
            last, pair = after(last)
            mul = only_user(last)
            if mul is None or mul.op_type != "Mul":
                return None
            chain += pair
            o = other(mul, last)
            if not seen_x and o == x:
                seen_x = True
            elif not seen_half and scalar(o, 0.5):
                seen_half = True
            else:
                return None
            chain.append(mul)
            last = mul.output[0]
        return chain, last

    def erf_gelu(erf):
        """x * 0.5 * (1 + erf(x / sqrt 2)) (x * (1 / sqrt 2) too)."""
        div = producer(erf.input[0])
        if div is not None and div.op_type == "Div" and scalar(div.input[1], np.sqrt(2.0)):
            x = div.input[0]
        else:
            x = times(div, 1 / np.sqrt(2.0))
        if x is None or len(users.get(div.output[0], [])) != 1:
            return None
        end = tail(erf, x)
        return None if end is None else ([div, erf] + end[0], x, end[1], "none")

    def tanh_gelu(tanh):
        """x * 0.5 * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3))), x^3 as x * (x * x) or Pow(x, 3)."""
        scale = producer(tanh.input[0])
        inner = times(scale, np.sqrt(2 / np.pi))
        add = producer(inner) if inner else None
        if add is None or add.op_type != "Add":
            return None
        for x, cubic in ((add.input[0], add.input[1]), (add.input[1], add.input[0])):
            mul = producer(cubic)
            cube = producer(times(mul, 0.044715) or "")
            if cube is None:
                continue
            if cube.op_type == "Pow" and cube.input[0] == x and scalar(cube.input[1], 3.0):
                parts = [cube]
            elif cube.op_type == "Mul" and x in cube.input:
                square = producer(other(cube, x))
                if square is None or square.op_type != "Mul" or list(square.input) != [x, x]:
                    continue
                parts = [square, cube]
            else:
                continue
            chain = parts + [mul, add, scale, tanh]
            if any(len(users.get(n.output[0], [])) != 1 for n in chain):
                continue
            end = tail(tanh, x)
            if end is not None:
                return chain + end[0], x, end[1], "tanh"
        return None

    drop, replace = set(), {}
    for node in nodes:
        found = erf_gelu(node) if node.op_type == "Erf" else tanh_gelu(node) if node.op_type == "Tanh" else None
        if found is None:
            continue
        chain, x, last, approximate = found
        gelu = helper.make_node("Gelu", [x], [last], approximate=approximate,
                                name=chain[-1].name.rsplit("/", 1)[0] + "/Gelu")
        drop.update(id(n) for n in chain)
        replace[id(chain[-1])] = gelu
    for hs in nodes:  # before opset 14 torch exports Hardswish as x * HardSigmoid(x)
        mul = only_user(hs.output[0]) if hs.op_type == "HardSigmoid" else None
        if mul is None or mul.op_type != "Mul" or other(mul, hs.output[0]) != hs.input[0]:
            continue
        alpha = next((helper.get_attribute_value(a) for a in hs.attribute if a.name == "alpha"), 0.2)
        beta = next((helper.get_attribute_value(a) for a in hs.attribute if a.name == "beta"), 0.5)
        if abs(alpha - 1 / 6) > 1e-6 or abs(beta - 0.5) > 1e-6:
            continue
        drop.update((id(hs), id(mul)))
        replace[id(mul)] = helper.make_node("HardSwish", [hs.input[0]], [mul.output[0]], name=mul.name)
    for sqrt in nodes:
        if sqrt.op_type != "Sqrt":
            continue
        inv = only_user(sqrt.output[0])
        if inv is None or not (inv.op_type == "Reciprocal" or
                               (inv.op_type == "Div" and inv.input[1] == sqrt.output[0] and scalar(inv.input[0], 1.0))):
            continue
        drop.update((id(sqrt), id(inv)))
        replace[id(inv)] = helper.make_node("Rsqrt", [sqrt.input[0]], [inv.output[0]], name=inv.name)
    for red in nodes:  # the dynamo exporter's AdaptiveMax/AvgPool1d(1): Unsqueeze(2) -> Reduce(2, 3) -> Squeeze(2)
        kind = {"ReduceMax": "GlobalMaxPool", "ReduceMean": "GlobalAveragePool"}.get(red.op_type)
        if kind is None or _module_type(red) not in ("AdaptiveMaxPool1d", "AdaptiveAvgPool1d"):
            continue
        up, down = producer(red.input[0]), only_user(red.output[0])
        axes = consts.get(red.input[1]) if len(red.input) > 1 else None
        if up is None or down is None or up.op_type != "Unsqueeze" or down.op_type != "Squeeze" or axes is None or \
                sorted(int(a) % 4 for a in axes.reshape(-1)) != [2, 3]:
            continue
        drop.update((id(red), id(down)))  # the Unsqueeze stays when something else reads it (dead otherwise)
        pool = helper.make_node(kind, [up.input[0]], [down.output[0]], name=red.name)
        pool.metadata_props.extend(red.metadata_props)
        replace[id(down)] = pool
    for inorm in nodes:  # GroupNorm as torch.onnx.export writes it before opset 18
        fused = _group_norm_pattern(inorm, nodes, users, consts, parameters)
        if fused is not None:
            chain, node = fused
            drop.update(id(n) for n in chain)
            replace[id(chain[-1])] = node
    out = []
    for n in nodes:
        if id(n) in replace:
            out.append(replace[id(n)])
        elif id(n) not in drop:
            out.append(n)
    # a Gelu replaces the last node of its chain: nodes between that read x still come first
    return out


def _static_names(nodes: list, graph) -> set[str]:
    """The tensors computed from initializers and Constant nodes only (no model input, no Shape)."""
    static = {i.name for i in graph.initializer} | {""}
    for n in nodes:
        if n.op_type != "Shape" and all(i in static for i in n.input):
            static.update(n.output)
    return static


# what the exporters write for nn.MultiheadAttention (and its need_weights average, QDQ pairs in it)
_ATTENTION_OPS = {"Transpose", "MatMul", "Gemm", "Add", "Mul", "Div", "Sqrt", "Softmax", "Reshape", "Unsqueeze",
                  "Squeeze", "Gather", "Slice", "Split", "Concat", "Shape", "Cast", "CastLike", "Expand", "Where",
                  "Equal", "Identity", "Dropout", "ReduceMean", "QuantizeLinear", "DequantizeLinear"}


def _attention_blocks(nodes: list, graph) -> tuple[list, dict[str, list]]:
    """torch.onnx.export writes an nn.MultiheadAttention (and so a TransformerEncoderLayer's self attention)
    sequence first inside, the batch moved behind the sequence, the heads split by Reshape / Transpose /
    Gather and the scale applied to q and k: ops edgekit cannot run one by one (it keeps the batch first). Such
    a block is recognised by its scope (the module path of a Softmax, with a product of two activations and a
    Transpose moving the first dim among the same scope's nodes) and replaced by one edgekit-only
    "MultiHeadAttention" node at the place of its last member; its inputs are the activations the block
    reads, its outputs those read outside it. ``_multi_head_attention`` converts it like the PyTorch
    frontend converts the module, after checking numerically that the block is that computation."""
    from onnx import helper

    static = _static_names(nodes, graph)
    graph_outputs = {o.name for o in graph.output}
    members_of: dict[str, list] = {}
    softmax_of = {}
    for sm in nodes:
        if sm.op_type != "Softmax" or not _in_module(sm):
            continue
        scope = layer_name(sm)
        name = f"{scope}/MultiHeadAttention" if _name_scopes(sm) else sm.name.rsplit("/", 1)[0] + "/MultiHeadAttention"
        if name in members_of:
            continue
        members = [n for n in nodes if n.output and not all(o in static for o in n.output)
                   and (layer_name(n) == scope or layer_name(n).startswith(scope + "."))]
        if not any(n.op_type == "MatMul" and not any(i in static for i in n.input) for n in members) or \
                not any(n.op_type == "Transpose" and list(_attrs(n).get("perm", [0]))[0] != 0 for n in members) or \
                any(n.op_type not in _ATTENTION_OPS for n in members):  # e.g. an LSTM and attention pooling
            continue  # an attention written batch first (bmm / scaled_dot_product_attention): op by op
        members_of[name] = members
        softmax_of[name] = sm
    if not members_of:
        return nodes, {}
    out, replaced, kept = list(nodes), {}, {}
    for name, members in members_of.items():
        inside = {id(n) for n in members}
        produced = {o for n in members for o in n.output}
        reads = []
        for n in members:
            for i in n.input:
                if i and i not in produced and i not in static and i not in reads:
                    reads.append(i)
        outputs = [o for n in members for o in n.output if o and (o in graph_outputs or any(
            id(u) not in inside and o in u.input for u in nodes))]
        last = max(out.index(n) for n in members)
        if any(out.index(u) < last for u in nodes if id(u) not in inside and any(o in u.input for o in outputs)):
            continue  # read outside before the block ends: left to the op-by-op walk (which says why not)
        block = helper.make_node("MultiHeadAttention", reads, outputs, name=name, domain="edgekit")
        block.metadata_props.extend(softmax_of[name].metadata_props)  # the dynamo exporter's module scopes
        replaced[id(out[last])] = block
        kept[name] = members
        for n in members:
            replaced.setdefault(id(n), None)
    return [replaced.get(id(n), n) for n in out if replaced.get(id(n), n) is not None], kept


def _group_norm_pattern(inorm, nodes: list, users: dict, consts: dict, parameters: set[str]):
    """Reshape(x, (0, G, -1)) -> InstanceNormalization(scale 1, bias 0) -> Reshape(Shape(x)) [-> Mul(weight)
    -> Add(bias)]: (chain, one GroupNormalization node with per-channel weight and bias), or None. A weight of
    ones and a bias of zeros that are not the model's parameters (GroupNorm(affine=False)) are left out."""
    from onnx import helper

    if inorm.op_type != "InstanceNormalization":
        return None

    def producer(name):
        return next((n for n in nodes if name in n.output), None)

    def only_user(name):
        u = users.get(name, [])
        return u[0] if len(u) == 1 else None

    first = producer(inorm.input[0])
    scale, bias = consts.get(inorm.input[1]), consts.get(inorm.input[2]) if len(inorm.input) > 2 else None
    target = consts.get(first.input[1]) if first is not None and first.op_type == "Reshape" else None
    if target is None or scale is None or bias is None or target.size != 3 or int(target[2]) != -1 or             np.any(scale != 1) or np.any(bias != 0) or len(users.get(first.output[0], [])) != 1:
        return None
    x, groups = first.input[0], int(target[1])
    back = only_user(inorm.output[0])
    shape_of = producer(back.input[1]) if back is not None and back.op_type == "Reshape" else None
    if shape_of is None or shape_of.op_type != "Shape" or shape_of.input[0] != x:
        return None
    chain, last, weight, shift = [first, inorm, back], back.output[0], "", ""
    mul = only_user(last)
    if mul is not None and mul.op_type == "Mul" and (mul.input[1] if mul.input[0] == last else mul.input[0]) in consts:
        weight = mul.input[1] if mul.input[0] == last else mul.input[0]
        chain.append(mul)
        last = mul.output[0]
        add = only_user(last)
        if add is not None and add.op_type == "Add" and (add.input[1] if add.input[0] == last else add.input[0]) \
                in consts:
            shift = add.input[1] if add.input[0] == last else add.input[0]
            chain.append(add)
            last = add.output[0]
    if weight and weight not in parameters and np.all(consts[weight] == 1):
        weight = ""
    if shift and shift not in parameters and not np.any(consts[shift]):
        shift = ""
    eps = next((helper.get_attribute_value(a) for a in inorm.attribute if a.name == "epsilon"), 1e-5)
    name = inorm.name.rsplit("/", 1)[0] + "/GroupNormalization"
    return chain, helper.make_node("GroupNormalization", [x, weight, shift], [last], num_groups=groups,
                                   epsilon=eps, name=name)


def _slices_to_split(graph: Graph, cut: set[str]) -> None:
    """Slices of one tensor along one axis that cover it end to end, in order and without overlap (how
    exporters write torch.chunk / split): one SPLIT op, as the PyTorch frontend makes."""
    by_input: dict[str, list[Op]] = {}
    for op in graph.ops:
        if op.kind == "slice" and op.outputs[0] in cut:
            by_input.setdefault(op.inputs[0], []).append(op)
    for name, slices in by_input.items():
        shape = graph.tensors[name].shape
        pieces = []
        for op in slices:
            b, e, s = op.attrs["begin"], op.attrs["end"], op.attrs["strides"]
            cut = [a for a in range(len(shape)) if (b[a], e[a]) != (0, shape[a])]
            if any(x != 1 for x in s) or len(cut) != 1:
                break
            pieces.append((cut[0], b[cut[0]], e[cut[0]], op))
        else:
            axes = {p[0] for p in pieces}
            pieces.sort(key=lambda p: p[1])
            if len(pieces) < 2 or len(axes) != 1 or pieces[0][1] != 0 or pieces[-1][2] != shape[pieces[0][0]] or \
                    any(a[2] != b[1] for a, b in zip(pieces, pieces[1:])):
                continue
            first = min(graph.ops.index(p[3]) for p in pieces)
            split = Op("split", pieces[0][3].name, [name], [p[3].outputs[0] for p in pieces], dict(axis=axes.pop()))
            for p in pieces:
                graph.ops.remove(p[3])
            graph.ops.insert(first, split)


# ---------------------------------------------------------------------------
# One function per ONNX op: its attributes as the ATen op's arguments
# ---------------------------------------------------------------------------

def _pads(node, a: dict, sizes, kernel, stride, dilation) -> list[int]:
    """Explicit pads (the begins of the spatial axes, then their ends), auto_pad resolved."""
    auto_pad = a.get("auto_pad", "NOTSET")
    if auto_pad in ("NOTSET", ""):
        return list(a.get("pads", [0] * (2 * len(sizes))))
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
    v = c.onnx_value(node.input[0], node)
    weight = c.cval(node, 1, "weight").astype(np.float32)
    n = weight.ndim - 2
    if n not in (1, 2):
        raise c.unsupported(node, f"a {n}-D convolution (edgekit: 1-D and 2-D)")
    k = list(a.get("kernel_shape", weight.shape[2:]))
    s, d = list(a.get("strides", [1] * n)), list(a.get("dilations", [1] * n))
    p = _pads(node, a, c._torch_shape(v)[2:], k, s, d)
    groups = int(a.get("group", 1))
    x, b = c.ref(node.input[0]), c.ref(node.input[2]) if len(node.input) > 2 else None
    if n == 1:
        if v.torch_rank != 3:
            raise c.unsupported(node, "a 1-D convolution of a tensor that is not (N, C, L)")
        fake = c.fake(node, "conv1d")
        c._conv(fake, x, weight[:, :, None, :], b, (1, s[0]), (0, 0, p[0], p[1]), (1, d[0]), groups, torch_rank=3)
    else:
        fake = c.fake(node, "conv2d")
        c._conv(fake, x, weight, b, tuple(s), (p[0], p[2], p[1], p[3]), tuple(d), groups)
    c.finish(node, fake)
    op = c.producer_of(node.output[0])
    if op is not None and op.kind in ("conv2d", "depthwise_conv2d"):
        c.weight_params(node.input[1], op.inputs[1], weight.shape[0], 0)


@handles("ConvTranspose")
def _conv_transpose(c: _Converter, node):
    a = _attrs(node)
    weight = c.cval(node, 1, "weight")
    if weight.ndim != 4:
        raise c.unsupported(node, "a ConvTranspose that is not 2-D")
    if a.get("auto_pad", "NOTSET") not in ("NOTSET", "") or "output_shape" in a:
        raise c.unsupported(node, "auto_pad / output_shape (give explicit pads)")
    p = list(a.get("pads", [0, 0, 0, 0]))
    if p[0] != p[2] or p[1] != p[3]:
        raise c.unsupported(node, f"uneven pads {p}")
    fake = c.fake(node, "conv_transpose2d", c.ref(node.input[0]), c.ref(node.input[1]),
                  c.ref(node.input[2]) if len(node.input) > 2 else None, list(a.get("strides", [1, 1])), [p[0], p[1]],
                  list(a.get("output_padding", [0, 0])), int(a.get("group", 1)), list(a.get("dilations", [1, 1])))
    c._op_conv_transpose2d(fake)
    c.finish(node, fake)


def _linear(c: _Converter, node, x: _Ref, weight: np.ndarray, bias, weight_source: str | None, out_axis: int):
    """x (..., I) times ``weight`` (O, I) plus ``bias``: the PyTorch frontend's Linear."""
    base = layer_name(node)
    fake = c.fake(node, "linear", x, c.const_ref(weight, f"{base}.weight"),
                  None if bias is None else c.const_ref(np.broadcast_to(bias, (weight.shape[0],)), f"{base}.bias"))
    c._op_linear(fake)
    c.finish(node, fake)
    op = c.producer_of(node.output[0])
    if weight_source is not None and op is not None:
        c.weight_params(weight_source, op.inputs[1], weight.shape[0], out_axis)


@handles("Gemm")
def _gemm(c: _Converter, node):
    a = _attrs(node)
    if a.get("transA", 0):
        raise c.unsupported(node, "it transposes its input (transA=1)")
    c.onnx_value(node.input[0], node)
    b = c.cval(node, 1, "weight").astype(np.float32)
    alpha = float(a.get("alpha", 1.0))
    weight = (b if a.get("transB", 0) else b.T) * np.float32(alpha)
    bias = c.cval(node, 2, "bias")
    if bias is not None:
        bias = (bias.astype(np.float32) * np.float32(a.get("beta", 1.0))).reshape(-1)
    _linear(c, node, c.ref(node.input[0]), weight, bias, node.input[1] if alpha == 1.0 else None,
            0 if a.get("transB", 0) else 1)


@handles("MatMul")
def _matmul(c: _Converter, node):
    """x @ W with a constant matrix W is a Linear layer (an Add of a constant vector right after it, its
    bias); a product of two activations is BATCH_MATMUL."""
    if c.is_const(node.input[1]) and c.cval(node, 1, "weight").ndim == 2 and not c.is_const(node.input[0]):
        w = c.cval(node, 1, "weight").astype(np.float32)
        bias, users = None, c.users.get(node.output[0], [])
        add = users[0] if len(users) == 1 and users[0].op_type == "Add" else None
        if add is not None:
            other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
            if c.is_const(other) and c.consts[c.ident(other)].size == w.shape[1]:
                bias = c.cval(add, list(add.input).index(other), "bias").astype(np.float32).reshape(-1)
            else:
                add = None
        _linear(c, node, c.ref(node.input[0]), np.ascontiguousarray(w.T), bias, node.input[1], 1)
        if add is not None:
            c.values[c.ident(add.output[0])] = c.values[c.ident(node.output[0])]
            c.absorbed.add(id(add))
        return
    fake = c.fake(node, "matmul", c.ref(node.input[0]), c.ref(node.input[1]))
    c._batch_matmul(fake, fake.args[0], fake.args[1])
    c.finish(node, fake)


def _call(op: str, method: str | None = None, arity: int = 1):
    """An ONNX op whose inputs are the ATen op's leading arguments, attributes ignored."""
    def convert(c: _Converter, node):
        fake = c.fake(node, op, *(c.ref(i) for i in node.input[:arity]))
        getattr(c, method or f"_op_{op}")(fake)
        c.finish(node, fake)
    return convert


for _onnx, _aten in (("Relu", "relu"), ("Sigmoid", "sigmoid"), ("Tanh", "tanh"), ("HardSwish", "hardswish"),
                     ("Rsqrt", "rsqrt")):
    HANDLERS[_onnx] = _call(_aten)
for _onnx, _aten in (("Add", "add"), ("Sub", "sub"), ("Mul", "mul"), ("Div", "div")):
    HANDLERS[_onnx] = _call(_aten, arity=2)


@handles("Pow")
def _pow(c: _Converter, node):
    exponent = c.cval(node, 1, "exponent")
    if exponent.size != 1:
        raise c.unsupported(node, "a power by a tensor")
    fake = c.fake(node, "pow", c.ref(node.input[0]), float(exponent.reshape(-1)[0]))
    c._op_pow(fake)
    c.finish(node, fake)


@handles("HardSigmoid")
def _hard_sigmoid(c: _Converter, node):
    a = _attrs(node)
    if abs(a.get("alpha", 0.2) - 1 / 6) > 1e-6 or abs(a.get("beta", 0.5) - 0.5) > 1e-6:
        raise c.unsupported(node, f"HardSigmoid with alpha={a.get('alpha', 0.2)}, beta={a.get('beta', 0.5)} "
                                  "(edgekit: torch's 1/6, 0.5)")
    _call("hardsigmoid")(c, node)


@handles("LeakyRelu")
def _leaky_relu(c: _Converter, node):
    fake = c.fake(node, "leaky_relu", c.ref(node.input[0]), _f32(_attrs(node).get("alpha", 0.01)))
    c._op_leaky_relu(fake)
    c.finish(node, fake)


@handles("Elu")
def _elu(c: _Converter, node):
    fake = c.fake(node, "elu", c.ref(node.input[0]), _f32(_attrs(node).get("alpha", 1.0)))
    c._op_elu(fake)
    c.finish(node, fake)


@handles("PRelu")
def _prelu(c: _Converter, node):
    c.cval(node, 1, "slope")
    _call("prelu", arity=2)(c, node)


@handles("Gelu")
def _gelu(c: _Converter, node):
    fake = c.fake(node, "gelu", c.ref(node.input[0]), approximate=_attrs(node).get("approximate", "none"))
    c._op_gelu(fake)
    c.finish(node, fake)


@handles("Clip")
def _clip(c: _Converter, node):
    if c.opset < 11:
        a = _attrs(node)
        lo, hi = a.get("min"), a.get("max")
    else:
        lo, hi = c.cval(node, 1, "min"), c.cval(node, 2, "max")
    lo = None if lo is None or not np.isfinite(float(lo)) else float(lo)
    hi = None if hi is None or not np.isfinite(float(hi)) else float(hi)
    fake = c.fake(node, "clamp", c.ref(node.input[0]))
    c._clamp_to(fake, lo, hi)
    c.finish(node, fake)


def _softmax_like(op: str):
    def convert(c: _Converter, node):
        v = c.onnx_value(node.input[0], node)
        axis = int(_attrs(node).get("axis", -1 if c.opset >= 13 else 1))
        if c.opset < 13 and axis % v.torch_rank != v.torch_rank - 1:
            raise c.unsupported(node, "a softmax over flattened trailing axes (opset < 13) other than the last")
        fake = c.fake(node, op, c.ref(node.input[0]), axis)
        getattr(c, f"_op_{op}")(fake)
        c.finish(node, fake)
    return convert


HANDLERS["Softmax"] = _softmax_like("softmax")
HANDLERS["LogSoftmax"] = _softmax_like("log_softmax")


@handles("BatchNormalization")
def _batch_norm(c: _Converter, node):
    if len(node.output) > 1 and any(c.users.get(o) for o in node.output[1:] if o):
        raise c.unsupported(node, "the model was exported in training mode; export it in eval mode")
    for i, what in zip(range(1, 5), ("scale", "bias", "mean", "variance")):
        c.cval(node, i, what)
    fake = c.fake(node, "batch_norm")
    c._batch_norm(fake, *(c.ref(i) for i in node.input[:5]), _f32(_attrs(node).get("epsilon", 1e-5)))
    c.finish(node, fake)


def _pool(c: _Converter, node, kind: str):
    a = _attrs(node)
    v = c.onnx_value(node.input[0], node)
    kernel = list(a["kernel_shape"])
    n = len(kernel)
    stride, dilation = list(a.get("strides", [1] * n)), list(a.get("dilations", [1] * n))
    p = _pads(node, a, c._torch_shape(v)[2:], kernel, stride, dilation)
    ceil = bool(a.get("ceil_mode", 0))
    if kind == "max" and not any(p) and kernel == c._torch_shape(v)[2:]:  # AdaptiveMaxPool(1) as exported
        return _global_pool(kind)(c, node)
    x = c.ref(node.input[0])
    if n == 2:
        pads = (p[0], p[2], p[1], p[3])  # (top, bottom, left, right)
        if kind == "max":
            fake = c.fake(node, "max_pool2d", x, kernel, stride, pads, dilation, ceil)
            c._op_max_pool2d(fake)
        else:
            fake = c.fake(node, "avg_pool2d", x, kernel, stride, pads, ceil, bool(a.get("count_include_pad", 0)))
            c._op_avg_pool2d(fake)
    elif n == 1:
        if p[0] != p[1]:
            raise c.unsupported(node, f"uneven pads {p} on a 1-D pooling")
        if kind == "max":
            fake = c.fake(node, "max_pool1d", x, kernel, stride, p[0], dilation, ceil)
            c._op_max_pool1d(fake)
        else:
            fake = c.fake(node, "avg_pool1d", x, kernel, stride, p[0], ceil, bool(a.get("count_include_pad", 0)))
            c._op_avg_pool1d(fake)
    else:
        raise c.unsupported(node, f"a {n}-D pooling (edgekit: 1-D and 2-D)")
    c.finish(node, fake)


@handles("MaxPool")
def _max_pool(c: _Converter, node):
    _pool(c, node, "max")


@handles("AveragePool")
def _average_pool(c: _Converter, node):
    _pool(c, node, "avg")


def _global_pool(kind: str):
    def convert(c: _Converter, node):
        v = c.onnx_value(node.input[0], node)
        if v.torch_rank not in (3, 4):
            raise c.unsupported(node, "a global pooling of a tensor that is not (N, C, H, W) or (N, C, L)")
        op = f"adaptive_{kind}_pool{v.torch_rank - 2}d"
        fake = c.fake(node, op, c.ref(node.input[0]), [1] * (v.torch_rank - 2))
        getattr(c, f"_op_{op}")(fake)
        c.finish(node, fake)
    return convert


HANDLERS["GlobalAveragePool"] = _global_pool("avg")
HANDLERS["GlobalMaxPool"] = _global_pool("max")


def _axes(c: _Converter, node, input_index: int = 1):
    """A reduction's / squeeze's axes: an attribute before opset 13 / 18, an input after."""
    a = _attrs(node)
    if "axes" in a:
        return [int(x) for x in a["axes"]]
    axes = c.cval(node, input_index, "axes")
    return None if axes is None else [int(x) for x in axes.reshape(-1)]


def _reduce(what: str):
    def convert(c: _Converter, node):
        v = c.onnx_value(node.input[0], node)
        axes = _axes(c, node)
        if axes is None:
            if _attrs(node).get("noop_with_empty_axes", 0):
                c.values[c.ident(node.output[0])] = v
                return
            axes = list(range(v.torch_rank))
        fake = c.fake(node, what, c.ref(node.input[0]), axes, bool(_attrs(node).get("keepdims", 1)))
        c._reduce(fake, what)
        c.finish(node, fake)
    return convert


HANDLERS["ReduceMean"] = _reduce("mean")
HANDLERS["ReduceMax"] = _reduce("amax")
HANDLERS["ReduceMin"] = _reduce("amin")
HANDLERS["ReduceSum"] = _reduce("sum")


@handles("LayerNormalization")
def _layer_norm(c: _Converter, node):
    a = _attrs(node)
    v = c.onnx_value(node.input[0], node)
    if any(c.users.get(o) for o in node.output[1:] if o):
        raise c.unsupported(node, "its mean / inverse standard deviation outputs are read")
    axis = int(a.get("axis", -1)) % v.torch_rank
    c.cval(node, 1, "scale")
    c.cval(node, 2, "bias")
    fake = c.fake(node, "layer_norm", c.ref(node.input[0]), c._torch_shape(v)[axis:], c.ref(node.input[1]),
                  c.ref(node.input[2]) if len(node.input) > 2 else None, _f32(a.get("epsilon", 1e-5)))
    c._op_layer_norm(fake)
    c.finish(node, fake)


@handles("InstanceNormalization")
def _instance_norm(c: _Converter, node):
    c.cval(node, 1, "scale")
    c.cval(node, 2, "bias")
    fake = c.fake(node, "instance_norm", c.ref(node.input[0]), c.ref(node.input[1]), c.ref(node.input[2]), None,
                  None, True, 0.1, _f32(_attrs(node).get("epsilon", 1e-5)))
    c._op_instance_norm(fake)
    c.finish(node, fake)


@handles("GroupNormalization")
def _group_norm(c: _Converter, node):
    """GroupNormalization: opset 21's per-channel scale and bias, opset 18's per-group ones (repeated over
    each group's channels), or torch's exported Reshape / InstanceNormalization pattern put back together."""
    a = _attrs(node)
    v = c.onnx_value(node.input[0], node)
    groups, channels = int(a["num_groups"]), c._torch_shape(v)[1]
    if channels % groups:
        raise c.unsupported(node, f"{channels} channels in {groups} groups")
    refs = []
    for i, what in ((1, "scale"), (2, "bias")):
        data = c.cval(node, i, what)
        if data is None:
            refs.append(None)
            continue
        data = data.astype(np.float32).reshape(-1)
        if data.size == groups and groups != channels:
            data = np.repeat(data, channels // groups)
        if data.size != channels:
            raise c.unsupported(node, f"a {what} of {data.size} values for {channels} channels")
        refs.append(c.const_ref(data, f"{layer_name(node)}.{what}"))
    fake = c.fake(node, "group_norm", c.ref(node.input[0]), groups, *refs, _f32(a.get("epsilon", 1e-5)))
    c._op_group_norm(fake)
    c.finish(node, fake)


@handles("Pad")
def _pad(c: _Converter, node):
    a = _attrs(node)
    v = c.onnx_value(node.input[0], node)
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}.get(a.get("mode", "constant"))
    if mode is None:
        raise c.unsupported(node, f"padding mode {a.get('mode')!r} (edgekit: constant, reflect, edge)")
    if c.opset < 11:
        pads, value = list(a["pads"]), float(a.get("value", 0.0))
    else:
        pads = [int(p) for p in c.cval(node, 1, "pads")]
        value = c.cval(node, 2, "value")
        value = 0.0 if value is None else float(value.reshape(-1)[0])
    r = v.torch_rank
    axes = _axes(c, node, 3) if len(node.input) > 3 and node.input[3] else list(range(r))
    full = [0] * (2 * r)
    for i, ax in enumerate(axes):
        full[ax % r], full[r + ax % r] = pads[i], pads[len(axes) + i]
    if any(full[i] or full[r + i] for i in (0, 1)):
        raise c.unsupported(node, "padding of the batch or channel dimension")
    torch_pads = []  # torch order: the last dimension first, (begin, end) each
    for ax in range(r - 1, 1, -1):
        torch_pads += [full[ax], full[r + ax]]
    while len(torch_pads) > 2 and not any(torch_pads[-2:]):
        torch_pads = torch_pads[:-2]
    fake = c.fake(node, "pad", c.ref(node.input[0]), torch_pads, mode, value)
    c._op_constant_pad_nd(fake)
    c.finish(node, fake)


@handles("Flatten")
def _flatten(c: _Converter, node):
    v = c.onnx_value(node.input[0], node)
    axis = int(_attrs(node).get("axis", 1)) % max(v.torch_rank, 1)
    if axis > 1:
        shape = c._torch_shape(v)
        if shape[0] != 1 or int(np.prod(shape[:axis])) != 1:
            raise c.unsupported(node, f"it flattens from axis {axis}, merging the batch with other dimensions")
    fake = c.fake(node, "flatten", c.ref(node.input[0]), 1, -1)
    c._op_flatten(fake)
    c.finish(node, fake)


def _view(c: _Converter, node, shape):
    fake = c.fake(node, "view", c.ref(node.input[0]), val=_shaped(shape))
    c._op_view(fake)
    c.finish(node, fake)


@handles("Reshape")
def _reshape(c: _Converter, node):
    if _sequence_view(c, node):
        return
    v = c.onnx_value(node.input[0], node)
    current = c._torch_shape(v)
    target = [int(s) for s in c.cval(node, 1, "shape")]
    allow_zero = bool(_attrs(node).get("allowzero", 0))
    shape = [current[i] if s == 0 and not allow_zero and i < len(current) else s for i, s in enumerate(target)]
    if shape.count(-1) == 1:
        known = int(np.prod([s for s in shape if s != -1]))
        shape[shape.index(-1)] = int(np.prod(current)) // max(known, 1)
    if int(np.prod(shape)) != int(np.prod(current)) or any(s < 1 for s in shape):
        raise c.unsupported(node, f"it reshapes {current} to {target}")
    _view(c, node, shape)


@handles("Squeeze")
def _squeeze(c: _Converter, node):
    if _squeeze_sequence(c, node):
        return
    v = c.onnx_value(node.input[0], node)
    shape = c._torch_shape(v)
    axes = _axes(c, node)
    axes = [i for i, s in enumerate(shape) if s == 1] if axes is None else [ax % len(shape) for ax in axes]
    _view(c, node, [s for i, s in enumerate(shape) if i not in axes])


@handles("Unsqueeze")
def _unsqueeze(c: _Converter, node):
    v = c.onnx_value(node.input[0], node)
    shape = list(c._torch_shape(v))
    axes = _axes(c, node)
    rank = len(shape) + len(axes)
    for ax in sorted(a % rank for a in axes):
        shape.insert(ax, 1)
    _view(c, node, shape)


@handles("Transpose")
def _transpose(c: _Converter, node):
    if _sequence_view(c, node):
        return
    v = c.onnx_value(node.input[0], node)
    perm = _attrs(node).get("perm", list(range(v.torch_rank))[::-1])
    fake = c.fake(node, "permute", c.ref(node.input[0]), list(perm))
    c._op_permute(fake)
    c.finish(node, fake)
    # edgekit keeps the batch first; only an LSTM / GRU reads a time-major (L, N, C) tensor (and the Shape
    # that sizes its initial state), and a recognised attention block a sequence-first one
    if c.values[fake.name].dims[0] != 0 and not all(u.op_type in _READS_SEQUENCE_FIRST
                                                       for u in c.users.get(node.output[0], ())):
        raise c.unsupported(node, f"a transpose {list(perm)} that moves the batch dimension (edgekit keeps it "
                                  "first; a sequence-first tensor is read only by nn.MultiheadAttention, LSTM and "
                                  "GRU, not by "
                                  f"{sorted({u.op_type for u in c.users.get(node.output[0], ())} - set(_READS_SEQUENCE_FIRST))})")


_READS_SEQUENCE_FIRST = ("LSTM", "GRU", "Shape", "MultiHeadAttention")


@handles("Concat")
def _concat(c: _Converter, node):
    fake = c.fake(node, "cat", [c.ref(i) for i in node.input], int(_attrs(node)["axis"]))
    c._op_cat(fake)
    c.finish(node, fake)


@handles("Split")
def _split(c: _Converter, node):
    v = c.onnx_value(node.input[0], node)
    a = _attrs(node)
    axis = int(a.get("axis", 0)) % v.torch_rank
    size = c._torch_shape(v)[axis]
    sizes = a.get("split")
    if sizes is None and len(node.input) > 1 and node.input[1]:
        sizes = c.cval(node, 1, "split sizes")
    if sizes is None:
        n = int(a.get("num_outputs", len(node.output)))
        step = -(-size // n)
        sizes = [min(step, size - i * step) for i in range(n)]
    sizes = [int(s) for s in np.asarray(sizes).reshape(-1)]
    if len(sizes) != len(node.output):
        raise c.unsupported(node, f"{len(sizes)} split sizes for {len(node.output)} outputs")
    c.finish(node, _split_pieces(c, node, v, axis, sizes))


def _split_pieces(c: _Converter, node, v, axis: int, sizes: list[int]):
    """One SPLIT op cutting axis into pieces of these sizes (Split's outputs, SplitToSequence's sequence)."""
    size = c._torch_shape(v)[axis]
    if sum(sizes) != size:
        raise c.unsupported(node, f"split sizes {sizes} do not cover the {size} of axis {axis}")
    fake = c.fake(node, "split")
    c._pieces(fake, v, axis, sizes)
    return fake


class _Pieces(tuple):
    """A SplitToSequence's output: the pieces, read one by one with SequenceAt."""


@handles("SplitToSequence")
def _split_to_sequence(c: _Converter, node):
    """The dynamo exporter's torch.chunk / split (optimize=False): the pieces of one SPLIT op."""
    v = c.onnx_value(node.input[0], node)
    a = _attrs(node)
    axis = int(a.get("axis", 0)) % v.torch_rank
    size = c._torch_shape(v)[axis]
    split = c.cval(node, 1, "split sizes") if len(node.input) > 1 and node.input[1] else None
    if split is None:
        if not a.get("keepdims", 1):
            raise c.unsupported(node, "a split into pieces of one with the axis dropped (keepdims=0)")
        sizes = [1] * size
    elif split.ndim == 0:  # pieces of that size, the last one smaller
        n = int(split)
        sizes = [n] * (size // n) + ([size % n] if size % n else [])
    else:
        sizes = [int(s) for s in split.reshape(-1)]
    fake = _split_pieces(c, node, v, axis, sizes)
    c.values[c.ident(node.output[0])] = _Pieces(c.values[fake.name])


@handles("SequenceAt")
def _sequence_at(c: _Converter, node):
    pieces = c.values.get(c.ident(node.input[0]))
    if pieces is pt._POISON:
        raise pt._Poisoned()
    if not isinstance(pieces, _Pieces):
        raise c.unsupported(node, "it reads a sequence that is not a SplitToSequence's")
    index = int(c.cval(node, 1, "position"))
    if not -len(pieces) <= index < len(pieces):
        raise c.unsupported(node, f"position {index} of a sequence of {len(pieces)}")
    c.values[c.ident(node.output[0])] = pieces[index]


@handles("Slice")
def _slice(c: _Converter, node):
    v = c.onnx_value(node.input[0], node)
    if c.opset < 10:
        a = _attrs(node)
        starts, ends = a["starts"], a["ends"]
        axes, steps = a.get("axes", list(range(len(starts)))), [1] * len(starts)
    else:
        starts, ends = (list(c.cval(node, i, w).reshape(-1)) for i, w in ((1, "starts"), (2, "ends")))
        axes = c.cval(node, 3, "axes", np.arange(len(starts)))
        steps = c.cval(node, 4, "steps", np.ones(len(starts), np.int64))
    big = 2 ** 62
    current, ref = v, c.ref(node.input[0])
    for i, (ax, start, end, step) in enumerate(zip(axes, starts, ends, steps)):
        if int(step) < 1:
            raise c.unsupported(node, f"a slice with step {int(step)}")
        last = i == len(axes) - 1
        name = c.ident(node.output[0]) if last else c.ident(f"{node.output[0]}.axis{i}")
        fake = _Node(node, name, "slice", (ref, int(ax), max(min(int(start), big), -big),
                                           max(min(int(end), big), -big), int(step)))
        c._op_slice(fake)
        current, ref = c.values[name], _Ref(name, [node])
    c.values[c.ident(node.output[0])] = current
    c.onnx_slices.add(current.name)


@handles("Gather")
def _gather(c: _Converter, node):
    """x[:, i] (one index: SELECT) or x[:, [i, i + 1, ...]] (consecutive indices: a slice)."""
    v = c.onnx_value(node.input[0], node)
    index = c.cval(node, 1, "indices")
    axis = int(_attrs(node).get("axis", 0)) % v.torch_rank
    if index.ndim == 0:
        fake = c.fake(node, "select", c.ref(node.input[0]), axis, int(index))
        c._op_select(fake)
    else:
        size = c._torch_shape(v)[axis]
        idx = [int(i) % size for i in index.reshape(-1)]
        if index.ndim != 1 or idx != list(range(idx[0], idx[0] + len(idx))):
            raise c.unsupported(node, "a gather of other than one index or consecutive indices")
        fake = c.fake(node, "slice", c.ref(node.input[0]), axis, idx[0], idx[-1] + 1, 1)
        c._op_slice(fake)
    c.finish(node, fake)


@handles("Resize", "Upsample")
def _resize(c: _Converter, node):
    a = _attrs(node)
    v = c.onnx_value(node.input[0], node)
    shape = c._torch_shape(v)
    mode, coords = a.get("mode", "nearest"), a.get("coordinate_transformation_mode", "half_pixel")
    if node.op_type == "Upsample":
        scales, sizes, coords = c.cval(node, 1, "scales"), None, "asymmetric"
    else:
        scales, sizes = c.cval(node, 2, "scales"), c.cval(node, 3, "sizes")
    if sizes is not None and sizes.size:
        out = [int(s) for s in sizes]
    elif scales is not None and scales.size:
        out = [int(np.floor(s * float(f))) for s, f in zip(shape, scales)]
    else:
        raise c.unsupported(node, "neither scales nor sizes are given")
    if out[:2] != shape[:2] or v.torch_rank not in (3, 4):
        raise c.unsupported(node, f"a resize of {shape} to {out} (edgekit resizes the spatial dims)")
    nearest = (coords, a.get("nearest_mode", "round_prefer_floor"))
    # TFLite's nearest: floor(x * in / out), or with half-pixel centres floor((x + 0.5) * in / out)
    if mode == "nearest" and nearest in (("asymmetric", "floor"), ("tf_half_pixel_for_nn", "floor"),
                                         ("half_pixel", "round_prefer_ceil")):
        half = coords != "asymmetric"
        op = "upsample_nearest2d" if v.torch_rank == 4 else "upsample_nearest1d"
        fake = c.fake(node, op, c.ref(node.input[0]), val=_shaped(out))
        getattr(c, f"_op_{op}")(fake, half_pixel=half)
    elif mode == "linear" and v.torch_rank == 4 and coords in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        fake = c.fake(node, "upsample_bilinear2d", c.ref(node.input[0]), out[2:], coords == "align_corners",
                      val=_shaped(out))
        c._op_upsample_bilinear2d(fake)
    else:
        raise c.unsupported(node, f"a resize in mode {mode!r} with {coords!r} coordinates "
                                  f"(nearest_mode {a.get('nearest_mode', 'round_prefer_floor')!r}); edgekit: nearest "
                                  "(floor, asymmetric) and linear (half_pixel, align_corners)")
    c.finish(node, fake)


@handles("Dropout", "Identity")
def _identity(c: _Converter, node):
    c.values[c.ident(node.output[0])] = c.onnx_value(node.input[0], node)
    if len(node.output) > 1 and c.users.get(node.output[1]):
        raise c.unsupported(node, "its mask output is read")


@handles("Cast")
def _cast(c: _Converter, node):
    from onnx import TensorProto

    if _attrs(node).get("to") not in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16):
        raise c.unsupported(node, "a cast of an activation to a type other than float")
    _identity(c, node)


@handles("CastLike")
def _cast_like(c: _Converter, node):
    """The dynamo exporter's CastLike(constant, activation): the constant in the activation's type (float)."""
    if c.is_const(node.input[0]):
        c.consts[c.ident(node.output[0])] = c.cval(node, 0, "value").astype(np.float32)
        return
    c.onnx_value(node.input[1], node)
    _identity(c, node)


@handles("Shape")
def _shape(c: _Converter, node):
    if _sequence_view(c, node):
        return
    a = _attrs(node)
    shape = np.array(c._torch_shape(c.onnx_value(node.input[0], node)), np.int64)
    c.consts[c.ident(node.output[0])] = shape[a.get("start", 0):a.get("end", len(shape))]


# Recurrent layers: ONNX holds them time-major, (L, N, C) in and (L, directions, N, H) out, with the gates
# in another order than torch; with N = 1 the time-major tensors are the batch-first ones relabelled.

def _recurrent(c: _Converter, node, gates: str, torch_gates: str):
    a = _attrs(node)
    if a.get("direction", "forward") != "forward":
        raise c.unsupported(node, f"a {a.get('direction')} recurrent layer (edgekit: forward only)")
    if int(a.get("layout", 0)) != 0:
        raise c.unsupported(node, "a batch-major recurrent layer (layout=1)")
    if len(node.input) > 4 and node.input[4]:
        raise c.unsupported(node, "sequence lengths (edgekit runs every step)")
    for i in range(5, len(node.input)):  # initial_h, initial_c, peepholes
        if np.any(c.cval(node, i, "initial state or peepholes", np.zeros(1))):
            raise c.unsupported(node, "an initial state other than zeros, or peepholes")
    for out in node.output[1:]:
        if out and c.users.get(out):
            raise c.unsupported(node, "the final state is not supported as an output; use the output sequence")
    v = c.onnx_value(node.input[0], node)
    if v.torch_rank != 3 or c._torch_shape(v)[1] != 1:
        raise c.unsupported(node, f"input of shape {c._torch_shape(v)} (edgekit: (L, 1, C))")
    # (L, 1, C) time-major is (1, L, C) batch-first over the same memory: swap torch dims 0 and 1
    name = c.ident(f"{node.output[0]}.batch_first")
    c.values[name] = pt._Value(v.name, tuple({0: 1, 1: 0}.get(d, d) for d in v.dims))
    w, r = c.cval(node, 1, "weights")[0], c.cval(node, 2, "recurrent weights")[0]
    hidden = int(a.get("hidden_size", r.shape[-1]))
    n = len(gates)
    b = c.cval(node, 3, "bias", np.zeros((1, 2 * n * hidden), np.float32))[0]
    order = [gates.index(g) for g in torch_gates]

    def torch_order(m):
        return np.concatenate([m[k * hidden:(k + 1) * hidden] for k in order]).astype(np.float32)

    base = layer_name(node)
    params = [c.const_ref(torch_order(w), f"{base}.w_ih"), c.const_ref(torch_order(r), f"{base}.w_hh"),
              c.const_ref(torch_order(b[:n * hidden]), f"{base}.b_ih"),
              c.const_ref(torch_order(b[n * hidden:]), f"{base}.b_hh")]
    zero = c.const_ref(np.zeros((1, 1, hidden), np.float32), f"{base}.h0")
    state = (zero, zero) if n == 4 else zero
    fake = c.fake(node, "lstm" if n == 4 else "gru", _Ref(name), state, params, True, 1, 0.0, False, False, True)
    if n == 4:
        if any(np.any(a.get(k, 0)) for k in ("clip", "input_forget")):
            raise c.unsupported(node, "clip / input_forget")
        c._op_lstm(fake)
    else:
        if int(a.get("linear_before_reset", 0)) != 1:
            raise c.unsupported(node, "a GRU with linear_before_reset=0 (torch's GRU has 1)")
        c._op_gru(fake)
    out = c.values[fake.name]
    n, length, hidden = c._torch_shape(out[0])
    c.values[c.ident(node.output[0])] = _Seq(out[0], (length, 1, n, hidden))


@handles("LSTM")
def _lstm(c: _Converter, node):
    _recurrent(c, node, "iofc", "ifco")


@handles("GRU")
def _gru(c: _Converter, node):
    _recurrent(c, node, "zrh", "rzh")


def _squeeze_sequence(c: _Converter, node) -> bool:
    """Squeeze(axes=[1]) of an LSTM / GRU output: the (L, N, H) time-major sequence, a relabelled view."""
    seq = c.values.get(c.ident(node.input[0]))
    if not isinstance(seq, _Seq):
        return False
    if seq.swapped or _axes(c, node) not in ([1], [-3]):
        raise c.unsupported(node, "a squeeze of an LSTM / GRU output other than its directions axis")
    _time_major(c, node, seq)
    return True


def _time_major(c: _Converter, node, seq: _Seq) -> None:
    v = seq.value
    c.values[c.ident(node.output[0])] = pt._Value(v.name, tuple({0: 1, 1: 0}.get(d, d) for d in v.dims))


def _sequence_view(c: _Converter, node) -> bool:
    """The dynamo exporter's spelling of that squeeze: Transpose (0, 2, 1, 3) of Y, then a Reshape to
    (L, N, H); and the Shape of either, which sizes that Reshape."""
    seq = c.values.get(c.ident(node.input[0]))
    if not isinstance(seq, _Seq):
        return False
    swapped = seq.swapped
    if node.op_type == "Shape":
        a = _attrs(node)
        c.consts[c.ident(node.output[0])] = np.array(seq.shape, np.int64)[a.get("start", 0):a.get("end", 4)]
    elif node.op_type == "Transpose" and list(_attrs(node).get("perm", [])) == [0, 2, 1, 3] and not swapped:
        L, d, n, h = seq.shape
        c.values[c.ident(node.output[0])] = _Seq(seq.value, (L, n, d, h), swapped=True)
    elif node.op_type == "Reshape" and swapped and [int(s) for s in c.cval(node, 1, "shape")] in (
            [seq.shape[0], seq.shape[1], seq.shape[3]], [0, 0, -1]):
        _time_major(c, node, seq)  # (L, N, 1, H) -> (L, N, H)
    else:
        raise c.unsupported(node, "it reads an LSTM / GRU output other than through the exporter's Squeeze")
    return True


# QDQ: a QuantizeLinear -> DequantizeLinear pair on an activation is its quantization parameters.

def _qparams(c: _Converter, node) -> tuple[np.ndarray, np.ndarray]:
    scale = c.cval(node, 1, "scale").astype(np.float64)
    zp = c.cval(node, 2, "zero point", np.zeros(scale.shape, np.int8))
    if zp.dtype == np.uint8:  # the same real values as int8 with the zero point moved by 128
        zp = zp.astype(np.int64) - 128
    elif zp.dtype != np.int8 and zp.dtype != np.int32:
        raise c.unsupported(node, f"it quantizes to {zp.dtype} (edgekit runs int8)")
    return scale, zp.astype(np.int64)


@handles("QuantizeLinear")
def _quantize_linear(c: _Converter, node):
    v = c.onnx_value(node.input[0], node)
    scale, zp = _qparams(c, node)
    if scale.size != 1:
        raise c.unsupported(node, "it quantizes an activation per channel (edgekit: one scale per activation)")
    c.quantized[c.ident(node.output[0])] = (v, float(scale.reshape(-1)[0]), int(zp.reshape(-1)[0]))


@handles("DequantizeLinear")
def _dequantize_linear(c: _Converter, node):
    source = node.input[0]
    if c.is_const(source):  # a quantized weight or bias: its real values, and its scales for the quantizer
        q = c.cval(node, 0, "quantized data")
        scale, zp = _qparams(c, node)
        axis = int(_attrs(node).get("axis", 1))
        shape = [1] * q.ndim
        if scale.size > 1:
            shape[axis % q.ndim] = -1
        raw_zp = zp + (128 if q.dtype == np.uint8 else 0)
        out = c.ident(node.output[0])
        c.consts[out] = ((q.astype(np.float64) - raw_zp.reshape(shape)) * scale.reshape(shape)).astype(np.float32)
        c.const_quant[out] = (scale.reshape(-1), zp.reshape(-1), axis % max(q.ndim, 1))
        return
    if c.ident(source) not in c.quantized:
        raise c.unsupported(node, "it dequantizes a tensor that no QuantizeLinear produced")
    v, scale, zp = c.quantized[c.ident(source)]
    if zp < -128 or zp > 127:
        raise c.unsupported(node, f"it uses zero point {zp}, outside int8")
    c.graph.meta.setdefault("activation_params", {})[v.name] = (scale, zp)
    if zp == -128:  # the pair clamps at 0: onnxruntime drops a ReLU into such a range, so keep the clamp as
        # a fused ReLU; it costs nothing and still holds where edgekit must change the parameters (a
        # CONCATENATION's inputs share one set, which may reach below 0)
        op = next((o for o in reversed(c.graph.ops) if v.name in o.outputs), None)
        if op is not None and op.kind in _FUSES_ACTIVATION and op.attrs.get("activation") == "none":
            op.attrs["activation"] = "relu"
    c.values[c.ident(node.output[0])] = v


# An exported nn.MultiheadAttention, recognised as a whole before the walk (_attention_blocks).

def _mha_reference(q, k, v, weights, biases, out_w, out_b, heads: int) -> np.ndarray:
    """torch's multi-head attention in float64 (inputs (1, L, E_in), weights and biases of q, k, v): the
    computation a recognised block must be."""
    E = out_w.shape[0]
    d = E // heads

    def split(x, w, b):
        y = x @ w.T + b
        return y.reshape(y.shape[0], y.shape[1], heads, d).transpose(0, 2, 1, 3)

    Q, K, V = (split(x, w, b) for x, w, b in zip((q, k, v), weights, biases))
    s = Q @ K.transpose(0, 1, 3, 2) / np.sqrt(d)
    p = np.exp(s - s.max(-1, keepdims=True))
    o = (p / p.sum(-1, keepdims=True)) @ V
    return o.transpose(0, 2, 1, 3).reshape(q.shape[0], q.shape[1], E) @ out_w.T + out_b


@handles("MultiHeadAttention")
def _multi_head_attention(c: _Converter, node):
    """The block's projections read from its MatMul / Gemm nodes with constant weights: the in-projections
    (those reading a block input through its entry Transpose; one packed q|k|v for self attention, q and k|v,
    or q, k, v for cross attention), and the output projection (the one left). The heads are found by
    running the block (onnx's reference evaluator) on random inputs against torch's formula with each
    number of heads; a block that matches none (a mask, add_bias_kv, add_zero_attn, ...) is refused."""
    import onnx
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    members = c.attention_members[node.name]
    if len(node.output) != 1:
        raise c.unsupported(node, "its attention weights are read (call it with need_weights=False or ignore them)")
    reads = list(node.input)
    values = [c.onnx_value(r, node) for r in reads]
    produced = {o: m for m in members for o in m.output}
    users = {}
    for m in members:
        for i in m.input:
            users.setdefault(i, []).append(m)
    # each input enters through a Transpose (1, 0, 2) (batch_first=True), or is read as it is: then it is
    # sequence first already (the exporter cancels a block's closing Transpose against the next one's opening
    # one), an (L, 1, E) tensor over the memory of the (1, L, E) one: read through a relabelled alias
    entries, batch_first = {}, {}
    for r, v in zip(reads, values):
        entry = users.get(r, [])
        if v.torch_rank != 3:
            raise c.unsupported(node, f"a rank-{v.torch_rank} input (expected (N, L, E) or (L, N, E))")
        if all(u.op_type == "Transpose" and list(_attrs(u).get("perm", [])) == [1, 0, 2] for u in entry):
            entries.update((u.output[0], r) for u in entry)
            batch_first[r] = r
        else:
            if c._torch_shape(v)[1] != 1:
                raise c.unsupported(node, f"a sequence-first input of shape {c._torch_shape(v)} (edgekit: batch 1)")
            entries[r] = r
            alias = c.ident(f"{r}.batch_first")
            c.values[alias] = pt._Value(v.name, tuple({0: 1, 1: 0}.get(d, d) for d in v.dims))
            batch_first[r] = f"{r}.batch_first"

    # a QDQ model's Q/DQ pairs inside the block are looked through (edgekit calibrates the block's own tensors)
    qdq = {m.output[0]: m.input[0] for m in members if m.op_type in ("QuantizeLinear", "DequantizeLinear")
           and not c.is_const(m.input[0])}

    def through(name):
        while name in qdq:
            name = qdq[name]
        return name

    def readers(name):
        found = []
        for u in users.get(name, []):
            found += readers(u.output[0]) if u.output[0] in qdq else [u]
        return found

    linears = []  # (weight (out, in), bias, block input it reads or None)
    for m in members:
        if m.op_type == "MatMul" and c.is_const(m.input[1]) and not c.is_const(m.input[0]):
            w = c.cval(m, 1, "weight")
            if w.ndim != 2:
                continue
            w, bias = w.T, None
            adds = [u for u in readers(m.output[0]) if u.op_type == "Add"]
            if len(adds) == 1:
                other = adds[0].input[1] if through(adds[0].input[0]) == m.output[0] else adds[0].input[0]
                if c.is_const(other) and c.consts[c.ident(other)].size == w.shape[0]:
                    bias = c.consts[c.ident(other)].reshape(-1)
        elif m.op_type == "Gemm" and c.is_const(m.input[1]):
            a = _attrs(m)
            if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
                raise c.unsupported(node, f"its Gemm '{m.name}' scales or transposes its input")
            w = c.cval(m, 1, "weight")
            w = w if a.get("transB", 0) else w.T
            bias = c.cval(m, 2, "bias")
            bias = None if bias is None else np.broadcast_to(bias.reshape(-1), (w.shape[0],))
        else:
            continue
        linears.append((np.asarray(w, np.float64), None if bias is None else np.asarray(bias, np.float64),
                        entries.get(through(m.input[0]))))
    inputs = [(w, b, r) for w, b, r in linears if r is not None]
    rest = [(w, b) for w, b, r in linears if r is None]
    if not inputs or len(rest) != 1:
        raise c.unsupported(node, "edgekit could not find its input and output projections")
    out_w, out_b = rest[0]
    E = out_w.shape[0]
    inputs.sort(key=lambda p: reads.index(p[2]))  # the query's projection first (rows q, then k, then v)
    weights, biases, roles = [], [], []
    for w, b, r in inputs:  # a packed projection's rows: E for each role
        for i in range(w.shape[0] // E if w.shape[0] % E == 0 else 0):
            weights.append(w[i * E:(i + 1) * E])
            biases.append(None if b is None else b[i * E:(i + 1) * E])
            roles.append(r)
    if len(roles) != 3 or out_w.shape != (E, E):
        raise c.unsupported(node, f"projections of shapes {[list(p[0].shape) for p in inputs]} and "
                                  f"{list(out_w.shape)} are not those of a multi-head attention")

    # run the block as exported, then torch's formula with each number of heads
    rng = np.random.default_rng(0)
    feeds = {r: rng.normal(size=c._torch_shape(v)).astype(np.float32) for r, v in zip(reads, values)}
    for m in members:
        for i in m.input:
            if i and i not in produced and i not in feeds:
                if not c.is_const(i):
                    raise c.unsupported(node, f"it reads '{i}', which is not an activation edgekit computes")
                feeds[i] = c.consts[c.ident(i)]
    run = [helper.make_node("Identity", [m.input[0]], [m.output[0]]) if m.output[0] in qdq else m for m in members]
    graph = helper.make_graph(run, "attention", [helper.make_value_info(i, onnx.TypeProto()) for i in feeds],
                              [helper.make_value_info(node.output[0], onnx.TypeProto())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", c.opset)])
    got = np.asarray(ReferenceEvaluator(model).run(None, feeds)[0], np.float64)
    q, k, v = (feeds[r].astype(np.float64) if batch_first[r] == r else feeds[r].transpose(1, 0, 2).astype(np.float64)
               for r in roles)
    seq_first = got.ndim == 3 and got.shape == (q.shape[1], 1, E) and q.shape[1] != 1  # (L, 1, E) out
    got = got.transpose(1, 0, 2) if seq_first else got
    zero = np.zeros(E)
    heads = next((h for h in range(1, E + 1) if E % h == 0 and got.shape == q.shape[:2] + (E,) and np.allclose(
        got, _mha_reference(q, k, v, weights, [zero if b is None else b for b in biases], out_w,
                            zero if out_b is None else out_b, h), rtol=1e-3, atol=1e-4)), None)
    if heads is None:
        raise c.unsupported(node, "an attention block that is not a plain multi-head attention (an attention or "
                                  "key padding mask, add_bias_kv or add_zero_attn are not supported)")
    fake = c.fake(node, "multihead_attention")
    y = c._attention_layers(fake, layer_name(node), [c.ref(batch_first[r]) for r in roles], weights, biases, out_w,
                            out_b, heads)
    if seq_first:  # (L, 1, E) out: a relabelled view, for a Transpose back to batch first or another block
        readers = {u.op_type for u in c.users.get(node.output[0], ())} - {"Transpose", "MultiHeadAttention"}
        if readers or node.output[0] in {o.name for o in c.onnx_graph.output}:
            raise c.unsupported(node, "its sequence-first (L, N, E) output is read by "
                                      f"{sorted(readers) or 'the model output'}; edgekit keeps the batch first (an "
                                      "nn.TransformerEncoderLayer needs batch_first=True)")
        y = pt._Value(y.name, tuple({0: 1, 1: 0}.get(d, d) for d in y.dims))
    c.values[c.ident(node.output[0])] = y
