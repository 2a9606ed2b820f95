"""The Cortex-M DSP depthwise kernel's unrolled interior path (kernels/dsp/ek_depthwise_conv2d_s8,
codegen/kernel_prep.depthwise_dsp_shapes) on the emulated M4 (mps2-an386) and M7 (mps2-an500).

Each example is a one-layer model generated for the board, built with -Wall -Wextra -Werror as
self-test firmware and run under QEMU; every output element must equal the numpy reference. The shapes
are drawn so that the interior path runs next to the border paths (unrolled border code for the window
rows and columns inside, the tap table where none is generated): four or more channels
(odd counts reach the scalar tail channels), widths 1..9 (pairs, a last single pixel, pairs that start
on odd pixel indices and are refused), stride 1 and 2, every padding side, dilation, windows 1x1 to
5x5; a depth multiplier of 2 falls back to the portable loop. A chain of in-place depthwise layers
checks the raster-order contract the in-place schedule relies on. The DSP kernel is Cortex-M code
(SXTB16 / SMLABB in inline assembly), so it has no host ASan build; the portable kernel's host
ASan/UBSan tests are in test_kernels_c.py."""
import shutil

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import edgekit
from edgekit import reference
from helpers import conv_out, float_graph, quantize_with_random_data
from test_kernels_c import activations
from test_kernels_dsp import DSP_SETTINGS, _check_on_board

pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(shutil.which("qemu-system-arm") is None or shutil.which("arm-none-eabi-gcc") is None,
                                 reason="needs qemu-system-arm and arm-none-eabi-gcc (make setup)")]

BOARDS = st.sampled_from(["mps2-an386", "mps2-an386", "mps2-an500"])


@st.composite
def dw_case(draw):
    kh, kw = draw(st.sampled_from([(3, 3), (3, 3), (3, 3), (1, 1), (5, 5), (3, 1), (2, 3)]))
    stride = draw(st.sampled_from([(1, 1), (2, 2), (1, 2), (2, 1)]))
    dilation = draw(st.sampled_from([(1, 1), (1, 1), (1, 1), (2, 1), (1, 2)]))
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    padding = tuple(draw(st.integers(0, 2)) for _ in range(4))
    oh, ow = conv_out(h, w, (kh, kw), stride, dilation, padding)
    if oh < 1 or ow < 1:
        padding = (padding[0] + kh * dilation[0], padding[1], padding[2] + kw * dilation[1], padding[3])
        oh, ow = conv_out(h, w, (kh, kw), stride, dilation, padding)
    c = draw(st.integers(4, 21))
    mult = draw(st.sampled_from([1, 1, 1, 1, 2]))
    return dict(h=h, w=w, c=c, k=(kh, kw), stride=stride, dilation=dilation, padding=padding, out=(oh, ow),
                mult=mult, act=draw(activations), bias=draw(st.booleans()),
                wscale=draw(st.floats(0.02, 2.0)), seed=draw(st.integers(0, 2 ** 31)))


def _graph(case, rng):
    kh, kw = case["k"]
    o = case["c"] * case["mult"]
    weights = {"w": rng.normal(0, case["wscale"], (1, kh, kw, o))}
    if case["bias"]:
        weights["b"] = rng.normal(0, case["wscale"], o)
    attrs = dict(stride=case["stride"], dilation=case["dilation"], padding=case["padding"], activation=case["act"],
                 depth_multiplier=case["mult"])
    return float_graph("depthwise_conv2d", [(1, case["h"], case["w"], case["c"])], attrs, weights,
                       (1, *case["out"], o))


@given(dw_case(), BOARDS)
@DSP_SETTINGS
def test_depthwise_dsp_interior_and_border(case, board):
    rng = np.random.default_rng(case["seed"])
    _check_on_board(_graph(case, rng), rng, board, {"x0": (-1.5, 2.0)}, n=3)


