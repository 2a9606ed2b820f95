"""Checks of the user's data and paths that catch nonsense before it becomes a silent wrong answer, a
hang or an internal error. Each raises an EdgekitError (or warns) naming the check that fired."""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from .errors import EdgekitError

# A static arena is one C array in .bss. On x86-64 and aarch64 Linux, gcc's default (small) code model
# addresses static data within 2 GiB, and a Raspberry Pi 4 may have 1 GiB of RAM in all: an arena above
# 1 GiB cannot be what the user meant for a model edgekit runs.
MAX_ARENA_BYTES_OS = 1 << 30


def warn(message: str) -> None:
    """A warning for legal input that is almost certainly a mistake: on stderr, one line."""
    warnings.warn(message, EdgekitWarning, stacklevel=3)


class EdgekitWarning(UserWarning):
    pass


# -- paths --------------------------------------------------------------------------------------------
def check_output_file(path, what: str) -> Path:
    """An output file the command will write: refused now (before the work) if it cannot be written."""
    p = Path(path)
    if p.is_dir():
        raise EdgekitError(f"{what} {p} is a directory; give a file path")
    parent = p.absolute().parent
    if not parent.exists():
        raise EdgekitError(f"{what} {p}: the directory {parent} does not exist")
    if not parent.is_dir():
        raise EdgekitError(f"{what} {p}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise EdgekitError(f"{what} {p} cannot be written (permission denied)")
    return p


# -- arrays -------------------------------------------------------------------------------------------
def check_float_samples(x, what: str) -> np.ndarray:
    """Samples a float model reads: int8 data here is almost always already-quantized tensors."""
    arr = np.asarray(x)
    if arr.dtype == np.int8:
        raise EdgekitError(f"{what} is an int8 array: edgekit expects float32 samples in the model's layout "
                           "(for raw int8 tensors use --int8 with run / profile)")
    if arr.dtype.kind not in "fiub":
        raise EdgekitError(f"{what} has dtype {arr.dtype}: give float32 samples")
    return arr


def check_calibration(x: np.ndarray) -> None:
    """Calibration on a constant set gives every tensor an empty range: refused."""
    if x.size and float(np.max(x)) == float(np.min(x)):
        raise EdgekitError(f"the calibration set is constant (every value is {float(x.flat[0]):g}): the "
                           "quantization ranges would be empty; calibrate on real samples")
    if x.shape[0] < 2:
        warn("the calibration set has one sample: the ranges it gives are unlikely to hold for other inputs")


def check_labels(labels, n: int, what: str = "labels") -> np.ndarray:
    """Class indices: integers (or floats that are whole numbers), one per sample."""
    y = np.asarray(labels)
    if y.dtype.kind not in "iuf" or y.dtype == np.bool_:
        raise EdgekitError(f"the {what} have dtype {y.dtype}: give integer class indices")
    y = y.reshape(-1) if y.ndim <= 1 else y
    if y.ndim != 1:
        raise EdgekitError(f"the {what} have shape {list(np.shape(labels))}: give one integer class index per "
                           "sample (not one-hot rows)")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise EdgekitError(f"the {what} are floats that are not whole numbers: give integer class indices")
    if y.shape[0] != n:
        raise EdgekitError(f"{y.shape[0]} {what} for {n} inputs")
    if y.size and y.min() < 0:
        raise EdgekitError(f"the {what} hold a negative class index ({int(y.min())})")
    return y.astype(np.int64)


def check_percentile(p: float) -> None:
    """The percentile observer keeps [100 - p, p] of the values: p must lie in (50, 100]."""
    if not np.isfinite(p) or not 50.0 < p <= 100.0:
        raise EdgekitError(f"--percentile {p:g}: the percentile observer keeps the values between the "
                           f"{100 - p:g}th and {p:g}th percentiles; give a number above 50 and at most 100 "
                           "(typically 99.9 to 99.999)")


def check_graph_shapes(graph) -> None:
    """Every tensor has positive dimensions: a zero-size or negative one is refused, naming its layer."""
    producers = {out: op for op in graph.ops for out in op.outputs}
    for name, t in graph.tensors.items():
        shape = tuple(t.shape)
        if any((not isinstance(d, (int, np.integer))) or d <= 0 for d in shape):
            op = producers.get(name)
            where = f"layer '{op.name}' ({op.kind}) output" if op else ("input" if name in graph.inputs else "tensor")
            raise EdgekitError(f"{where} '{name}' has shape {list(shape)}: every dimension must be positive "
                               "(a zero-size or negative dimension cannot be computed)")


def check_exit_threshold(value, criterion: str) -> None:
    """A softmax exit answers when its top probability reaches the threshold: above 1 it never would.
    ``value`` may hold one threshold per early exit (a list, or a comma-separated string)."""
    if isinstance(value, str) and "," in value:
        value = value.split(",")
    if isinstance(value, (list, tuple)):
        for v in value:
            check_exit_threshold(v, criterion)
        return
    if value is None or (isinstance(value, str) and value.strip().lower() in ("off", "none", "project")):
        return
    try:
        v = float(value)
    except (TypeError, ValueError):
        return  # threshold_to_int reports it
    if criterion == "softmax" and v > 1.0:
        raise EdgekitError(f"exit threshold {value}: with the softmax criterion it is a probability (0 to 1); "
                           "above 1 no early exit could ever answer (use 'off' for the full network)")


# -- argparse types (usage errors: exit 2) ------------------------------------------------------------
def _parse_number(text: str, kind: type, what: str):
    """``kind(text)``, or argparse's usage error saying what the text should have been."""
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def positive_int(text: str) -> int:
    value = _parse_number(text, int, "a whole number")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def tcp_port(text: str) -> int:
    value = _parse_number(text, int, "a port number")
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port (1 to 65535)")
    return value


def percentile_arg(text: str) -> float:
    value = _parse_number(text, float, "a number")
    try:
        check_percentile(value)
    except EdgekitError as exc:
        raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[1]) from None
    return value


def positive_float(text: str) -> float:
    value = _parse_number(text, float, "a number")
    if not np.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{value:g} must be a positive number")
    return value


_SIZE_UNITS = {"": 1, "B": 1, "KB": 1024, "KIB": 1024, "K": 1024, "MB": 1024 ** 2, "MIB": 1024 ** 2, "M": 1024 ** 2}


def byte_size(text: str) -> int:
    """A size in bytes: 65536, 64KB, 64KiB, 1.5MB (KB and MB are binary here, as in memory maps)."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else None
    if m is None or unit not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: give bytes, or KB / MB (e.g. 64KB)")
    value = int(float(m.group(1)) * _SIZE_UNITS[unit])
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1 byte")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not np.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{value:g} must be zero or more")
    return value


def quiet_broken_pipe() -> None:
    """stdout went away (`edgekit ... | head`): stop writing to it, without a traceback at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0)) if c not in (0x0A, 0x09, 0x0D)}


class TerminalSafe:
    """A text stream for a terminal: control characters that could come from names in a model file
    (ESC sequences that recolour, move the cursor or retitle the terminal) are written escaped."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        return self._stream.write(text.translate(_CONTROL))

    def __getattr__(self, name):
        return getattr(self._stream, name)


def guard_terminal() -> None:
    if getattr(sys.stdout, "isatty", lambda: False)() and not isinstance(sys.stdout, TerminalSafe):
        sys.stdout = TerminalSafe(sys.stdout)
