"""The data the compression passes train and measure on.

``data`` may be the string ``"digits"`` (scikit-learn's digits, the fixed
80/20 stratified split), a path to a user's ``.npz`` (x_train, y_train,
x_test, y_test), a ``datasets.Split``, or a tuple (x_train, y_train[, x_test,
y_test]). Samples are checked against the model before any work starts.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import datasets
from ..errors import EdgekitError
from .fxgraph import eval_mode


def as_split(data) -> datasets.Split:
    if isinstance(data, datasets.Split):
        return data
    if isinstance(data, (str, Path)):
        return datasets.load_dataset(str(data))
    if isinstance(data, (tuple, list)) and len(data) in (2, 4):
        arrays = [np.asarray(a) for a in data]
        if len(arrays) == 2:
            arrays = arrays + arrays
        x_tr, y_tr, x_te, y_te = arrays
        for x, y, part in ((x_tr, y_tr, "training"), (x_te, y_te, "test")):
            if x.ndim < 2 or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
                raise EdgekitError(f"the {part} data must be samples batched on axis 0 with one integer label "
                                   f"each; got x {list(x.shape)} and y {list(y.shape)}")
        return datasets.Split(x_tr.astype(np.float32), y_tr.astype(np.int64), x_te.astype(np.float32),
                              y_te.astype(np.int64), "arrays")
    raise EdgekitError("data must be 'digits', a path to an .npz (x_train, y_train, x_test, y_test), a "
                       "datasets.Split or a tuple (x_train, y_train[, x_test, y_test])")


def _reshaped(split: datasets.Split, shape: tuple[int, ...]) -> datasets.Split:
    return datasets.Split(split.x_train.reshape((-1,) + shape), split.y_train,
                          split.x_test.reshape((-1,) + shape), split.y_test, split.name)


def _check_values(split: datasets.Split) -> None:
    for name in ("x_train", "x_test"):
        if not np.all(np.isfinite(getattr(split, name))):
            raise EdgekitError(f"the data's {name} contains NaN or inf values")
    if split.y_train.min() < 0 or split.y_test.min() < 0:
        raise EdgekitError("labels must be non-negative class indices")


def fit_to_shape(split: datasets.Split, sample_shape: tuple[int, ...]) -> datasets.Split:
    """The split with samples of ``sample_shape``; digits is reshaped between (1, 8, 8) and (64,)."""
    _check_values(split)
    have = tuple(split.x_train.shape[1:])
    if have == tuple(sample_shape):
        return split
    if split.name == "digits" and math.prod(have) == math.prod(sample_shape):
        return _reshaped(split, tuple(sample_shape))
    raise EdgekitError(f"the data's samples have shape {list(have)}, but the model takes samples of shape "
                       f"{list(sample_shape)}")


def fit_to_model(split: datasets.Split, model: nn.Module) -> datasets.Split:
    """For an nn.Module (no recorded input shape): the split in a layout the model runs on."""
    _check_values(split)
    candidates = [tuple(split.x_train.shape[1:])]
    if split.name == "digits":
        candidates += [s for s in ((1, 8, 8), (64,)) if s not in candidates]
    first_error = None
    for shape in candidates:
        x = torch.as_tensor(split.x_train[:2].reshape((-1,) + shape))
        try:
            with eval_mode(model):
                y = model(x)
        except Exception as exc:
            first_error = first_error or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            continue
        if not isinstance(y, torch.Tensor) or y.dim() != 2:
            raise EdgekitError(f"the model must return class scores of shape (N, classes); it returned "
                               f"{type(y).__name__} {list(getattr(y, 'shape', []))}")
        classes = int(max(split.y_train.max(), split.y_test.max())) + 1
        if y.shape[1] < classes:
            raise EdgekitError(f"the data has {classes} classes but the model outputs {y.shape[1]} scores")
        return _reshaped(split, shape) if shape != candidates[0] else split
    raise EdgekitError(f"the model does not run on the data's samples of shape {list(candidates[0])}: "
                       f"{first_error}")


def prepare(data, model: nn.Module, sample_shape: tuple[int, ...] | None = None) -> datasets.Split:
    split = as_split(data)
    if sample_shape is not None:
        split = fit_to_shape(split, sample_shape)
    return fit_to_model(split, model)
