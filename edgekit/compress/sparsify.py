"""Unstructured magnitude pruning: exact zeros in the weights.

The smallest-magnitude weights of every Conv / Linear layer (``scope="layer"``)
or of the whole model (``scope="global"``, one threshold) become exactly 0.0.
With ``steps`` > 1 the sparsity grows on Zhu & Gupta's cubic schedule with
fine-tuning in between; fine-tuning keeps pruned weights at zero (see
``finetune.WeightConstraints``). The zeros save flash and time once the C
generator stores such layers in its sparse encoding.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import EdgekitError
from ..progress import Progress
from . import fxgraph
from .finetune import finetune


def _check_sparsity(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise EdgekitError(f"{what} must be a fraction in [0, 1) of the weights to zero, got {value!r}")
    return float(value)


def _layers(model: nn.Module, names) -> list[tuple[str, nn.Module]]:
    layers = fxgraph.weight_layers(model)
    known = [n for n, _ in layers]
    for name in names:
        if name not in known:
            raise EdgekitError(f"no Conv/Linear layer named {name!r}; layers: {', '.join(known)}")
    return layers


@torch.no_grad()
def _zero_smallest(weights: list[torch.Tensor], sparsity: float) -> None:
    """Zero the ``sparsity`` fraction of smallest |w| over ``weights`` taken together (ties broken by order)."""
    flat = torch.cat([w.detach().reshape(-1).abs() for w in weights])
    k = int(round(sparsity * flat.numel()))
    if k == 0:
        return
    order = torch.argsort(flat, stable=True)[:k]
    mask = torch.ones_like(flat)
    mask[order] = 0.0
    start = 0
    for w in weights:
        n = w.numel()
        w.mul_(mask[start:start + n].reshape(w.shape))
        start += n


def sparsify_once(model: nn.Module, sparsity: float, *, scope: str = "layer", layers=None, exclude=()) -> nn.Module:
    new = fxgraph.clone(model)
    overrides = dict(layers or {})
    targets = [(n, m) for n, m in _layers(new, list(overrides) + list(exclude)) if n not in exclude]
    free = [m.weight for n, m in targets if n not in overrides]
    if scope == "global":
        if free:
            _zero_smallest(free, sparsity)
    elif scope == "layer":
        for w in free:
            _zero_smallest([w], sparsity)
    else:
        raise EdgekitError(f"unknown sparsity scope {scope!r}; use 'layer' or 'global'")
    for n, m in targets:
        if n in overrides:
            _zero_smallest([m.weight], overrides[n])
    return new


def sparsify(model: nn.Module, sparsity: float = 0.9, *, scope: str = "layer", layers: dict[str, float] | None = None,
             exclude=(), data=None, steps: int = 1, epochs: int = 0, lr: float = 3e-3, teacher: nn.Module | None = None,
             show_progress: bool = True, seed: int = 0) -> nn.Module:
    """Zero the ``sparsity`` fraction of smallest-magnitude weights of every Conv / Linear layer
    (``scope="layer"``) or across the model (``scope="global"``); ``layers`` sets a sparsity per layer,
    ``exclude`` leaves layers dense. ``steps`` > 1 reaches it gradually, fine-tuning ``epochs`` on ``data``
    after each step. Returns a new model; ``model`` is untouched."""
    sparsity = _check_sparsity(sparsity, "the sparsity")
    layers = {k: _check_sparsity(v, f"the sparsity of layer {k!r}") for k, v in (layers or {}).items()}
    if not isinstance(steps, int) or steps < 1:
        raise EdgekitError(f"steps must be a positive integer, got {steps!r}")
    split = None
    if data is not None:
        from .data import prepare
        split = prepare(data, model)
    elif epochs:
        raise EdgekitError("fine-tuning between sparsity steps needs data")
    current = model
    bar = Progress(steps, "sparsifying", enabled=show_progress and steps > 1, unit=" steps")
    for step in range(1, steps + 1):
        ramp = 1.0 - (1.0 - step / steps) ** 3  # Zhu & Gupta: prune fast early, slowly at the end
        current = sparsify_once(current, sparsity * ramp, scope=scope,
                                layers={k: v * ramp for k, v in layers.items()}, exclude=exclude)
        if epochs:
            current = finetune(current, split, epochs=epochs, lr=lr, teacher=teacher, seed=seed + step,
                               label=f"fine-tune {step}/{steps}", show_progress=show_progress)
        bar.update()
    bar.close()
    return current.eval()


def sparsity_of(model: nn.Module) -> dict[str, float]:
    """Fraction of exact zeros per Conv / Linear layer, and overall under ``"total"``."""
    out, zeros, total = {}, 0, 0
    for name, m in fxgraph.weight_layers(model):
        z = int((m.weight == 0).sum())
        out[name] = z / m.weight.numel()
        zeros += z
        total += m.weight.numel()
    out["total"] = zeros / total if total else 0.0
    return out
