"""Weight clustering (Deep Compression's weight sharing).

    small = edgekit.cluster(model, bits=4)                                  # k-means, 16 values per layer
    small = edgekit.cluster(model, 4, data=(x, y), epochs=5)                # + fine-tuned shared centroids

Every Conv / Linear weight is replaced by the nearest of at most 2**bits
centroids, found by 1-D k-means (k-means++ initialisation, fixed seed: the same
model gives the same result), per layer or per output channel. Exact zeros (a
pruned model) stay zero: zero is kept as a centroid of its own, so the sparsity
survives. Fine-tuning trains the centroids, each with the sum of its weights'
gradients, keeping every weight's assignment.

After ``edgekit.quantize`` a layer clustered per layer gets one weight scale,
so it keeps at most 2**bits int8 values: one int8 codebook for the layer (see
docs/DESIGN-NOTES.md). The "codebook" and "huffman" weight encodings of
``edgekit.generate`` then store it in a few bits per weight.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from ..errors import EdgekitError
from ..progress import Progress

CLUSTERED = (nn.Conv1d, nn.Conv2d, nn.Linear)


def kmeans_1d(values: np.ndarray, k: int, rng: np.random.Generator, iterations: int = 100):
    """(centroids ascending, label of each value): Lloyd's k-means on scalars,
    initialised by k-means++. With k or fewer distinct values, those values."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    distinct = np.unique(values)
    if distinct.size <= k:
        return distinct, np.searchsorted(distinct, values)
    chosen = [values[rng.integers(values.size)]]
    nearest = (values - chosen[0]) ** 2
    for _ in range(1, k):
        chosen.append(values[rng.choice(values.size, p=nearest / nearest.sum())])
        nearest = np.minimum(nearest, (values - chosen[-1]) ** 2)
    centroids = np.sort(np.array(chosen))
    for _ in range(iterations):
        labels = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, values)
        counts = np.bincount(labels, minlength=centroids.size)
        sums = np.bincount(labels, weights=values, minlength=centroids.size)
        moved = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
        moved = np.sort(moved[counts > 0])  # an emptied cluster is dropped
        if moved.size == centroids.size and np.array_equal(moved, centroids):
            break
        centroids = moved
    labels = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, values)
    return centroids, labels


def _cluster_group(values: np.ndarray, k: int, rng) -> tuple[np.ndarray, np.ndarray, bool]:
    """Centroids (float32) and labels for one layer or channel. Exact zeros keep
    centroid 0 (label 0); the other values share k - 1 centroids."""
    zero = values == 0
    if not zero.any():
        centroids, labels = kmeans_1d(values, k, rng)
        return centroids.astype(np.float32), labels, False
    labels = np.zeros(values.size, np.int64)
    centroids = np.zeros(1, np.float64)
    if (~zero).any():
        if k < 2:
            raise EdgekitError("bits=0 leaves no value for the nonzero weights of a pruned layer")
        c, lab = kmeans_1d(values[~zero], k - 1, rng)
        centroids = np.concatenate([[0.0], c])
        labels[~zero] = lab + 1
    return centroids.astype(np.float32), labels, True


class _SharedWeights(nn.Module):
    """A parametrization: the weight is ``table[labels]``. Autograd of the
    gather sums the gradients of the weights of each cluster into its centroid."""

    def __init__(self, table: torch.Tensor, labels: torch.Tensor, frozen: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table)
        self.register_buffer("labels", labels)
        self.register_buffer("frozen", frozen)  # the zero centroids of pruned weights: stay exactly 0

    def forward(self, original):
        table = torch.where(self.frozen, torch.zeros_like(self.table), self.table)
        return table.reshape(-1)[self.labels].reshape(original.shape)


def _fold_batchnorm(model: nn.Module) -> nn.Module:
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(model.eval(), inplace=True)
    except Exception as exc:  # symbolic tracing fails on data-dependent control flow
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise EdgekitError(f"cannot fold the BatchNorm layers of {type(model).__name__} before clustering "
                           f"(torch.fx could not trace it: {first}); pass fold_batchnorm=False to cluster "
                           "the convolutions as they are (their codebooks are then per channel after folding)"
                           ) from None


