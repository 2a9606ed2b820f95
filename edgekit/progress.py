"""A small progress bar for long work (training, calibration, flashing).

Redraws in place on a terminal; in a log (CI, a pipe) it prints one line when
the work is done, so logs stay readable.
"""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int | None, label: str, enabled: bool = True, unit: str = "", stream=None):
        self.total, self.label, self.enabled, self.unit = total, label, enabled, unit
        self.stream = stream or sys.stderr
        self.count = 0
        self.start = time.perf_counter()
        self.last_draw = 0.0
        self.postfix = ""
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, n: int = 1, postfix: str | None = None) -> None:
        self.count += n
        if postfix is not None:
            self.postfix = postfix
        now = time.perf_counter()
        if self.enabled and self.tty and (now - self.last_draw > 0.1 or self.count == self.total):
            self.last_draw = now
            self._draw(end="")

    def _draw(self, end: str) -> None:
        elapsed = time.perf_counter() - self.start
        if self.total:
            frac = min(1.0, self.count / self.total)
            bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
            text = f"{self.label:14s} [{bar}] {self.count}/{self.total}{self.unit} {elapsed:5.1f}s"
        else:
            text = f"{self.label:14s} {self.count}{self.unit} {elapsed:5.1f}s"
        if self.postfix:
            text += f"  {self.postfix}"
        self.stream.write(("\r" if self.tty else "") + text + end)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(end="\n")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def progress(iterable, label: str, enabled: bool = True, total: int | None = None):
    """Iterate with a progress bar."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    bar = Progress(total, label, enabled)
    try:
        for item in iterable:
            yield item
            bar.update()
    finally:
        bar.close()
