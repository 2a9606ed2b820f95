"""Raspberry Pi boards with threads (`generate(..., threads=N)`): each large layer's output shared by
a persistent pthread pool (linux_aarch64/ek_pool.c). Every share is checked bit for bit against the
reference under qemu-aarch64 on both CPUs (every guest thread is a host thread there), over layer
shapes where some threads get nothing; a whole model gives identical outputs with 1 and 4 threads;
the workers start once, are joined by ek_model_shutdown() and start again; and the pool, built for
this machine with the portable kernels, runs clean under ThreadSanitizer."""
import shutil
import subprocess

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import edgekit
from edgekit.boards import Board, load_board
from edgekit.codegen import project as project_mod
from edgekit.codegen.project import load_project
from edgekit.errors import EdgekitError
from helpers import conv_out, float_graph
from test_kernels_c import activations
from test_rpi import CHECKS, PI_SETTINGS, QEMU, CrossBuild, check_on_pi

pytestmark = pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None or shutil.which("qemu-aarch64") is None,
                                reason="needs aarch64-linux-gnu-gcc and qemu-aarch64 (scripts/setup.sh)")


@pytest.fixture(scope="module")
def xbuild_mt(tmp_path_factory):
    return CrossBuild(tmp_path_factory.mktemp("aarch64_objects_mt"))


