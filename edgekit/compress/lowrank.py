"""Low-rank factorization: a Linear (or 1x1 convolution) W (O x I) becomes two
layers, I -> r -> O, from the truncated SVD W ~ (U sqrt(S)) (sqrt(S) V^T), the
matrix factorization ALBERT applies to its embeddings.

The rank is given (``rank``) or chosen per layer as the smallest that keeps a
fraction ``energy`` of the squared singular values. A layer is replaced only
when the two factors hold fewer parameters than the original.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import EdgekitError
from . import fxgraph
from .finetune import finetune


def _eligible(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return True
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        return m.groups == 1 and all(k == 1 for k in m.kernel_size) and m.padding_mode == "zeros"
    return False


def choose_rank(singular: torch.Tensor, rank: int | None, energy: float | None) -> int:
    if rank is not None:
        return max(1, min(int(rank), singular.numel()))
    power = singular.double() ** 2
    cumulative = torch.cumsum(power, 0) / power.sum().clamp_min(1e-300)
    return int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=torch.float64) - 1e-12)) + 1


@torch.no_grad()
def _factor(m: nn.Module, r: int, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> nn.Module:
    root = torch.sqrt(s[:r])
    first_w = (root[:, None] * vh[:r]).to(m.weight.dtype)
    second_w = (u[:, :r] * root[None, :]).to(m.weight.dtype)
    if isinstance(m, nn.Linear):
        first = nn.Linear(m.in_features, r, bias=False)
        second = nn.Linear(r, m.out_features, bias=m.bias is not None)
        first.weight.copy_(first_w)
        second.weight.copy_(second_w)
    else:
        conv = type(m)
        ones = (1,) * len(m.kernel_size)
        first = conv(m.in_channels, r, m.kernel_size, stride=m.stride, padding=m.padding, bias=False)
        second = conv(r, m.out_channels, ones, bias=m.bias is not None)
        first.weight.copy_(first_w.reshape(first.weight.shape))
        second.weight.copy_(second_w.reshape(second.weight.shape))
    if m.bias is not None:
        second.bias.copy_(m.bias)
    return nn.Sequential(first, second).train(m.training)


def factorize(model: nn.Module, *, rank: int | None = None, energy: float | None = None, layers=None,
              exclude=(), data=None, epochs: int = 0, lr: float = 3e-3, teacher: nn.Module | None = None,
              show_progress: bool = True, seed: int = 0) -> nn.Module:
    """Replace each Linear / 1x1 conv layer (or only ``layers``) by its rank-``rank`` factorization, or the
    one keeping ``energy`` of its spectrum; then fine-tune ``epochs`` on ``data``. Returns a new model."""
    if (rank is None) == (energy is None):
        raise EdgekitError("factorize needs exactly one of rank (an integer >= 1) or energy (a fraction in (0, 1])")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise EdgekitError(f"the rank must be an integer >= 1, got {rank!r}")
    if energy is not None and (isinstance(energy, bool) or not isinstance(energy, (int, float))
                               or not 0.0 < float(energy) <= 1.0):
        raise EdgekitError(f"the energy must be a fraction in (0, 1], got {energy!r}")
    split = None
    if data is not None:
        from .data import prepare
        split = prepare(data, model)
    elif epochs:
        raise EdgekitError("fine-tuning after factorization needs data")
    new = fxgraph.clone(model)
    candidates = {name: m for name, m in new.named_modules() if _eligible(m)}
    wanted = list(layers) if layers is not None else list(candidates)
    for name in list(wanted) + list(exclude):
        if name not in candidates:
            raise EdgekitError(f"layer {name!r} cannot be factorized: only Linear and 1x1 convolution layers "
                               f"can; candidates: {', '.join(candidates) or 'none'}")
    replaced = 0
    for name in wanted:
        if name in exclude:
            continue
        m = candidates[name]
        w = m.weight.detach().double().reshape(m.weight.shape[0], -1)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        r = choose_rank(s, rank, energy)
        out_f, in_f = w.shape
        if r * (in_f + out_f) >= in_f * out_f:
            continue  # the factors would be no smaller
        fxgraph.set_submodule(new, name, _factor(m, r, u, s, vh))
        replaced += 1
    if epochs and replaced:
        finetune(new, split, epochs=epochs, lr=lr, teacher=teacher, seed=seed, label="fine-tuning",
                 show_progress=show_progress)
    return new.eval()
