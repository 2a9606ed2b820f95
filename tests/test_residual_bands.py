"""Residual blocks in row bands (codegen/memory_plan.py ``residual_blocks``, model.c's band loop): conv ->
conv -> add with the block's input, the first convolution's output kept only as the rows the second
one's windows read, the second's as one band, the add written over the block input.

- Random blocks (kernel heights and widths 1-5, depthwise or dense, channels, heights 1-10, operand
  order of the add) generated with the technique on and off, built and run: on the host under
  ASan/UBSan and on the emulated M4 / M7 (DSP kernels), 0 differing elements against the numpy
  reference. A block the schedule cannot take (the second window reaching fewer rows below its centre
  than the first's padding above, a dilated convolution, the block input read elsewhere, the Pi's
  threads) keeps today's plan and the report says why.
- The band height: the most rows that keep the schedule's bound; a block that is not the peak is not
  banded.
- Operator order (op-order): a shortcut convolution run before the main path's second one.
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
from edgekit.codegen.memory_plan import plan_with_report, residual_blocks
from edgekit.codegen.project import load_project
from helpers import MLPERF_TINY, c_matches_reference
from test_kernels_c import EXAMPLES, SETTINGS

torch.set_num_threads(1)
MLPERF = MLPERF_TINY / "pretrainedResnet_quant.tflite"


@st.composite
def block_case(draw):
    c = draw(st.integers(1, 8))
    dw_a, dw_b = draw(st.booleans()), draw(st.booleans())
    # mostly blocks the schedule takes (two rows or more, kb >= ka); the others must fall back
    kb = draw(st.sampled_from([3, 5, 1]))
    takes = draw(st.sampled_from([True, False, True]))
    ka = draw(st.sampled_from([k for k in (1, 3, 5) if (k <= kb) == takes] or [1]))
    return dict(h=draw(st.sampled_from([*range(2, 11), 1])), w=draw(st.integers(1, 8)), c=c,
                m=c if (dw_a or dw_b) else draw(st.integers(1, 10)), dw_a=dw_a, dw_b=dw_b,
                ka=(ka, draw(st.sampled_from([1, 3]))), kb=(kb, draw(st.sampled_from([1, 3]))),
                x_first=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 31)))


class Block(nn.Module):
    """stem conv -> relu -> x; conv A -> relu -> conv B; relu(B + x) (or x + B)."""

    def __init__(self, case, dilation=1, extra_reader=False):
        super().__init__()
        c, m = case["c"], case["m"]
        self.stem = nn.Conv2d(1, c, 3, 1, 1)
        ka, kb = case["ka"], case["kb"]
        self.a = nn.Conv2d(c, m, ka, 1, (ka[0] // 2 * dilation, ka[1] // 2 * dilation), dilation=dilation,
                           groups=c if case["dw_a"] else 1)
        self.b = nn.Conv2d(m, c, kb, 1, (kb[0] // 2, kb[1] // 2), groups=c if case["dw_b"] else 1)
        self.x_first = case["x_first"]
        self.extra = nn.Conv2d(c, c, 1) if extra_reader else None

    def forward(self, t):
        x = torch.relu(self.stem(t))
        y = self.b(torch.relu(self.a(x)))
        z = torch.relu(x + y if self.x_first else y + x)
        return z + self.extra(x) if self.extra is not None else z


def _graph(case, **kw):
    torch.manual_seed(case["seed"] % 10000)
    rng = np.random.default_rng(case["seed"])
    calib = rng.normal(size=(16, 1, case["h"], case["w"])).astype(np.float32)
    g = edgekit.quantize(Block(case, **kw).eval(), calib)
    x = rng.integers(-128, 128, size=(3,) + g.tensors[g.inputs[0]].shape[1:]).astype(np.int8)
    return g, x


def _holds(case) -> bool:
    """The schedule's conditions on this block: two rows or more, the second window's rows below its
    centre covering the first's padding above."""
    return case["h"] >= 2 and case["kb"][0] // 2 >= case["ka"][0] // 2


def _check_report(case, memory, without=None):
    """A banded block is one the schedule takes and lowers the bound (against ``without``: the report with
    the technique off); a block that runs whole says why."""
    if memory["banded_blocks"]:
        assert _holds(case)
        blk = memory["banded_blocks"][0]
        assert 1 <= blk["rows"] <= case["h"] and blk["extra_macs"] == 0
        if without is not None:
            assert memory["lower_bound"] < without["lower_bound"]
    else:
        assert memory["not_banded"], "a block that runs whole must say why"
        reason = memory["not_banded"][0]["reason"]
        if not _holds(case):
            assert "row" in reason


