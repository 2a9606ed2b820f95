"""Structured pruning: remove whole neurons and channels, and rebuild smaller layers.

The model is traced with torch.fx and every channel of every tensor is
followed through the graph. Each output channel of a Conv / Linear layer is
an *atom*; layers that only pass channels along (BatchNorm, activations,
pooling, dropout) keep them; a depthwise convolution ties each of its output
channels to the input channel it reads (with a multiplier m, one input
channel owns m outputs); a residual add unites the channels it adds; a
concatenation lays its inputs' channels side by side; a flatten expands each
channel into its H*W features. Channels that meet at an add form one *group*,
removed together; the model's inputs and outputs are pinned.

Groups whose atoms come from the same layers form a *prunable layer* (named
after those layers, e.g. ``stem.0+block.3`` for a residual stage). Pruning
removes the least important groups of each prunable layer (``scope="layer"``)
or of the whole model (``scope="global"``, scores normalised by their layer's
mean), then writes new, smaller Conv / Linear / BatchNorm modules into a copy
of the model: parameters and MACs drop, and no mask is left.

Importance criteria: ``l1`` / ``l2``, the mean absolute / root-mean-square
weight of the channel's filters with a following BatchNorm folded in (the
weights as deployed); ``apoz``, how often the channel is non-zero after its
ReLU on data (1 - average percentage of zeros).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx, nn

from ..errors import EdgekitError
from ..progress import Progress
from . import fxgraph
from .fxgraph import BINARY, CHANNELWISE, NON_TENSOR, RESHAPES, SPATIAL, arg, op_name, shape_of

CRITERIA = ("l1", "l2", "apoz")
SCOPES = ("layer", "global")
FOLLOWS = "Conv1d/Conv2d (groups 1 or depthwise), Linear, BatchNorm, activations, pooling, padding, dropout, " \
          "flatten, residual add and concatenation"


class _UnionFind:
    def __init__(self):
        self.parent: list[int] = []

    def new(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n)

    def find(self, a: int) -> int:
        p = self.parent
        while p[a] != a:
            p[a] = p[p[a]]
            a = p[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(int(a)), self.find(int(b))
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


@dataclass
class _LayerUse:
    """A Conv / Linear / BatchNorm module and the atoms at its input and output positions."""

    name: str
    kind: str  # conv | depthwise | linear | batch_norm
    module: nn.Module
    node: fx.Node
    in_atoms: np.ndarray
    out_atoms: np.ndarray


@dataclass
class PrunableLayer:
    """A set of channel groups that come from the same layers."""

    name: str
    producers: tuple[str, ...]
    groups: list[int]  # union-find roots
    scores: np.ndarray | None = None

    @property
    def channels(self) -> int:
        return len(self.groups)


@dataclass
class ChannelAnalysis:
    gm: fx.GraphModule
    uf: _UnionFind
    layers: dict[str, _LayerUse]
    atom_source: dict[int, tuple[str, int]]  # atom -> (producing layer, output channel)
    pinned: set[int]
    node_atoms: dict[str, np.ndarray]
    prunable: list[PrunableLayer] = field(default_factory=list)

    def layer_named(self, name: str) -> PrunableLayer:
        for p in self.prunable:
            if name == p.name or name in p.producers:
                return p
        known = ", ".join(p.name for p in self.prunable) or "none"
        raise EdgekitError(f"no prunable layer named {name!r}; prunable layers: {known}")


class _Analyser:
    """Walks the traced graph and assigns channel atoms to every tensor."""

    def __init__(self, gm: fx.GraphModule, model_name: str):
        self.gm = gm
        self.model_name = model_name
        self.uf = _UnionFind()
        self.atoms: dict[fx.Node, np.ndarray | None] = {}
        self.layers: dict[str, _LayerUse] = {}
        self.atom_source: dict[int, tuple[str, int]] = {}
        self.pinned: set[int] = set()

    def blocked(self, node: fx.Node, why: str) -> EdgekitError:
        path, type_ = fxgraph.module_path_and_type(node, self.gm)
        what = f"layer '{path}' ({type_})" if node.op == "call_module" else f"operation '{node.name}' ({op_name(node, self.gm)})"
        return EdgekitError(f"structured pruning cannot analyse {self.model_name}: {what} {why}.\n"
                            f"The pruner follows channels through {FOLLOWS}.")

    def tie(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a, b):
            self.uf.union(x, y)

    def pin(self, atoms: np.ndarray | None) -> None:
        if atoms is not None:
            self.pinned.update(int(a) for a in atoms)

    def input_atoms(self, node: fx.Node, value) -> np.ndarray:
        if not isinstance(value, fx.Node) or self.atoms.get(value) is None:
            if isinstance(value, fx.Node) and value.op == "get_attr":
                raise self.blocked(node, f"reads the parameter {value.target!r} directly (a functional layer); "
                                         "the pruner rewrites nn.Conv/nn.Linear/nn.BatchNorm modules only")
            raise self.blocked(node, "takes an input whose channels the pruner does not know")
        return self.atoms[value]

    def run(self) -> ChannelAnalysis:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                shape = shape_of(node)
                atoms = self.uf.new(shape[1]) if shape is not None and len(shape) >= 2 else None
                self.pin(atoms)
                self.atoms[node] = atoms
            elif node.op == "get_attr":
                self.atoms[node] = None
            elif node.op == "output":
                for out in node.all_input_nodes:
                    self.pin(self.atoms.get(out))
            else:
                self.atoms[node] = self.visit(node)
        pinned_roots = {self.uf.find(a) for a in self.pinned}
        analysis = ChannelAnalysis(self.gm, self.uf, self.layers, self.atom_source, pinned_roots,
                                   {n.name: a for n, a in self.atoms.items() if a is not None})
        analysis.prunable = _prunable_layers(analysis)
        return analysis

    # -- one node ------------------------------------------------------------
    def visit(self, node: fx.Node) -> np.ndarray | None:
        kind = op_name(node, self.gm)
        if kind in NON_TENSOR:
            return None
        if all(self.atoms.get(a) is None for a in node.all_input_nodes) and \
                not any(a.op == "get_attr" for a in node.all_input_nodes) and kind not in ("conv", "linear"):
            return None  # arithmetic on sizes, not on tensors
        if kind in ("conv", "linear", "batch_norm"):
            return self.layer(node, kind)
        if kind.startswith("module:"):
            mod = self.gm.get_submodule(node.target)
            if any(True for _ in mod.parameters()):
                raise self.blocked(node, "has parameters the pruner does not know how to slice")
            raise self.blocked(node, "is a module the pruner does not know")
        if kind == "getitem":
            src = node.args[0]
            if isinstance(src, fx.Node) and shape_of(src) is None:  # an item of a tuple result
                return self.atoms.get(src) if node.args[1] == 0 else None
            raise self.blocked(node, "indexes into a tensor")
        x = node.args[0] if node.args else None
        if kind in CHANNELWISE:
            return self.input_atoms(node, x)
        if kind in SPATIAL:
            if kind in ("pad", "constant_pad_nd") and node.op != "call_module":
                pads = arg(node, 1, "pad")
                rank = len(shape_of(x))
                if len(pads) > 2 * (rank - 2):
                    raise self.blocked(node, "pads the channel dimension")
            return self.input_atoms(node, x)
        if kind == "mean":
            atoms = self.input_atoms(node, x)
            dims = arg(node, 1, "dim")
            dims = [dims] if isinstance(dims, int) else list(dims or [])
            rank = len(shape_of(x))
            if not dims or any(d % rank < 2 for d in dims):
                raise self.blocked(node, "averages over the batch or channel dimension")
            return atoms
        if kind in ("softmax", "log_softmax"):
            atoms = self.input_atoms(node, x)
            self.pin(atoms)  # every channel changes every output: keep them all
            return atoms
        if kind in BINARY:
            return self.binary(node)
        if kind == "cat":
            return self.concat(node)
        if kind == "flatten":
            return self.flatten(node, x)
        if kind in RESHAPES:
            return self.reshape(node, x)
        raise self.blocked(node, "is an operation the pruner does not know")

    def layer(self, node: fx.Node, kind: str) -> np.ndarray:
        name = str(node.target) if node.op == "call_module" else None
        if name is None:
            raise self.blocked(node, "is a functional layer whose parameters are passed in; use an nn module")
        mod = self.gm.get_submodule(name)
        in_atoms = self.input_atoms(node, node.args[0])
        in_shape = shape_of(node.args[0])
        if kind == "batch_norm":
            out_atoms = in_atoms
        elif kind == "linear":
            if len(in_shape) != 2:
                raise self.blocked(node, f"is applied to a rank-{len(in_shape)} tensor (the pruner follows "
                                         "Linear layers on (N, features) only)")
            out_atoms = self.layers[name].out_atoms if name in self.layers else self.uf.new(mod.out_features)
        else:  # convolution
            if mod.groups == 1:
                out_atoms = self.layers[name].out_atoms if name in self.layers else self.uf.new(mod.out_channels)
            elif mod.groups == mod.in_channels:
                kind = "depthwise"
                mult = mod.out_channels // mod.in_channels
                out_atoms = np.repeat(in_atoms, mult)
            else:
                raise self.blocked(node, f"is a grouped convolution (groups={mod.groups}); the pruner handles "
                                         "groups=1 and depthwise convolutions")
        if len(in_atoms) != (mod.num_features if kind == "batch_norm" else
                             mod.in_features if kind == "linear" else mod.in_channels):
            raise self.blocked(node, "reads a tensor whose channel count does not match its weights")
        if name in self.layers:  # a module called twice: both inputs must keep the same channels
            self.tie(self.layers[name].in_atoms, in_atoms)
            if kind == "depthwise":
                self.tie(self.layers[name].out_atoms, out_atoms)
        else:
            self.layers[name] = _LayerUse(name, kind, mod, node, in_atoms, out_atoms)
            if kind in ("conv", "linear"):
                for i, a in enumerate(out_atoms):
                    self.atom_source[int(a)] = (name, i)
        return out_atoms

    def binary(self, node: fx.Node) -> np.ndarray:
        out_shape = shape_of(node)
        operands = [a for a in node.args[:2] if isinstance(a, fx.Node) and self.atoms.get(a) is not None]
        if not operands:
            raise self.blocked(node, "combines tensors whose channels the pruner does not know")
        result = None
        for a in operands:
            shape = shape_of(a)
            if len(shape) == len(out_shape) and shape[1] == out_shape[1]:
                if result is None:
                    result = self.atoms[a]
                else:
                    self.tie(result, self.atoms[a])
            elif math.prod(shape[1:]) != 1:
                raise self.blocked(node, f"broadcasts shapes {list(shape)} -> {list(out_shape)} across channels")
        for a in node.args[:2]:
            if isinstance(a, fx.Node) and a.op == "get_attr":
                raise self.blocked(node, f"combines activations with the parameter {a.target!r}")
        if result is None:
            raise self.blocked(node, "produces channels from broadcasting only")
        return result

    def concat(self, node: fx.Node) -> np.ndarray:
        parts = arg(node, 0, "tensors")
        rank = len(shape_of(node))
        dim = int(arg(node, 1, "dim", 0)) % rank
        atoms = [self.input_atoms(node, p) for p in parts]
        if dim == 1:
            return np.concatenate(atoms)
        if dim == 0:
            raise self.blocked(node, "concatenates along the batch dimension")
        for a in atoms[1:]:
            self.tie(atoms[0], a)
        return atoms[0]

    def flatten(self, node: fx.Node, x) -> np.ndarray:
        atoms = self.input_atoms(node, x)
        in_shape = shape_of(x)
        if node.op == "call_module":
            mod = self.gm.get_submodule(node.target)
            start, end = mod.start_dim, mod.end_dim
        else:
            start, end = arg(node, 1, "start_dim", 0), arg(node, 2, "end_dim", -1)
        rank = len(in_shape)
        if rank <= 2:
            return atoms
        if start % rank != 1 or end % rank != rank - 1:
            if start % rank == 0 and end % rank == rank - 1:
                raise self.blocked(node, "flattens the batch dimension")
            if start % rank >= 2:  # flattening spatial dimensions only keeps channels in place
                return atoms
            raise self.blocked(node, f"flattens dimensions {start}..{end}")
        return np.repeat(atoms, math.prod(in_shape[2:]))

    def reshape(self, node: fx.Node, x) -> np.ndarray:
        atoms = self.input_atoms(node, x)
        in_shape, out_shape = shape_of(x), shape_of(node)
        sizes = node.args[1:] if len(node.args) > 2 else arg(node, 1, "shape", ())
        sizes = list(sizes) if isinstance(sizes, (list, tuple)) else [sizes]
        fixed = any(isinstance(s, int) and s != -1 for s in sizes[1:])
        if fixed:  # the forward hard-codes a size: its channels stay as they are
            self.pin(atoms)
        if out_shape[0] != in_shape[0]:
            raise self.blocked(node, "reshapes across the batch dimension")
        if len(out_shape) >= 2 and out_shape[1] == in_shape[1]:
            return atoms
        if len(out_shape) == 2 and out_shape[1] == math.prod(in_shape[1:]):
            return np.repeat(atoms, math.prod(in_shape[2:]))
        raise self.blocked(node, f"reshapes {list(in_shape)} to {list(out_shape)}")


def _prunable_layers(a: ChannelAnalysis) -> list[PrunableLayer]:
    members: dict[int, list[int]] = {}
    for atom in a.atom_source:
        members.setdefault(a.uf.find(atom), []).append(atom)
    by_producers: dict[tuple[str, ...], list[int]] = {}
    for root, atoms in members.items():
        if root in a.pinned:
            continue
        producers = tuple(sorted({a.atom_source[x][0] for x in atoms}, key=list(a.layers).index))
        by_producers.setdefault(producers, []).append(root)
    return [PrunableLayer("+".join(p), p, sorted(roots)) for p, roots in by_producers.items()]


def analyse(model: nn.Module, example: torch.Tensor) -> ChannelAnalysis:
    """Follow every channel of ``model`` on an input like ``example``; list what can be pruned."""
    gm = fxgraph.trace(model)
    fxgraph.propagate_shapes(gm, example)
    return _Analyser(gm, type(model).__name__).run()


# ---------------------------------------------------------------------------
# Importance
# ---------------------------------------------------------------------------

def _following_batch_norm(a: ChannelAnalysis, layer: _LayerUse) -> nn.Module | None:
    users = list(layer.node.users)
    if len(users) == 1 and users[0].op == "call_module":
        mod = a.gm.get_submodule(users[0].target)
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            return mod
    return None


def _filter_norms(a: ChannelAnalysis, layer: _LayerUse, criterion: str) -> np.ndarray:
    w = layer.module.weight.detach().double()
    w = w.reshape(w.shape[0], -1)
    bn = _following_batch_norm(a, layer)
    if bn is not None and bn.track_running_stats and bn.running_var is not None:
        gamma = bn.weight.detach().double() if bn.affine else torch.ones_like(bn.running_var, dtype=torch.float64)
        w = w * (gamma / torch.sqrt(bn.running_var.double() + bn.eps)).reshape(-1, 1)
    if criterion == "l1":
        return w.abs().mean(dim=1).numpy()
    return torch.sqrt((w * w).mean(dim=1)).numpy()


@torch.no_grad()
def _nonzero_fractions(a: ChannelAnalysis, x: np.ndarray, batch_size: int = 256) -> dict[int, list[float]]:
    """Per atom, the fraction of positive activations after each ReLU it reaches (or after its layer)."""
    gm = a.gm
    relu_nodes = [n for n in gm.graph.nodes if n.name in a.node_atoms and op_name(n, gm) in ("relu", "relu6", "hardtanh")]
    watched = {n.name for n in relu_nodes}
    seen_roots = {a.uf.find(int(atom)) for n in relu_nodes for atom in a.node_atoms[n.name]}
    for layer in a.layers.values():  # groups no ReLU reaches: measure the layer's (BN-folded) output
        if layer.kind in ("conv", "linear") and any(a.uf.find(int(t)) not in seen_roots for t in layer.out_atoms):
            bn_user = _following_batch_norm(a, layer)
            watched.add(next(iter(layer.node.users)).name if bn_user is not None else layer.node.name)
    totals: dict[str, torch.Tensor] = {}
    count = 0

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in watched:
                dims = [0] + list(range(2, out.dim()))
                pos = (out > 0).double().mean(dim=dims) * out.shape[0]
                totals[n.name] = totals.get(n.name, 0) + pos
            return out

    with fxgraph.eval_mode(gm):
        for start in range(0, len(x), batch_size):
            xb = torch.as_tensor(x[start:start + batch_size], dtype=torch.float32)
            Recorder(gm).run(xb)
            count += len(xb)
    fractions: dict[int, list[float]] = {}
    for name, total in totals.items():
        for atom, frac in zip(a.node_atoms[name], (total / count).tolist()):
            fractions.setdefault(a.uf.find(int(atom)), []).append(frac)
    return fractions


def score(a: ChannelAnalysis, criterion: str, x: np.ndarray | None = None) -> None:
    """Fill each prunable layer's ``scores`` (one per group, higher = more important)."""
    if criterion not in CRITERIA:
        raise EdgekitError(f"unknown pruning criterion {criterion!r}; use one of {', '.join(CRITERIA)}")
    if criterion == "apoz":
        if x is None:
            raise EdgekitError("the 'apoz' criterion measures activations: give data")
        fractions = _nonzero_fractions(a, x)
        for p in a.prunable:
            p.scores = np.array([float(np.mean(fractions.get(g, [0.0]))) for g in p.groups])
        return
    norms = {name: _filter_norms(a, layer, criterion) for name, layer in a.layers.items()
             if layer.kind in ("conv", "linear")}
    per_group: dict[int, list[float]] = {}
    for atom, (name, channel) in a.atom_source.items():
        per_group.setdefault(a.uf.find(atom), []).append(float(norms[name][channel]))
    for p in a.prunable:
        p.scores = np.array([float(np.mean(per_group[g])) for g in p.groups])


