"""In-place arena schedules (codegen/memory_plan.py): a layer writes its output over the input it
is the last reader of.

- The in-place offset of a convolution against a byte-level simulation of the kernels' contract
  (output pixels in raster order, two at a time, each group's windows read before and while its
  pixels are written): safe at the planned offset, clobbering one byte closer.
- Random chains (conv, depthwise, 1x1 conv, residual add, relu, dense) planned with every technique,
  generated, built and run: on the host under ASan/UBSan and on the emulated M4 / M7 (DSP kernels),
  0 differing elements against the numpy reference; the plan must really overlap some layer.
- What the schedules cannot handle (encoded weights; also weight-only and early-exit graphs) runs
  no layer in place.
"""
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import edgekit
from edgekit import reference
from edgekit.codegen.memory_plan import PIXEL_GROUP, TECHNIQUES, conv_inplace_delta, plan_memory, plan_with_report
from edgekit.errors import EdgekitError
from helpers import c_matches_reference, conv_out
from test_kernels_c import SETTINGS, conv_case

torch.set_num_threads(1)


def _window_pixels(case, oy, ox):
    (kh, kw), (sh, sw), (dh, dw) = case["k"], case["stride"], case["dilation"]
    for ky in range(kh):
        for kx in range(kw):
            iy, ix = oy * sh - case["padding"][0] + ky * dh, ox * sw - case["padding"][2] + kx * dw
            if 0 <= iy < case["h"] and 0 <= ix < case["w"]:
                yield iy * case["w"] + ix


def _simulate(case, delta: int) -> bool:
    """Run the kernel contract on tagged bytes, the output at `delta` bytes below the input: True when
    every read finds the input byte it expects."""
    c, o = case["c"], case["o"]
    oh, ow = case["out"]
    in_size = case["h"] * case["w"] * c
    base_in = max(0, delta)
    base_out = base_in - delta
    mem = {}
    for i in range(in_size):
        mem[base_in + i] = ("in", i)
    pixels = oh * ow

    def read_group(group) -> bool:
        for p in group:
            for q in _window_pixels(case, p // ow, p % ow):
                for ch in range(c):
                    if mem.get(base_in + q * c + ch) != ("in", q * c + ch):
                        return False
        return True

    for start in range(0, pixels, PIXEL_GROUP):
        group = range(start, min(start + PIXEL_GROUP, pixels))
        for p in group:
            if not read_group(group):
                return False
            for ch in range(o):
                mem[base_out + p * o + ch] = ("out", p)
        if not read_group(group):
            return False
    return True


@given(st.one_of(conv_case(), conv_case(depthwise=True)))
@settings(SETTINGS, max_examples=40)
def test_conv_inplace_offset_is_safe_and_tight(case):
    delta = conv_inplace_delta((1, case["h"], case["w"], case["c"]), (1, *case["out"], case["o"]), case["k"],
                               case["stride"], case["dilation"], case["padding"][0], case["padding"][2])
    in_size = case["h"] * case["w"] * case["c"]
    delta = max(delta, -in_size)  # further below: the output lies wholly above the input
    assert _simulate(case, delta)
    if delta > -in_size:
        assert not _simulate(case, delta - 1)


# --- random chains, run for real --------------------------------------------------------------------


@st.composite
def chain_case(draw):
    h, w = draw(st.integers(4, 9)), draw(st.integers(4, 9))  # big enough that overlapping pays
    return dict(h=h, w=w, c=draw(st.integers(1, 6)), m=draw(st.integers(4, 12)), n=draw(st.integers(1, 12)),
                k=draw(st.sampled_from([1, 3])), stride=draw(st.integers(1, 2)),
                dw_stride=draw(st.integers(1, 2)), dw_k=draw(st.sampled_from([3, 5])),
                residual=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 31)))