@given(block_case())
@settings(SETTINGS, max_examples=min(EXAMPLES, 6))
def test_block_host_asan_with_and_without_bands(cbuild, case):
    g, x = _graph(case)
    memory = {}
    for off in ((), ("residual-bands",)):
        with tempfile.TemporaryDirectory() as tmp:
            got, ref = c_matches_reference(g, Path(tmp), cbuild, {g.inputs[0]: x}, memory_off=off)
            memory[off] = load_project(tmp)["memory"]
        assert int(np.sum(got != ref)) == 0, off
    assert not memory[("residual-bands",)]["banded_blocks"]
    _check_report(case, memory[()], memory[("residual-bands",)])


@pytest.mark.qemu
@pytest.mark.skipif(shutil.which("qemu-system-arm") is None or shutil.which("arm-none-eabi-gcc") is None,
                    reason="needs qemu-system-arm and arm-none-eabi-gcc (make setup)")
@given(block_case(), st.sampled_from(["mps2-an386", "mps2-an386", "mps2-an500"]), st.sampled_from([(), (), ("residual-bands",)]))
@settings(SETTINGS, max_examples=min(EXAMPLES, 4))
def test_block_cortex_m(case, board, off):
    from cortex_m_selftest import run_selftest

    g, x = _graph(case)
    with tempfile.TemporaryDirectory() as tmp:
        got = run_selftest(g, board, x, Path(tmp), memory_off=off)
        memory = load_project(Path(tmp) / "project")["memory"]
    ref = reference.run(g, x)[0].reshape(len(x), -1)
    assert int(np.sum(got != ref)) == 0
    if not off:
        _check_report(case, memory)


BIG = dict(h=16, w=16, c=8, m=8, dw_a=False, dw_b=False, ka=(3, 3), kb=(3, 3), x_first=False, seed=3)


def test_banded_block_lowers_the_arena_and_says_so(tmp_path):
    """A ResNet-like block: banded, in several bands, the arena below the plan without bands (and the
    report's saving is that difference), the kernel scratch unchanged."""
    g, _ = _graph(BIG)
    on = edgekit.generate(g, tmp_path / "on", board="mps2-an386")
    off = edgekit.generate(g, tmp_path / "off", board="mps2-an386", memory_off="residual-bands")
    blk = on["memory"]["banded_blocks"]
    assert [b["layers"] for b in blk] == [[1, 2, 3]] and 1 <= blk[0]["rows"] < 16 and blk[0]["bands"] >= 2
    assert on["arena_bytes"] < off["arena_bytes"]
    assert on["memory"]["saved_bytes"]["residual-bands"] == off["arena_bytes"] - on["arena_bytes"]
    assert on["scratch_bytes"] == off["scratch_bytes"]


@pytest.mark.qemu
@pytest.mark.skipif(shutil.which("qemu-system-arm") is None or shutil.which("arm-none-eabi-gcc") is None,
                    reason="needs qemu-system-arm and arm-none-eabi-gcc (make setup)")
def test_profiled_counts_of_banded_layers_are_summed_over_the_bands(tmp_path):
    """The real firmware on the emulated M4 (flashed, profiled, bit-exact), with and without bands: each
    banded layer's count is its calls' sum, within a few per cent of the same layer run whole."""
    from edgekit.device.emulator import Emulator
    from edgekit.device.flash import flash_project
    from edgekit.device.profile import profile
    from edgekit.device.protocol import DeviceLink

    g, x = _graph(BIG)
    counts = {}
    with Emulator("mps2-an386") as emu:
        for off in ((), ("residual-bands",)):
            out = tmp_path / f"fw{len(off)}"
            record = edgekit.generate(g, out, board="mps2-an386", memory_off=off)
            assert bool(record["memory"]["banded_blocks"]) == (not off)
            edgekit.build(out)
            flash_project(out, emu.url, show_progress=False)
            report = profile(emu.url, x[:2], project_dir=out, int8=True, show_progress=False)
            assert report["bit_exact"], report["mismatches"]
            counts[off] = {l["index"]: l["median"] for l in report["layers"]}
            assert sum(counts[off].values()) <= report["total"]["max"]
            with DeviceLink(emu.url) as link:
                link.reset()  # back to the bootloader for the next firmware
    banded, whole = counts[()], counts[("residual-bands",)]
    for i in (1, 2, 3):  # conv A (+ the carried rows' memmove), conv B, the add (its tables per band)
        assert 0.97 < banded[i] / whole[i] < 1.15, (i, banded[i], whole[i])


