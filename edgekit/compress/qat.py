"""Quantization-aware training that deploys to exactly the int8 scheme of ``edgekit.quantize``.

The model is traced, its BatchNorms folded into the convolution / linear layer
before them (as the converter folds them), and fake quantization inserted
where the int8 graph quantizes:

- weights of every Conv / Linear layer: symmetric per output channel, int8 in
  [-127, 127], scale max|w| / 127 (``passes.quantize.quantize_weight``);
- activations: asymmetric per tensor (``quant_math.choose_activation_params``)
  on the model input and after every conv / linear / add / global mean, after
  the ReLU or ReLU6 the converter fuses into it; tensors that pooling,
  flattening, concatenation or a lone ReLU only move share one set of
  parameters, as the quantizer's union of tensors does.

Ranges start from calibration (min/max, as post-training quantization) and
are learned with the weights (scale and zero point trained through the
fake-quantize op's gradient, as LSQ+); they are frozen, rounded to the int8
scheme, for the last epoch. The result is a GraphModule of plain layers whose weights are
already on the int8 grid, with a fake-quantize op at each quantization point.
``torch.export`` keeps those ops; the edgekit converter reads their scale and
zero point, so ``edgekit.quantize`` uses the trained parameters instead of
calibrating those tensors and produces the same kernels as for any model.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from .. import quant_math as qm
from ..errors import EdgekitError
from ..passes.quantize import shares_values
from . import fxgraph
from .finetune import finetune
from .fxgraph import arg, op_name, shape_of

QMIN, QMAX = -128, 127
SOFTMAX_PARAMS = (1.0 / 256.0, -128)


# ---------------------------------------------------------------------------
# Fake quantization
# ---------------------------------------------------------------------------

def fake_quant_weight(w: torch.Tensor, one_scale: bool = False) -> torch.Tensor:
    """Per-output-channel symmetric int8 in [-127, 127], straight-through gradient. With ``one_scale``
    (a clustered layer, ``passes.quantize.shares_values``) every channel uses the layer's scale."""
    flat = w.detach().reshape(w.shape[0], -1)
    max_abs = flat.abs().amax(dim=1).double()
    if one_scale:
        max_abs = torch.full_like(max_abs, float(max_abs.max()))
    scale = torch.where(max_abs > 0, max_abs / 127.0, torch.ones_like(max_abs)).float()
    scale = scale.reshape((-1,) + (1,) * (w.dim() - 1))
    q = torch.clamp(torch.round(w.detach() / scale), -127, 127)
    return w + (q * scale - w).detach()


class QATConv1d(nn.Conv1d):
    one_scale = False

    def forward(self, x):
        return self._conv_forward(x, fake_quant_weight(self.weight, self.one_scale), self.bias)


class QATConv2d(nn.Conv2d):
    one_scale = False

    def forward(self, x):
        return self._conv_forward(x, fake_quant_weight(self.weight, self.one_scale), self.bias)


class QATLinear(nn.Linear):
    one_scale = False

    def forward(self, x):
        return F.linear(x, fake_quant_weight(self.weight, self.one_scale), self.bias)


_QAT_CLASSES = {nn.Conv1d: QATConv1d, nn.Conv2d: QATConv2d, nn.Linear: QATLinear}


# Adam moves every parameter by about its learning rate per step; these factors make that a
# ~3 % change of the scale and ~0.1 quantization step of the zero point at lr 1e-3, so a range
# calibrated around an outlier can shrink several-fold within a few epochs.
_LOG_SCALE_GAIN = 30.0
_ZERO_POINT_GAIN = 100.0