def _training_data(data):
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
    elif hasattr(data, "x_train") and hasattr(data, "y_train"):
        x, y = data.x_train, data.y_train
    else:
        raise EdgekitError("cluster: data must be (x, y) arrays or a dataset split with x_train / y_train")
    x, y = np.asarray(x, dtype=np.float32), np.asarray(y)
    if x.shape[0] == 0 or x.shape[0] != y.shape[0]:
        raise EdgekitError(f"cluster: data has {x.shape[0]} samples and {y.shape[0]} labels")
    return x, y


def cluster(model: nn.Module, bits: int, *, per_channel: bool = False, data=None, epochs: int = 0,
            lr: float = 1e-3, fold_batchnorm: bool = True, seed: int = 0, show_progress: bool = True) -> nn.Module:
    """A new model whose Conv / Linear weights take at most ``2**bits`` distinct
    values per layer (or per output channel with ``per_channel``). The input
    model is left untouched.

    ``data`` ((x, y) or a dataset split) and ``epochs`` > 0 fine-tune the shared
    centroids (and the other parameters: biases, ...) with Adam at ``lr``; each
    weight keeps its cluster, and pruned zeros stay zero.
    ``fold_batchnorm`` first folds each BatchNorm into the convolution before it
    (torch.fx), so what is clustered is exactly what gets deployed: otherwise
    folding rescales every channel and a per-layer codebook becomes per channel.
    """
    if not isinstance(model, nn.Module):
        raise EdgekitError(f"cluster takes an nn.Module, got {type(model).__name__}")
    if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise EdgekitError(f"cluster: bits must be an integer from 1 to 8 (int8 codebooks), got {bits!r}")
    if epochs and data is None:
        raise EdgekitError("cluster: fine-tuning (epochs > 0) needs data=(x, y)")
    training = _training_data(data) if epochs else None
    new = copy.deepcopy(model).eval()
    if fold_batchnorm:
        new = _fold_batchnorm(new)
    layers = [(name, m) for name, m in new.named_modules() if isinstance(m, CLUSTERED)]
    if not layers:
        raise EdgekitError(f"cluster: {type(model).__name__} has no Conv1d / Conv2d / Linear layer to cluster")
    k = 1 << int(bits)
    shared = []
    bar = Progress(len(layers), "clustering", enabled=show_progress, unit=" layers")
    for index, (name, m) in enumerate(layers):
        w = m.weight.detach().cpu().numpy().astype(np.float32)
        groups = w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)
        width = min(k, groups.shape[1] + 1)
        table = np.zeros((groups.shape[0], width), np.float32)
        frozen = np.zeros_like(table, dtype=bool)
        labels = np.zeros(groups.shape, np.int64)
        for g, values in enumerate(groups):
            if not np.all(np.isfinite(values)):
                raise EdgekitError(f"cluster: layer '{name}' has NaN or inf weights")
            rng = np.random.default_rng([seed, index, g])
            centroids, lab, zero_kept = _cluster_group(values, k, rng)
            table[g, :centroids.size] = centroids
            frozen[g, 0] = zero_kept
            labels[g] = lab + g * width
        with torch.no_grad():
            m.weight.copy_(torch.as_tensor(table.reshape(-1)[labels].reshape(w.shape)))
        shared.append((m, table, labels.reshape(w.shape), frozen))
        bar.update()
    bar.close()
    if training is not None:
        _fine_tune(new, shared, training, epochs, lr, seed, show_progress)
    return new.eval()


def _fine_tune(model, shared, training, epochs, lr, seed, show_progress):
    from torch.nn.utils import parametrize

    from ..train import train_classifier

    for m, table, labels, frozen in shared:
        parametrize.register_parametrization(
            m, "weight", _SharedWeights(torch.as_tensor(table), torch.as_tensor(labels.reshape(-1)),
                                        torch.as_tensor(frozen)))
    x, y = training
    try:
        train_classifier(model, x, y, epochs=epochs, lr=lr, weight_decay=0.0, seed=seed,
                         show_progress=show_progress, label="fine-tuning")
    finally:
        for m, *_ in shared:
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
