"""PyTorch -> float IR, through ``torch.export``.

The exported ATen graph is walked node by node. Tensors change layout on the
way in: NCHW activations become NHWC, conv weights become OHWI (depthwise:
1HWO), as TFLite and CMSIS-NN lay them out. A Flatten of a spatial tensor
keeps NHWC order in memory; the Linear layer that reads it gets its weight
columns permuted instead, so no transpose runs on the device.
"""
from __future__ import annotations

import operator
from pathlib import Path

import numpy as np

from ..errors import EdgekitError
from ..ir import Graph, Op, Tensor, conv_output_size

SUPPORTED_LAYERS = (
    "Conv2d (groups 1 or depthwise), Conv1d, Linear, BatchNorm1d/2d, ReLU, ReLU6, MaxPool2d, "
    "AvgPool2d, AdaptiveAvgPool2d, ZeroPad2d / F.pad, Flatten / view / reshape, residual add (+), "
    "torch.cat, Dropout, Identity, a final Softmax, int8 fake quantization (from edgekit.qat), "
    "Sigmoid, Tanh, Hardswish, Hardsigmoid, SiLU, GELU, ELU, LeakyReLU, PReLU, clamp / Hardtanh, torch.rsqrt, "
    "x + y, x - y, x * y (broadcasting (N,C,1,1) with (N,C,H,W)), x + c, x * c, x / c with constants or "
    "parameter tensors, (x - y) ** 2"
)


class _Poisoned(Exception):
    """A node reads the result of a node that could not be converted: reported once, at the source."""


# The extra file of a .pt2 that names a multi-exit model's outputs (early exits in order, final last).
EXITS_FILE = "edgekit_exits.json"