class ActivationQuant(nn.Module):
    """Fake int8 quantization of a group of activation tensors that share parameters.

    ``mode``: "observe" (exact min/max over every tensor of the group, no quantization: calibration),
    "train" (learned scale and zero point, LSQ+ style, starting from the calibrated range), "frozen"
    (the fixed ``scale`` / ``zero_point`` the converter reads)."""

    def __init__(self, fixed: tuple[float, int] | None = None):
        super().__init__()
        self.register_buffer("lo", torch.zeros((), dtype=torch.float64))
        self.register_buffer("hi", torch.zeros((), dtype=torch.float64))
        self.register_buffer("observed", torch.zeros((), dtype=torch.bool))
        self.log_scale = nn.Parameter(torch.zeros(1))
        self.zero_point_param = nn.Parameter(torch.zeros(1))
        self.fixed = fixed
        self.mode = "observe"
        self.scale, self.zero_point = 1.0, 0

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        lo, hi = float(x.min()), float(x.max())
        if not bool(self.observed):
            self.lo.fill_(lo)
            self.hi.fill_(hi)
            self.observed.fill_(True)
        else:
            self.lo.fill_(min(float(self.lo), lo))
            self.hi.fill_(max(float(self.hi), hi))

    def calibrated(self) -> tuple[float, int]:
        if self.fixed is not None:
            return self.fixed
        if not bool(self.observed):
            raise EdgekitError("internal: a QAT activation was never observed")
        return qm.choose_activation_params(float(self.lo), float(self.hi))

    @torch.no_grad()
    def start_training(self) -> None:
        scale, zero_point = self.calibrated()
        self.log_scale.fill_(float(np.log(scale)) / _LOG_SCALE_GAIN)
        self.zero_point_param.fill_(zero_point / _ZERO_POINT_GAIN)
        self.mode = "train"

    def _learned(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale = torch.exp(self.log_scale * _LOG_SCALE_GAIN)
        zero_point = torch.clamp(self.zero_point_param * _ZERO_POINT_GAIN, QMIN, QMAX)
        return scale, zero_point

    @torch.no_grad()
    def freeze(self) -> None:
        if self.fixed is not None:
            scale, zero_point = self.fixed
        elif self.mode == "train":
            s, z = self._learned()
            s, z = float(s), float(z)
            scale, zero_point = qm.choose_activation_params(s * (QMIN - z), s * (QMAX - z))
        elif self.mode == "frozen":
            return
        else:
            scale, zero_point = self.calibrated()
        self.scale, self.zero_point = float(scale), int(zero_point)
        self.mode = "frozen"

    def drop_training_state(self) -> None:
        """After freezing: only the fixed parameters remain (no trainable ones)."""
        for name in ("log_scale", "zero_point_param"):
            if name in self._parameters:
                del self._parameters[name]

    def forward(self, x):
        if self.mode == "frozen":
            return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, QMIN, QMAX)
        if self.mode == "observe":
            self._observe(x)
            return x
        if self.fixed is not None:
            return torch.fake_quantize_per_tensor_affine(x, float(self.fixed[0]), int(self.fixed[1]), QMIN, QMAX)
        scale, zero_point = self._learned()
        return torch._fake_quantize_learnable_per_tensor_affine(x, scale, zero_point, QMIN, QMAX, 1.0)

    def extra_repr(self) -> str:
        if self.mode == "frozen":
            return f"scale={self.scale:.6g}, zero_point={self.zero_point}"
        return f"mode={self.mode}"


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, ActivationQuant) or super().is_leaf_module(m, qualname)


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise EdgekitError(f"torch.fx could not trace {type(model).__name__} for QAT: {first}") from None
    return fx.GraphModule(model, graph, type(model).__name__)


# ---------------------------------------------------------------------------
# Graph preparation: mirror the converter's folding, fusion and shared parameters
# ---------------------------------------------------------------------------

_WEIGHTED = ("conv", "linear")
_ALIASES = ("dropout", "identity", "clone", "contiguous", "detach")
_SAME_PARAMS = ("max_pool2d", "avg_pool2d", "flatten", "view", "reshape", "unsafe_view", "cat", "pad",
                "constant_pad_nd")
