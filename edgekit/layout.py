"""Moving batched arrays between the source framework's layout and the IR's channels-last one.

Layouts: "NCHW" (IR NHWC), "NCL" (a torch signal; IR (N, L, C)), "NLC" (a batch_first sequence, as the
IR holds it), "NC" and "NHWC" (as the IR holds them).
"""
from __future__ import annotations

import numpy as np

from .errors import EdgekitError


def to_ir(x: np.ndarray, layout: str, sample_shape) -> np.ndarray:
    """(N, ...) in ``layout`` -> (N, ...) channels last with the IR's sample shape."""
    x = np.asarray(x)
    if layout == "NCHW" and x.ndim == 4:
        x = x.transpose(0, 2, 3, 1)
    elif layout == "NCL" and x.ndim == 3:
        x = x.transpose(0, 2, 1)
    sample_shape = tuple(sample_shape)
    if tuple(x.shape[1:]) != sample_shape:
        raise EdgekitError(f"inputs have samples of shape {list(_from_ir_shape(x.shape[1:], layout))}, the model "
                           f"expects {list(_from_ir_shape(sample_shape, layout))} ({layout}, batched on axis 0)")
    return np.ascontiguousarray(x)


def from_ir(y: np.ndarray, layout: str) -> np.ndarray:
    y = np.asarray(y)
    if layout == "NCHW" and y.ndim == 4:
        return np.ascontiguousarray(y.transpose(0, 3, 1, 2))
    if layout == "NCL" and y.ndim == 3:
        return np.ascontiguousarray(y.transpose(0, 2, 1))
    return y


def _from_ir_shape(shape, layout: str) -> tuple:
    shape = tuple(shape)
    if layout == "NCHW" and len(shape) == 3:
        return (shape[2], shape[0], shape[1])
    if layout == "NCL" and len(shape) == 2:
        return (shape[1], shape[0])
    return shape