def load_exported(path: str | Path):
    """Load a ``torch.export.save`` file, with clear errors."""
    import torch

    import logging
    import zipfile

    path = Path(path)
    if not path.exists():
        raise EdgekitError(f"model file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise EdgekitError(f"{path} is not a torch.export file (torch.export.save writes a zip archive)")
    export_log = logging.getLogger("torch.export")
    level = export_log.level
    export_log.setLevel(logging.ERROR)  # torch logs its own traceback before raising
    extra = {EXITS_FILE: ""}
    try:
        program = torch.export.load(str(path), extra_files=extra)
    except Exception as exc:  # torch raises many kinds here
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise EdgekitError(f"{path} is not a loadable torch.export file: {first}") from None
    finally:
        export_log.setLevel(level)
    if extra[EXITS_FILE]:  # written by edgekit.compress.exits.save_model: a multi-exit model
        import json
        try:
            program.edgekit_exits = list(json.loads(extra[EXITS_FILE])["names"])
        except (ValueError, KeyError, TypeError):
            raise EdgekitError(f"{path}: its {EXITS_FILE} record is damaged") from None
    return program


def export_module(module, example_input):
    """torch.export a module in eval mode, turning export failures into one clear message."""
    import torch

    module = module.eval()
    if not isinstance(example_input, tuple):
        example_input = (example_input,)
    try:
        return torch.export.export(module, example_input)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EdgekitError(f"torch.export could not trace {type(module).__name__}: {first}") from None


def from_torch(model, example_input=None, *, input_shape=None) -> Graph:
    """Convert an ``nn.Module`` (with an example input or an input shape) or an
    ``ExportedProgram`` to a float IR graph."""
    import torch

    if isinstance(model, torch.export.ExportedProgram):
        program = model
    else:
        if example_input is None:
            if input_shape is None:
                raise EdgekitError("from_torch needs example_input or input_shape for an nn.Module")
            example_input = torch.zeros(tuple(input_shape))
        example_input = torch.as_tensor(example_input, dtype=torch.float32)
        if example_input.shape[0] != 1:
            example_input = example_input[:1]
        program = export_module(model, example_input)
    graph = _Converter(program).run()
    names = getattr(model, "edgekit_exits", None) or getattr(program, "edgekit_exits", None)
    if names:
        from ..passes.exits import set_exit_names
        set_exit_names(graph, names)
    return graph


_POISON = object()  # the value of a node that could not be converted
_NO_HANDLER = "this operation is not supported"
# Layers refused as a whole: their first ATen op (an LSTM's zeros, an attention's linear) says nothing.
_UNSUPPORTED_MODULES = ("LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "MultiheadAttention",
                        "TransformerEncoderLayer", "TransformerDecoderLayer", "TransformerEncoder", "Transformer")


def _layer_of(node) -> tuple[str, str]:
    """(module path, module type) of the layer a node came from."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, type_ = list(stack.values())[-1]
    type_name = type_ if isinstance(type_, str) else getattr(type_, "__qualname__", str(type_))
    return path, type_name.rsplit(".", 1)[-1]  # "torch.nn.modules.rnn.LSTM" -> "LSTM"


def _pair(v, n=2) -> tuple[int, ...]:
    if isinstance(v, (list, tuple)):
        v = list(v)
        if len(v) == 1:
            v = v * n
        return tuple(int(x) for x in v)
    return (int(v),) * n


class _Value:
    """What the converter knows about one torch value."""

    def __init__(self, name: str, torch_rank: int, perm: np.ndarray | None = None):
        self.name = name  # IR tensor name
        self.torch_rank = torch_rank  # rank of the torch tensor (4: NCHW, 3: NCL, 2: NC)
        self.perm = perm  # set on a flattened spatial tensor: IR position -> torch position


class _Converter:
    def __init__(self, program):
        self.program = program
        self.graph = Graph()
        self.values: dict[str, object] = {}
        self.consts: dict[str, np.ndarray] = {}
        self.node_name: dict[str, str] = {}
        self._load_constants()

    # -- constants ---------------------------------------------------------
    def _load_constants(self):
        sig = self.program.graph_signature
        state = self.program.state_dict
        constants = getattr(self.program, "constants", {}) or {}
        for ph, target in sig.inputs_to_parameters.items():
            self.consts[ph] = state[target].detach().float().cpu().numpy()
        for ph, target in sig.inputs_to_buffers.items():
            buf = state[target] if target in state else constants[target]
            self.consts[ph] = buf.detach().cpu().numpy()
        for ph, target in getattr(sig, "inputs_to_lifted_tensor_constants", {}).items():
            self.consts[ph] = constants[target].detach().cpu().numpy()

    def const(self, arg, what: str, node) -> np.ndarray | None:
        if arg is None:
            return None
        if not hasattr(arg, "name") or arg.name not in self.consts:
            raise self.unsupported(node, f"its {what} is computed at run time, not a parameter")
        data = self.consts[arg.name].astype(np.float32)
        if not np.all(np.isfinite(data)):
            path, _ = _layer_of(node)
            bad = int(np.sum(~np.isfinite(data)))
            raise EdgekitError(f"layer '{path or node.name}' has {bad} NaN or inf values in its {what}; "
                               "retrain or fix the checkpoint before deploying")
        return data

    # -- errors ------------------------------------------------------------
    def unsupported(self, node, why: str) -> EdgekitError:
        path, type_ = _layer_of(node)
        target = getattr(node.target, "__name__", str(node.target))
        where = f"layer '{path}' ({type_})" if path else f"operation '{node.name}'"
        if type_ in _UNSUPPORTED_MODULES and why == _NO_HANDLER:  # name the layer, not an op inside it
            return EdgekitError(f"{where}: {type_} layers are not supported yet.\nedgekit supports: {SUPPORTED_LAYERS}.")
        return EdgekitError(f"{where} uses {target}: {why}.\nedgekit supports: {SUPPORTED_LAYERS}.")

    # -- IR helpers --------------------------------------------------------
    def value(self, arg) -> _Value:
        v = self.values.get(arg.name) if hasattr(arg, "name") else None
        if v is _POISON:
            raise _Poisoned()
        if not isinstance(v, _Value):
            raise EdgekitError(f"it reads {arg}, which is not a tensor edgekit can convert")
        return v

    def shape(self, v: _Value) -> tuple[int, ...]:
        return self.graph.tensors[v.name].shape

    def new_tensor(self, base: str, shape, data=None) -> str:
        name = self.graph.unique_name(base)
        self.graph.add_tensor(Tensor(name, tuple(int(s) for s in shape), "float32", data))
        return name

    def add_op(self, kind, node, inputs, out_shape, torch_rank, attrs=None, perm=None) -> _Value:
        out = self.new_tensor(node.name, out_shape)
        path, _ = _layer_of(node)
        self.graph.ops.append(Op(kind, path or node.name, list(inputs), [out], dict(attrs or {})))
        v = _Value(out, torch_rank, perm)
        self.values[node.name] = v
        return v

    def require_plain(self, v: _Value, node):
        if v.perm is not None:
            raise self.unsupported(node, "it reads the flattened output of a spatial tensor; "
                                         "edgekit keeps NHWC order and can remap it only into a Linear layer")

    def torch_axis_to_ir(self, v: _Value, dim: int, node) -> int:
        rank = v.torch_rank
        dim = dim % rank
        if rank == 4:
            return {0: 0, 1: 3, 2: 1, 3: 2}[dim]
        if rank == 3:
            return {0: 0, 1: 3, 2: 2}[dim]
        if rank == 2:
            return dim
        raise self.unsupported(node, f"tensors of rank {rank} are not supported")

    # -- the walk ----------------------------------------------------------
    def run(self) -> Graph:
        """Convert every node; a node that cannot be converted is recorded and the walk goes on, so one
        error lists every unsupported layer (nodes that only read its result are not listed again)."""
        sig = self.program.graph_signature
        user_inputs = list(sig.user_inputs)
        problems: dict[str, str] = {}  # one line per layer (module path), or per top-level operation
        for node in self.program.graph.nodes:
            if node.op == "placeholder":
                if node.name in self.consts:
                    continue
                if node.name not in user_inputs:
                    raise EdgekitError(f"model input {node.name!r} is neither a parameter nor a user input")
                self._input(node)
            elif node.op == "call_function":
                try:
                    self._call(node)
                except _Poisoned:
                    self.values[node.name] = _POISON
                except EdgekitError as exc:
                    self.values[node.name] = self._stand_in(node)
                    path, type_ = _layer_of(node)
                    key = path or node.name
                    if key not in problems:
                        problems[key] = str(exc).split("\nedgekit supports:")[0]
            elif node.op == "output":
                try:
                    self._output(node)
                except _Poisoned:
                    pass
        if len(problems) == 1:
            raise EdgekitError(f"{next(iter(problems.values()))}\nedgekit supports: {SUPPORTED_LAYERS}.")
        if problems:
            lines = "\n  ".join(problems.values())
            raise EdgekitError(f"{len(problems)} layers of this model are not supported:\n  {lines}"
                               f"\nedgekit supports: {SUPPORTED_LAYERS}.")
        return self.graph

    def _input(self, node):
        val = node.meta.get("val")
        if val is None:
            raise EdgekitError(f"model input {node.name!r} has no recorded shape")
        shape = tuple(int(s) for s in val.shape)
        if len(shape) == 4:
            ir_shape, layout = (1, shape[2], shape[3], shape[1]), "NCHW"
        elif len(shape) == 3:
            ir_shape, layout = (1, 1, shape[2], shape[1]), "NCL"
        elif len(shape) == 2:
            ir_shape, layout = (1, shape[1]), "NC"
        else:
            raise EdgekitError(f"model input {node.name!r} has shape {list(shape)}; "
                               "edgekit takes (N, C, H, W), (N, C, L) or (N, features)")
        name = self.new_tensor(node.name, ir_shape)
        self.graph.inputs.append(name)
        self.graph.source_layouts[name] = layout
        self.values[node.name] = _Value(name, len(shape))

    def _output(self, node):
        outs = node.args[0]
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        for arg in outs:
            v = self.value(arg)
            if v.perm is not None:
                raise self.unsupported(node, "the model returns a flattened spatial tensor")
            self.graph.outputs.append(v.name)
            self.graph.source_layouts[v.name] = {4: "NCHW", 3: "NCL", 2: "NC"}[v.torch_rank]

    def _call(self, node):
        target = node.target
        if target is operator.getitem:
            src = self.values.get(node.args[0].name)
            if src is _POISON:
                raise _Poisoned()
            if isinstance(src, tuple):
                self.values[node.name] = src[node.args[1]]
                if self.values[node.name] is _POISON:
                    raise _Poisoned()
                return
            raise self.unsupported(node, "indexing into a tensor is not supported")
        name = getattr(target, "__name__", str(target))  # e.g. "conv2d.default"
        op_name = name.split(".")[0]
        handler = getattr(self, f"_op_{op_name}", None)
        if self._fold_constant(node):
            return
        if self._reads_poisoned(node):
            raise _Poisoned()
        if handler is None:
            raise self.unsupported(node, _NO_HANDLER)
        handler(node)

    def _stand_in(self, node):
        """After a node failed: a tensor of its output shape, so the walk can still judge the nodes
        after it (the graph is never used: the conversion fails with the list of problems)."""
        def one(val):
            shape = tuple(int(d) for d in getattr(val, "shape", ()))
            if len(shape) == 4:
                ir = (1, shape[2], shape[3], shape[1])
            elif len(shape) == 3:
                ir = (1, 1, shape[2], shape[1])
            elif len(shape) == 2:
                ir = shape
            else:
                return _POISON
            return _Value(self.new_tensor(f"{node.name}_unconverted", ir), len(shape))
        val = node.meta.get("val")
        try:
            if isinstance(val, (list, tuple)):
                return tuple(one(v) for v in val)
            return one(val)
        except (TypeError, ValueError):
            return _POISON

    def _reads_poisoned(self, node) -> bool:
        from torch.fx.node import map_arg

        reads = []
        map_arg((node.args, node.kwargs), reads.append)
        return any(self.values.get(n.name) is _POISON for n in reads)

    def _fold_constant(self, node) -> bool:
        """Evaluate an op whose tensor inputs are all parameters / constants (a layer scale reshaped
        to (C, 1, 1), a parameter times 2): its result is one more constant, no device code."""
        import torch
        from torch.fx.node import map_arg

        reads = []
        map_arg((node.args, node.kwargs), reads.append)
        if any(n.name not in self.consts for n in reads):
            return False
        args, kwargs = map_arg((node.args, node.kwargs), lambda n: torch.as_tensor(self.consts[n.name]))
        try:
            with torch.no_grad():
                result = node.target(*args, **kwargs)
        except Exception:  # noqa: BLE001 - not foldable: the handler decides
            return False
        if not isinstance(result, torch.Tensor):
            return False
        self.consts[node.name] = result.detach().cpu().numpy()
        return True

    # identity-like ops
    def _identity(self, node):
        self.values[node.name] = self.value(node.args[0])

    _op_dropout = _op_dropout_ = _op_alpha_dropout = _op_feature_dropout = _identity
    _op_clone = _op_contiguous = _op_detach = _op_identity = _identity

    def _op_native_dropout(self, node):
        v = self.value(node.args[0])
        self.values[node.name] = (v, None)

    # quantization-aware training: the trained parameters of the tensor it reads
    def _op_fake_quantize_per_tensor_affine(self, node):
        x, scale, zero_point, qmin, qmax = node.args[:5]
        if (int(qmin), int(qmax)) != (-128, 127):
            raise self.unsupported(node, f"fake quantization to [{qmin}, {qmax}] is not int8 [-128, 127]")
        if hasattr(scale, "name"):  # the tensor_qparams overload: parameters held as buffers
            scale = float(self.const(scale, "scale", node).reshape(-1)[0])
            zero_point = int(self.const(zero_point, "zero point", node).reshape(-1)[0])
        v = self.value(x)
        self.graph.meta.setdefault("activation_params", {})[v.name] = (float(scale), int(zero_point))
        self.values[node.name] = v

    # convolution
    @staticmethod
    def _conv_args(node):
        """aten.conv1d/conv2d(input, weight, bias, stride, padding, dilation, groups), positional or keyword."""
        a = list(node.args) + [None] * 7
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        defaults = (None, None, None, 1, 0, 1, 1)
        return [a[i] if a[i] is not None else node.kwargs.get(n, d) for i, (n, d) in enumerate(zip(names, defaults))]

    def _op_conv2d(self, node):
        x, w, b, stride, padding, dilation, groups = self._conv_args(node)
        self._conv(node, x, w, b, _pair(stride), padding, _pair(dilation), int(groups))

    def _op_conv1d(self, node):
        x, w, b, stride, padding, dilation, groups = self._conv_args(node)
        v = self.value(x)
        if v.torch_rank != 3:
            raise self.unsupported(node, "Conv1d expects an (N, C, L) input")
        weight = self.const(w, "weight", node)[:, :, None, :]  # (O, I, 1, K)
        if not isinstance(padding, str):
            padding = (0, _pair(padding, 1)[0])
        self._conv(node, x, weight, b, (1, _pair(stride, 1)[0]), padding, (1, _pair(dilation, 1)[0]),
                   int(groups), torch_rank=3)

    def _op_convolution(self, node):
        x, w, b, stride, padding, dilation, transposed, _, groups = node.args[:9]
        if transposed:
            raise self.unsupported(node, "transposed convolution is not supported")
        weight = self.const(w, "weight", node)
        if weight.ndim == 3:
            self._conv(node, x, weight[:, :, None, :], b, (1, _pair(stride, 1)[0]), (0, _pair(padding, 1)[0]),
                       (1, _pair(dilation, 1)[0]), int(groups), torch_rank=3)
        else:
            self._conv(node, x, w, b, _pair(stride), padding, _pair(dilation), int(groups))

    def _conv(self, node, x, w, b, stride, padding, dilation, groups, torch_rank=4):
        v = self.value(x)
        self.require_plain(v, node)
        if v.torch_rank != torch_rank:
            raise self.unsupported(node, f"expected a rank-{torch_rank} input, got rank {v.torch_rank}")
        weight = w if isinstance(w, np.ndarray) else self.const(w, "weight", node)
        bias = self.const(b, "bias", node)
        _, H, W, C = self.shape(v)
        O, I, KH, KW = weight.shape
        if isinstance(padding, str):
            if padding == "valid":
                pads = (0, 0, 0, 0)
            elif padding == "same":
                th = dilation[0] * (KH - 1)
                tw = dilation[1] * (KW - 1)
                pads = (th // 2, th - th // 2, tw // 2, tw - tw // 2)
            else:
                raise self.unsupported(node, f"padding mode {padding!r} is not supported")
        else:
            ph, pw = _pair(padding)
            pads = (ph, ph, pw, pw)
        OH = conv_output_size(H, KH, stride[0], dilation[0], pads[0], pads[1])
        OW = conv_output_size(W, KW, stride[1], dilation[1], pads[2], pads[3])
        if OH < 1 or OW < 1:
            raise self.unsupported(node, f"the kernel {KH}x{KW} does not fit the {H}x{W} input")
        attrs = dict(stride=stride, dilation=dilation, padding=pads, activation="none")
        if groups == 1:
            kind = "conv2d"
            ir_weight = np.ascontiguousarray(weight.transpose(0, 2, 3, 1))  # OHWI
        elif groups == C and I == 1 and O % C == 0:
            kind = "depthwise_conv2d"
            ir_weight = np.ascontiguousarray(weight.transpose(1, 2, 3, 0))  # 1HWO
            attrs["depth_multiplier"] = O // C
        else:
            raise self.unsupported(node, f"grouped convolution with groups={groups} "
                                         f"(only 1 or depthwise groups={C}) is not supported")
        path, _ = _layer_of(node)
        base = path or node.name
        inputs = [v.name, self.new_tensor(f"{base}.weight", ir_weight.shape, ir_weight)]
        if bias is not None:
            inputs.append(self.new_tensor(f"{base}.bias", bias.shape, bias))
        self.add_op(kind, node, inputs, (1, OH, OW, O), torch_rank, attrs)

    def _op_linear(self, node):
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        v = self.value(x)
        if v.torch_rank != 2:
            raise self.unsupported(node, "Linear on a tensor of rank other than 2 is not supported; flatten first")
        weight = self.const(w, "weight", node)
        bias = self.const(b, "bias", node)
        if v.perm is not None:
            weight = weight[:, v.perm]
        path, _ = _layer_of(node)
        base = path or node.name
        inputs = [v.name, self.new_tensor(f"{base}.weight", weight.shape, np.ascontiguousarray(weight))]
        if bias is not None:
            inputs.append(self.new_tensor(f"{base}.bias", bias.shape, bias))
        self.add_op("fully_connected", node, inputs, (1, weight.shape[0]), 2, dict(activation="none"))

    # normalisation
    def _batch_norm(self, node, x, gamma, beta, mean, var, eps):
        v = self.value(x)
        self.require_plain(v, node)
        mean = self.const(mean, "running mean", node)
        var = self.const(var, "running variance", node)
        C = mean.shape[0]
        gamma = self.const(gamma, "weight", node) if gamma is not None else np.ones(C, np.float32)
        beta = self.const(beta, "bias", node) if beta is not None else np.zeros(C, np.float32)
        scale = (gamma / np.sqrt(var.astype(np.float64) + eps)).astype(np.float32)
        offset = (beta - mean * scale).astype(np.float32)
        path, _ = _layer_of(node)
        base = path or node.name
        inputs = [v.name, self.new_tensor(f"{base}.scale", scale.shape, scale),
                  self.new_tensor(f"{base}.offset", offset.shape, offset)]
        return self.add_op("batch_norm", node, inputs, self.shape(v), v.torch_rank)

    def _op_batch_norm(self, node):
        x, gamma, beta, mean, var, training, _, eps = node.args[:8]
        if training:
            raise self.unsupported(node, "the model was exported in training mode; call model.eval() first")
        self._batch_norm(node, x, gamma, beta, mean, var, float(eps))

    def _op__native_batch_norm_legit_no_training(self, node):
        x, gamma, beta, mean, var, _, eps = node.args[:7]
        v = self._batch_norm(node, x, gamma, beta, mean, var, float(eps))
        self.values[node.name] = (v, None, None)

    # activations
    def _activation(self, node, kind):
        v = self.value(node.args[0])
        self.add_op(kind, node, [v.name], self.shape(v), v.torch_rank, perm=v.perm)

    def _op_relu(self, node):
        self._activation(node, "relu")

    _op_relu_ = _op_relu

    def _op_relu6(self, node):
        self._activation(node, "relu6")

    def _op_hardtanh(self, node):
        lo = float(node.args[1]) if len(node.args) > 1 else float(node.kwargs.get("min_val", -1.0))
        hi = float(node.args[2]) if len(node.args) > 2 else float(node.kwargs.get("max_val", 1.0))
        self._clamp_to(node, lo, hi)

    def _clamp_to(self, node, lo, hi):
        """clamp / Hardtanh: ReLU and ReLU6 where the bounds are theirs, else a clamp to any bounds."""
        if lo is not None and hi is not None and lo > hi:
            raise self.unsupported(node, f"clamp bounds min={lo} > max={hi}")
        if lo is None and hi is None:
            self.values[node.name] = self.value(node.args[0])
            return None
        if (lo, hi) == (0.0, 6.0):
            return self._activation(node, "relu6")
        if (lo, hi) == (0.0, None):
            return self._activation(node, "relu")
        v = self.value(node.args[0])
        self.add_op("clamp", node, [v.name], self.shape(v), v.torch_rank,
                    dict(lo=None if lo is None else float(lo), hi=None if hi is None else float(hi)), perm=v.perm)

    def _op_clamp(self, node):
        a = list(node.args) + [None, None]
        lo = a[1] if a[1] is not None else node.kwargs.get("min")
        hi = a[2] if a[2] is not None else node.kwargs.get("max")
        if hasattr(lo, "name") or hasattr(hi, "name"):
            raise self.unsupported(node, "clamp to tensor bounds is not supported (only numbers)")
        self._clamp_to(node, None if lo is None else float(lo), None if hi is None else float(hi))

    _op_clamp_ = _op_clip = _op_clamp

    def _op_clamp_min(self, node):
        self._clamp_to(node, float(node.args[1]), None)

    def _op_clamp_max(self, node):
        self._clamp_to(node, None, float(node.args[1]))

    # pointwise activations (int8: 256-entry tables, edgekit/pointwise.py)
    def _unary(self, node, kind, attrs=None):
        v = self.value(node.args[0])
        return self.add_op(kind, node, [v.name], self.shape(v), v.torch_rank, attrs, perm=v.perm)

    def _op_sigmoid(self, node):
        self._unary(node, "logistic")

    def _op_tanh(self, node):
        self._unary(node, "tanh")

    def _op_rsqrt(self, node):
        self._unary(node, "rsqrt")

    def _op_hardswish(self, node):
        self._unary(node, "hard_swish")

    def _op_leaky_relu(self, node):
        slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
        if float(slope) < 0:
            raise self.unsupported(node, f"LeakyReLU with a negative slope ({slope}) has no int8 kernel")
        self._unary(node, "leaky_relu", dict(alpha=float(slope)))

    def _op_elu(self, node):
        a = [float(x) for x in list(node.args[1:4])] + [1.0] * (3 - len(node.args[1:4]))
        if a != [1.0, 1.0, 1.0]:
            raise self.unsupported(node, f"ELU with alpha, scale, input_scale = {a} (only the default 1, 1, 1)")
        self._unary(node, "elu")

    def _op_gelu(self, node):
        approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        self._unary(node, "gelu", dict(approximate=str(approximate)))

    def _op_silu(self, node):
        """SiLU as TFLite's converter lowers it: x * sigmoid(x)."""
        v = self.value(node.args[0])
        gate = self.add_op("logistic", node, [v.name], self.shape(v), v.torch_rank, perm=v.perm)
        self.add_op("mul", node, [v.name, gate.name], self.shape(v), v.torch_rank, dict(activation="none"),
                    perm=v.perm)

    def _op_hardsigmoid(self, node):
        """Hardsigmoid as relu6(x + 3) / 6: an ADD with a fused ReLU6, then a MUL by 1/6 (TFLite has no
        HARD_SIGMOID)."""
        v = self.value(node.args[0])
        scalar = (1,) * len(self.shape(v))
        three = self.new_tensor(f"{node.name}.three", scalar, np.full(scalar, 3.0, np.float32))
        shifted = self.add_op("add", node, [v.name, three], self.shape(v), v.torch_rank, dict(activation="relu6"),
                              perm=v.perm)
        sixth = self.new_tensor(f"{node.name}.sixth", scalar, np.full(scalar, 1.0 / 6.0, np.float32))
        self.add_op("mul", node, [shifted.name, sixth], self.shape(v), v.torch_rank, dict(activation="none"),
                    perm=v.perm)

    _op_sigmoid_ = _op_sigmoid
    _op_tanh_ = _op_tanh
    _op_hardswish_ = _op_hardswish
    _op_leaky_relu_ = _op_leaky_relu
    _op_elu_ = _op_elu
    _op_silu_ = _op_silu
    _op_hardsigmoid_ = _op_hardsigmoid

    def _op_prelu(self, node):
        v = self.value(node.args[0])
        alpha = self.const(node.args[1], "slope", node).reshape(-1)
        if v.torch_rank == 2 or alpha.size == 1:
            ir_alpha = alpha.reshape((1,) * (len(self.shape(v)) - 1) + (-1,))
        else:
            self.require_plain(v, node)
            ir_alpha = alpha.reshape((1,) * (len(self.shape(v)) - 1) + (-1,))
        if ir_alpha.shape[-1] not in (1, self.shape(v)[-1]):
            raise self.unsupported(node, f"{alpha.size} slopes for {self.shape(v)[-1]} channels")
        path, _ = _layer_of(node)
        name = self.new_tensor(f"{path or node.name}.weight", ir_alpha.shape, np.ascontiguousarray(ir_alpha))
        self.add_op("prelu", node, [v.name, name], self.shape(v), v.torch_rank, perm=v.perm)

    _op__prelu_kernel = _op_prelu

    _op_hardtanh_ = _op_hardtanh

    def _op_softmax(self, node):
        v = self.value(node.args[0])
        self.require_plain(v, node)
        axis = self.torch_axis_to_ir(v, int(node.args[1]), node)
        if axis != len(self.shape(v)) - 1:
            raise self.unsupported(node, "Softmax is supported over the channel / feature dimension only")
        self.add_op("softmax", node, [v.name], self.shape(v), v.torch_rank, dict(beta=1.0))

    _op__softmax = _op_softmax

    # pooling
    def _pool_common(self, node, v, kernel, stride, padding, ceil_mode, dilation=(1, 1)):
        if dilation != (1, 1):
            raise self.unsupported(node, "dilated pooling is not supported")
        _, H, W, C = self.shape(v)
        kh, kw = kernel
        sh, sw = stride
        ph, pw = padding

        def out_size(size, k, s, p):
            n = size + 2 * p - k
            o = (-(-n // s) if ceil_mode else n // s) + 1
            if ceil_mode and (o - 1) * s >= size + p:  # torch drops a window that starts in the padding
                o -= 1
            return o

        OH, OW = out_size(H, kh, sh, ph), out_size(W, kw, sw, pw)
        if OH < 1 or OW < 1:
            raise self.unsupported(node, f"the {kh}x{kw} window does not fit the {H}x{W} input")
        return (1, OH, OW, C), dict(kernel=(kh, kw), stride=(sh, sw), padding=(ph, ph, pw, pw), activation="none")

    def _op_max_pool2d(self, node):
        a = list(node.args) + [None] * 6
        v = self.value(a[0])
        self.require_plain(v, node)
        kernel = _pair(a[1])
        stride = _pair(a[2]) if a[2] else kernel
        padding = _pair(a[3] if a[3] is not None else 0)
        dilation = _pair(a[4] if a[4] is not None else 1)
        ceil_mode = bool(a[5]) if a[5] is not None else False
        shape, attrs = self._pool_common(node, v, kernel, stride, padding, ceil_mode, dilation)
        return self.add_op("max_pool2d", node, [v.name], shape, 4, attrs)

    def _op_max_pool2d_with_indices(self, node):
        v = self._op_max_pool2d(node)
        self.values[node.name] = (v, None)

    def _op_avg_pool2d(self, node):
        a = list(node.args) + [None] * 7
        v = self.value(a[0])
        self.require_plain(v, node)
        kernel = _pair(a[1])
        stride = _pair(a[2]) if a[2] else kernel
        padding = _pair(a[3] if a[3] is not None else 0)
        ceil_mode = bool(a[4]) if a[4] is not None else False
        count_include_pad = bool(a[5]) if a[5] is not None else True
        if a[6] is not None:
            raise self.unsupported(node, "AvgPool2d with divisor_override is not supported")
        shape, attrs = self._pool_common(node, v, kernel, stride, padding, ceil_mode)
        attrs["count_include_pad"] = count_include_pad
        self.add_op("avg_pool2d", node, [v.name], shape, 4, attrs)

    def _op_adaptive_avg_pool2d(self, node):
        v = self.value(node.args[0])
        self.require_plain(v, node)
        _, H, W, C = self.shape(v)
        oh, ow = _pair(node.args[1])
        if (oh, ow) == (1, 1):
            self.add_op("mean", node, [v.name], (1, 1, 1, C), 4)
        elif H % oh == 0 and W % ow == 0:
            k = (H // oh, W // ow)
            attrs = dict(kernel=k, stride=k, padding=(0, 0, 0, 0), activation="none", count_include_pad=True)
            self.add_op("avg_pool2d", node, [v.name], (1, oh, ow, C), 4, attrs)
        else:
            raise self.unsupported(node, f"AdaptiveAvgPool2d to {oh}x{ow} from {H}x{W} (not a whole-window "
                                         "division) is not supported")

    def _op_mean(self, node):
        v = self.value(node.args[0])
        self.require_plain(v, node)
        dims = node.args[1] if len(node.args) > 1 else None
        keepdim = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
        if v.torch_rank != 4 or dims is None or sorted(d % 4 for d in dims) != [2, 3]:
            raise self.unsupported(node, "mean is supported over the spatial dimensions (2, 3) of an NCHW tensor")
        C = self.shape(v)[3]
        out = self.add_op("mean", node, [v.name], (1, 1, 1, C), 4)
        if not keepdim:
            out.torch_rank = 2
            self._reshape_to(node, out, (1, C), 2)

    # shape ops
    def _reshape_to(self, node, v: _Value, ir_shape, torch_rank, perm=None):
        out = self.new_tensor(f"{node.name}_reshaped" if node.name in self.values else node.name, ir_shape)
        path, _ = _layer_of(node)
        self.graph.ops.append(Op("reshape", path or node.name, [v.name], [out], {}))
        nv = _Value(out, torch_rank, perm)
        self.values[node.name] = nv
        return nv

    def _flatten_spatial(self, node, v: _Value):
        shape = self.shape(v)
        if v.torch_rank == 2:
            self.values[node.name] = v
            return
        if v.torch_rank == 4:
            _, H, W, C = shape
        else:  # NCL held as (1, 1, L, C)
            _, H, W, C = shape
        n = H * W * C
        perm = None
        if H * W > 1 and C > 1:
            h, w, c = np.meshgrid(np.arange(H), np.arange(W), np.arange(C), indexing="ij")
            perm = (c * H * W + h * W + w).reshape(-1)
        self._reshape_to(node, v, (1, n), 2, perm)

    def _op_flatten(self, node):
        v = self.value(node.args[0])
        start = int(node.args[1]) if len(node.args) > 1 else 0
        end = int(node.args[2]) if len(node.args) > 2 else -1
        if start % v.torch_rank not in (0, 1) or end % v.torch_rank != v.torch_rank - 1:
            raise self.unsupported(node, f"flatten({start}, {end}) is supported only as flatten(1) / flatten(0)")
        self._flatten_spatial(node, v)

    def _op_view(self, node):
        v = self.value(node.args[0])
        target = [int(s) for s in node.args[1]]
        val = node.meta.get("val")
        out_shape = tuple(int(s) for s in val.shape) if val is not None else tuple(target)
        if len(out_shape) == 2:
            self._flatten_spatial(node, v)
        elif len(out_shape) == v.torch_rank and list(out_shape[1:]) == self._torch_shape(v)[1:]:
            self.values[node.name] = v
        else:
            raise self.unsupported(node, f"reshape to {list(out_shape)} is not supported (only flattening to "
                                         "(N, features))")

    _op_reshape = _op_view
    _op__unsafe_view = _op_view

    def _torch_shape(self, v: _Value) -> list[int]:
        s = self.shape(v)
        if v.torch_rank == 4:
            return [1, s[3], s[1], s[2]]
        if v.torch_rank == 3:
            return [1, s[3], s[2]]
        return list(s)

    # elementwise
    def _operand(self, arg, node):
        """A binary op's operand: a converted tensor (_Value), or a constant (parameter, buffer, number)."""
        if hasattr(arg, "name") and arg.name in self.consts:
            data = self.consts[arg.name].astype(np.float32)
            if not np.all(np.isfinite(data)):
                raise self.unsupported(node, "a constant operand holds NaN or inf")
            return data
        if isinstance(arg, (int, float)) and not isinstance(arg, bool):
            return np.array(float(arg), np.float32)
        return self.value(arg)

    def _ir_constant(self, data: np.ndarray, v: _Value, node) -> np.ndarray:
        """A torch-layout constant that broadcasts against ``v``, in ``v``'s IR layout (NHWC)."""
        rank, ir_shape = v.torch_rank, self.shape(v)
        if data.ndim > rank:
            raise self.unsupported(node, f"a constant of shape {list(data.shape)} against a rank-{rank} tensor")
        data = data.reshape((1,) * (rank - data.ndim) + data.shape)
        if data.shape[0] != 1:
            raise self.unsupported(node, "a constant with a batch dimension is not supported")
        if data.size == 1:
            return data.reshape((1,) * len(ir_shape))
        if v.perm is not None:
            self.require_plain(v, node)
        if rank == 4:
            data = data.transpose(0, 2, 3, 1)
        elif rank == 3:
            data = data.transpose(0, 2, 1).reshape((1,) * (len(ir_shape) - 2) + (data.shape[2], data.shape[1]))
        if any(c not in (1, s) for c, s in zip(data.shape, ir_shape)):
            raise self.unsupported(node, f"a constant of shape {list(data.shape)} does not broadcast to the tensor")
        return np.ascontiguousarray(data)

    def _binary(self, node, kind, a, b, alpha=1.0):
        """x op y with broadcasting, x op constant, constant op x: one IR op, the order kept."""
        oa, ob = self._operand(a, node), self._operand(b, node)
        if not isinstance(oa, _Value) and not isinstance(ob, _Value):
            raise self.unsupported(node, "both operands are constants")
        if alpha != 1.0:
            if isinstance(ob, _Value):
                raise self.unsupported(node, f"alpha={alpha} with a tensor operand is not supported")
            ob = ob * np.float32(alpha)
        v = oa if isinstance(oa, _Value) else ob
        names, perm = [], v.perm
        for o in (oa, ob):
            if isinstance(o, _Value):
                names.append(o.name)
            else:
                data = self._ir_constant(o, v, node)
                path, _ = _layer_of(node)
                names.append(self.new_tensor(f"{path or node.name}.{kind}_operand", data.shape, data))
                if data.size > 1:
                    perm = None
        if isinstance(oa, _Value) and isinstance(ob, _Value):
            if oa.torch_rank != ob.torch_rank:
                raise self.unsupported(node, f"operands of rank {oa.torch_rank} and {ob.torch_rank}")
            if self.shape(oa) != self.shape(ob):
                self.require_plain(oa, node)
                self.require_plain(ob, node)
            elif oa.perm is not None or ob.perm is not None:
                if oa.perm is None or ob.perm is None or not np.array_equal(oa.perm, ob.perm):
                    self.require_plain(oa if oa.perm is not None else ob, node)
        shapes = [self.graph.tensors[n].shape for n in names]
        try:
            out_shape = tuple(int(d) for d in np.broadcast_shapes(*shapes))
        except ValueError:
            raise self.unsupported(node, f"shapes {self._torch_shape(v)} do not broadcast") from None
        if out_shape != self.shape(v) and not (isinstance(oa, _Value) and isinstance(ob, _Value)):
            raise self.unsupported(node, "a constant operand larger than the tensor is not supported")
        attrs = {} if kind == "squared_difference" else dict(activation="none")
        return self.add_op(kind, node, names, out_shape, v.torch_rank, attrs, perm=perm)

    def _op_add(self, node):
        alpha = float(node.kwargs.get("alpha", 1))
        self._binary(node, "add", node.args[0], node.args[1], alpha)

    def _op_sub(self, node):
        alpha = float(node.kwargs.get("alpha", 1))
        self._binary(node, "sub", node.args[0], node.args[1], alpha)

    def _op_rsub(self, node):  # other - alpha * input
        alpha = float(node.kwargs.get("alpha", node.args[2] if len(node.args) > 2 else 1))
        if alpha != 1.0:
            raise self.unsupported(node, f"rsub with alpha={alpha} is not supported")
        self._binary(node, "sub", node.args[1], node.args[0])

    def _op_mul(self, node):
        self._binary(node, "mul", node.args[0], node.args[1])

    def _op_div(self, node):
        mode = node.kwargs.get("rounding_mode")
        divisor = self._operand(node.args[1], node)
        if mode is not None or isinstance(divisor, _Value):
            raise self.unsupported(node, "division is supported by a constant only (x / 6), as a multiply")
        if np.any(divisor == 0):
            raise self.unsupported(node, "division by zero")
        self._binary(node, "mul", node.args[0], (1.0 / divisor).astype(np.float32)
                     if divisor.size > 1 else float(1.0 / divisor.reshape(-1)[0]))

    def _op_pow(self, node):
        """(x - y) ** 2 becomes SQUARED_DIFFERENCE when nothing else reads x - y; x ** 2 is x * x."""
        exponent = node.args[1]
        if isinstance(exponent, (int, float)) and float(exponent) == 1.0:
            self.values[node.name] = self.value(node.args[0])
            return
        if not isinstance(exponent, (int, float)) or float(exponent) != 2.0:
            raise self.unsupported(node, f"power {exponent} is not supported (only ** 2)")
        self._square(node, node.args[0])

    def _square(self, node, src):
        v = self.value(src)
        producer = self.graph.ops[-1] if self.graph.ops else None
        if producer is not None and producer.kind == "sub" and producer.outputs == [v.name] \
                and len(src.users) == 1 and all(not self.graph.tensors[n].is_constant for n in producer.inputs):
            producer.kind = "squared_difference"
            producer.attrs.pop("activation", None)
            self.values[node.name] = v
            return
        self.add_op("mul", node, [v.name, v.name], self.shape(v), v.torch_rank, dict(activation="none"), perm=v.perm)

    def _op_square(self, node):
        self._square(node, node.args[0])

    _op_add_ = _op_add
    _op_sub_ = _op_sub
    _op_mul_ = _op_mul
    _op_div_ = _op_div

    def _op_cat(self, node):
        parts = [self.value(t) for t in node.args[0]]
        dim = int(node.args[1]) if len(node.args) > 1 else int(node.kwargs.get("dim", 0))
        for p in parts:
            self.require_plain(p, node)
        axis = self.torch_axis_to_ir(parts[0], dim, node)
        if axis == 0:
            raise self.unsupported(node, "concatenation along the batch dimension is not supported")
        shape = list(self.shape(parts[0]))
        for p in parts[1:]:
            s = self.shape(p)
            if len(s) != len(shape) or any(s[i] != shape[i] for i in range(len(s)) if i != axis):
                raise self.unsupported(node, "concatenated tensors differ in a dimension other than the joined one")
        shape[axis] = sum(self.shape(p)[axis] for p in parts)
        self.add_op("concat", node, [p.name for p in parts], tuple(shape), parts[0].torch_rank, dict(axis=axis))

    _op_concat = _op_cat

    def _op_constant_pad_nd(self, node):
        v = self.value(node.args[0])
        self.require_plain(v, node)
        pads = [int(p) for p in node.args[1]]
        if str(node.target).startswith("aten.pad"):  # pad(input, pad, mode, value)
            mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
            if mode != "constant":
                raise self.unsupported(node, f"padding mode {mode!r} is not supported (only constant)")
            value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value")
        else:
            value = node.args[2] if len(node.args) > 2 else 0.0
        value = 0.0 if value is None else float(value)
        if v.torch_rank != 4 or len(pads) not in (2, 4) or any(p < 0 for p in pads):
            raise self.unsupported(node, "only non-negative padding of the height and width of an NCHW tensor "
                                         "is supported")
        left, right = pads[0], pads[1]
        top, bottom = (pads[2], pads[3]) if len(pads) == 4 else (0, 0)
        _, H, W, C = self.shape(v)
        self.add_op("pad", node, [v.name], (1, H + top + bottom, W + left + right, C), 4,
                    dict(padding=(top, bottom, left, right), value=value))

    _op_pad = _op_constant_pad_nd