_FUSES_ACTIVATION = ("weighted", "add", "max_pool2d", "avg_pool2d")


def _strip_fake_quant(gm: fx.GraphModule) -> None:
    """Remove the fake quantization of an earlier QAT: this one places its own."""
    for node in list(gm.graph.nodes):
        is_fq = (node.op == "call_module" and isinstance(gm.get_submodule(node.target), ActivationQuant)) or \
                op_name(node, gm) == "fake_quantize_per_tensor_affine"
        if is_fq:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()


def _call_sites(gm: fx.GraphModule) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            counts[n.target] = counts.get(n.target, 0) + 1
    return counts


@torch.no_grad()
def _fold_batch_norms(gm: fx.GraphModule) -> None:
    """Fold each BatchNorm into the Conv / Linear before it, as ``passes.fuse.fold_batch_norm`` does."""
    calls = _call_sites(gm)
    for node in list(gm.graph.nodes):
        if op_name(node, gm) != "batch_norm":
            continue
        prev = node.args[0]
        if not (isinstance(prev, fx.Node) and op_name(prev, gm) in _WEIGHTED and len(prev.users) == 1
                and calls[prev.target] == 1):
            continue
        bn = gm.get_submodule(node.target)
        layer = gm.get_submodule(prev.target)
        scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps) if bn.affine else \
            1.0 / torch.sqrt(bn.running_var.double() + bn.eps)
        shift = (bn.bias.double() if bn.affine else 0.0) - bn.running_mean.double() * scale
        folded = fxgraph.clone(layer)
        folded.weight.copy_((layer.weight.double() * scale.reshape((-1,) + (1,) * (layer.weight.dim() - 1))
                             ).float())
        bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(scale)
        folded.bias = nn.Parameter((bias * scale + shift).float())
        fxgraph.set_submodule(gm, prev.target, folded)
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()


def _unsupported(gm, node, why: str) -> EdgekitError:
    path, type_ = fxgraph.module_path_and_type(node, gm)
    where = f"layer '{path}' ({type_})" if node.op == "call_module" else f"operation '{node.name}'"
    return EdgekitError(f"QAT cannot place int8 quantization for {where}: {why}")


def _classify(gm: fx.GraphModule, node: fx.Node) -> str:
    """How the int8 converter treats a node: weighted | add | relu | mean | softmax | alias | same | none."""
    kind = op_name(node, gm)
    if kind in _WEIGHTED or kind == "batch_norm":
        return "weighted"
    if kind in ("relu", "relu6"):
        return "relu"
    if kind == "hardtanh":
        lo = arg(node, 1, "min_val", -1.0) if node.op != "call_module" else gm.get_submodule(node.target).min_val
        hi = arg(node, 2, "max_val", 1.0) if node.op != "call_module" else gm.get_submodule(node.target).max_val
        if (float(lo), float(hi)) != (0.0, 6.0):
            raise _unsupported(gm, node, "Hardtanh other than ReLU6 has no int8 kernel")
        return "relu"
    if kind in _ALIASES:
        return "alias"
    if kind == "getitem":
        return "alias" if node.args[1] == 0 else "none"
    if kind in ("size", "dim", "getattr", "sym_size"):
        return "none"
    if kind == "add":
        tensors = [a for a in node.args[:2] if isinstance(a, fx.Node) and shape_of(a) is not None]
        if len(tensors) != 2:
            raise _unsupported(gm, node, "only the sum of two tensors has an int8 kernel")
        return "add"
    if kind in ("max_pool2d", "avg_pool2d"):
        return kind
    if kind == "adaptive_avg_pool2d":
        out = shape_of(node)
        return "mean" if out[2:] == (1, 1) else "avg_pool2d"
    if kind == "mean":
        return "mean"
    if kind in ("softmax", "log_softmax"):
        if kind == "log_softmax":
            raise _unsupported(gm, node, "LogSoftmax has no int8 kernel")
        return "softmax"
    if kind in _SAME_PARAMS:
        return "same"
    raise _unsupported(gm, node, f"{kind} has no int8 kernel")


