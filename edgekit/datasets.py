"""Datasets for demos, tests and benchmarks.

``digits``: scikit-learn's 8x8 handwritten digits (ships with scikit-learn,
no download), split 80/20 stratified with a fixed seed. Accuracy claims in
edgekit are measured on its held-out 20 %.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import EdgekitError

SEED = 0


@dataclass
class Split:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    name: str = ""

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1


def digits(flat: bool = False, seed: int = SEED) -> Split:
    """Digits as float32 in [0, 1]: (N, 1, 8, 8), or (N, 64) with ``flat``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    if not flat:
        x_tr, x_te = x_tr.reshape(-1, 1, 8, 8), x_te.reshape(-1, 1, 8, 8)
    return Split(x_tr, y_tr, x_te, y_te, "digits")


def load_npz(path: str | Path) -> Split:
    """A user's dataset: an .npz with x_train, y_train, x_test, y_test."""
    path = Path(path)
    if not path.exists():
        raise EdgekitError(f"dataset file not found: {path}")
    if not path.is_file():
        raise EdgekitError(f"dataset {path} is not a file (an .npz with x_train, y_train, x_test, y_test)")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise EdgekitError(f"{path} is not a readable .npz file: {exc}") from None
    if not hasattr(data, "files"):
        raise EdgekitError(f"{path} is a single array, not an .npz with x_train, y_train, x_test, y_test")
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in data]
    if missing:
        raise EdgekitError(f"{path} lacks arrays {', '.join(missing)} (needs x_train, y_train, x_test, y_test)")
    arrays = []
    for k in ("x_train", "y_train", "x_test", "y_test"):
        try:
            arrays.append(np.asarray(data[k]))
        except Exception as exc:  # object arrays need pickle, which edgekit never loads
            raise EdgekitError(f"{path}: {k} cannot be read as a numeric array ({exc})") from None
    from .safety import check_labels
    for k, a in zip(("x_train", "y_train", "x_test", "y_test"), arrays):
        if a.dtype.kind not in "biuf":
            raise EdgekitError(f"{path}: {k} has dtype {a.dtype}; give numeric arrays")
        if a.ndim == 0 or a.shape[0] == 0:
            raise EdgekitError(f"{path}: {k} is empty; give at least one sample")
    if arrays[0].ndim < 2 or arrays[2].ndim < 2:
        raise EdgekitError(f"{path}: x_train / x_test must be samples batched on axis 0 (at least 2 dimensions)")
    arrays[1] = check_labels(arrays[1], arrays[0].shape[0], f"labels y_train of {path}")
    arrays[3] = check_labels(arrays[3], arrays[2].shape[0], f"labels y_test of {path}")
    split = Split(*arrays, name=path.stem)
    if split.x_train.shape[0] != split.y_train.shape[0] or split.x_test.shape[0] != split.y_test.shape[0]:
        raise EdgekitError(f"{path}: x and y have different numbers of samples")
    if split.x_train.shape[1:] != split.x_test.shape[1:]:
        raise EdgekitError(f"{path}: train and test samples differ in shape")
    split.x_train = split.x_train.astype(np.float32)
    split.x_test = split.x_test.astype(np.float32)
    split.y_train = split.y_train.astype(np.int64)
    split.y_test = split.y_test.astype(np.int64)
    return split


def load_dataset(spec: str, flat: bool = False) -> Split:
    if spec == "digits":
        return digits(flat=flat)
    return load_npz(spec)