@pytest.fixture(scope="module")
def split_everything():
    """Share every layer that can be shared, however small (the defaults skip layers too small to
    repay waking the pool), so that small test layers exercise the shares."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(project_mod, "SPLIT_MIN_MACS", 0)
        mp.setattr(project_mod, "SPLIT_MIN_ELEMENTS", 0)
        yield


@st.composite
def shared_layer(draw):
    """A layer the pool shares: a convolution or depthwise layer by output rows (1 to 9 of them, so
    that some threads get none; strides, padding on every side, dilation), a convolution with 32 to
    67 output channels by blocks of 16 when there are fewer rows than that shares well, a fully
    connected layer by groups of 4 neurons (1 to 40), or ADD / MUL by runs of 16 or, broadcasting, by rows."""
    kind = draw(st.sampled_from(["conv2d", "conv2d", "depthwise_conv2d", "depthwise_conv2d", "fully_connected", "add",
                                 "mul"]))
    seed = draw(st.integers(0, 2 ** 31))
    if kind == "fully_connected":
        return dict(kind=kind, n_in=draw(st.integers(1, 70)), n_out=draw(st.integers(1, 40)), seed=seed,
                    act=draw(activations))
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 6))
    c = draw(st.sampled_from([1, 3, 8, 16, 17]))
    if kind in ("add", "mul"):
        other = tuple(1 if i > 0 and draw(st.booleans()) else d for i, d in enumerate((1, h, w, c)))
        return dict(kind=kind, shape=(1, h, w, c), other=other, seed=seed, act=draw(activations))
    k = draw(st.sampled_from([(1, 1), (3, 3), (3, 1), (5, 3)]))
    o = draw(st.one_of(st.integers(1, 12), st.sampled_from([32, 35, 48, 64, 67])))
    return dict(kind=kind, h=h, w=w, c=c, k=k, o=o, stride=draw(st.integers(1, 2)),
                dilation=draw(st.integers(1, 2)), padding=draw(st.tuples(*(st.integers(0, 3) for _ in range(4)))),
                seed=seed, act=draw(activations))


def layer_graph(case, rng):
    kind, act = case["kind"], case["act"]
    if kind == "fully_connected":
        weights = {"w": rng.normal(0, 1, (case["n_out"], case["n_in"])), "b": rng.normal(0, 1, case["n_out"])}
        return float_graph(kind, [(1, case["n_in"])], dict(activation=act), weights, (1, case["n_out"]))
    if kind in ("add", "mul"):
        return float_graph(kind, [case["shape"], case["other"]], dict(activation=act), None, case["shape"])
    (kh, kw), s, d, pad = case["k"], case["stride"], case["dilation"], case["padding"]
    out = conv_out(case["h"], case["w"], (kh, kw), (s, s), (d, d), pad)
    if out[0] < 1 or out[1] < 1:
        pad = (pad[0] + kh * d, pad[1], pad[2] + kw * d, pad[3])
        out = conv_out(case["h"], case["w"], (kh, kw), (s, s), (d, d), pad)
    c = case["c"]
    o = c if kind == "depthwise_conv2d" else case["o"]
    weights = {"w": rng.normal(0, 1, (1, kh, kw, c) if kind == "depthwise_conv2d" else (o, kh, kw, c)),
               "b": rng.normal(0, 1, o)}
    attrs = dict(stride=(s, s), dilation=(d, d), padding=pad, activation=act,
                 **({"depth_multiplier": 1} if kind == "depthwise_conv2d" else {}))
    return float_graph(kind, [(1, case["h"], case["w"], c)], attrs, weights, (1, *out, o))


def channel_blocks_share_better(rows: int, blocks: int, threads: int) -> bool:
    """A convolution has more 16-channel blocks than rows, and they give the busiest thread less."""
    def longest(units):  # the most units one thread gets, as a fraction
        return max(units * (p + 1) // threads - units * p // threads for p in range(threads)) / units
    return blocks >= 2 and blocks > rows and longest(blocks) < (longest(rows) if rows >= 2 else 1.0)


@given(shared_layer(), st.sampled_from(["rpi4", "rpi5"]), st.integers(2, 4))
@PI_SETTINGS
def test_shared_layer_bit_exact(xbuild_mt, split_everything, case, board, threads):
    rng = np.random.default_rng(case["seed"])
    g = layer_graph(case, rng)
    out = g.tensors[g.outputs[0]].shape
    record = check_on_pi(g, rng, xbuild_mt, board, {"x0": (-1.0, 3.0), "x1": (-2.0, 2.0)}, threads=threads)
    assert record["threads"] == threads
    layer = [l for l in record["layers"] if l["kernel"]][0]
    want = {"conv2d": "rows", "depthwise_conv2d": "rows", "fully_connected": "channels"}.get(case["kind"])
    if case["kind"] in ("add", "mul"):
        want = "flat" if case["other"] == case["shape"] else "rows"
    if case["kind"] == "conv2d" and channel_blocks_share_better(out[1], out[3] // 16, threads):
        want = "channels"
    elif (want == "rows" and out[1] < 2) or (want == "channels" and case["n_out"] < 8):
        want = None  # one row (or fewer than 8 neurons): nothing to share
    assert layer.get("split") == want, (layer, want)


@pytest.mark.parametrize("board", ["rpi4", "rpi5"])
@pytest.mark.parametrize("k, o", [((1, 1), 64), ((3, 3), 67)])
def test_conv_channel_shares_bit_exact(xbuild_mt, split_everything, board, k, o):
    """A convolution with 3 output rows on 4 threads shares its output channels: 64 channels as 4
    blocks of 16; 67 as 16 + 16 + 16 + 19 (the share ending at the last whole block takes the 3 past it, which
    the SDOT kernel reads from the packed filter's last, overlapping tile). Every share writes a slice
    of each pixel; the outputs equal the reference."""
    rng = np.random.default_rng(o)
    pad = (1, 1, 1, 1) if k == (3, 3) else (0, 0, 0, 0)
    case = dict(kind="conv2d", h=5, w=4, c=17, k=k, o=o, stride=2, dilation=1, padding=pad, seed=0, act="relu")
    g = layer_graph(case, rng)
    assert g.tensors[g.outputs[0]].shape[1] == 3
    record = check_on_pi(g, rng, xbuild_mt, board, {"x0": (-1.0, 3.0)}, threads=4)
    assert [l.get("split") for l in record["layers"] if l["kernel"]] == ["channels"]


def _quantized_res_cnn():
    import torch
    from edgekit import models
    torch.manual_seed(0)
    x = np.random.default_rng(0).uniform(0, 1, (24, 1, 8, 8)).astype(np.float32)
    return edgekit.quantize(models.DigitsResCNN().eval(), x[:16]), x[16:]


@pytest.fixture(scope="module")
def res_cnn_projects(tmp_path_factory, split_everything):
    """The residual CNN (convolutions, depthwise with a multiplier, add, concat, pools, FC) for rpi5 with
    1 and 4 threads, every layer that can be shared shared."""
    q, x = _quantized_res_cnn()
    out = {}
    for threads in (1, 4):
        d = tmp_path_factory.mktemp(f"res_cnn_{threads}")
        edgekit.generate(q, d, board="rpi5", threads=threads)
        edgekit.build(d)
        out[threads] = d
    return q, x, out


def test_whole_model_same_outputs_with_four_threads(res_cnn_projects):
    q, x, projects = res_cnn_projects
    shared = {l["kind"] for l in load_project(projects[4])["layers"] if l.get("split")}
    assert {"conv2d", "depthwise_conv2d", "add", "fully_connected"} <= shared, shared
    assert not any(l.get("split") for l in load_project(projects[1])["layers"])
    one, four = edgekit.run(projects[1], x), edgekit.run(projects[4], x)
    assert np.array_equal(one, four)
    assert np.array_equal(four, edgekit.reference_run(q, x))


SHUTDOWN_MAIN = r"""
#define _POSIX_C_SOURCE 200809L
#include <dirent.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include "model.h"
/* Threads of this process now (each guest thread is a host thread under qemu-aarch64). */
static int threads_now(void)
{
    DIR *d = opendir("/proc/self/task");
    int n = 0;
    for (struct dirent *e; d && (e = readdir(d)) != NULL;) {
        n += e->d_name[0] != '.';
    }
    if (d) {
        closedir(d);
    }
    return n;
}
/* The thread count once it reaches want, or after ~2 s: under qemu-aarch64 a joined guest thread's host
 * thread ends a moment after the join returns (qemu wakes the joiner, then tears the thread down), so
 * /proc/self/task may still list it right after ek_model_shutdown(). A worker that was not joined stays. */
static int threads_settled(int want)
{
    for (int i = 0; i < 2000 && threads_now() != want; ++i) {
        const struct timespec ms = {0, 1000000};
        nanosleep(&ms, NULL);
    }
    return threads_now();
}
static void fill(void)
{
    for (int32_t k = 0; k < ek_model_input_size(0); ++k) {
        ek_model_input(0)[k] = (ek_model_elem)(int8_t)(k * 37 + 11);
    }
}
int main(void)
{
    const int before = threads_now();
    int8_t first[4096];
    const int32_t n = ek_model_output_size(0);
    fill();
    ek_model_invoke();
    memcpy(first, ek_model_output(0), (size_t)n);
    const int running = threads_now();
    fill();
    ek_model_invoke(); /* the same workers again */
    const int again = threads_now();
    const int same1 = memcmp(first, ek_model_output(0), (size_t)n) == 0;
    ek_model_shutdown();
    const int after = threads_settled(before);
    fill();
    ek_model_invoke(); /* started again */
    const int restarted = threads_now();
    const int same2 = memcmp(first, ek_model_output(0), (size_t)n) == 0;
    printf("%d %d %d %d %d %d %d\n", before, running, again, after, restarted, same1, same2);
    return 0; /* exit joins the restarted workers */
}
"""


@pytest.mark.parametrize("board", ["rpi4", "rpi5"])
def test_pool_starts_once_shuts_down_and_restarts(res_cnn_projects, board, tmp_path):
    """Three workers appear with the first inference and stay for the next (no thread per inference);
    ek_model_shutdown() joins them; the next inference starts them again; outputs stay the same."""
    q, _, _ = res_cnn_projects
    b = load_board(board)
    edgekit.generate(q, tmp_path, board=board, threads=4)
    (tmp_path / "shutdown_main.c").write_text(SHUTDOWN_MAIN)
    record = load_project(tmp_path)
    sources = ["shutdown_main.c", "model.c", "model_weights.c", "ek_pool.c", "ek_port.c", "ek_protocol.c"] + [f"kernels/{k}.c" for k in record["kernels"]]
    exe = tmp_path / "shutdown"
    proc = subprocess.run([b["cc"], *b["cflags"], *CHECKS[:5], "-Iinclude", "-I.", *sources,
                           "-o", str(exe), "-lm", "-pthread"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run(QEMU + ["-cpu", b["qemu"]["cpu"], str(exe)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    before, running, again, after, restarted, same1, same2 = map(int, proc.stdout.split())
    assert running == before + 3 and again == running, proc.stdout
    assert after == before and restarted == before + 3, proc.stdout
    assert same1 == 1 and same2 == 1


def test_pool_clean_under_thread_sanitizer(res_cnn_projects, tmp_path):
    """The same project with the portable kernels, built for this machine with -fsanitize=thread: no
    data race between the shares, the pool's hand-overs and the thread-local kernel scratch."""
    if subprocess.run(["gcc", "-fsanitize=thread", "-x", "c", "-", "-o", str(tmp_path / "t")], input="int main(void){return 0;}",
                      capture_output=True, text=True).returncode != 0:
        pytest.skip("this gcc has no ThreadSanitizer")
    q, x, _ = res_cnn_projects
    rpi4 = load_board("rpi4")
    portable = Board("rpi4-portable", "rpi4 with the portable kernels", rpi4.kind, rpi4.templates,
                     {**rpi4.data, "name": "rpi4-portable", "kernel_variant": None, "cc": "gcc", "cflags": ["-O1"]},
                     None)
    edgekit.generate(q, tmp_path / "p", board=portable, threads=4)
    p = tmp_path / "p"
    (p / "shutdown_main.c").write_text(SHUTDOWN_MAIN)
    record = load_project(p)
    sources = ["shutdown_main.c", "model.c", "model_weights.c", "ek_pool.c", "ek_port.c", "ek_protocol.c"] + [f"kernels/{k}.c" for k in record["kernels"]]
    proc = subprocess.run(["gcc", "-O1", "-g", "-fsanitize=thread", *CHECKS[:5], "-Iinclude", "-I.",
                           *sources, "-o", "tsan", "-lm", "-pthread"], cwd=p, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([str(p / "tsan")], capture_output=True, text=True, timeout=120,
                          env={"TSAN_OPTIONS": "halt_on_error=1 exitcode=66"})
    assert proc.returncode == 0 and "WARNING: ThreadSanitizer" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stdout.split()[5:] == ["1", "1"]


def test_threads_refused_where_there_is_no_pool(tmp_path):
    q, _ = _quantized_res_cnn()
    with pytest.raises(EdgekitError, match="runs one thread"):
        edgekit.generate(q, tmp_path / "h", board="host", threads=4)
    with pytest.raises(EdgekitError, match="whole number from 1 to 64"):
        edgekit.generate(q, tmp_path / "z", board="rpi4", threads=0)
    with pytest.raises(EdgekitError, match="caller's thread"):
        edgekit.generate(q, tmp_path / "lib", board="rpi4", threads=2, library=True)
    assert edgekit.generate(q, tmp_path / "d", board="rpi4")["threads"] == 4  # the board's cores
    assert edgekit.generate(q, tmp_path / "m", board="mps2-an386")["threads"] == 1