def _place_quantizers(gm: fx.GraphModule) -> list[ActivationQuant]:
    nodes = list(gm.graph.nodes)
    kinds = {n: _classify(gm, n) for n in nodes if n.op in ("call_module", "call_function", "call_method")}

    def base(n):
        while isinstance(n, fx.Node) and kinds.get(n) == "alias":
            n = n.args[0]
        return n

    # consumers of each tensor in the converter's graph (aliases are not ops there)
    consumers: dict[fx.Node, int] = {}
    outputs: set[fx.Node] = set()
    for n in nodes:
        if n.op == "output":
            outputs.update(base(a) for a in n.all_input_nodes)
        elif kinds.get(n) not in (None, "alias", "none"):
            for a in n.all_input_nodes:
                consumers[base(a)] = consumers.get(base(a), 0) + 1

    tensor_of: dict[fx.Node, int] = {}  # node -> tensor id
    last_node: dict[int, fx.Node] = {}  # tensor id -> node after which it is final
    parent: list[int] = []
    fusable: dict[int, bool] = {}
    fixed: dict[int, tuple[float, int]] = {}

    def new_tensor(n, can_fuse=False) -> int:
        t = len(parent)
        parent.append(t)
        tensor_of[n] = t
        last_node[t] = n
        fusable[t] = can_fuse
        return t

    def find(t):
        while parent[t] != t:
            t = parent[t]
        return t

    def union(a, b):
        parent[find(a)] = find(b)

    for n in nodes:
        k = kinds.get(n)
        if n.op == "placeholder":
            new_tensor(n)
        elif k is None or k == "none":
            continue
        elif k == "alias":
            if base(n) in tensor_of:
                tensor_of[n] = tensor_of[base(n)]
        elif k == "weighted":
            new_tensor(n, can_fuse=True)
        elif k == "add":
            new_tensor(n, can_fuse=True)
        elif k in ("max_pool2d", "avg_pool2d"):
            union(new_tensor(n, can_fuse=True), tensor_of[base(n.args[0])])
        elif k == "mean":
            new_tensor(n)
        elif k == "softmax":
            fixed[new_tensor(n)] = SOFTMAX_PARAMS
        elif k == "relu":
            src = base(n.args[0])
            t = tensor_of[src]
            if fusable.get(t) and last_node[t] is src and consumers.get(src, 0) == 1 and src not in outputs:
                tensor_of[n] = t
                last_node[t] = n
                fusable[t] = False
            else:  # a lone ReLU shares its input's parameters
                union(new_tensor(n), t)
        elif k == "same":
            inputs = [a for a in n.all_input_nodes if base(a) in tensor_of]
            t = new_tensor(n)
            for a in inputs:
                union(t, tensor_of[base(a)])

    quantizers: dict[int, ActivationQuant] = {}
    for t, n in sorted(last_node.items()):
        root = find(t)
        if root not in quantizers:
            fixed_params = next((fixed[u] for u in fixed if find(u) == root), None)
            quantizers[root] = ActivationQuant(fixed_params)
            gm.add_module(f"act_quant_{len(quantizers) - 1}", quantizers[root])
        name = next(k for k, m in gm.named_children() if m is quantizers[root])
        with gm.graph.inserting_after(n):
            q = gm.graph.call_module(name, (n,))
        n.replace_all_uses_with(q, delete_user_cb=lambda user: user is not q)
    return list(quantizers.values())


