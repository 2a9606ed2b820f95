"""The Cortex-M DSP add's rescale tables and fully connected paths (kernels/dsp/ek_add_s8,
ek_fully_connected_s8) on the emulated M4 (mps2-an386) and M7 (mps2-an500): random shapes and
quantization parameters (hypothesis), self-test firmware built with -Wall -Wextra -Werror, every output
compared with the numpy reference (0 differing elements)."""
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from edgekit import reference
from edgekit.boards import load_board
from edgekit.codegen.kernel_prep import ADD_TABLE_BYTES, add_tables
from edgekit.codegen.project import generate_project, load_project
from helpers import float_graph, quantize_with_random_data
from test_kernels_c import activations
from test_kernels_dsp import BOARDS, DSP_SETTINGS, HOST_DSP_BOARD, _check_on_board, pytestmark  # noqa: F401 (the qemu marks)


def _residual_graph(h, w, c, act, wscale, rng):
    """x + conv3x3(x) then the activation: the 3x3 convolution over c >= 57 channels plans >= 2 KB of
    scratch (ek_conv2d_s8's windows), which the add's tables then share."""
    from edgekit.ir import Op, Tensor

    weights = {"w": rng.normal(0, wscale, (c, 3, 3, c)), "b": rng.normal(0, wscale, c)}
    attrs = dict(stride=(1, 1), dilation=(1, 1), padding=(1, 1, 1, 1), activation="none")
    g = float_graph("conv2d", [(1, h, w, c)], attrs, weights, (1, h, w, c))
    g.add_tensor(Tensor("z", (1, h, w, c)))
    g.ops.append(Op("add", "residual", ["x0", "y"], ["z"], {"activation": act}))
    g.outputs[:] = ["z"]
    g.source_layouts["z"] = "NHWC"
    return g


@given(st.integers(1, 6), st.integers(1, 6), st.integers(57, 64), activations, st.floats(0.01, 0.3),
       st.integers(0, 2 ** 31), BOARDS)
@DSP_SETTINGS
def test_add_s8_dsp_tables(h, w, c, act, wscale, seed, board):
    """The residual add through its rescale tables (>= 256 elements) or, when shorter, its loop; in place
    when the plan puts the output over an input."""
    rng = np.random.default_rng(seed)
    g = _residual_graph(h, w, c, act, wscale, rng)
    add = quantize_with_random_data(g, np.random.default_rng(seed + 1), {"x0": (-2.0, 3.0)}).ops[-1].attrs
    assert add["left_shift"] <= 22 and max(add["input1_shift"], add["input2_shift"], add["output_shift"]) <= 0, \
        "these parameters would take the portable loop, not the DSP one under test"
    _check_on_board(g, rng, board, {"x0": (-2.0, 3.0)}, n=3)


def test_add_tables_chosen_only_with_room():
    """EK_ADD_S8_TABLES is defined when the scratch already holds the tables and an add is long enough:
    a 3x3 convolution over 64 channels plans 2,304 B; over 8 channels it plans less, and no tables.
    With the tables and no short add, the add's loop and the table loop's forms no layer takes are
    left out (kernel_prep.dsp_fallbacks_unused; test_add_s8_dsp_tables runs them bit-exact)."""
    rng = np.random.default_rng(0)
    board = load_board("mps2-an386")
    for c, expect in ((64, True), (8, False)):
        q = quantize_with_random_data(_residual_graph(8, 8, c, "relu", 0.1, rng), rng, {"x0": (-2.0, 3.0)})
        with tempfile.TemporaryDirectory() as tmp:
            generate_project(q, Path(tmp), board)
            record = load_project(Path(tmp))
            header = (Path(tmp) / "include" / "ek_nn.h").read_text()
        assert (record["scratch_bytes"] >= ADD_TABLE_BYTES) == expect
        assert ("#define EK_ADD_S8_TABLES 1" in header) == expect
        # the one add is long: built with the table path alone and one of its three forms
        assert ("#define EK_ADD_S8_LOOP 0" in header) == expect
        assert sum(f"#define EK_ADD_S8_TABLE_{form} 0" in header for form in ("ZERO", "NARROW", "WIDE")) == 2 * expect
    assert not add_tables([], load_board("host"), 4096)


