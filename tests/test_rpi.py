"""Raspberry Pi 64-bit boards: the NEON kernels (SDOT on rpi5) cross-built with
aarch64-linux-gnu-gcc -Werror and UBSan, run under qemu-aarch64 with the Pi's
core (-cpu cortex-a72 / cortex-a76), bit-exact with the numpy reference over
random shapes and parameters; whole models; and the protocol runner over TCP
and stdin/stdout, driven by edgekit's host side (`profile`)."""
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import edgekit
from edgekit.boards import load_board
from edgekit.codegen.project import generate_project, load_project
from helpers import conv_out, conv_out_nonempty, float_graph, quantize_with_random_data, tiny_quantized_fc
from test_kernels_c import SETTINGS, activations, conv_case, input_range, observers, pool_case

pytestmark = pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None or shutil.which("qemu-aarch64") is None,
                                reason="needs aarch64-linux-gnu-gcc and qemu-aarch64 (scripts/setup.sh)")

QEMU = ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu"]
CHECKS = ["-std=c99", "-Wall", "-Wextra", "-Werror", "-fsanitize=undefined", "-fno-sanitize-recover=all"]
PI_SETTINGS = settings(SETTINGS, max_examples=max(4, SETTINGS.max_examples // 2))


class CrossBuild:
    """Kernel objects compiled once per board (they do not depend on the model)."""

    def __init__(self, root: Path):
        self.root = root
        self.lock = threading.Lock()
        self.objects: dict[tuple[str, str], Path] = {}

    def build(self, project: Path, board) -> Path:
        record = load_project(project)
        flags = board["cflags"] + CHECKS + ["-I", str(project / "include"), "-I", str(project)]
        objs = []
        threads = record.get("threads", 1)  # with threads the kernels' scratch is thread-local
        for k in record["kernels"]:
            with self.lock:
                key = (board.name, k, threads > 1)
                if key not in self.objects:
                    obj = self.root / f"{board.name}_{k}{'_mt' if threads > 1 else ''}.o"
                    subprocess.run([board["cc"], *flags, "-c", str(project / "kernels" / f"{k}.c"), "-o", str(obj)],
                                   check=True, capture_output=True, text=True)
                    self.objects[key] = obj
                objs.append(str(self.objects[key]))
        exe = project / "model_runner_test"
        proc = subprocess.run([board["cc"], *flags, *(str(project / f) for f in ("model_runner.c", "ek_port.c",
                               "ek_protocol.c", "ek_pool.c", "model.c", "model_weights.c")), *objs, "-o", str(exe),
                               "-lm", "-pthread"], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return exe


@pytest.fixture(scope="session")
def xbuild(tmp_path_factory):
    return CrossBuild(tmp_path_factory.mktemp("aarch64_objects"))


def run_qemu(exe: Path, cpu: str, data: np.ndarray, out_elems: int) -> np.ndarray:
    src, dst = exe.parent / "in.bin", exe.parent / "out.bin"
    np.ascontiguousarray(data, np.int8).tofile(src)
    proc = subprocess.run(QEMU + ["-cpu", cpu, str(exe), str(src), str(dst)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "runtime error" not in proc.stderr, proc.stderr[-3000:]
    out = np.fromfile(dst, np.int8)
    return out.reshape(data.shape[0], out_elems)


def run_layer_on_pi(q, xs, xbuild, board, threads=None, inspect=None) -> tuple[np.ndarray, dict]:
    """The quantized graph generated for the board (a name or a Board; ``threads``: None for the board's
    default), built with UBSan, run under qemu-aarch64 on the samples ``xs`` (name -> int8 array, or one
    array for a one-input graph); asserts it equals the reference and returns the outputs and the project
    record. ``inspect(project_dir)`` runs before the build (e.g. to read a generated kernel)."""
    from edgekit import reference
    xs = xs if isinstance(xs, dict) else {q.inputs[0]: xs}
    n = next(iter(xs.values())).shape[0]
    data = np.concatenate([xs[name].reshape(n, -1) for name in q.inputs], axis=1)  # the runner reads per sample
    board = load_board(board) if isinstance(board, str) else board
    with tempfile.TemporaryDirectory() as tmp:
        record = generate_project(q, tmp, board, threads=threads)
        if inspect is not None:
            inspect(Path(tmp))
        exe = xbuild.build(Path(tmp), board)
        got = run_qemu(exe, board["qemu"]["cpu"], data, q.tensors[q.outputs[0]].size)
    want = reference.run(q, xs if len(xs) > 1 else xs[q.inputs[0]])[0].reshape(got.shape)
    assert int(np.sum(got != want)) == 0, f"{int(np.sum(got != want))} of {got.size} differ on {board.name}"
    return got, record


def check_on_pi(g, rng, xbuild, board_name, ranges=None, observer="minmax", threads=1):
    """The graph quantized, generated for the board (with ``threads``), built with UBSan, run under
    qemu-aarch64 on 10 random samples and compared with the reference. Returns the project record."""
    q = quantize_with_random_data(g, rng, ranges, observer)
    xs = {name: rng.integers(-128, 128, size=(10,) + q.tensors[name].shape[1:]).astype(np.int8) for name in q.inputs}
    return run_layer_on_pi(q, xs, xbuild, board_name, threads=threads)[1]


boards = st.sampled_from(["rpi4", "rpi5"])


@given(conv_case(), boards)
@PI_SETTINGS
def test_conv2d_neon(xbuild, case, board):
    rng = np.random.default_rng(case["seed"])
    kh, kw = case["k"]
    # Wider channels than the portable test: the 16-lane loops and their tails both run.
    c = case["c"] * 5
    weights = {"w": rng.normal(0, case["wscale"], (case["o"], kh, kw, c)), "b": rng.normal(0, 1, case["o"])}
    attrs = dict(stride=case["stride"], dilation=case["dilation"], padding=case["padding"], activation=case["act"])
    g = float_graph("conv2d", [(1, case["h"], case["w"], c)], attrs, weights, (1, *case["out"], case["o"]))
    check_on_pi(g, rng, xbuild, board, {"x0": case["rng"]}, case["observer"])


@given(st.integers(1, 4), st.integers(1, 7), st.integers(1, 4), st.integers(1, 40), st.integers(1, 13),
       st.tuples(*(st.integers(0, 1) for _ in range(4))), st.integers(1, 2), activations, boards, st.integers(0, 2 ** 31))
@PI_SETTINGS
def test_conv2d_neon_windows(xbuild, kw, h, w, c, o, padding, stride, act, board, seed):
    """1xN and 1x1 windows (read in place when inside the input, gathered at a padded border),
    odd pixel counts (the last pixel of a pair computed twice), out_c below 4 and not a multiple
    of 4 (the last group overlaps), K = kw * c not a multiple of 16 or 8 (the vector tails)."""
    rng = np.random.default_rng(seed)
    padding = (0, 0, padding[2], padding[3])
    out = conv_out(h, w, (1, kw), (1, stride), (1, 1), padding)
    if out[1] < 1:
        padding = (0, 0, padding[2] + kw, padding[3])
        out = conv_out(h, w, (1, kw), (1, stride), (1, 1), padding)
    weights = {"w": rng.normal(0, 1, (o, 1, kw, c)), "b": rng.normal(0, 1, o)}
    attrs = dict(stride=(1, stride), dilation=(1, 1), padding=padding, activation=act)
    g = float_graph("conv2d", [(1, h, w, c)], attrs, weights, (1, *out, o))
    check_on_pi(g, rng, xbuild, board, {"x0": (-2.0, 3.0)})


@given(st.integers(1, 9), st.integers(1, 5), st.sampled_from([1, 3, 4, 8, 13, 16, 20, 33]),
       st.sampled_from([1, 5, 15, 16, 17, 32, 40]), st.sampled_from([(1, 1), (1, 3), (3, 3), (2, 5)]),
       st.tuples(*(st.integers(0, 2) for _ in range(4))), st.integers(1, 2), activations, boards,
       st.integers(0, 2 ** 31))
@PI_SETTINGS
def test_conv2d_tile(xbuild, h, w, c, o, k, padding, stride, act, board, seed):
    """The packed register tile (rpi5 SDOT, rpi4 SMLAL by lane): 16-channel blocks (fewer than 16
    channels, and a last block overlapping the one before when out_c is not a multiple of 16),
    4-pixel groups with the last pixel repeated, K (= kh * kw * in_c) with a tail past the last
    whole load (1..3 groups of 4 taps past 16 on rpi5, 1..7 taps past 8 on rpi4), windows read in
    place (1x1 / 1xN inside the input) or gathered with padding."""
    rng = np.random.default_rng(seed)
    kh, kw = k
    out, padding = conv_out_nonempty(h, w, k, (stride, stride), padding)
    weights = {"w": rng.normal(0, 1, (o, kh, kw, c)), "b": rng.normal(0, 1, o)}
    attrs = dict(stride=(stride, stride), dilation=(1, 1), padding=padding, activation=act)
    g = float_graph("conv2d", [(1, h, w, c)], attrs, weights, (1, *out, o))
    check_on_pi(g, rng, xbuild, board, {"x0": (-2.0, 3.0)})


@given(st.integers(1, 7), st.integers(1, 13), st.sampled_from([4, 8, 12, 16, 20, 28, 32, 36]),
       st.sampled_from([1, 5, 16, 17, 40]), st.sampled_from([(3, 3), (1, 1), (2, 5), (5, 1)]),
       st.tuples(*(st.integers(0, 2) for _ in range(4))), st.integers(1, 2), st.integers(1, 2), activations,
       st.integers(0, 2 ** 31))
@PI_SETTINGS
def test_conv2d_sdot_runs(xbuild, h, w, c, o, k, padding, stride, dilation, act, seed):
    """rpi5, in_c a multiple of 4: windows read in place as kh * kw runs of in_c (no gather) from the
    input or, when windows reach into the padding (on every side here), from its padded copy in the
    scratch: groups of four pixels of one row at fixed tap offsets, groups crossing an output row,
    the last pixel repeated, strides, dilation, in_c a multiple of 16 as one loop of 16-byte steps
    (16, 32), the others as runs with a 4 / 8 / 12-byte tail loaded exactly. in_c not a multiple of
    4 keeps the gathered windows (test_conv2d_tile)."""
    rng = np.random.default_rng(seed)
    kh, kw = k
    out, padding = conv_out_nonempty(h, w, k, (stride, stride), padding, (dilation, dilation))
    weights = {"w": rng.normal(0, 1, (o, kh, kw, c)), "b": rng.normal(0, 1, o)}
    attrs = dict(stride=(stride, stride), dilation=(dilation, dilation), padding=padding, activation=act)
    g = float_graph("conv2d", [(1, h, w, c)], attrs, weights, (1, *out, o))
    check_on_pi(g, rng, xbuild, "rpi5", {"x0": (-2.0, 3.0)})


@given(st.integers(2, 7), st.integers(4, 11), st.sampled_from([4, 8, 12, 16, 32, 48]), st.sampled_from([(1, 1), (3, 3), (1, 2)]),
       st.tuples(*(st.integers(0, 1) for _ in range(4))), st.integers(1, 2), activations, st.sampled_from([0, 1, 2]),
       st.integers(0, 2 ** 31))
@PI_SETTINGS
def test_conv2d_sdot_tile_shift_forms(xbuild, h, w, c, k, padding, stride, act, left_block, seed):
    """rpi5, windows as runs of 16k bytes (16-byte steps of 4 lanes) or of 4, 8, 12 bytes (one step
    of 1-3 lanes each: in_c 4-12 over 1 or 2 columns, 3x3 over 4): the tile with its output stage in
    assembly (ek_conv_sdot_tile) when every lane of a 16-channel block shifts right by 1 or more (no
    rounding mask) or some lane by 0 (the mask), and the C output stage when a lane shifts left; 48
    channels are three blocks, one of each (the left-shifting one drawn); whole tiles, the tiles
    whose loads would pass the input's end and the last 1-3 pixels in C; in place, from the padded
    copy, strided."""
    from edgekit import reference
    rng = np.random.default_rng(seed)
    kh, kw = k
    out, padding = conv_out_nonempty(h, w, k, (stride, stride), padding)
    g = float_graph("conv2d", [(1, h, w, c)], dict(stride=(stride, stride), dilation=(1, 1), padding=padding,
                    activation=act), {"w": rng.normal(0, 1, (48, kh, kw, c)), "b": rng.normal(0, 1, 48)}, (1, *out, 48))
    q = quantize_with_random_data(g, rng, {"x0": (-2.0, 3.0)})
    a = q.ops[0].attrs
    new = np.maximum(rng.integers(-9, 0, 48), a["shift"])  # right shifts of 1 or more
    zero_block = (left_block + 1) % 3
    new[16 * zero_block + rng.integers(0, 16)] = 0
    new[16 * left_block + rng.integers(0, 16)] = 1
    a["multiplier"][:] = a["multiplier"] >> (new - a["shift"])  # the same scale (multiplier x 2^shift)
    a["shift"][:] = new
    x = rng.integers(-128, 128, size=(10, h, w, c)).astype(np.int8)
    b = load_board("rpi5")
    with tempfile.TemporaryDirectory() as tmp:
        generate_project(q, tmp, b)
        got = run_qemu(xbuild.build(Path(tmp), b), b["qemu"]["cpu"], x.reshape(10, -1), out[0] * out[1] * 48)
    ref = reference.run(q, x)[0].reshape(got.shape)
    assert int(np.sum(got != ref)) == 0, f"{int(np.sum(got != ref))} of {got.size} differ"


@pytest.mark.parametrize("c, k, stride, padding", [
    (16, (3, 3), 1, (1, 1, 1, 1)), (16, (3, 3), 1, (0, 0, 0, 0)), (16, (1, 3), 1, (0, 1, 0, 1)), (16, (2, 2), 1, (0, 0, 0, 0)),
    (3, (3, 3), 1, (1, 1, 1, 1)), (3, (3, 3), 2, (0, 0, 1, 1)), (4, (3, 3), 1, (0, 0, 0, 0)), (4, (3, 3), 2, (1, 1, 1, 1)),
    (2, (3, 3), 2, (1, 1, 1, 1))])
@pytest.mark.parametrize("h, w", [(7, 9), (8, 12)])
def test_conv2d_sdot_near_steps(xbuild, c, k, stride, padding, h, w):
    """rpi5: tiles whose four pixels lie in one output row within 64 bytes (16 channels at stride 1;
    3x3 over 1-4 channels widened to 4 at stride 1 or 2) load each step's bytes in one LD1 at the
    first pixel (EK_SDOT_D4/D2/D1_STEP); the tiles crossing a row, the last tiles (whose wider load
    would pass what may be read) and the last pixels take the other paths. Widths with and without a
    crossing tile, padded and in place, two 16-channel blocks."""
    rng = np.random.default_rng(c * 100 + h * 10 + stride)
    out, padding = conv_out_nonempty(h, w, k, (stride, stride), padding)
    g = float_graph("conv2d", [(1, h, w, c)], dict(stride=(stride, stride), dilation=(1, 1), padding=padding,
                    activation="relu"), {"w": rng.normal(0, 1, (32, *k, c)), "b": rng.normal(0, 1, 32)}, (1, *out, 32))
    q = quantize_with_random_data(g, rng, {"x0": (-2.0, 3.0)})
    run_layer_on_pi(q, rng.integers(-128, 128, size=(6, h, w, c)).astype(np.int8), xbuild, "rpi5")


@pytest.mark.parametrize("w, stride", [(18, 1), (33, 2), (16, 1)])
@pytest.mark.parametrize("board_name", ["rpi4", "rpi5"])
def test_conv2d_padded_copy_widens_rgb_rows(xbuild, w, stride, board_name):
    """The padded copy (ek_conv_pad_copy) of a 3-channel input: on rpi5 widened to 4 channels, 16 pixels a
    step through VLD3 / VST4 and the rest one pixel at a time (rows of 16 and more input columns reach the
    16-pixel loop); on rpi4 copied as it is. Padded, so every row has its zero-point borders."""
    rng = np.random.default_rng(w * 10 + stride)
    out, padding = conv_out_nonempty(5, w, (3, 3), (stride, stride), (1, 1, 1, 1))
    g = float_graph("conv2d", [(1, 5, w, 3)], dict(stride=(stride, stride), dilation=(1, 1), padding=padding,
                    activation="relu"), {"w": rng.normal(0, 1, (16, 3, 3, 3)), "b": rng.normal(0, 1, 16)}, (1, *out, 16))
    q = quantize_with_random_data(g, rng, {"x0": (-2.0, 3.0)})
    run_layer_on_pi(q, rng.integers(-128, 128, size=(4, 5, w, 3)).astype(np.int8), xbuild, board_name)


@pytest.mark.parametrize("act_min, act_max", [(-128, 127), (-128, 30), (-40, 127), (-40, 30)])
@pytest.mark.parametrize("c, k", [(16, (3, 3)), (3, (3, 3)), (32, (1, 1))])
def test_conv2d_sdot_tile_clamp(xbuild, c, k, act_min, act_max):
    """rpi5: the assembly tile clamps the int8 outputs to the activation range, and skips the clamp
    only when that range is all of int8 (the saturating narrow has clamped then). Quantizing rarely
    gives a narrower range (relu6's output scale maps 6 to 127), so the range is set here, inside
    the outputs' own so that each narrowed bound clamps some of them."""
    from edgekit import reference
    rng = np.random.default_rng(c * 1000 + act_max)
    kh, kw = k
    out, padding = conv_out_nonempty(9, 10, k, (1, 1), (kh // 2, kw // 2, kh // 2, kw // 2))
    g = float_graph("conv2d", [(1, 9, 10, c)], dict(stride=(1, 1), dilation=(1, 1), padding=padding, activation="none"),
                    {"w": rng.normal(0, 1, (32, kh, kw, c)), "b": rng.normal(0, 1, 32)}, (1, *out, 32))
    q = quantize_with_random_data(g, rng, {"x0": (-2.0, 3.0)})
    x = rng.integers(-128, 128, size=(6, 9, 10, c)).astype(np.int8)
    q.ops[0].attrs["act_min"], q.ops[0].attrs["act_max"] = -128, 127
    unclamped = reference.run(q, x)[0]
    assert (unclamped < act_min).any() == (act_min > -128) and (unclamped > act_max).any() == (act_max < 127)
    q.ops[0].attrs["act_min"], q.ops[0].attrs["act_max"] = act_min, act_max
    run_layer_on_pi(q, x, xbuild, "rpi5")


@pytest.mark.parametrize("h, c, o", [(64, 16, 17), (74, 12, 17), (64, 16, 8)])
def test_conv2d_sdot_padded_span_too_large(xbuild, h, c, o):
    """rpi5: a layer whose padded input span is over kernel_prep.SDOT_PAD_COPY_MAX ((h + 2)^2 x in_c) gets
    no padded copy planned and reads its windows through the run-pointer table (the padding taps at the
    zero-point row) and, inside the input, at fixed offsets; bit-exact too (o 8: the narrow tile, P = 4)."""
    from edgekit.codegen.kernel_prep import SDOT_PAD_COPY_MAX
    assert (h + 2) * (h + 2) * c > SDOT_PAD_COPY_MAX
    rng = np.random.default_rng(c)
    weights = {"w": rng.normal(0, 1, (o, 3, 3, c)), "b": rng.normal(0, 1, o)}
    attrs = dict(stride=(1, 1), dilation=(1, 1), padding=(1, 1, 1, 1), activation="relu")
    g = float_graph("conv2d", [(1, h, h, c)], attrs, weights, (1, h, h, o))
    check_on_pi(g, rng, xbuild, "rpi5", {"x0": (-2.0, 3.0)})


@given(st.integers(1, 7), st.integers(1, 14), st.sampled_from([1, 2, 3, 5, 6, 7, 13]), st.sampled_from([1, 8, 16, 17, 40]),
       st.sampled_from([(3, 3), (1, 3), (2, 5), (5, 1)]), st.tuples(*(st.integers(0, 2) for _ in range(4))),
       st.integers(1, 2), st.integers(1, 2), st.integers(1, 2), activations, st.integers(0, 2 ** 31))
@PI_SETTINGS
def test_conv2d_sdot_gathered_rows(xbuild, h, w, c, o, k, padding, stride, dil_h, dil_w, act, seed):
    """rpi5, in_c not a multiple of 4 (first layers over 1-3 channels). in_c 3, 6, 7, 13 widened to a
    multiple of 4 (kernel_prep.sdot_widened_c): the filter packed with zero weights in the added
    channels, the input read from its padded copy with as many channels (3 -> 4 by 16 pixels at a
    time, the others per pixel), as window rows (dilation_w 1) or taps. in_c 1, 2, 5: windows
    gathered, four pixels of one output row inside the input by kh row copies (wide rows), the others
    (padding on every side, groups crossing an output row, dilation across the row) by the generic
    window function; one 16-channel block set up once (o <= 16) or per group."""
    rng = np.random.default_rng(seed)
    kh, kw = k
    dilation = (dil_h, dil_w)
    out, padding = conv_out_nonempty(h, w, k, (stride, stride), padding, dilation)
    weights = {"w": rng.normal(0, 1, (o, kh, kw, c)), "b": rng.normal(0, 1, o)}
    attrs = dict(stride=(stride, stride), dilation=dilation, padding=padding, activation=act)
    g = float_graph("conv2d", [(1, h, w, c)], attrs, weights, (1, *out, o))
    check_on_pi(g, rng, xbuild, "rpi5", {"x0": (-2.0, 3.0)})


@given(st.integers(1, 12), st.integers(1, 12), st.sampled_from([1, 2, 3, 4, 5, 8, 12, 16, 20, 32, 40]), st.integers(1, 8),
       st.sampled_from([(1, 1), (3, 3), (1, 3), (2, 5), (5, 1)]), st.tuples(*(st.integers(0, 2) for _ in range(4))),
       st.integers(1, 2), st.integers(1, 2), activations, st.integers(0, 2 ** 31))
@PI_SETTINGS
def test_conv2d_sdot_narrow(xbuild, h, w, c, o, k, padding, stride, dilation, act, seed):
    """rpi5, out_c 1..8: the narrow tile (8 pixels x 8 channels, the filter in one 8-channel block,
    kernel_prep.sdot_narrow) on every window path: runs from the padded copy or in place (in_c 4, 8,
    12, 20, 40: tails of 4 / 8 / 12 bytes), 16-byte steps (16, 32), widened in_c 3, the GEMM of 1x1
    layers, and gathered windows (in_c 1, 2, 5: four pixels, P = 4); pixel counts not a multiple of
    8 (the last pixel repeated), pixels of a group on two output rows, channels n < 8 stored alone."""
    rng = np.random.default_rng(seed)
    kh, kw = k
    if k == (1, 1) and rng.integers(2):
        stride, padding = 1, (0, 0, 0, 0)  # the pointwise GEMM
    out, padding = conv_out_nonempty(h, w, k, (stride, stride), padding, (dilation, dilation))
    weights = {"w": rng.normal(0, 1, (o, kh, kw, c)), "b": rng.normal(0, 1, o)}
    attrs = dict(stride=(stride, stride), dilation=(dilation, dilation), padding=padding, activation=act)
    g = float_graph("conv2d", [(1, h, w, c)], attrs, weights, (1, *out, o))
    check_on_pi(g, rng, xbuild, "rpi5", {"x0": (-2.0, 3.0)})


@given(st.integers(1, 9), st.integers(1, 7), st.sampled_from([1, 3, 8, 13, 16, 20, 33]),
       st.sampled_from([1, 5, 16, 17, 40]), activations, boards, st.integers(0, 2 ** 31))
@PI_SETTINGS
def test_conv2d_pointwise_gemm(xbuild, h, w, c, o, act, board, seed):
    """A 1x1 stride-1 unpadded convolution walks the pixels as a GEMM (each window is its input
    pixel, no window function): every pixel count (odd, not a multiple of 4), and in_c not a
    multiple of 16, where rpi5's last pixels' padded loads would leave the input and go through
    the gathered windows instead."""
    rng = np.random.default_rng(seed)
    weights = {"w": rng.normal(0, 1, (o, 1, 1, c)), "b": rng.normal(0, 1, o)}
    attrs = dict(stride=(1, 1), dilation=(1, 1), padding=(0, 0, 0, 0), activation=act)
    g = float_graph("conv2d", [(1, h, w, c)], attrs, weights, (1, h, w, o))
    check_on_pi(g, rng, xbuild, board, {"x0": (-2.0, 3.0)})


@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 6), st.integers(1, 6), st.sampled_from([8, 9, 15, 16, 17, 31, 40]),
       st.tuples(*(st.integers(0, 2) for _ in range(4))), st.integers(1, 2), st.integers(1, 2), activations, boards,
       st.integers(0, 2 ** 31))
@PI_SETTINGS
def test_depthwise_conv2d_neon_channel_groups(xbuild, kh, kw, h, w, c, padding, stride, dilation, act, board, seed):
    """The 16- and 8-channel groups with the last group ending at out_c, padding on every side
    (taps reading the zero-point row), strides and dilation."""
    rng = np.random.default_rng(seed)
    out, padding = conv_out_nonempty(h, w, (kh, kw), (stride, stride), padding, (dilation, dilation))
    weights = {"w": rng.normal(0, 1, (1, kh, kw, c)), "b": rng.normal(0, 1, c)}
    attrs = dict(stride=(stride, stride), dilation=(dilation, dilation), padding=padding, activation=act,
                 depth_multiplier=1)
    g = float_graph("depthwise_conv2d", [(1, h, w, c)], attrs, weights, (1, *out, c))
    check_on_pi(g, rng, xbuild, board, {"x0": (-1.0, 4.0)})


@given(st.integers(1, 9), st.integers(1, 9), st.sampled_from([16, 17, 24, 31, 33, 64]),
       st.tuples(*(st.integers(0, 2) for _ in range(4))), st.integers(1, 2), st.integers(1, 2), activations, boards,
       st.integers(0, 2 ** 31))
@PI_SETTINGS
def test_depthwise_conv2d_neon_3x3(xbuild, h, w, c, padding, stride, dilation, act, board, seed):
    """The 3x3 path (16-channel groups over all pixels, weights kept in registers): interior pixels
    at fixed tap offsets and border pixels reading the zero-point row on every side, strides,
    dilation, a last group overlapping the previous one (c not a multiple of 16)."""
    rng = np.random.default_rng(seed)
    out, padding = conv_out_nonempty(h, w, (3, 3), (stride, stride), padding, (dilation, dilation))
    weights = {"w": rng.normal(0, 1, (1, 3, 3, c)), "b": rng.normal(0, 1, c)}
    attrs = dict(stride=(stride, stride), dilation=(dilation, dilation), padding=padding, activation=act,
                 depth_multiplier=1)
    g = float_graph("depthwise_conv2d", [(1, h, w, c)], attrs, weights, (1, *out, c))
    check_on_pi(g, rng, xbuild, board, {"x0": (-1.0, 4.0)})


@given(conv_case(depthwise=True), boards, st.integers(1, 4))
@PI_SETTINGS
def test_depthwise_conv2d_neon(xbuild, case, board, widen):
    rng = np.random.default_rng(case["seed"])
    kh, kw = case["k"]
    c, mult = case["c"] * widen * 3, case["mult"]
    weights = {"w": rng.normal(0, case["wscale"], (1, kh, kw, c * mult)), "b": rng.normal(0, 1, c * mult)}
    attrs = dict(stride=case["stride"], dilation=case["dilation"], padding=case["padding"], activation=case["act"],
                 depth_multiplier=mult)
    g = float_graph("depthwise_conv2d", [(1, case["h"], case["w"], c)], attrs, weights, (1, *case["out"], c * mult))
    check_on_pi(g, rng, xbuild, board, {"x0": case["rng"]}, case["observer"])


@given(st.integers(1, 300), st.integers(1, 24), activations, st.floats(0.01, 2.0), input_range(), observers,
       boards, st.integers(0, 2 ** 31))
@PI_SETTINGS
def test_fully_connected_neon(xbuild, n_in, n_out, act, wscale, in_range, observer, board, seed):
    rng = np.random.default_rng(seed)
    weights = {"w": rng.normal(0, wscale, (n_out, n_in)), "b": rng.normal(0, wscale, n_out)}
    g = float_graph("fully_connected", [(1, n_in)], dict(activation=act), weights, (1, n_out))
    check_on_pi(g, rng, xbuild, board, {"x0": in_range}, observer)


@pytest.mark.parametrize("board", ["rpi4", "rpi5"])
def test_fully_connected_neon_shift_forms(xbuild, board):
    """The packed fully connected kernels' output stage per 16-row block (ek_fc_output16) in its three
    forms: 40 rows give blocks at rows 0, 16 and 24 (the last overlapping); rows 0-15 all shift right by
    1 or more, rows 16-31 have a zero shift among right shifts, rows 32-39 one left shift."""
    from edgekit import reference
    rng = np.random.default_rng(7)
    g = float_graph("fully_connected", [(1, 37)], dict(activation="none"),
                    {"w": rng.normal(0, 1, (40, 37)), "b": rng.normal(0, 1, 40)}, (1, 40))
    q = quantize_with_random_data(g, rng, {"x0": (-2.0, 3.0)})
    a = q.ops[0].attrs
    new = np.maximum(rng.integers(-9, 0, 40), a["shift"])
    new[20], new[35] = 0, 2
    # the same scale in another form: multiplier x 2^shift kept (the multiplier loses low bits)
    a["multiplier"][:] = a["multiplier"] >> (new - a["shift"])
    a["shift"][:] = new
    x = rng.integers(-128, 128, size=(10, 37)).astype(np.int8)
    b = load_board(board)
    with tempfile.TemporaryDirectory() as tmp:
        record = generate_project(q, tmp, b)
        assert record["layers"][0]["kernel"] == ("ek_fully_connected_s8_pairs" if board == "rpi4"
                                                 else "ek_fully_connected_s8")
        got = run_qemu(xbuild.build(Path(tmp), b), b["qemu"]["cpu"], x, 40)
    ref = reference.run(q, x)[0].reshape(got.shape)
    assert int(np.sum(got != ref)) == 0, f"{int(np.sum(got != ref))} of {got.size} differ on {board}"
    assert len(np.unique(ref[:, 16:])) > 20  # the rows with zero and left shifts not all clamped


@st.composite
def binary_case(draw):
    """ADD / SUB / MUL: runs of 16 and their tails (c or h * w * c not a multiple of 16), and the
    other operand broadcasting over any subset of height, width and channels, first or second,
    a variable or a constant."""
    shape = (1, draw(st.integers(1, 5)), draw(st.integers(1, 6)), draw(st.sampled_from([1, 3, 15, 16, 17, 33, 40])))
    other = tuple(1 if i > 0 and draw(st.booleans()) else d for i, d in enumerate(shape))
    return dict(kind=draw(st.sampled_from(["add", "sub", "mul"])), shape=shape, other=other, swap=draw(st.booleans()),
                const=draw(st.booleans()), act=draw(activations), r1=draw(input_range()), r2=draw(input_range()),
                seed=draw(st.integers(0, 2 ** 31)))


@given(binary_case(), boards)
@PI_SETTINGS
def test_binary_elementwise_neon(xbuild, case, board):
    rng = np.random.default_rng(case["seed"])
    attrs = dict(activation=case["act"])
    if case["const"]:
        k = rng.uniform(case["r2"][0], case["r2"][1], case["other"])
        g = float_graph(case["kind"], [case["shape"]], attrs, {"k": k}, case["shape"])
        if case["swap"]:
            g.ops[0].inputs.reverse()
    else:
        shapes = [case["other"], case["shape"]] if case["swap"] else [case["shape"], case["other"]]
        g = float_graph(case["kind"], shapes, attrs, None, case["shape"])
    check_on_pi(g, rng, xbuild, board, {"x0": case["r1"], "x1": case["r2"]})


REQUANT_MAIN = r"""
#include <stdio.h>
#include "ek_neon.h"
#include "ek_quant.h"
int32_t ek_kernel_scratch[2];
const int32_t ek_kernel_scratch_bytes = 8;
/* stdin: records of 4 x (acc, multiplier, shift) int32 + (offset, act_min, act_max);
 * stdout: 4 x (scalar, vector) int32 per record. */
int main(void)
{
    int32_t r[15];
    while (fread(r, sizeof r, 1, stdin) == 1) {
        int32_t acc[4], mult[4], shift[4], got[4], got_right[4] = {0, 0, 0, 0};
        for (int i = 0; i < 4; ++i) {
            acc[i] = r[3 * i];
            mult[i] = r[3 * i + 1];
            shift[i] = r[3 * i + 2];
        }
        const ek_neon_quant q = ek_neon_quant4(mult, shift);
        vst1q_s32(got, ek_neon_requantize4(vld1q_s32(acc), q, vdupq_n_s32(r[12]), vdupq_n_s32(r[13]),
                                           vdupq_n_s32(r[14]), 0));
        /* the variant without the left shift, where it applies (no lane shifts left) */
        const int right = ek_neon_shifts_right(shift, 4);
        if (right) {
            vst1q_s32(got_right, ek_neon_requantize4(vld1q_s32(acc), q, vdupq_n_s32(r[12]), vdupq_n_s32(r[13]),
                                                     vdupq_n_s32(r[14]), 1));
        }
        for (int i = 0; i < 4; ++i) {
            const int32_t want = ek_clamp(ek_requantize_acc(acc[i], mult[i], shift[i]) + r[12], r[13], r[14]);
            const int32_t triple[3] = {want, got[i], right ? got_right[i] : want};
            fwrite(triple, sizeof triple, 1, stdout);
        }
    }
    return 0;
}
"""


@pytest.fixture(scope="module")
def requant_exes(tmp_path_factory):
    """A program comparing ek_neon_requantize4 with the scalar ek_requantize_acc, per board."""
    q = tiny_quantized_fc()
    exes = {}
    for name in ("rpi4", "rpi5"):
        board = load_board(name)
        d = tmp_path_factory.mktemp(f"requant_{name}")
        generate_project(q, d, board, threads=1)  # a plain (not thread-local) scratch below
        (d / "requant.c").write_text(REQUANT_MAIN)
        subprocess.run([board["cc"], *board["cflags"], *CHECKS, "-I", str(d / "include"), str(d / "requant.c"),
                        "-o", str(d / "requant")], check=True, capture_output=True, text=True)
        exes[name] = (d / "requant", board["qemu"]["cpu"])
    return exes


@given(pool_case(), st.sampled_from([1, 7, 8, 16, 17, 24, 40]), boards)
@PI_SETTINGS
def test_max_pool2d_neon(xbuild, case, c, board):
    """vmaxq_s8 over 16 and 8 channels, the scalar tail, padding and fused clamps."""
    rng = np.random.default_rng(case["seed"])
    g = float_graph("max_pool2d", [(*case["shape"][:3], c)], case["attrs"], None, (*case["out"][:3], c))
    check_on_pi(g, rng, xbuild, board, {"x0": case["rng"]})


@given(st.integers(1, 6), st.integers(1, 9), st.sampled_from([1, 15, 16, 17, 40, 64]), input_range(), observers,
       boards, st.integers(0, 2 ** 31))
@PI_SETTINGS
def test_mean_neon(xbuild, h, w, c, in_range, observer, board, seed):
    """16 channels summed per vector with the offset added once, then the scalar tail."""
    rng = np.random.default_rng(seed)
    g = float_graph("mean", [(1, h, w, c)], {}, None, (1, 1, 1, c))
    check_on_pi(g, rng, xbuild, board, {"x0": in_range}, observer)


@st.composite
def requant_case(draw):
    """An accumulator, multiplier and shift the generator accepts (passes/verify.py):
    |acc << max(shift, 0)| <= 2^31 - 1 - 128, room for the output offset, multiplier in [0, 2^31)
    (the extremes included)."""
    shift = draw(st.one_of(st.sampled_from([-31, -30, -1, 0, 1, 30]), st.integers(-31, 30)))
    bound = (2 ** 31 - 1 - 128) >> max(shift, 0)
    acc = draw(st.one_of(st.sampled_from([0, 1, -1, bound, -bound, bound // 2, -(bound // 2) - 1]),
                         st.integers(-bound, bound)))
    mult = draw(st.one_of(st.sampled_from([0, 1, 2 ** 30, 2 ** 31 - 1, 2 ** 30 + 1]), st.integers(0, 2 ** 31 - 1)))
    return acc, mult, shift


@given(st.lists(st.tuples(requant_case(), requant_case(), requant_case(), requant_case(),
                          st.integers(-128, 127), st.integers(-128, 127), st.integers(-128, 127)),
                min_size=1, max_size=64), boards)
@settings(SETTINGS, max_examples=max(20, SETTINGS.max_examples))
def test_neon_requantize_equals_scalar(requant_exes, records, board):
    """The vector requantization (vqrdmulhq_s32, rounding shift with the negative fix-up) equals
    ek_requantize_acc lane by lane, over extreme multipliers, shifts and accumulators; so does its
    variant without the left shift on every record whose four shifts are all right shifts."""
    exe, cpu = requant_exes[board]
    data = np.array([[v for lane in r[:4] for v in lane] + [r[4], min(r[5], r[6]), max(r[5], r[6])]
                     for r in records], np.int32)
    proc = subprocess.run(QEMU + ["-cpu", cpu, str(exe)], input=data.tobytes(), capture_output=True, timeout=60)
    assert proc.returncode == 0 and b"runtime error" not in proc.stderr, proc.stderr[-3000:]
    got = np.frombuffer(proc.stdout, np.int32).reshape(-1, 3)  # scalar, vector, vector without the left shift
    assert len(got) == 4 * len(records)
    assert np.array_equal(got[:, 0], got[:, 1]), got[got[:, 0] != got[:, 1]][:5]
    assert np.array_equal(got[:, 0], got[:, 2]), got[got[:, 0] != got[:, 2]][:5]


@pytest.fixture(scope="module")
def kws_projects(tmp_path_factory):
    """The DS-CNN keyword spotter generated and built for both Pis."""
    import torch
    from edgekit import models
    torch.manual_seed(0)
    x = np.random.default_rng(0).normal(0, 1, (40, 1, 49, 10)).astype(np.float32)
    q = edgekit.quantize(models.ds_cnn_kws().eval(), x[:32])
    out = {}
    for board in ("rpi4", "rpi5"):
        d = tmp_path_factory.mktemp(board)
        edgekit.generate(q, d, board=board)
        edgekit.build(d)
        out[board] = d
    return q, x[32:], out


@pytest.mark.parametrize("board", ["rpi4", "rpi5"])
def test_whole_model_bit_exact_under_qemu(kws_projects, board):
    q, x, projects = kws_projects
    y = edgekit.run(projects[board], x)  # model_runner under qemu-aarch64 -cpu cortex-a72 / cortex-a76
    assert np.array_equal(y, edgekit.reference_run(q, x))
    conv = "ek_conv2d_s8" if board == "rpi5" else "ek_conv2d_s8_pairs"  # rpi4: no -128 weight in this model
    kernels = (projects[board] / "kernels" / f"{conv}.c").read_text()
    assert "arm_neon" in (projects[board] / "include" / "ek_neon.h").read_text()
    assert ("vdotq_laneq_s32(" if board == "rpi5" else "ld1r {v4.8h}") in kernels  # the SDOT / int16-pair tile


def test_rpi5_build_uses_sdot_and_needs_the_a76(kws_projects):
    """The Pi 5 build really executes SDOT: a Pi 4 core (cortex-a72) stops on an illegal instruction."""
    q, x, projects = kws_projects
    dump = subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(projects["rpi5"] / "model_runner")],
                          capture_output=True, text=True).stdout
    assert "sdot" in dump
    assert "sdot" not in subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(projects["rpi4"] / "model_runner")],
                                        capture_output=True, text=True).stdout
    data = Path(tempfile.mkdtemp()) / "in.bin"
    p = q.tensors[q.inputs[0]].quant
    from edgekit import quant_math as qm
    qm.quantize(edgekit.api.to_ir_inputs(q, x[:1]), p.scale[0], p.zero_point[0]).tofile(data)
    proc = subprocess.run(QEMU + ["-cpu", "cortex-a72", str(projects["rpi5"] / "model_runner"), str(data),
                                  str(data) + ".out"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and ("Illegal instruction" in proc.stderr or proc.returncode in (-4, 132))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_runner_over_tcp_with_profile(kws_projects):
    """`edgekit profile --port socket://...` against the Pi runner (here under qemu-aarch64)."""
    from edgekit.device.profile import format_report, profile
    q, x, projects = kws_projects
    port = _free_port()
    runner = subprocess.Popen(QEMU + ["-cpu", "cortex-a76", str(projects["rpi5"] / "edgekit_runner"), "--tcp",
                                      str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:  # wait until it listens
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and runner.poll() is None, "the runner did not start"
                time.sleep(0.1)
        report = profile(f"socket://127.0.0.1:{port}", x[:4], project_dir=projects["rpi5"], show_progress=False,
                         timeout=30)
    finally:
        runner.kill()
        runner.wait()
    assert report["bit_exact"], "outputs over the protocol differ from the reference"
    assert report["unit"] == "nanoseconds" and report["total"]["median"] > 0
    # the runner's 4 threads' CPU time (THREAD_COUNTS): the caller's whole inference, each worker's shares
    assert [t["thread"] for t in report["threads"]] == [0, 1, 2, 3], report.get("threads")
    assert all(t["min"] > 0 for t in report["threads"])
    assert "CPU time per thread" in format_report(report)
    assert len(report["layers"]) == sum(1 for l in load_project(projects["rpi5"])["layers"] if l["kernel"])
    assert "bit-exact with the reference: yes" in format_report(report)


def test_runner_over_stdio(kws_projects):
    """The same protocol over stdin/stdout: identify and an invoke, frames checked by CRC."""
    from edgekit.device import protocol as P
    q, x, projects = kws_projects
    import struct
    size = q.tensors[q.inputs[0]].size
    frames = (P.encode_frame(P.IDENTIFY, 1) + P.encode_frame(P.SET_INPUT, 2, struct.pack("<BI", 0, 0) + bytes(size)) +
              P.encode_frame(P.INVOKE, 3) + P.encode_frame(P.THREAD_COUNTS, 4))
    proc = subprocess.run(QEMU + ["-cpu", "cortex-a76", str(projects["rpi5"] / "edgekit_runner")], input=frames,
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    answers = [P.decode_frame(f) for f in proc.stdout.split(b"\x00") if f]
    assert [a[0] for a in answers] == [P.IDENTIFY | 0x80, P.SET_INPUT | 0x80, P.INVOKE | 0x80, P.THREAD_COUNTS | 0x80]
    threads = answers[3][2]
    assert threads[0] == 4 and len(threads) == 1 + 8 * 4  # CPU ns of the caller and the 3 workers
    assert all(ns > 0 for ns in struct.unpack("<4Q", threads[1:]))
    assert q.fingerprint().encode() in answers[0][2] and b"rpi5" in answers[0][2]
