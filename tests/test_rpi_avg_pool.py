"""The Pi NEON average pool (kernels/neon/ek_avg_pool2d_s8: SADDW sums in int16 lanes emptied every 256
taps, 32 / 16 / 8 channels a block and a scalar tail, the division in float where it is exact) on both Pi
CPUs: cross-built with UBSan, run under qemu-aarch64 (-cpu cortex-a72 / cortex-a76), bit-exact with the
numpy reference (itself checked against TFLite in test_tflite_reference.py). Random windows, strides,
paddings (counted or not), clamps and channel counts 1..70; windows of more than 256 taps, global and
not, at the inputs' extremes; the scalar division (a build that lowers the float path's limit); and the
float division's exactness over every count it is used for, at the quotients' edges."""
import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgekit.boards import load_board
from helpers import float_graph, quantize_with_random_data
from test_kernels_c import SETTINGS, pool_case
from test_rpi import CrossBuild, run_layer_on_pi

pytestmark = pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None or shutil.which("qemu-aarch64") is None,
                                reason="needs aarch64-linux-gnu-gcc and qemu-aarch64 (scripts/setup.sh)")

POOL_SETTINGS = settings(SETTINGS, max_examples=max(4, SETTINGS.max_examples // 3))
FLOAT_COUNT = 1 << 16  # the kernel's EK_AVG_FLOAT_COUNT: counts below it divide in float


@pytest.fixture(scope="module")
def xbuild(tmp_path_factory):
    return CrossBuild(tmp_path_factory.mktemp("aarch64_avg_pool"))


def scalar_division_board(name: str):
    """The board with the float division's limit at 1, so every average takes the scalar division."""
    board = load_board(name)
    return dataclasses.replace(board, name=f"{name}-scalar-div",
                               data={**board.data, "cflags": board["cflags"] + ["-DEK_AVG_FLOAT_COUNT=1"]})


def pool_graph(h, w, c, kernel, stride, padding=(0, 0, 0, 0), activation="none", count_include_pad=False):
    def out(size, k, s, p0, p1):
        return (size + p0 + p1 - k) // s + 1
    oh, ow = out(h, kernel[0], stride[0], *padding[:2]), out(w, kernel[1], stride[1], *padding[2:])
    attrs = dict(kernel=kernel, stride=stride, padding=padding, activation=activation,
                 count_include_pad=count_include_pad)
    return float_graph("avg_pool2d", [(1, h, w, c)], attrs, None, (1, oh, ow, c))


def run_on_pi(q, x: np.ndarray, xbuild, board, kernel="ek_avg_pool2d_s8") -> np.ndarray:
    """The quantized pool run on the board (test_rpi_add_depthwise.run_on_pi: UBSan, qemu-aarch64, equal to
    the reference), asserting the kernel is the NEON one (int16 lane sums); returns the outputs."""
    def neon_kernel(project: Path):
        assert "vaddw_s8" in (project / "kernels" / f"{kernel}.c").read_text()
    return run_layer_on_pi(q, x, xbuild, board, threads=1, inspect=neon_kernel)[0]


@given(pool_case(), st.sampled_from([1, 5, 8, 9, 16, 23, 24, 32, 40, 48, 56, 63, 70]), st.sampled_from(["rpi4", "rpi5"]))
@POOL_SETTINGS
def test_avg_pool2d_neon(xbuild, case, c, board):
    """Random windows, strides, paddings (counted or not at the borders), fused clamps and channel counts
    that run the 32-, 16- and 8-channel blocks and the scalar tail."""
    rng = np.random.default_rng(case["seed"])
    g = float_graph("avg_pool2d", [(*case["shape"][:3], c)], case["attrs"], None, (*case["out"][:3], c))
    q = quantize_with_random_data(g, rng, {"x0": case["rng"]}, "minmax")
    x = rng.integers(-128, 128, size=(6, *case["shape"][1:3], c)).astype(np.int8)
    x[0], x[1] = -128, 127
    run_on_pi(q, x, xbuild, board)


@pytest.mark.parametrize("h, w, c, kernel, stride, padding, board", [
    (25, 5, 64, (25, 5), (1, 1), (0, 0, 0, 0), "rpi5"),  # a global pool (a DS-CNN's): one run of 125 pixels
    (8, 8, 64, (8, 8), (1, 1), (0, 0, 0, 0), "rpi4"),  # a ResNet's global pool: 64 pixels
    (23, 30, 57, (23, 30), (1, 1), (0, 0, 0, 0), "rpi4"),  # 690 taps a lane: emptied into int32 twice
    (20, 21, 72, (17, 17), (3, 4), (2, 1, 0, 3), "rpi5"),  # 289-tap windows in rows narrower than the input
])
def test_avg_pool2d_neon_large_windows(xbuild, h, w, c, kernel, stride, padding, board):
    """Windows of more values than an int16 lane holds (256), global and not, and the inputs' extremes:
    an all -128 / all 127 image would overflow the lanes if they were not emptied."""
    rng = np.random.default_rng(h * w * c)
    q = quantize_with_random_data(pool_graph(h, w, c, kernel, stride, padding), rng, {"x0": (-1.0, 1.0)}, "minmax")
    x = rng.integers(-128, 128, size=(4, h, w, c)).astype(np.int8)
    x[0], x[1] = -128, 127
    got = run_on_pi(q, x, xbuild, board)
    assert len(np.unique(got[2:])) > 1  # not a constant output


@pytest.mark.parametrize("h, w, c, board", [(23, 30, 40, "rpi4"), (16, 17, 35, "rpi5"), (7, 7, 64, "rpi5")])
def test_mean_neon_many_pixels(xbuild, h, w, c, board):
    """MEAN's NEON sums in int16 lanes too: more pixels than a lane holds (256; emptied into int32), the
    inputs' extremes, 16-channel blocks and the scalar tail (small means: tests/test_rpi.py)."""
    rng = np.random.default_rng(h * w + c)
    g = float_graph("mean", [(1, h, w, c)], {}, None, (1, 1, 1, c))
    q = quantize_with_random_data(g, rng, {"x0": (-1.0, 3.0)}, "minmax")
    x = rng.integers(-128, 128, size=(4, h, w, c)).astype(np.int8)
    x[0], x[1] = -128, 127
    got = run_on_pi(q, x, xbuild, board, kernel="ek_mean_s8")
    assert len(np.unique(got[2:])) > 1  # not a constant output


@pytest.mark.parametrize("board", ["rpi4", "rpi5"])
def test_avg_pool2d_neon_scalar_division(xbuild, board):
    """The division the kernel takes for windows of 2^16 taps or more (built here with that limit at 1,
    so every window takes it): padding counted, a clamp, all channel blocks."""
    rng = np.random.default_rng(7)
    g = pool_graph(9, 11, 61, (3, 4), (2, 3), (1, 1, 2, 1), "relu6", count_include_pad=True)
    q = quantize_with_random_data(g, rng, {"x0": (-3.0, 7.0)}, "minmax")
    x = rng.integers(-128, 128, size=(4, 9, 11, 61)).astype(np.int8)
    x[0], x[1] = -128, 127
    run_on_pi(q, x, xbuild, scalar_division_board(board))


def test_float_division_is_exact_below_the_limit():
    """The kernel's float division, checked on the host's IEEE float32 (the same correctly rounded FDIV):
    for every count below 2^16 and every quotient an int8 average can have (0..128), the numerators at
    the quotient's edges (k * count and k * count + count - 1, the one closest to rounding up) and the
    largest one an average can reach (128 * count + count / 2) truncate to the integer quotient."""
    d = np.arange(1, FLOAT_COUNT, dtype=np.int64)
    for k in range(0, 129):
        for n in (k * d, k * d + d - 1):
            got = np.trunc(n.astype(np.float32) / d.astype(np.float32)).astype(np.int64)
            assert np.array_equal(got, n // d), k
    n = 128 * d + d // 2
    assert n.max() < 2 ** 24  # exact in float32, as every count and numerator above
    assert np.array_equal(np.trunc(n.astype(np.float32) / d.astype(np.float32)).astype(np.int64), n // d)