# ---- ek_fully_connected_s8_rows4 ------------------------------------------------------------------

def _fc_graph(n_in, n_out, act, wscale, rng, bias=True):
    weights = {"w": rng.normal(0, wscale, (n_out, n_in))}
    if bias:
        weights["b"] = rng.normal(0, wscale, n_out)
    return float_graph("fully_connected", [(1, n_in)], dict(activation=act), weights, (1, n_out))


@st.composite
def fc_case(draw):
    """in_c 4..300: tails (in_c % 4), one chunk of the input or several (more than the 128 inputs the
    planned scratch holds); out_c 4..40: a last partial group; some rows' shifts 0 (the generic stage
    for their group)."""
    n_in = draw(st.one_of(st.integers(4, 40), st.integers(120, 300)))
    n_out = draw(st.integers(4, 40))
    zero = draw(st.lists(st.integers(0, n_out - 1), max_size=2, unique=True))
    return dict(n_in=n_in, n_out=n_out, act=draw(activations), wscale=draw(st.floats(0.01, 1.0)),
                bias=draw(st.booleans()), zero=zero, per_tensor=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 31)))


def _fc_case_model(case):
    """The case's quantized layer and three inputs. per_tensor: one multiplier and shift for all rows
    (TFLite's per-tensor weights: the kernel's shared output stage), else the quantizer's per-row ones
    with the rows in ``zero`` given shift 0 (their group's generic stage)."""
    rng = np.random.default_rng(case["seed"])
    q = quantize_with_random_data(_fc_graph(case["n_in"], case["n_out"], case["act"], case["wscale"], rng,
                                            case["bias"]), rng, {"x0": (-3.0, 2.0)})
    a = q.ops[0].attrs
    a["multiplier"], a["shift"] = np.array(a["multiplier"]).copy(), np.array(a["shift"]).copy()
    if case["per_tensor"]:
        a["multiplier"][:], a["shift"][:] = a["multiplier"][0], a["shift"][0]
    else:
        a["shift"][case["zero"]] = 0
    return q, rng.integers(-128, 128, size=(3, case["n_in"])).astype(np.int8)


@given(fc_case(), BOARDS)
@DSP_SETTINGS
def test_fully_connected_s8_rows4(case, board):
    """The weights never sign-extended (even bytes ^ 0x80, the input as (P, Q) pairs), records for the
    output stage, bit-exact with the numpy reference on the M4 / M7."""
    from cortex_m_selftest import run_selftest

    q, x = _fc_case_model(case)
    with tempfile.TemporaryDirectory() as tmp:
        got = run_selftest(q, board, x, Path(tmp))
        assert (Path(tmp) / "project" / "kernels" / "ek_fully_connected_s8_rows4.c").exists()
    ref = reference.run(q, x)[0].reshape(len(x), -1)
    assert int(np.sum(got != ref)) == 0, f"{board}: {int(np.sum(got != ref))} of {got.size} differ"



@given(fc_case())
@DSP_SETTINGS
def test_fully_connected_s8_rows4_portable_host_asan(case):
    """The packed filter and the records through the kernel's portable form, on the host under
    ASan / UBSan, bit-exact with the numpy reference."""
    from edgekit.boards import load_board_file
    from helpers import CBuild, run_c

    q, x = _fc_case_model(case)
    with tempfile.TemporaryDirectory() as tmp:
        board_file = Path(tmp) / "host-dsp.toml"
        board_file.write_text(HOST_DSP_BOARD)
        record = generate_project(q, Path(tmp) / "project", load_board_file(board_file))
        assert record["kernels"] == ["ek_fully_connected_s8_rows4"]
        got = run_c(CBuild(Path(tmp), sanitize=True).build(Path(tmp) / "project"), [x], case["n_out"])
    ref = reference.run(q, x)[0].reshape(len(x), -1)
    assert int(np.sum(got != ref)) == 0


