"""Fine-tuning that never undoes an earlier compression step.

``WeightConstraints`` records, before training, which weights of each Conv /
Linear layer are exactly zero (pruned) and which share one value (clustered);
after every optimizer step it projects the weights back: pruned weights to
zero, each cluster to the mean of its members (the shared-centroid update of
Deep Compression). A dense, unclustered layer has neither, so the projection
leaves it alone. Any step of a recipe can thus be followed by fine-tuning or
distillation and keep its sparsity and its codebooks.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..train import train_classifier
from .fxgraph import weight_layers

MAX_CLUSTERS = 256


class _Tied:
    """One weight tensor's groups of equal values."""

    def __init__(self, weight: torch.Tensor, inverse: np.ndarray, zero_groups: np.ndarray):
        self.weight = weight
        self.inverse = torch.as_tensor(inverse, dtype=torch.long)
        groups = int(inverse.max()) + 1
        self.counts = torch.bincount(self.inverse, minlength=groups).to(weight.dtype)
        self.zero_groups = torch.as_tensor(zero_groups, dtype=torch.long)
        self.groups = groups

    @torch.no_grad()
    def apply(self) -> None:
        flat = self.weight.view(-1)
        sums = torch.zeros(self.groups, dtype=flat.dtype).index_add_(0, self.inverse, flat)
        means = sums / self.counts
        means[self.zero_groups] = 0.0
        flat.copy_(means[self.inverse])


def _groups_of(w: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(inverse index, zero group ids) if some weights share a value, else None."""
    flat = w.reshape(-1)
    values, inverse = np.unique(flat, return_inverse=True)
    if len(values) <= MAX_CLUSTERS and len(values) < flat.size:
        return inverse.reshape(-1), np.flatnonzero(values == 0)
    rows = w.reshape(w.shape[0], -1)
    inverses, zeros, offset, shared = [], [], 0, False
    for row in rows:
        v, inv = np.unique(row, return_inverse=True)
        shared |= len(v) < row.size and np.count_nonzero(v) < np.count_nonzero(row)
        inverses.append(inv.reshape(-1) + offset)
        zeros.extend((np.flatnonzero(v == 0) + offset).tolist())
        offset += len(v)
    if not shared:
        return None
    return np.concatenate(inverses), np.asarray(zeros, dtype=np.int64)


class WeightConstraints:
    """Keeps pruned weights at zero and clustered weights clustered during training."""

    def __init__(self, model: nn.Module):
        self.tied: list[_Tied] = []
        self.masks: list[tuple[torch.Tensor, torch.Tensor]] = []
        for _, layer in weight_layers(model):
            w = layer.weight
            data = w.detach().cpu().numpy()
            groups = _groups_of(data)
            if groups is not None:
                self.tied.append(_Tied(w, *groups))
            elif np.any(data == 0):
                self.masks.append((w, (w.detach() != 0).to(w.dtype)))

    @torch.no_grad()
    def apply(self) -> None:
        for tied in self.tied:
            tied.apply()
        for w, mask in self.masks:
            w.mul_(mask)

    def __bool__(self) -> bool:
        return bool(self.tied or self.masks)


def distillation_loss(teacher: nn.Module, temperature: float = 4.0, alpha: float = 0.7):
    """Hinton et al.: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy(labels)."""
    teacher = teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def loss(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t = teacher(xb)
        s = model(xb)
        soft = F.kl_div(F.log_softmax(s / temperature, dim=1), F.softmax(t / temperature, dim=1),
                        reduction="batchmean") * (temperature * temperature)
        return alpha * soft + (1.0 - alpha) * F.cross_entropy(s, yb)
    return loss


def finetune(model: nn.Module, split, *, epochs: int, lr: float = 3e-3, teacher: nn.Module | None = None,
             temperature: float = 4.0, alpha: float = 0.7, batch_size: int = 64, seed: int = 0,
             label: str = "fine-tuning", show_progress: bool = True) -> nn.Module:
    """Train ``model`` in place on ``split.x_train`` (cross-entropy, or distillation from ``teacher``),
    keeping its pruned and clustered weights so. Returns the model in eval mode."""
    if epochs <= 0:
        return model.eval()
    constraints = WeightConstraints(model)
    loss_fn = distillation_loss(teacher, temperature, alpha) if teacher is not None else None
    return train_classifier(model, split.x_train, split.y_train, epochs=epochs, lr=lr, batch_size=batch_size,
                            weight_decay=0.0, seed=seed, show_progress=show_progress, label=label,
                            loss_fn=loss_fn, after_step=constraints.apply if constraints else None)
