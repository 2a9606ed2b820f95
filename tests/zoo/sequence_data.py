"""A small synthetic keyword-spotting-like sequence dataset, generated with a fixed seed: (N, L, C)
float32 frames (batch_first, as nn.LSTM / nn.GRU / a transformer read them) and integer labels.

Class k is a short "keyword": a chirp of two feature channels that rises (k odd) or falls, placed at a
random time in the window, on top of noise and a random slow background drift. Telling classes apart
needs the order of events over time, not just which channels are active."""
from __future__ import annotations

import numpy as np

SEED = 1234


def keyword_sequences(n: int = 800, steps: int = 16, channels: int = 8, classes: int = 4, seed: int = SEED):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.normal(0, 0.3, (n, steps, channels))
    x += np.linspace(0, 1, steps)[None, :, None] * rng.normal(0, 0.3, (n, 1, channels))  # drift
    length = steps // 2
    for i in range(n):
        k = int(y[i])
        start = rng.integers(0, steps - length + 1)
        a, b = (2 * (k // 2)) % channels, (2 * (k // 2) + 1) % channels
        ramp = np.linspace(0.0, 1.5, length)
        if k % 2:
            ramp = ramp[::-1]
        x[i, start:start + length, a] += ramp
        x[i, start:start + length, b] += ramp[::-1]
    return x.astype(np.float32), y.astype(np.int64)


def split(x, y, test_fraction: float = 0.25):
    n_test = int(len(y) * test_fraction)
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]