def test_band_height_is_the_most_rows_within_the_bound():
    g, _ = _graph(BIG)
    plan, report = plan_with_report(g, 8, kernel_variant="dsp")
    [grp] = plan.bands
    assert report["lower_bound"] == plan.lower_bound()
    # one row more and the block's steps would need more than the schedule's bound
    grp.rows += 1
    live = 16 * 16 * 8 + sum(grp.band_bytes())
    assert live > report["lower_bound"]


@pytest.mark.parametrize("what", ["window", "dilation", "reader"])
def test_blocks_the_schedule_cannot_take_keep_todays_plan(cbuild, tmp_path, what):
    case = dict(BIG, h=8, w=6, ka=(5, 3), kb=(3, 3)) if what == "window" else dict(BIG, h=8, w=6)
    g, x = _graph(case, dilation=2 if what == "dilation" else 1, extra_reader=what == "reader")
    got, ref = c_matches_reference(g, tmp_path, cbuild, {g.inputs[0]: x})
    memory = load_project(tmp_path)["memory"]
    assert int(np.sum(got != ref)) == 0
    assert not memory["banded_blocks"]
    [skip] = memory["not_banded"]
    assert {"window": "row(s) of padding above", "dilation": "dilation", "reader": "read by other layers"}[what] \
        in skip["reason"]


def test_pi_threads_keep_todays_plan(tmp_path):
    g, _ = _graph(BIG)
    rec = edgekit.generate(g, tmp_path / "t4", board="rpi4")
    assert not rec["memory"]["banded_blocks"] and "threads" in rec["memory"]["not_banded"][0]["reason"]
    rec = edgekit.generate(g, tmp_path / "t1", board="rpi4", threads=1)
    assert rec["memory"]["banded_blocks"]


@pytest.mark.skipif(not MLPERF.exists(), reason="needs the shared MLPerf Tiny models")
def test_resnet8_first_block_is_banded():
    """ResNet-8: its first block (the arena's peak) runs in bands; the stride-2 blocks are not the pattern."""
    g = edgekit.load(MLPERF)
    groups, skipped = residual_blocks(g)
    assert [grp.ops for grp in groups] == [(1, 2, 3)] and not skipped
    on = plan_with_report(g, 8, kernel_variant="dsp")[1]
    off = plan_with_report(g, 8, kernel_variant="dsp", off=["residual-bands"])[1]
    assert on["lower_bound"] < off["lower_bound"] and on["arena_bytes"] < off["arena_bytes"]


# --- operator order (op-order) --------------------------------------------------------------------------


class Down(nn.Module):
    """A downsampling residual block (ResNet-8's second and third): conv s2 -> conv on the main path, a
    1x1 s2 convolution of the block input on the shortcut, written in that order."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, 1, 1)
        self.a, self.b = nn.Conv2d(8, 16, 3, 2, 1), nn.Conv2d(16, 16, 3, 1, 1)
        self.s = nn.Conv2d(8, 16, 1, 2)

    def forward(self, t):
        x = torch.relu(self.stem(t))
        return torch.relu(self.b(torch.relu(self.a(x))) + self.s(x))


def test_shortcut_runs_first_when_that_frees_the_block_input(cbuild, tmp_path):
    """op-order moves the shortcut before the main path's second convolution (the block input is then
    free while it runs): the bound and the arena fall, the layers keep their indices (names, per-layer
    counts), and the code is bit-exact on the host under ASan/UBSan."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    g = edgekit.quantize(Down().eval(), rng.normal(size=(16, 1, 16, 16)).astype(np.float32))
    x = rng.integers(-128, 128, size=(3,) + g.tensors[g.inputs[0]].shape[1:]).astype(np.int8)
    got, ref = c_matches_reference(g, tmp_path, cbuild, {g.inputs[0]: x})
    record = load_project(tmp_path)
    assert int(np.sum(got != ref)) == 0
    mem = record["memory"]
    kinds = [op.kind for op in g.ops]
    shortcut = max(i for i, op in enumerate(g.ops) if op.kind == "conv2d")  # written last in forward
    assert mem["schedule"].index(shortcut) < mem["schedule"].index(shortcut - 1), mem["schedule"]
    assert mem["saved_bytes"]["op-order"] > 0 and [l["kind"] for l in record["layers"]] == kinds
    off = plan_with_report(g, 8, kernel_variant="x86", off=["op-order"])[1]
    assert mem["lower_bound"] < off["lower_bound"]
    # the calls in model.c follow the schedule
    model_c = (tmp_path / "model.c").read_text()
    calls = [model_c.index(f"EK_LAYER_BEGIN({i});") for i in mem["schedule"] if g.ops[i].kind != "reshape"]
    assert calls == sorted(calls)
