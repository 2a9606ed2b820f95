"""Early exits: small classifiers at intermediate layers, so easy inputs stop early.

    multi = edgekit.add_exits(model, after=["conv1", "conv2"], data="digits")
    early1, early2, final = multi(x)           # the early exits in network order, the final classifier last

``add_exits`` returns a NEW model (a ``torch.fx.GraphModule``; the input is
untouched) whose forward returns one tensor of class scores per exit: the
early exits in the order they sit in the network, the original classifier
last. Each head reads the output of the named layer *after* the BatchNorm /
activation / dropout that directly follows it (so ``conv2`` means the block's
output, and BatchNorm still folds into ``conv2``). A spatial feature map gets
an average pool to a small grid + flatten + linear layer (the grid keeps
where things are, which a global pool would lose); a vector gets one linear
layer.

Training: ``mode="frozen"`` trains the heads only (the backbone and its
BatchNorm statistics stay as they are, so the final exit's accuracy is
unchanged); ``mode="joint"`` trains everything on a weighted sum of the exits'
losses. ``distill=True`` adds a distillation term from the final exit's
outputs to every early head. The model's ``edgekit_exits`` attribute names the
exits; ``save_model`` writes it into the ``.pt2`` so ``edgekit generate``
knows which outputs are exits.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import EdgekitError
from ..train import train_classifier
from . import fxgraph
from .data import prepare
from .finetune import WeightConstraints

MODES = ("frozen", "joint")
# The op kinds a tap moves past: what a layer's "block" applies to its output channel by channel.
_FOLLOWERS = {"batch_norm", "relu", "relu6", "hardtanh", "dropout", "identity", "clone", "contiguous"}
HEAD_FEATURES = 256  # an automatic head pools to the finest grid (4x4, 2x2, 1x1) with at most this many features


def _paths(node: fx.Node) -> list[tuple[str, str]]:
    """(call-site key, module path) of every module a node runs inside, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    out = [(str(k), str(v[0])) for k, v in stack.items() if v and v[0]]
    if node.op == "call_module" and (not out or out[-1][1] != str(node.target)):
        out.append((str(node.target), str(node.target)))
    return out


def _layer_nodes(gm: fx.GraphModule) -> tuple[dict[str, list[fx.Node]], dict[str, int]]:
    """Per module path: its nodes in graph order, and how many places call it."""
    nodes: dict[str, list[fx.Node]] = {}
    sites: dict[str, set[str]] = {}
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
        for key, path in _paths(node):
            nodes.setdefault(path, []).append(node)
            sites.setdefault(path, set()).add(key)
    counts = {p: max(len(sites[p]), calls.get(p, 1)) for p in nodes}
    return nodes, counts


