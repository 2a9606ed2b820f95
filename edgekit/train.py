"""Small, deterministic training loops (CPU, two cores are plenty for these models)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .progress import Progress


def seed_everything(seed: int = 0) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def train_classifier(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int = 30, lr: float = 3e-3,
                     batch_size: int = 64, weight_decay: float = 1e-4, seed: int = 0, show_progress: bool = True,
                     label: str = "training", loss_fn=None, after_step=None) -> nn.Module:
    """Adam + cosine schedule, cross-entropy (or ``loss_fn(model, xb, yb)``).
    ``after_step()`` runs after every optimizer step (e.g. to keep pruned weights at zero)."""
    seed_everything(seed)
    xt, yt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    gen = torch.Generator().manual_seed(seed)
    ce = nn.CrossEntropyLoss()
    bar = Progress(epochs, label, enabled=show_progress, unit=" epochs")
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(xt), generator=gen)
        total, count = 0.0, 0
        for i in range(0, len(xt), batch_size):
            idx = order[i:i + batch_size]
            xb, yb = xt[idx], yt[idx]
            opt.zero_grad()
            loss = loss_fn(model, xb, yb) if loss_fn else ce(model(xb), yb)
            loss.backward()
            opt.step()
            if after_step is not None:
                after_step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        sched.step()
        bar.update(postfix=f"loss {total / count:.4f}")
    bar.close()
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    model.eval()
    outs = [model(torch.as_tensor(x[i:i + batch_size], dtype=torch.float32)).numpy()
            for i in range(0, len(x), batch_size)]
    return np.concatenate(outs)


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((np.asarray(logits).reshape(len(y), -1).argmax(axis=1) == y).mean())