class Chain(nn.Module):
    """conv -> relu -> depthwise -> relu -> 1x1 conv (-> + the depthwise output) -> relu -> dense."""

    def __init__(self, case):
        super().__init__()
        m, n = case["m"], case["m"] if case["residual"] else case["n"]
        self.conv = nn.Conv2d(case["c"], m, case["k"], case["stride"], case["k"] // 2)
        self.dw = nn.Conv2d(m, m, case["dw_k"], case["dw_stride"], case["dw_k"] // 2, groups=m)
        self.pw = nn.Conv2d(m, n, 1)
        self.residual = case["residual"]
        oh, ow = conv_out(case["h"], case["w"], (case["k"],) * 2, (case["stride"],) * 2, (1, 1), (case["k"] // 2,) * 4)
        oh, ow = conv_out(oh, ow, (case["dw_k"],) * 2, (case["dw_stride"],) * 2, (1, 1), (case["dw_k"] // 2,) * 4)
        self.fc = nn.Linear(n * oh * ow, 5)

    def forward(self, x):
        y = torch.relu(self.dw(torch.relu(self.conv(x))))
        z = self.pw(y)
        z = torch.relu(z + y) if self.residual else torch.relu(z)
        return self.fc(torch.flatten(z, 1))


def _chain_graph(case):
    torch.manual_seed(case["seed"] % 10000)
    rng = np.random.default_rng(case["seed"])
    calib = rng.normal(size=(16, case["c"], case["h"], case["w"])).astype(np.float32)
    g = edgekit.quantize(Chain(case).eval(), calib)
    x = rng.integers(-128, 128, size=(4,) + g.tensors[g.inputs[0]].shape[1:]).astype(np.int8)
    return g, x


@given(chain_case())
@settings(SETTINGS, max_examples=12)
def test_inplace_chain_host_asan(cbuild, case):
    g, x = _chain_graph(case)
    with tempfile.TemporaryDirectory() as tmp:
        got, ref = c_matches_reference(g, Path(tmp), cbuild, {g.inputs[0]: x})
        record = edgekit.codegen.project.load_project(tmp)
    assert record["memory"]["in_place_layers"], "the plan overlapped no layer: the test would not test it"
    assert record["arena_bytes"] <= record["memory"]["greedy_arena_bytes"]
    assert int(np.sum(got != ref)) == 0


@pytest.mark.qemu
@pytest.mark.skipif(shutil.which("qemu-system-arm") is None or shutil.which("arm-none-eabi-gcc") is None,
                    reason="needs qemu-system-arm and arm-none-eabi-gcc (make setup)")
@given(chain_case(), st.sampled_from(["mps2-an386", "mps2-an386", "mps2-an500"]))
@settings(SETTINGS, max_examples=6)
def test_inplace_chain_cortex_m(case, board):
    from cortex_m_selftest import run_selftest

    g, x = _chain_graph(case)
    with tempfile.TemporaryDirectory() as tmp:
        got = run_selftest(g, board, x, Path(tmp))
        record = edgekit.codegen.project.load_project(Path(tmp) / "project")
    assert record["memory"]["in_place_layers"]
    ref = reference.run(g, x)[0].reshape(len(x), -1)
    assert int(np.sum(got != ref)) == 0


# --- the planner's invariants and fallbacks ---------------------------------------------------------


def _check_plan(plan):
    pairs = {(p.input, p.output): p.delta for p in plan.inplace}
    bufs = plan.buffers
    for i, a in enumerate(bufs):
        for j, b in enumerate(bufs):
            if j <= i or a.last < b.first or b.last < a.first:
                continue
            apart = a.offset + a.size <= b.offset or b.offset + b.size <= a.offset
            if (i, j) in pairs:
                assert apart or a.offset - b.offset >= pairs[(i, j)]
            elif (j, i) in pairs:
                assert apart or b.offset - a.offset >= pairs[(j, i)]
            else:
                assert apart
    assert plan.lower_bound() <= plan.arena_bytes


@given(chain_case())
@settings(SETTINGS, max_examples=15)
def test_plan_keeps_live_tensors_apart(case):
    g, _ = _chain_graph(case)
    for variant in ("dsp", "x86", None):
        for off in ((), ("offset-search",), TECHNIQUES):
            plan, report = plan_with_report(g, 8, kernel_variant=variant, off=off)
            _check_plan(plan)
            assert report["arena_bytes"] <= report["greedy_arena_bytes"] or off == TECHNIQUES
    assert plan_memory(g).arena_bytes == plan_with_report(g, 8, off="all")[0].arena_bytes


def test_mlperf_like_savings_reported(tmp_path):
    """A DS-CNN (depthwise-separable, the keyword spotter's shape): in place saves, each technique's
    saving is reported, and turning all off gives today's greedy plan."""
    from edgekit import models
    torch.manual_seed(0)
    x = np.random.default_rng(0).normal(size=(8, 1, 49, 10)).astype(np.float32)
    g = edgekit.quantize(models.ds_cnn_kws().eval(), x)
    on = edgekit.generate(g, tmp_path / "on", board="mps2-an386")
    off = edgekit.generate(g, tmp_path / "off", board="mps2-an386", memory_off="all")
    assert on["arena_bytes"] < off["arena_bytes"] == on["memory"]["greedy_arena_bytes"]
    assert on["memory"]["saved_bytes"]["inplace-depthwise"] > 0
    assert on["memory"]["lower_bound"] <= on["arena_bytes"]
    with pytest.raises(EdgekitError, match="unknown memory technique"):
        edgekit.generate(g, tmp_path / "bad", memory_off=["inplace-everything"])


def test_encoded_weights_keep_todays_plan(tmp_path):
    case = dict(h=6, w=6, c=3, m=8, n=8, k=3, stride=1, dw_stride=1, dw_k=3, residual=True, seed=3)
    g, _ = _chain_graph(case)
    dense = edgekit.generate(g, tmp_path / "dense", board="mps2-an386")
    huff = edgekit.generate(g, tmp_path / "huff", board="mps2-an386", weights="huffman")
    weighted = {i for i, op in enumerate(g.ops) if op.kind in ("conv2d", "depthwise_conv2d", "fully_connected")}
    assert set(dense["memory"]["in_place_layers"]) & weighted
    assert not set(huff["memory"]["in_place_layers"]) & weighted