def _tap(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """Move past the BatchNorm / activation / dropout that alone reads the layer's output."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.op == "output" or fxgraph.op_name(user, gm) not in _FOLLOWERS or user.args[0] is not node:
            break
        node = user
    return node


def _resolve(gm: fx.GraphModule, after) -> list[tuple[str, fx.Node]]:
    if isinstance(after, str):
        after = [a.strip() for a in after.split(",") if a.strip()]
    after = list(after or [])
    if not after:
        raise EdgekitError("name at least one layer to put an early exit after (e.g. after=['conv1'])")
    nodes, counts = _layer_nodes(gm)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    final = output.args[0]
    if not isinstance(final, fx.Node):
        raise EdgekitError("the model already returns several outputs; add exits to a single-output classifier")
    valid = [p for p in nodes if counts[p] == 1 and _tap(gm, nodes[p][-1]) is not final]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    taps = []
    for name in after:
        if name not in nodes:
            raise EdgekitError(f"unknown layer {name!r} for an early exit; the layers (as in model.named_modules()) "
                               f"are: {', '.join(valid)}")
        if counts[name] > 1:
            raise EdgekitError(f"layer {name!r} runs at {counts[name]} places in the model, so 'after {name}' is "
                               f"ambiguous; name a layer that runs once: {', '.join(valid)}")
        tap = _tap(gm, nodes[name][-1])
        if tap is final:
            raise EdgekitError(f"layer {name!r} produces the model's output: an exit after it would be the final "
                               "classifier itself; choose an earlier layer")
        if any(tap is t for _, t in taps):
            other = next(n for n, t in taps if t is tap)
            raise EdgekitError(f"layers {other!r} and {name!r} put an exit at the same place; name one of them")
        taps.append((name, tap))
    return sorted(taps, key=lambda nt: order[nt[1]])


def _head(shape: tuple[int, ...], classes: int, pool: int | None, name: str) -> nn.Module:
    if len(shape) == 2:
        return nn.Sequential(OrderedDict(fc=nn.Linear(shape[1], classes)))
    if len(shape) != 4:
        raise EdgekitError(f"the output of layer {name!r} has shape {list(shape)}; an exit head reads a feature "
                           "map (N, C, H, W) or a vector (N, features)")
    _, C, H, W = shape
    if pool is None:
        pool = next((p for p in (4, 2) if H % p == 0 and W % p == 0 and C * p * p <= HEAD_FEATURES), 1)
    elif not (isinstance(pool, int) and pool >= 1 and H % pool == 0 and W % pool == 0):
        raise EdgekitError(f"the exit after {name!r} cannot pool its {H}x{W} map to {pool}x{pool}: the grid must "
                           "divide the map")
    layers = OrderedDict()
    if (H, W) != (pool, pool):
        layers["pool"] = nn.AdaptiveAvgPool2d(pool)
    layers["flatten"] = nn.Flatten()
    layers["fc"] = nn.Linear(C * pool * pool, classes)
    return nn.Sequential(layers)


def _module_name(gm: nn.Module, layer: str) -> str:
    base = "exit_" + layer.replace(".", "_")
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


class _Trainer(nn.Module):
    """The multi-exit model as training sees it: with a frozen backbone, only the heads ever train
    (BatchNorm statistics and dropout of the backbone stay in eval mode)."""

    def __init__(self, model: fx.GraphModule, heads: list[str], frozen: bool):
        super().__init__()
        self.model, self.heads, self.frozen = model, heads, frozen

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.model.eval()
            for h in self.heads:
                self.model.get_submodule(h).train(mode)
        return self

    def forward(self, x):
        return self.model(x)


def _loss(weights: list[float], frozen: bool, distill: bool, temperature: float, alpha: float):
    def loss(model, xb, yb):
        outs = model(xb)
        final = outs[-1]
        teacher = F.softmax(final.detach() / temperature, dim=1) if distill else None
        total = 0.0 if frozen else weights[-1] * F.cross_entropy(final, yb)
        for w, logits in zip(weights[:-1], outs[:-1]):
            term = F.cross_entropy(logits, yb)
            if distill:
                kd = F.kl_div(F.log_softmax(logits / temperature, dim=1), teacher, reduction="batchmean")
                term = (1.0 - alpha) * term + alpha * temperature * temperature * kd
            total = total + w * term
        return total
    return loss


def add_exits(model, after, data="digits", *, mode: str = "frozen", epochs: int = 30, pool: int | None = None,
              distill: bool = True, weights=None, temperature: float = 2.0, alpha: float = 0.5, lr: float = 3e-3,
              batch_size: int = 64, seed: int = 0, show_progress: bool = True,
              sample_shape: tuple[int, ...] | None = None) -> fx.GraphModule:
    """A new model with early-exit classifiers after the layers ``after`` (module paths as in
    ``model.named_modules()``), trained on ``data``. Its forward returns a tuple of class scores: the early
    exits in network order, the original classifier last.

    ``mode``: "frozen" (train the heads only) or "joint" (everything, loss = sum of ``weights[k]`` x exit k's
    loss; ``weights`` lists the early exits then the final, default all 1). ``distill``: early heads also
    learn the final exit's softened outputs (temperature ``temperature``, weight ``alpha``). ``pool``: the
    grid a head averages a feature map to (default: the finest of 4x4, 2x2, 1x1 with at most 256 features).
    ``model`` may be an ``nn.Module`` or a ``.pt2`` path; it is never modified."""
    if mode not in MODES:
        raise EdgekitError(f"unknown exit training mode {mode!r}: choose one of {', '.join(MODES)}")
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise EdgekitError(f"epochs must be a positive integer, got {epochs!r}")
    if not (isinstance(temperature, (int, float)) and temperature > 0) or not 0.0 <= alpha <= 1.0:
        raise EdgekitError("the distillation temperature must be positive and alpha in [0, 1]")
    if isinstance(model, (str, Path)):
        model, sample_shape = fxgraph.load_model(model)
    if getattr(model, "edgekit_exits", None):
        raise EdgekitError("the model already has early exits; add exits to the single-exit model")
    split = prepare(data, model, sample_shape)
    gm = model if isinstance(model, fx.GraphModule) else fxgraph.trace(model)
    gm = fxgraph.clone(gm)
    example = torch.as_tensor(split.x_train[:1])
    fxgraph.propagate_shapes(gm, example)
    taps = _resolve(gm, after)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    final = output.args[0]
    classes = int(fxgraph.shape_of(final)[1])
    heads, outs = [], []
    for name, tap in taps:
        head = _head(fxgraph.shape_of(tap), classes, pool, name)
        module = _module_name(gm, name)
        gm.add_submodule(module, head)
        with gm.graph.inserting_after(tap):
            outs.append(gm.graph.call_module(module, (tap,)))
        heads.append(module)
    output.args = (tuple(outs) + (final,),)
    gm.graph.lint()
    gm.recompile()
    names = [name for name, _ in taps] + ["final"]
    if weights is None:
        weights = [1.0] * len(names)
    weights = [float(w) for w in weights]
    if len(weights) != len(names) or any(w < 0 for w in weights):
        raise EdgekitError(f"weights must list {len(names)} non-negative numbers (the early exits, then the final)")
    frozen = mode == "frozen"
    if frozen:
        for p in gm.parameters():
            p.requires_grad_(False)
        for h in heads:
            for p in gm.get_submodule(h).parameters():
                p.requires_grad_(True)
    torch.manual_seed(seed)
    for h in heads:  # fresh, seeded heads
        for m in gm.get_submodule(h).modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()
    constraints = None if frozen else WeightConstraints(gm)  # pruned / clustered backbones stay so
    trainer = _Trainer(gm, heads, frozen)
    train_classifier(trainer, split.x_train, split.y_train, epochs=epochs, lr=lr, batch_size=batch_size,
                     weight_decay=1e-4 if not frozen else 0.0, seed=seed, show_progress=show_progress,
                     label=f"training {len(heads)} exit head{'s' if len(heads) > 1 else ''}" +
                     (" and the backbone" if not frozen else ""),
                     loss_fn=_loss(weights, frozen, distill, float(temperature), float(alpha)),
                     after_step=constraints.apply if constraints else None)
    for p in gm.parameters():
        p.requires_grad_(True)
    gm.eval()
    _mark(gm, names)
    return gm


def _mark(gm: fx.GraphModule, names: list[str], attribute: str = "edgekit_exits") -> None:
    """Name the exits (or set another exit attribute) on the module, in a way copies of it keep."""
    setattr(gm, attribute, list(names))
    try:
        from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY
        gm.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {})[attribute] = list(names)
    except (ImportError, AttributeError):  # an older torch: copy.deepcopy then drops the names
        pass


def fit_temperatures(model: nn.Module, x: np.ndarray, y: np.ndarray) -> list[float]:
    """Per early exit, the temperature T that makes softmax(logits / T) best calibrated on ``(x, y)``
    (least negative log-likelihood; use the training split, never the data the operating point is
    chosen on). A head that is too sure of itself gets T > 1."""
    exit_names(model)
    outs = exit_outputs(model, np.asarray(x, dtype=np.float32))
    labels = torch.as_tensor(np.asarray(y).reshape(-1), dtype=torch.long)
    temperatures = []
    for logits in outs[:-1]:
        z = torch.as_tensor(logits, dtype=torch.float64)
        grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 121))
        nll = [float(F.cross_entropy(z / t, labels)) for t in grid]
        best = int(np.argmin(nll))
        lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
        for _ in range(40):  # golden-section refinement between the grid neighbours
            a, b = hi - (hi - lo) / 1.618034, lo + (hi - lo) / 1.618034
            if F.cross_entropy(z / a, labels) < F.cross_entropy(z / b, labels):
                hi = b
            else:
                lo = a
        temperatures.append(float(0.5 * (lo + hi)))
    return temperatures


def calibrate(model: nn.Module, data="digits") -> list[float]:
    """Fit each early exit's temperature on ``data``'s training split (``fit_temperatures``) and store them
    on ``model`` (``save_model`` writes them; ``edgekit.quantize`` folds them into the exit decisions)."""
    split = data if hasattr(data, "x_train") else None
    if split is None:
        from .data import as_split
        split = as_split(data)
    x = np.asarray(split.x_train, dtype=np.float32)
    temperatures = fit_temperatures(model, x, split.y_train)
    _mark(model, temperatures, "edgekit_exit_temperatures")
    return temperatures


def backbone(model: nn.Module) -> tuple[fx.GraphModule, list[str]]:
    """A multi-exit model without its early exits: (the single-exit network, the layers the exits sat
    after). Compress that, then ``add_exits(compressed, after)`` trains heads that fit the new backbone
    (``edgekit tune`` does so). ``model`` is untouched."""
    names = exit_names(model)
    gm = fxgraph.clone(model) if isinstance(model, fx.GraphModule) else fxgraph.trace(model)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    outs = output.args[0]
    if not isinstance(outs, (tuple, list)) or len(outs) != len(names):
        raise EdgekitError(f"the model names {len(names)} exits but returns "
                           f"{len(outs) if isinstance(outs, (tuple, list)) else 1} outputs")
    output.args = (outs[-1],)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    for attribute in ("edgekit_exits", "edgekit_exit_temperatures"):
        if hasattr(gm, attribute):
            delattr(gm, attribute)
        try:
            from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY
            gm.meta.get(_USER_PRESERVED_ATTRIBUTES_KEY, {}).pop(attribute, None)
        except ImportError:
            pass
    return gm.eval(), names[:-1]


def exit_names(model) -> list[str]:
    names = getattr(model, "edgekit_exits", None)
    if not names:
        raise EdgekitError("this model has no early exits (make one with edgekit.add_exits)")
    return list(names)


@torch.no_grad()
def exit_outputs(model: nn.Module, x: np.ndarray, batch_size: int = 512) -> list[np.ndarray]:
    """Every exit's float class scores on ``x``."""
    model.eval()
    parts = [model(torch.as_tensor(x[i:i + batch_size], dtype=torch.float32)) for i in range(0, len(x), batch_size)]
    return [torch.cat([p[k] for p in parts]).numpy() for k in range(len(parts[0]))]


def evaluate(model: nn.Module, data="digits", thresholds=(0.5, 0.8, 0.9, 0.95, 0.99)) -> dict:
    """The float model on the held-out split: each exit's accuracy, and per max-softmax threshold the share
    of inputs each exit answers and the accuracy of the answers (the float view; the int8 one is
    ``edgekit thresholds`` / ``device.profile.sweep_reference``)."""
    names = exit_names(model)
    split = data if hasattr(data, "x_test") else None
    if split is None:
        from .data import as_split
        split = as_split(data)
    x = split.x_test.reshape((-1,) + tuple(np.asarray(split.x_train).shape[1:]))
    outs = exit_outputs(model, x)
    y = split.y_test
    probs = [torch.softmax(torch.as_tensor(o), dim=1).numpy() for o in outs]
    rows = []
    for t in thresholds:
        conf = np.stack([p.max(axis=1) for p in probs[:-1]], axis=1)
        fired = conf >= t
        index = np.where(fired.any(axis=1), fired.argmax(axis=1), len(names) - 1)
        pred = np.stack([o.argmax(axis=1) for o in outs], axis=1)[np.arange(len(y)), index]
        rows.append({"threshold": float(t), "accuracy": float((pred == y).mean()),
                     "hit_rates": [float((index == k).mean()) for k in range(len(names))]})
    return {"exits": names, "accuracy": [float((o.argmax(axis=1) == y).mean()) for o in outs], "curve": rows,
            "samples": int(len(y))}


def save_model(model: nn.Module, sample_shape, path) -> Path:
    """``torch.export`` a multi-exit model to ``path`` (.pt2), with the exits named inside it."""
    import logging

    from ..frontends.pytorch import EXITS_FILE

    names = exit_names(model)
    program = fxgraph.export_model(model, sample_shape)
    path = Path(path)
    export_log = logging.getLogger("torch.export")
    level = export_log.level
    export_log.setLevel(logging.ERROR)
    try:
        record = {"names": names}
        if getattr(model, "edgekit_exit_temperatures", None):
            record["temperatures"] = [float(t) for t in model.edgekit_exit_temperatures]
        torch.export.save(program, str(path), extra_files={EXITS_FILE: json.dumps(record)})
    finally:
        export_log.setLevel(level)
    return path


def load_model(path) -> tuple[fx.GraphModule, tuple[int, ...]]:
    """A multi-exit ``.pt2`` back as a trainable module (with its ``edgekit_exits``)."""
    from ..frontends.pytorch import load_exported

    model, shape = fxgraph.load_model(path)
    program = load_exported(path)
    names = getattr(program, "edgekit_exits", None)
    if names:
        _mark(model, names)
    temperatures = getattr(program, "edgekit_exit_temperatures", None)
    if temperatures:
        _mark(model, temperatures, "edgekit_exit_temperatures")
    return model, shape
