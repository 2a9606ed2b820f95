"""A synthetic 1-D signal classification set (fixed seed) for the 1-D architectures: each class is a
tone of its own frequency on its own channels, with random phase, amplitude and noise. Not an
architecture: the data the TC-ResNet, IMU and M5 tests train on."""
import numpy as np


def signals(channels: int, length: int, classes: int = 4, n_train: int = 480, n_test: int = 160, seed: int = 0):
    """(x_train, y_train, x_test, y_test), x of shape (N, channels, length), float32."""
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    y = rng.integers(0, classes, n)
    t = np.arange(length, dtype=np.float64) / length
    x = rng.normal(0, 0.4, (n, channels, length))
    for i in range(n):
        k = int(y[i])
        freq = 2 + 3 * k + rng.uniform(-0.5, 0.5)
        phase = rng.uniform(0, 2 * np.pi)
        amp = rng.uniform(0.7, 1.3)
        active = [(k + j) % channels for j in range(max(1, channels // 2))]
        x[i, active] += amp * np.sin(2 * np.pi * freq * t + phase)
    x = x.astype(np.float32)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]