def test_pack_fc_rows4_order_and_records():
    """The packed bytes are the filter's, reordered per group of 4 rows x 4 inputs with the even bytes
    ^ 0x80, the group tails and the last rows as they are; the records' biases carry 128 x the odd
    weights, and the output constants follow the shifts (a group with shift 0: generic)."""
    from edgekit.codegen.kernel_prep import FC_ROWS4_REC, fc_rows4_records, folded_bias, pack_fc_rows4

    rng = np.random.default_rng(5)
    w = rng.integers(-128, 128, (6, 10)).astype(np.int8)
    p = pack_fc_rows4(w).view(np.uint8)
    assert p.size == w.size
    u = w.view(np.uint8)
    for r in range(4):
        for i in range(8):
            assert p[16 * (i // 4) + 4 * r + i % 4] == (u[r, i] ^ 0x80 if i % 2 == 0 else u[r, i])
        assert list(p[32 + 2 * r:34 + 2 * r]) == list(u[r, 8:10])
    assert bytes(p[40:]) == u[4:].tobytes()
    w = rng.integers(-128, 128, (14, 6)).astype(np.int8)  # a group of 8 rows, one of 4, 2 rows as stored
    p, u = pack_fc_rows4(w).view(np.uint8), w.view(np.uint8)
    for r in range(12):
        g, rows, k = (0, 8, r) if r < 8 else (48, 4, r - 8)
        for i in range(4):
            assert p[g + 4 * k + i] == (u[r, i] ^ 0x80 if i % 2 == 0 else u[r, i])
        assert list(p[g + 4 * rows + 2 * k:g + 4 * rows + 2 * k + 2]) == list(u[r, 4:6])
    assert bytes(p[72:]) == u[12:].tobytes()
    q = quantize_with_random_data(_fc_graph(10, 6, "relu", 0.5, rng), rng)
    op = q.ops[0]
    wq = q.tensors[op.inputs[1]].data.astype(np.int64)
    fb = folded_bias(q, op).astype(np.int64)
    b = [int(fb[r] + 128 * wq[r, 1:8:2].sum()) for r in range(4)] + list(fb[4:6])
    op.attrs["multiplier"], op.attrs["shift"] = np.array(op.attrs["multiplier"]).copy(), np.array(op.attrs["shift"]).copy()
    op.attrs["multiplier"][:], op.attrs["shift"][:] = op.attrs["multiplier"][0], -7
    rec = fc_rows4_records(q, op).astype(np.int64)  # one requantization: {r, m, 2c, 2 x biases}
    c = (1 << 5) + int(op.attrs["output_offset"]) * (1 << 6)
    assert list(rec) == [7, op.attrs["multiplier"][0], 2 * c] + [2 * v for v in b]
    op.attrs["shift"][1] = 0
    rec = fc_rows4_records(q, op)[3:].reshape(2, FC_ROWS4_REC).astype(np.int64)  # per group: both generic
    assert list(rec[0, 1:5]) == b[:4] and list(rec[1, 1:3]) == b[4:] and rec[0, 0] == -1 and rec[1, 0] == -1
    assert list(rec[0, 6::2]) == list(op.attrs["shift"][:4])


def test_fc_rows4_layers_by_share():
    """An FC-only model (the autoencoder's kind) takes the kernel for every layer of >= 4 rows and
    inputs; a convolution's classifier head (well under 1 % of the MACs) keeps ek_fully_connected_s8."""
    from edgekit.codegen.kernel_prep import fc_rows4_layers
    from edgekit.ir import Op, Tensor

    rng = np.random.default_rng(1)
    q = quantize_with_random_data(_fc_graph(20, 8, "relu", 0.5, rng), rng)
    assert fc_rows4_layers(q) == {q.ops[0].name}
    g = _residual_graph(4, 4, 64, "relu", 0.1, rng)  # a 3x3 over 64 channels: 590 K MACs
    g.add_tensor(Tensor("flat", (1, 4 * 4 * 64)))
    g.add_tensor(Tensor("wf", (4, 4 * 4 * 64), "float32", rng.normal(0, 0.1, (4, 1024)).astype(np.float32)))
    g.add_tensor(Tensor("o", (1, 4)))
    g.ops.append(Op("reshape", "flatten", ["z"], ["flat"], {"shape": (1, 1024)}))
    g.ops.append(Op("fully_connected", "head", ["flat", "wf"], ["o"], {"activation": "none"}))
    assert fc_rows4_layers(g) == set()  # the choice reads shapes only: 4 K MACs of 594 K