# ---------------------------------------------------------------------------
# Choosing and removing
# ---------------------------------------------------------------------------

def _check_ratio(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise EdgekitError(f"{what} must be a fraction in [0, 1) of the channels to remove, got {value!r}")
    return float(value)


def choose(a: ChannelAnalysis, ratio: float, layers: dict[str, float] | None, scope: str) -> set[int]:
    """The groups to remove: the lowest-scoring ones, at least one group kept per prunable layer."""
    if scope not in SCOPES:
        raise EdgekitError(f"unknown pruning scope {scope!r}; use 'layer' or 'global'")
    ratio = _check_ratio(ratio, "the pruning ratio")
    overrides: dict[str, float] = {}
    for name, r in (layers or {}).items():
        overrides[a.layer_named(name).name] = _check_ratio(r, f"the pruning ratio of layer {name!r}")
    removed: set[int] = set()
    if scope == "global":
        free = [p for p in a.prunable if p.name not in overrides]
        candidates = []
        for p in free:
            mean = float(np.mean(p.scores)) or 1.0
            candidates += [(s / mean, g, p.name) for s, g in zip(p.scores, p.groups)]
        candidates.sort(key=lambda t: t[0])
        budget = int(round(ratio * len(candidates)))
        left = {p.name: p.channels for p in free}
        for _, group, name in candidates:
            if budget == 0:
                break
            if left[name] > 1:
                removed.add(group)
                left[name] -= 1
                budget -= 1
    for p in a.prunable:
        if scope == "global" and p.name not in overrides:
            continue
        r = overrides.get(p.name, ratio)
        n = min(int(round(r * p.channels)), p.channels - 1)
        order = np.argsort(p.scores, kind="stable")[:n]
        removed.update(p.groups[i] for i in order)
    return removed


def _keep(a: ChannelAnalysis, atoms: np.ndarray, removed: set[int]) -> list[int]:
    return [i for i, atom in enumerate(atoms) if a.uf.find(int(atom)) not in removed]


@torch.no_grad()
def _sliced(use: _LayerUse, keep_in: list[int], keep_out: list[int]) -> nn.Module:
    m = use.module
    ki, ko = torch.as_tensor(keep_in, dtype=torch.long), torch.as_tensor(keep_out, dtype=torch.long)
    if use.kind == "batch_norm":
        new = type(m)(len(keep_in), eps=m.eps, momentum=m.momentum, affine=m.affine,
                      track_running_stats=m.track_running_stats)
        if m.affine:
            new.weight.copy_(m.weight[ki])
            new.bias.copy_(m.bias[ki])
        if m.track_running_stats:
            new.running_mean.copy_(m.running_mean[ki])
            new.running_var.copy_(m.running_var[ki])
            new.num_batches_tracked.copy_(m.num_batches_tracked)
    elif use.kind == "linear":
        new = nn.Linear(len(keep_in), len(keep_out), bias=m.bias is not None)
        new.weight.copy_(m.weight[ko][:, ki])
        if m.bias is not None:
            new.bias.copy_(m.bias[ko])
    else:
        groups = len(keep_in) if use.kind == "depthwise" else 1
        new = type(m)(len(keep_in), len(keep_out), m.kernel_size, stride=m.stride, padding=m.padding,
                      dilation=m.dilation, groups=groups, bias=m.bias is not None, padding_mode=m.padding_mode)
        w = m.weight[ko]
        new.weight.copy_(w if use.kind == "depthwise" else w[:, ki])
        if m.bias is not None:
            new.bias.copy_(m.bias[ko])
    new.train(m.training)
    return new.to(m.weight.device if hasattr(m, "weight") and m.weight is not None else "cpu")


def remove(model: nn.Module, a: ChannelAnalysis, removed: set[int], example: torch.Tensor) -> nn.Module:
    """A copy of ``model`` with the ``removed`` groups' channels cut out of every layer."""
    new_model = fxgraph.clone(model)
    for name, use in a.layers.items():
        keep_in, keep_out = _keep(a, use.in_atoms, removed), _keep(a, use.out_atoms, removed)
        if len(keep_in) == len(use.in_atoms) and len(keep_out) == len(use.out_atoms):
            continue
        if not keep_in or not keep_out:
            raise EdgekitError(f"internal: pruning would remove every channel of layer '{name}'")
        fxgraph.set_submodule(new_model, name, _sliced(use, keep_in, keep_out))
    try:
        with fxgraph.eval_mode(new_model):
            y = new_model(example)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise EdgekitError(f"the pruned {type(model).__name__} no longer runs ({first}); its forward probably "
                           "hard-codes a channel count (use x.flatten(1) rather than x.view(-1, 128))") from None
    if not isinstance(y, torch.Tensor):
        raise EdgekitError("the pruned model returns a non-tensor output")
    return new_model


# ---------------------------------------------------------------------------
# The public functions
# ---------------------------------------------------------------------------

def _example_and_split(model, data, example_input, input_shape):
    from .data import prepare
    split = prepare(data, model) if data is not None else None
    if example_input is not None:
        example = torch.as_tensor(np.asarray(example_input, dtype=np.float32))[:1]
    elif split is not None:
        example = torch.as_tensor(split.x_train[:1])
    elif input_shape is not None:
        example = torch.zeros((1,) + tuple(input_shape))
    else:
        raise EdgekitError("pruning needs the input's shape: give data, example_input or input_shape")
    return example, split


def prunable_layers(model: nn.Module, *, example_input=None, input_shape=None) -> list[dict]:
    """What structured pruning can remove: one entry per prunable layer."""
    example, _ = _example_and_split(model, None, example_input, input_shape)
    return [{"name": p.name, "layers": list(p.producers), "channels": p.channels}
            for p in analyse(model, example).prunable]


def prune_once(model: nn.Module, ratio: float, example: torch.Tensor, *, layers=None, scope="layer",
               criterion="l1", x=None) -> nn.Module:
    a = analyse(model, example)
    score(a, criterion, x)
    return remove(model, a, choose(a, ratio, layers, scope), example)


def prune(model: nn.Module, ratio: float = 0.5, *, criterion: str = "l1", scope: str = "layer",
          layers: dict[str, float] | None = None, data=None, steps: int = 1, epochs: int = 0, lr: float = 3e-3,
          teacher: nn.Module | None = None, example_input=None, input_shape=None, show_progress: bool = True,
          seed: int = 0) -> nn.Module:
    """Remove a fraction ``ratio`` of the channels / neurons of every prunable layer (``scope="layer"``)
    or of the whole model (``scope="global"``); ``layers`` overrides the ratio per layer.

    With ``steps`` > 1 the ratio is reached gradually (the kept fraction shrinks geometrically) with
    ``epochs`` of fine-tuning on ``data`` after each step (distilling from ``teacher`` when given).
    Returns a new, smaller model; ``model`` is untouched."""
    if not isinstance(steps, int) or steps < 1:
        raise EdgekitError(f"steps must be a positive integer, got {steps!r}")
    if epochs and data is None:
        raise EdgekitError("fine-tuning between pruning steps needs data")
    _check_ratio(ratio, "the pruning ratio")
    example, split = _example_and_split(model, data, example_input, input_shape)
    x_stats = split.x_train[:512] if split is not None else None
    first = analyse(model, example)
    if layers:
        for name, r in layers.items():
            first.layer_named(name)
            _check_ratio(r, f"the pruning ratio of layer {name!r}")
    original = {p.name: p.channels for p in first.prunable}
    total = sum(original.values())
    keep_ratio = {name: 1.0 - r for name, r in ((first.layer_named(k).name, v) for k, v in (layers or {}).items())}
    current = model
    from .finetune import finetune
    bar = Progress(steps, "pruning", enabled=show_progress and steps > 1, unit=" steps")
    for step in range(1, steps + 1):
        a = analyse(current, example)
        score(a, criterion, x_stats)
        frac = step / steps
        step_layers = {}
        for p in a.prunable:
            target = original.get(p.name, p.channels) * keep_ratio.get(p.name, 1.0 - ratio) ** frac
            step_layers[p.name] = max(0.0, 1.0 - max(1, round(target)) / p.channels)
        if scope == "global":
            free = [p for p in a.prunable if p.name not in keep_ratio]
            now = sum(p.channels for p in free)
            goal = (total - sum(original[n] for n in keep_ratio)) * (1.0 - ratio) ** frac
            step_ratio = max(0.0, 1.0 - goal / now) if now else 0.0
            removed = choose(a, min(step_ratio, 0.999), {n: step_layers[n] for n in keep_ratio}, "global")
        else:
            removed = choose(a, 0.0, step_layers, "layer")
        current = remove(current, a, removed, example)
        if epochs:
            current = finetune(current, split, epochs=epochs, lr=lr, teacher=teacher, seed=seed + step,
                               label=f"fine-tune {step}/{steps}", show_progress=show_progress)
        bar.update()
    bar.close()
    return current.eval()


def sensitivity(model: nn.Module, data, *, ratios=(0.25, 0.5, 0.75), criterion: str = "l1",
                tolerance: float = 0.01, show_progress: bool = True) -> dict:
    """Prune each prunable layer alone at each ratio (no fine-tuning) and measure held-out accuracy.

    Returns the baseline accuracy and, per layer, the accuracy at each ratio and the largest ratio whose
    accuracy stays within ``tolerance`` of the baseline (what the layer tolerates)."""
    from ..train import accuracy, predict
    from .data import prepare

    for r in ratios:
        _check_ratio(r, "a sensitivity ratio")
    split = prepare(data, model)
    example = torch.as_tensor(split.x_train[:1])
    with fxgraph.eval_mode(model):
        base = accuracy(predict(model, split.x_test), split.y_test)
    a = analyse(model, example)
    score(a, criterion, split.x_train[:512])
    rows = []
    bar = Progress(len(a.prunable) * len(ratios), "sensitivity", enabled=show_progress, unit=" prunings")
    for p in a.prunable:
        accs = {}
        for r in ratios:
            removed = choose(a, 0.0, {p.name: r}, "layer")
            pruned = remove(model, a, removed, example)
            accs[r] = accuracy(predict(pruned, split.x_test), split.y_test)
            bar.update(postfix=f"{p.name} {r:.2f}: {accs[r] * 100:.1f} %")
        tolerated = max([0.0] + [r for r in ratios if accs[r] >= base - tolerance])
        rows.append({"layer": p.name, "channels": p.channels,
                     "accuracy": {f"{r:g}": accs[r] for r in ratios}, "tolerates": tolerated})
    bar.close()
    return {"baseline_accuracy": base, "criterion": criterion, "tolerance": tolerance, "layers": rows}
