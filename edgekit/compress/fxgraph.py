"""What the compression passes share: a model as a torch.fx graph of standard layers.

A user's ``nn.Module`` is traced with ``torch.fx.symbolic_trace`` (the passes
rewrite submodules of a copy, so the user's class and forward survive). A
``.pt2`` file holds only an ATen graph whose layers are calls with parameter
arguments; ``from_exported`` rebuilds it as a ``GraphModule`` whose
convolutions, linear layers and batch norms are real ``nn`` modules again, so
the same passes (and fine-tuning) apply to it.

Every node gets a canonical operation name (``op_name``) whether it is a
module call, a torch / functional call, a tensor method or an ATen op.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import operator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import EdgekitError

# Parameter-free modules and functions that act on each channel on its own.
CHANNELWISE = {"relu", "relu6", "hardtanh", "leaky_relu", "sigmoid", "tanh", "silu", "gelu", "hardswish",
               "hardsigmoid", "elu", "dropout", "feature_dropout", "alpha_dropout", "clone", "contiguous",
               "identity", "detach", "fake_quantize_per_tensor_affine"}
# Channel-preserving spatial operations.
SPATIAL = {"max_pool1d", "max_pool2d", "avg_pool1d", "avg_pool2d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
           "adaptive_max_pool1d", "adaptive_max_pool2d", "pad", "constant_pad_nd"}
BINARY = {"add", "sub", "mul", "div"}
RESHAPES = {"view", "reshape", "unsafe_view"}
NON_TENSOR = {"size", "dim", "sym_size", "getattr"}

_MODULE_OPS = {
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardtanh: "hardtanh", nn.LeakyReLU: "leaky_relu", nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh", nn.SiLU: "silu", nn.GELU: "gelu", nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid",
    nn.ELU: "elu", nn.Dropout: "dropout", nn.Dropout1d: "dropout", nn.Dropout2d: "dropout",
    nn.AlphaDropout: "dropout", nn.Identity: "identity", nn.MaxPool1d: "max_pool1d", nn.MaxPool2d: "max_pool2d",
    nn.AvgPool1d: "avg_pool1d", nn.AvgPool2d: "avg_pool2d", nn.AdaptiveAvgPool1d: "adaptive_avg_pool1d",
    nn.AdaptiveAvgPool2d: "adaptive_avg_pool2d", nn.AdaptiveMaxPool2d: "adaptive_max_pool2d",
    nn.ZeroPad2d: "pad", nn.ConstantPad2d: "pad", nn.ConstantPad1d: "pad", nn.Flatten: "flatten",
    nn.Softmax: "softmax", nn.LogSoftmax: "log_softmax", nn.Conv1d: "conv", nn.Conv2d: "conv", nn.Linear: "linear",
    nn.BatchNorm1d: "batch_norm", nn.BatchNorm2d: "batch_norm",
}
_FUNCTIONS = {F.max_pool2d: "max_pool2d", F.max_pool1d: "max_pool1d", F.adaptive_max_pool2d: "adaptive_max_pool2d",
              operator.iadd: "add", operator.imul: "mul", operator.getitem: "getitem", getattr: "getattr",
              operator.truediv: "div"}
_ALIASES = {"concat": "cat", "concatenate": "cat", "max_pool2d_with_indices": "max_pool2d",
            "softmax_": "softmax", "log_softmax_": "log_softmax", "native_dropout": "dropout",
            "native_batch_norm_legit_no_training": "batch_norm", "convolution": "conv", "conv1d": "conv",
            "conv2d": "conv", "mean_dim": "mean", "hardtanh_": "hardtanh", "lift_fresh_copy": "clone"}


def module_path_and_type(node: fx.Node, root: nn.Module) -> tuple[str, str]:
    if node.op == "call_module":
        return str(node.target), type(root.get_submodule(node.target)).__name__
    return node.name, node.op


def op_name(node: fx.Node, root: nn.Module) -> str:
    """Canonical name of what a node computes ("conv", "linear", "relu", "add", ...)."""
    if node.op == "call_module":
        mod = root.get_submodule(node.target)
        for cls, name in _MODULE_OPS.items():
            if type(mod) is cls:
                return name
        return "module:" + type(mod).__name__
    if node.op == "call_method":
        name = str(node.target)
    elif node.op == "call_function":
        target = node.target
        if target in _FUNCTIONS:
            return _FUNCTIONS[target]
        schema = getattr(target, "_schema", None)
        name = schema.name.split("::")[-1] if schema is not None else getattr(target, "__name__", str(target))
    else:
        return node.op
    name = name.lstrip("_")
    name = _ALIASES.get(name, name)
    if name.endswith("_") and name[:-1] in CHANNELWISE | BINARY:
        name = name[:-1]
    return _ALIASES.get(name, name)


def arg(node: fx.Node, index: int, name: str, default=None):
    """A call's argument by position or keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def shape_of(node) -> tuple[int, ...] | None:
    """The tensor shape ShapeProp recorded for a node (None for non-tensors)."""
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return None
    return tuple(int(s) for s in meta.shape)


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace a model (a copy is traced; the model is untouched)."""
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many kinds here
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise EdgekitError(f"torch.fx could not trace {type(model).__name__} (data-dependent control flow in "
                           f"forward?): {first}") from None


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Run in eval mode (no BatchNorm statistics updated, no dropout), then restore every module's mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for m, training in modes:
            m.training = training


def propagate_shapes(gm: fx.GraphModule, example: torch.Tensor) -> None:
    try:
        with eval_mode(gm):
            ShapeProp(gm).propagate(example)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise EdgekitError(f"the model does not run on an input of shape {list(example.shape)}: {first}") from None


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def clone(model: nn.Module) -> nn.Module:
    """A deep copy that shares nothing with the input (passes never touch their input)."""
    return copy.deepcopy(model)


# ---------------------------------------------------------------------------
# .pt2 -> a GraphModule of standard layers
# ---------------------------------------------------------------------------

def _owner(target: str) -> str:
    return target.rpartition(".")[0] or target.replace(".", "_")


def _ints(v, n: int) -> tuple[int, ...]:
    if isinstance(v, (list, tuple)):
        v = list(v)
        return tuple(int(x) for x in (v * n if len(v) == 1 else v))
    return (int(v),) * n


def _add_nested(root: nn.Module, path: str, module: nn.Module) -> None:
    *parents, name = path.split(".")
    for part in parents:
        if not hasattr(root, part):
            root.add_module(part, nn.Module())
        root = getattr(root, part)
    root.add_module(name, module)


def from_exported(program, name: str = "GraphModule") -> fx.GraphModule:
    """Rebuild an ``ExportedProgram`` as a trainable GraphModule of nn layers (its class named ``name``)."""
    src = program.module()
    root = nn.Module()
    graph = fx.Graph()
    env: dict[fx.Node, object] = {}
    made: dict[str, str] = {}  # weight target -> module path

    def tensor_of(node: fx.Node) -> torch.Tensor:
        if node.op != "get_attr":
            raise EdgekitError(f"operation '{node.name}' computes a layer's parameter at run time; "
                               "the compression passes need parameters stored in the model")
        obj = src
        for part in node.target.split("."):
            obj = getattr(obj, part)
        return obj.detach().clone()

    def add_module(weight_node: fx.Node, build) -> str:
        key = weight_node.target
        if key not in made:
            path = _owner(key)
            if path in dict(root.named_modules()):
                path = path + "_" + str(len(made))
            _add_nested(root, path, build())
            made[key] = path
        return made[key]

    def mapped(a):
        return fx.node.map_arg(a, lambda n: env[n])

    for node in src.graph.nodes:
        if node.op == "placeholder":
            new = graph.placeholder(node.name)
            new.meta = dict(node.meta)
            env[node] = new
        elif node.op == "get_attr":
            env[node] = node  # resolved by the layer that reads it
        elif node.op == "call_module":
            if str(node.target).startswith("_guards"):
                continue
            raise EdgekitError(f"the exported model calls submodule {node.target!r}, which edgekit cannot rebuild")
        elif node.op == "output":
            outs = node.args[0]
            if isinstance(outs, (list, tuple)) and len(outs) == 1:
                outs = outs[0]
            graph.output(mapped(outs))
        elif node.op == "call_function":
            kind = op_name(node, src)
            args = node.args
            if kind == "conv":
                x, w, b = args[0], args[1], arg(node, 2, "bias")
                if node.target is torch.ops.aten.convolution.default:
                    stride, padding, dilation, transposed, _, groups = args[3:9]
                    if transposed:
                        raise EdgekitError(f"operation '{node.name}': transposed convolution is not supported")
                else:
                    stride, padding = arg(node, 3, "stride", 1), arg(node, 4, "padding", 0)
                    dilation, groups = arg(node, 5, "dilation", 1), arg(node, 6, "groups", 1)
                weight = tensor_of(w)
                bias = tensor_of(b) if b is not None else None
                nd = weight.dim() - 2
                cls = nn.Conv2d if nd == 2 else nn.Conv1d

                def build(weight=weight, bias=bias, cls=cls, nd=nd, stride=stride, padding=padding,
                          dilation=dilation, groups=groups):
                    pad = padding if isinstance(padding, str) else _ints(padding, nd)
                    m = cls(weight.shape[1] * int(groups), weight.shape[0], tuple(weight.shape[2:]),
                            stride=_ints(stride, nd), padding=pad, dilation=_ints(dilation, nd),
                            groups=int(groups), bias=bias is not None)
                    m.weight = nn.Parameter(weight)
                    if bias is not None:
                        m.bias = nn.Parameter(bias)
                    return m
                env[node] = graph.call_module(add_module(w, build), (env[x],))
            elif kind == "linear":
                x, w, b = args[0], args[1], arg(node, 2, "bias")
                weight = tensor_of(w)
                bias = tensor_of(b) if b is not None else None

                def build(weight=weight, bias=bias):
                    m = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
                    m.weight = nn.Parameter(weight)
                    if bias is not None:
                        m.bias = nn.Parameter(bias)
                    return m
                env[node] = graph.call_module(add_module(w, build), (env[x],))
            elif kind == "batch_norm":
                x, gamma, beta, mean, var = args[:5]
                eps = float(args[7] if node.target is torch.ops.aten.batch_norm.default else args[6])
                rank = len(node.args[0].meta["val"].shape)
                c = tensor_of(mean).shape[0]

                def build(gamma=gamma, beta=beta, mean=mean, var=var, eps=eps, rank=rank, c=c):
                    m = (nn.BatchNorm2d if rank == 4 else nn.BatchNorm1d)(c, eps=eps, affine=gamma is not None)
                    if gamma is not None:
                        m.weight = nn.Parameter(tensor_of(gamma))
                        m.bias = nn.Parameter(tensor_of(beta))
                    m.running_mean.copy_(tensor_of(mean))
                    m.running_var.copy_(tensor_of(var))
                    return m
                new = graph.call_module(add_module(mean, build), (env[x],))
                # the no-training variant returns (out, mean, rstd); readers take item 0
                env[node] = (new, None, None) if "legit" in str(node.target) else new
            elif kind == "getitem" and isinstance(env.get(node.args[0]), tuple):
                env[node] = env[node.args[0]][node.args[1]]
            elif kind in RESHAPES:
                x = args[0]
                in_shape = tuple(node.args[0].meta["val"].shape)
                out_shape = tuple(node.meta["val"].shape)
                if len(out_shape) == 2 and out_shape[0] == in_shape[0] and out_shape[1] == math.prod(in_shape[1:]):
                    env[node] = graph.call_function(torch.flatten, (env[x], 1))
                else:  # keep the shape but let the batch dimension vary (a .pt2 records batch 1)
                    sizes = [int(s) for s in args[1]]
                    if -1 not in sizes:
                        sizes[0] = -1
                    env[node] = graph.call_function(torch.reshape, (env[x], sizes))
            else:
                for a in node.all_input_nodes:
                    if a.op == "get_attr" and env[a] is a:  # a parameter of a layer edgekit does not rebuild
                        attr = a.target.replace(".", "_")
                        value = tensor_of(a)
                        if value.is_floating_point():
                            root.register_parameter(attr, nn.Parameter(value))
                        else:
                            root.register_buffer(attr, value)
                        env[a] = graph.get_attr(attr)
                new = graph.call_function(node.target, mapped(node.args), mapped(node.kwargs))
                env[node] = new
    for node, new in env.items():  # keep where each operation came from (edgekit.add_exits finds layers by it)
        new = new[0] if isinstance(new, tuple) else new
        if isinstance(new, fx.Node) and new is not node and node.meta.get("nn_module_stack"):
            new.meta.setdefault("nn_module_stack", node.meta["nn_module_stack"])
    graph.lint()
    gm = fx.GraphModule(root, graph, class_name=name)
    return gm.eval()


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------

def load_model(path: str | Path) -> tuple[nn.Module, tuple[int, ...]]:
    """A ``.pt2`` file as a trainable module, with the shape of one input sample."""
    from ..frontends.pytorch import load_exported

    program = load_exported(path)
    user_inputs = list(program.graph_signature.user_inputs)
    if len(user_inputs) != 1:
        raise EdgekitError(f"{path}: edgekit compresses models with one input, this one has {len(user_inputs)}")
    placeholder = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == user_inputs[0])
    shape = tuple(int(s) for s in placeholder.meta["val"].shape[1:])
    return from_exported(program, Path(path).name), shape


def export_model(model: nn.Module, sample_shape, path: str | Path | None = None):
    """``torch.export`` a model (eval mode) with batch 1; save it when ``path`` is given."""
    from ..frontends.pytorch import export_module

    model = model.eval()
    program = export_module(model, torch.zeros((1,) + tuple(sample_shape)))
    if path is not None:
        export_log = logging.getLogger("torch.export")
        level = export_log.level
        export_log.setLevel(logging.ERROR)
        try:
            torch.export.save(program, str(path))
        finally:
            export_log.setLevel(level)
    return program


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The Conv / Linear layers, in definition order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]


def count_parameters(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def nonzero_weights(model: nn.Module) -> int:
    return int(sum(int(torch.count_nonzero(m.weight)) for _, m in weight_layers(model)))


def as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()