def test_interior_path_is_generated_for_the_shapes_it_covers(tmp_path):
    """Python picks the unrolled path per layer shape: a 3x3 depthwise with 8 channels gets it (interior
    and border code), 3 channels or a depth multiplier of 2 do not (the tap-table / portable paths)."""
    rng = np.random.default_rng(3)
    shapes, q8 = {}, None
    for name, (c, mult) in {"c8": (8, 1), "c3": (3, 1), "m2": (4, 2)}.items():
        case = dict(h=6, w=5, c=c, k=(3, 3), stride=(1, 1), dilation=(1, 1), padding=(1, 1, 1, 1), out=(6, 5),
                    mult=mult, act="relu", bias=True, wscale=0.5)
        q = quantize_with_random_data(_graph(case, rng), rng)
        q8 = q if name == "c8" else q8
        record = edgekit.generate(q, tmp_path / name, board="mps2-an386")
        source = (tmp_path / name / "kernels" / "ek_depthwise_conv2d_s8.c").read_text()
        shapes[name] = "ek_dw_interior_0(" in source
        if name == "c8":  # and the border code: left / right edges (pad 1: window columns 1..2 and 0..1
            # inside), top / bottom rows and the corners (window rows 1..2 or 0..1)
            kinds = {(ky0, ky1, kx0, kx1) for ky0, ky1 in ((0, 3), (1, 3), (0, 2)) for kx0, kx1 in ((0, 3), (1, 3), (0, 2))}
            for ky0, ky1, kx0, kx1 in kinds - {(0, 3, 0, 3)}:
                assert f"window rows {ky0} .. {ky1 - 1} and columns {kx0} .. {kx1 - 1} inside" in source
            # and pair functions: in rows from an even pixel index (6 x 5 output) a left edge pixel beside
            # an interior one, in the others an interior pixel beside a right edge one
            assert "A's window columns 1 .. 2 inside, B's 0 .. 2 */" in source
            assert "A's window columns 0 .. 2 inside, B's 0 .. 1 */" in source
        assert record["kernels"] == ["ek_depthwise_conv2d_s8"]
    assert shapes == {"c8": True, "c3": False, "m2": False}
    # the M3 (no DSP extension) builds the portable kernel: no geometries, no unrolled code
    record = edgekit.generate(q8, tmp_path / "m3", board="mps2-an385")
    assert record["kernels"] == ["ek_depthwise_conv2d_s8"]
    assert "ek_dw_interior" not in (tmp_path / "m3" / "kernels" / "ek_depthwise_conv2d_s8.c").read_text()


@pytest.mark.parametrize("board", ["mps2-an386", "mps2-an500"])
@pytest.mark.parametrize("c, pad", [(13, (1, 1, 1, 1)), (8, (1, 1, 2, 0))])
def test_border_pairs(board, c, pad, tmp_path):
    """Pair functions (a border pixel beside an interior one, all window rows inside): 13 channels (one
    tail channel, computed per pixel beside the pair) and a window shifted left by two columns of padding
    (pixel A with one window column inside, B with two), bit-exact on the M4 and the M7."""
    from cortex_m_selftest import run_selftest
    rng = np.random.default_rng(c)
    case = dict(h=7, w=5, c=c, k=(3, 3), stride=(1, 1), dilation=(1, 1), padding=pad,
                out=conv_out(7, 5, (3, 3), (1, 1), (1, 1), pad), mult=1, act="relu6", bias=True, wscale=0.5)
    q = quantize_with_random_data(_graph(case, rng), rng, {"x0": (-1.5, 2.0)})
    x = rng.integers(-128, 128, size=(3, 7, 5, c)).astype(np.int8)
    got = run_selftest(q, board, x, tmp_path)
    source = (tmp_path / "project" / "kernels" / "ek_depthwise_conv2d_s8.c").read_text()
    assert "ek_dw_pair_0_0(" in source and ("ek_dw_tail(" in source) == (c % 4 != 0)
    if pad[2] == 2:
        assert "A's window columns 2 .. 2 inside, B's 1 .. 2 */" in source
    ref = reference.run(q, x)[0].reshape(len(x), -1)
    assert int(np.sum(got != ref)) == 0


def _depthwise_chain(rng, layers):
    """A quantized chain of 3x3 depthwise layers over 9x8x12, one per (stride, padding), and 3 int8 inputs."""
    from edgekit.ir import Graph, Op, Tensor
    g = Graph()
    g.add_tensor(Tensor("x0", (1, 9, 8, 12)))
    g.inputs.append("x0")
    g.source_layouts["x0"] = "NHWC"
    prev, shape = "x0", (9, 8)
    for i, (stride, pad) in enumerate(layers):
        w, b, y = f"w{i}", f"b{i}", f"y{i}" if i < len(layers) - 1 else "y"
        g.add_tensor(Tensor(w, (1, 3, 3, 12), "float32", rng.normal(0, 0.5, (1, 3, 3, 12)).astype(np.float32)))
        g.add_tensor(Tensor(b, (12,), "float32", rng.normal(0, 0.5, 12).astype(np.float32)))
        shape = conv_out(*shape, (3, 3), stride, (1, 1), pad)
        g.add_tensor(Tensor(y, (1, *shape, 12)))
        g.ops.append(Op("depthwise_conv2d", f"dw{i}", [prev, w, b], [y],
                        dict(stride=stride, dilation=(1, 1), padding=pad, activation="relu", depth_multiplier=1)))
        prev = y
    g.outputs.append("y")
    g.source_layouts["y"] = "NHWC"
    q = quantize_with_random_data(g, rng, {"x0": (-1.0, 2.0)})
    return q, rng.integers(-128, 128, size=(3, 9, 8, 12)).astype(np.int8)