def _swap_weight_modules(gm: fx.GraphModule, to_qat: bool) -> None:
    for name, m in list(gm.named_modules()):
        if to_qat and type(m) in _QAT_CLASSES:
            new = fxgraph.clone(m)
            new.__class__ = _QAT_CLASSES[type(m)]
            # a clustered layer gets one weight scale from the quantizer: simulate exactly that
            new.one_scale = bool(shares_values(m.weight.detach().cpu().numpy()))
            fxgraph.set_submodule(gm, name, new)
        elif not to_qat and type(m) in _QAT_CLASSES.values():
            plain = next(k for k, v in _QAT_CLASSES.items() if v is type(m))
            new = fxgraph.clone(m)
            new.__class__ = plain
            with torch.no_grad():
                new.weight.copy_(fake_quant_weight(m.weight, m.one_scale))
            if "one_scale" in new.__dict__:
                del new.one_scale
            fxgraph.set_submodule(gm, name, new)


def prepare_qat(model: nn.Module, example: torch.Tensor) -> tuple[fx.GraphModule, list]:
    """A traced copy of ``model`` with BatchNorm folded and fake quantization in place (observing)."""
    gm = _trace(fxgraph.clone(model).eval())
    _strip_fake_quant(gm)
    _fold_batch_norms(gm)
    gm.recompile()
    fxgraph.propagate_shapes(gm, example)
    quantizers = _place_quantizers(gm)
    _swap_weight_modules(gm, to_qat=True)
    gm.graph.lint()
    gm.recompile()
    return gm, quantizers


def finalize(gm: fx.GraphModule, quantizers) -> fx.GraphModule:
    """Freeze the ranges and put the weights on their int8 grid: the deployable QAT model."""
    for q in quantizers:
        q.freeze()
        q.drop_training_state()
    _swap_weight_modules(gm, to_qat=False)
    gm.recompile()
    return gm.eval()


@torch.no_grad()
def calibrate(gm: fx.GraphModule, quantizers, x: np.ndarray, batch_size: int = 64) -> None:
    """Min/max of every quantized tensor over ``x``, as post-training calibration."""
    for q in quantizers:
        q.mode = "observe"
    gm.eval()
    for start in range(0, len(x), batch_size):
        gm(torch.as_tensor(x[start:start + batch_size], dtype=torch.float32))


def qat(model: nn.Module, data, *, epochs: int = 4, lr: float = 1e-3, calib_samples: int = 256,
        freeze_epochs: int = 1, teacher: nn.Module | None = None, batch_size: int = 64,
        show_progress: bool = True, seed: int = 0) -> fx.GraphModule:
    """Fine-tune ``model`` with int8 fake quantization at the places ``edgekit.quantize`` quantizes.

    Activation ranges start from min/max calibration on ``calib_samples`` training samples (what
    post-training quantization uses), are learned with the weights, and are frozen, rounded to the
    int8 scheme, for the last ``freeze_epochs`` epochs. Returns a new GraphModule (BatchNorm folded,
    weights on the int8 grid, activation fake-quantize ops) that ``edgekit.quantize`` converts with
    exactly those parameters. ``model`` is untouched."""
    from .data import prepare

    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise EdgekitError(f"QAT epochs must be a positive integer, got {epochs!r}")
    if not isinstance(calib_samples, int) or calib_samples < 1:
        raise EdgekitError(f"calib_samples must be a positive integer, got {calib_samples!r}")
    split = prepare(data, model)
    example = torch.as_tensor(split.x_train[:1])
    gm, quantizers = prepare_qat(model, example)
    calibrate(gm, quantizers, split.x_train[:calib_samples])
    frozen_epochs = min(max(0, freeze_epochs), epochs - 1)
    for q in quantizers:
        q.start_training()
    finetune(gm, split, epochs=epochs - frozen_epochs, lr=lr, teacher=teacher, batch_size=batch_size, seed=seed,
             label="QAT", show_progress=show_progress)
    if frozen_epochs:
        for q in quantizers:
            q.freeze()
        finetune(gm, split, epochs=frozen_epochs, lr=lr * 0.3, teacher=teacher, batch_size=batch_size,
                 seed=seed + 1, label="QAT (frozen)", show_progress=show_progress)
    return finalize(gm, quantizers)