def test_inplace_depthwise_chain_on_m4(tmp_path):
    """Three 3x3 depthwise layers (stride 1, 2, 1) whose outputs the plan lays over their inputs, on the
    M4: the interior pairs' raster order keeps the in-place schedule bit-exact."""
    from cortex_m_selftest import run_selftest
    rng = np.random.default_rng(11)
    q, x = _depthwise_chain(rng, [((1, 1), (1, 1, 1, 1)), ((2, 2), (0, 1, 0, 1)), ((1, 1), (1, 1, 1, 1))])
    got = run_selftest(q, "mps2-an386", x, tmp_path)
    record = edgekit.codegen.project.load_project(tmp_path / "project")
    assert record["memory"]["in_place_layers"]  # the plan really overlaps a depthwise layer
    ref = reference.run(q, x)[0].reshape(len(x), -1)
    assert int(np.sum(got != ref)) == 0


@pytest.mark.parametrize("board", ["mps2-an386", "mps2-an500"])
@pytest.mark.parametrize("variant", ["shifts", "narrow"])
def test_generic_output_stage_groups(board, variant, tmp_path):
    """The output stage's records (kernel_prep.depthwise_dsp_records) mark a group of four channels
    generic when a channel's shift is outside the fast stage's range (here 0 and -23) or the activation
    bounds narrow int8: such a layer runs the tap-table path for every pixel (the unrolled code has only
    the fast stage), each group through its own stage, next to the tail channel: bit-exact."""
    from cortex_m_selftest import run_selftest
    rng = np.random.default_rng(5)
    case = dict(h=7, w=6, c=13, k=(3, 3), stride=(1, 1), dilation=(1, 1), padding=(1, 1, 1, 1), out=(7, 6),
                mult=1, act="relu", bias=True, wscale=0.5)
    q = quantize_with_random_data(_graph(case, rng), rng, {"x0": (-1.5, 2.0)})
    op = q.ops[0]
    if variant == "shifts":
        op.attrs["shift"] = np.array(op.attrs["shift"]).copy()
        op.attrs["shift"][1], op.attrs["shift"][6] = 0, -23
    else:
        op.attrs["act_min"] = int(op.attrs["act_min"]) + 40
        op.attrs["act_max"] = 100
    x = rng.integers(-128, 128, size=(3, 7, 6, 13)).astype(np.int8)
    got = run_selftest(q, board, x, tmp_path)
    assert "ek_dw_interior_0(" in (tmp_path / "project" / "kernels" / "ek_depthwise_conv2d_s8.c").read_text()
    ref = reference.run(q, x)[0].reshape(len(x), -1)
    assert int(np.sum(got != ref)) == 0


def test_records_hold_weights_only_for_unrolled_layers(tmp_path, monkeypatch):
    """Two 3x3 depthwise layers of different geometries (stride_w 1 and 2) with room for one geometry's
    unrolled code (DW_DSP_CODE_BUDGET lowered to ~1.5 KB): the layer that runs unrolled code stores the
    full records (13 stage words, 18 tap words, 6 column-sum words per four channels); the other, which
    runs the tap-table path (weights from the filter), stores the 13 stage words only. The kernel picks
    each layer's record length from the same geometry match: bit-exact on the M4."""
    import re
    from cortex_m_selftest import run_selftest
    from edgekit.codegen import kernel_prep
    monkeypatch.setattr(kernel_prep, "DW_DSP_CODE_BUDGET",
                        kernel_prep.DW_DSP_BODY_BYTES + 9 * kernel_prep.DW_DSP_TAP_BYTES)
    rng = np.random.default_rng(17)
    q, x = _depthwise_chain(rng, [((1, 1), (1, 1, 1, 1)), ((2, 2), (0, 1, 0, 1))])
    got = run_selftest(q, "mps2-an386", x, tmp_path)
    ref = reference.run(q, x)[0].reshape(len(x), -1)
    assert int(np.sum(got != ref)) == 0
    source = (tmp_path / "project" / "kernels" / "ek_depthwise_conv2d_s8.c").read_text()
    assert "ek_dw_interior_0(" in source and "ek_dw_interior_1(" not in source  # one geometry unrolled
    assert "stride_w 1," in source  # the stride-1 layer's (more interior pixels)
    weights = (tmp_path / "project" / "model_weights.c").read_text()
    lengths = {name: int(n) for name, n in re.findall(r"int32_t (l\d+_dw\d)_bias\[(\d+)\]", weights)}
    kernel_prep_rec = kernel_prep.DW_DSP_REC
    assert lengths == {"l0_dw0": 12 + 3 * (kernel_prep_rec + 2 * 9 + 2 * 3), "l1_dw1": 12 + 3 * kernel_prep_rec}
