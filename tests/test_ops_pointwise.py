"""Pointwise ops (issue 10): unary activations (LOGISTIC, TANH, HARD_SWISH, LEAKY_RELU, ELU, GELU, RSQRT),
clamp to any bounds, PRELU, and broadcasting binary ops (ADD, SUB, MUL, SQUARED_DIFFERENCE, with
tensors or constants). Each int8 op: the numpy reference equals tflite-runtime's reference kernels
bit for bit (ELU: the builtin kernels, BUILTIN_REF has no ELU), the generated C (ASan + UBSan)
equals the reference, and the exported .tflite reads back into the same graph; all over random
shapes and quantization parameters (hypothesis)."""
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
from edgekit.errors import EdgekitError
from edgekit.export.tflite import export_tflite
from edgekit.frontends.tflite import load_tflite
from helpers import c_matches_reference, float_graph, quantize_with_random_data, tflite_run
from test_kernels_c import EXAMPLES, SETTINGS, input_range

FEWER = settings(SETTINGS, max_examples=max(5, EXAMPLES // 2))  # one op each: half the examples
pytest.importorskip("tflite_runtime.interpreter")  # every op here is compared with TFLite

UNARY = [("logistic", {}), ("tanh", {}), ("hard_swish", {}), ("leaky_relu", {"alpha": 0.1}),
         ("leaky_relu", {"alpha": 0.01}), ("elu", {}), ("gelu", {"approximate": "none"}),
         ("gelu", {"approximate": "tanh"}), ("clamp", {"lo": -0.5, "hi": 0.75}), ("clamp", {"lo": 0.25, "hi": None}),
         ("clamp", {"lo": None, "hi": 1.5})]
SHAPES = [(1, 7), (1, 3, 5, 4), (1, 1, 1, 33), (1, 8, 8, 2), (1, 2, 3, 6)]


def _all_checks(g, rng, cbuild, ranges, n=12, lowest=None):
    """int8 graph: reference == tflite-runtime == C, and export -> import gives the same outputs.
    ``lowest(q)``: the smallest int8 input the op accepts (RSQRT: the zero point)."""
    q = quantize_with_random_data(g, rng, ranges)
    low = lowest(q) if lowest else -128
    inputs = {name: rng.integers(low, 128, size=(n,) + q.tensors[name].shape[1:]).astype(np.int8)
              for name in q.inputs}
    ref = reference.run(q, inputs if len(q.inputs) > 1 else inputs[q.inputs[0]])
    with tempfile.TemporaryDirectory() as tmp:
        path = export_tflite(q, Path(tmp) / "op.tflite", io="int8")
        builtin_ref = not any(op.kind == "elu" for op in q.ops)  # BUILTIN_REF registers no ELU
        got = tflite_run(path, [inputs[name] for name in q.inputs], builtin_ref)
        back = load_tflite(path)
        again = reference.run(back, [inputs[name] for name in q.inputs][0] if len(back.inputs) == 1
                              else dict(zip(back.inputs, [inputs[name] for name in q.inputs])))
        c_out, c_ref = c_matches_reference(q, Path(tmp) / "c", cbuild, inputs)
    for gv, rv, av in zip(got, ref, again):
        gv = gv.reshape(rv.shape)
        diff = int(np.sum(gv != rv))
        assert diff == 0, (f"{diff} of {gv.size} elements differ from TFLite; tflite {gv[gv != rv][:5]} "
                           f"ours {rv[gv != rv][:5]} inputs {np.argwhere(gv != rv)[:3].tolist()}")
        assert np.array_equal(av.reshape(rv.shape), rv), "the re-imported .tflite computes something else"
    assert int(np.sum(c_out != c_ref)) == 0, f"{int(np.sum(c_out != c_ref))} C outputs differ from the reference"


@given(st.sampled_from(UNARY), st.sampled_from(SHAPES), input_range(), st.floats(0.25, 4.0), st.integers(0, 2 ** 31))
@SETTINGS
def test_unary_ops(cbuild, kind_attrs, shape, in_range, spread, seed):
    kind, attrs = kind_attrs
    rng = np.random.default_rng(seed)
    g = float_graph(kind, [shape], attrs, None, shape)
    _all_checks(g, rng, cbuild, {"x0": (in_range[0] * spread, in_range[1] * spread)})


@given(st.sampled_from(SHAPES), st.floats(0.0, 2.0), st.floats(0.05, 30.0), st.integers(0, 2 ** 31))
@FEWER
def test_rsqrt(cbuild, shape, lo, width, seed):
    """RSQRT on positive inputs (TFLite refuses an input below the zero point at run time)."""
    rng = np.random.default_rng(seed)
    g = float_graph("rsqrt", [shape], {}, None, shape)
    _all_checks(g, rng, cbuild, {"x0": (lo + 1e-3, lo + 1e-3 + width)},
                lowest=lambda q: int(q.tensors["x0"].quant.zero_point[0]))


@st.composite
def binary_case(draw):
    shape = draw(st.sampled_from(SHAPES))
    # The second operand broadcasts over any subset of the non-batch dimensions.
    other = tuple(1 if i > 0 and draw(st.booleans()) else d for i, d in enumerate(shape))
    swap = draw(st.booleans())  # the broadcast operand first
    return dict(kind=draw(st.sampled_from(["add", "sub", "mul", "squared_difference"])), shape=shape, other=other,
                swap=swap, act=draw(st.sampled_from(["none", "relu", "relu6"])), r1=draw(input_range()),
                r2=draw(input_range()), const=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 31)))


@given(binary_case())
@SETTINGS
def test_binary_ops(cbuild, case):
    rng = np.random.default_rng(case["seed"])
    kind = case["kind"]
    attrs = {} if kind == "squared_difference" else dict(activation=case["act"])
    if case["const"]:
        k = rng.uniform(case["r2"][0], case["r2"][1], case["other"])
        g = float_graph(kind, [case["shape"]], attrs, {"k": k}, case["shape"])
        if case["swap"]:
            g.ops[0].inputs.reverse()
    else:
        shapes = [case["other"], case["shape"]] if case["swap"] else [case["shape"], case["other"]]
        g = float_graph(kind, shapes, attrs, None, case["shape"])
    ranges = {"x0": case["r2"] if case["swap"] and not case["const"] else case["r1"],
              "x1": case["r1"] if case["swap"] else case["r2"]}
    _all_checks(g, rng, cbuild, ranges)


@given(st.sampled_from(SHAPES), st.booleans(), input_range(), st.floats(-0.5, 1.5), st.integers(0, 2 ** 31))
@FEWER
def test_prelu(cbuild, shape, per_channel, in_range, slope, seed):
    rng = np.random.default_rng(seed)
    alpha_shape = (1,) * (len(shape) - 1) + ((shape[-1],) if per_channel else (1,))
    alpha = rng.uniform(min(slope, 0.0), max(slope, 0.05), alpha_shape)
    g = float_graph("prelu", [shape], {}, {"alpha": alpha}, shape)
    _all_checks(g, rng, cbuild, {"x0": in_range})


@pytest.mark.parametrize("kind, attrs", [k for k in UNARY if k[0] != "gelu"] + [("prelu", {}), ("sub", {}),
                                                                            ("squared_difference", {})])
def test_tflite_micro_agrees(kind, attrs, tmp_path):
    """TFLite Micro computes LOGISTIC / TANH in fixed point, not from a float table: on every int8 input,
    at several input scales, it still gives our outputs (its interpreter has no GELU)."""
    from test_tflite_models import tflm_run

    rng = np.random.default_rng(7)
    x = np.arange(-128, 128).astype(np.int8).reshape(256, 1)
    for lo, hi in [(-4.0, 4.0), (-8.0, 2.0), (-1.0, 1.0), (-12.0, 12.0), (-0.3, 5.0)]:
        if kind == "prelu":
            g = float_graph(kind, [(1, 1)], {}, {"a": np.array([[0.25]])}, (1, 1))
        elif kind in ("sub", "squared_difference"):
            g = float_graph(kind, [(1, 1)], attrs, {"k": np.array([[0.7]])}, (1, 1))
        else:
            g = float_graph(kind, [(1, 1)], attrs, None, (1, 1))
        q = quantize_with_random_data(g, rng, {"x0": (lo, hi)})
        path = export_tflite(q, tmp_path / f"{kind}.tflite", io="int8")
        ref = reference.run(q, x)[0].reshape(-1)
        got = tflm_run(path, x).reshape(-1)
        assert np.array_equal(got, ref), f"{kind} at range {(lo, hi)}: {int(np.sum(got != ref))} of 256 differ"


# ---------------------------------------------------------------------------
# From PyTorch
# ---------------------------------------------------------------------------

class EverydayOps(nn.Module):
    """Every pointwise op a PyTorch user writes, on one small conv net."""

    def __init__(self, with_elu=True):
        super().__init__()
        self.with_elu = with_elu  # tflite-runtime's BUILTIN_REF has no ELU kernel
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.prelu = nn.PReLU(8)
        self.act = nn.Hardtanh(-0.5, 1.5)
        self.layer_scale = nn.Parameter(torch.linspace(0.5, 1.5, 8))
        self.bias = nn.Parameter(torch.linspace(-0.2, 0.2, 8).reshape(1, 8, 1, 1))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.conv(x)
        a = torch.sigmoid(x) * 0.5 + torch.tanh(x)
        b = nn.functional.hardswish(x) - nn.functional.silu(x) / 6
        c = nn.functional.leaky_relu(a, 0.1) + (nn.functional.elu(b) if self.with_elu else b)
        c = self.prelu(c) * self.layer_scale.view(1, -1, 1, 1) + self.bias
        d = torch.clamp(self.conv2(c), min=-1.0) - torch.clamp(c, -0.25, 0.75)
        d = self.act(d * nn.functional.hardsigmoid(c)) + (c - d) ** 2
        d = nn.functional.gelu(1 - d) * torch.rsqrt(d.pow(2).mean((2, 3), keepdim=True) + 1e-2)
        return self.fc(torch.flatten(d.mean((2, 3)), 1))


def test_pytorch_everyday_ops_bit_exact(cbuild, rng, tmp_path):
    torch.manual_seed(0)
    model = EverydayOps(with_elu=False).eval()
    x = rng.normal(0, 1, (24, 3, 6, 6)).astype(np.float32)
    g = edgekit.load(model, x[:1])
    kinds = {op.kind for op in g.ops}
    assert {"logistic", "tanh", "hard_swish", "leaky_relu", "gelu", "prelu", "clamp", "sub", "mul",
            "squared_difference", "add", "rsqrt"} <= kinds, kinds
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    # The float graph computes what PyTorch computes.
    got = reference.run(g, x.transpose(0, 2, 3, 1))[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    q = edgekit.quantize(model, x)
    x_q = rng.integers(-128, 128, size=(8,) + q.tensors[q.inputs[0]].shape[1:]).astype(np.int8)
    c_out, c_ref = c_matches_reference(q, tmp_path / "c", cbuild, {q.inputs[0]: x_q})
    assert np.array_equal(c_out, c_ref)
    # The whole model through tflite-runtime's reference kernels and back.
    path = export_tflite(q, tmp_path / "m.tflite", io="int8")
    assert np.array_equal(tflite_run(path, [x_q])[0].reshape(c_ref.shape), c_ref)
    assert np.array_equal(reference.run(load_tflite(path), x_q)[0].reshape(c_ref.shape), c_ref)


def test_every_unsupported_layer_in_one_message():
    class Unsupported(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.soft = nn.Softplus()
            self.rnn = nn.RNN(4, 4, batch_first=True)  # LSTM and GRU are supported (ops-sequence); RNN is not
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            x = self.soft(self.conv(x))
            x = torch.erfinv(x.clamp(-0.5, 0.5))
            seq = x.mean(2).permute(0, 2, 1)
            out, _ = self.rnn(seq)
            return self.fc(out[:, -1])

    with pytest.raises(EdgekitError) as err:
        edgekit.load(Unsupported(), np.zeros((1, 1, 8, 8), np.float32))
    msg = str(err.value)
    assert "layer 'soft' (Softplus)" in msg and "softplus" in msg
    assert "erfinv" in msg
    assert "layer 'rnn' (RNN): RNN layers are not supported" in msg and "zeros" not in msg
    assert "internal" not in msg and "edgekit supports" in msg
    assert msg.count("\n  ") >= 3  # one line per unsupported layer, listed together


def test_weight_only_clamp_runs(cbuild, rng, tmp_path):
    """Weight-only (float activations) runs a clamp to any bounds with the float clamp kernel."""
    from edgekit.passes.quantize import quantize_weights_only
    g = float_graph("clamp", [(1, 3, 4, 5)], {"lo": -0.5, "hi": 0.75}, None, (1, 3, 4, 5))
    x = rng.uniform(-2, 2, (6, 3, 4, 5)).astype(np.float32)
    got, ref = c_matches_reference(quantize_weights_only(g), tmp_path / "w", cbuild, {"x0": x})
    assert np.array_equal(got, ref) and ref.min() == -0.5 and ref.max() == 0.75


def test_weight_only_refuses_lut_ops_clearly(tmp_path):
    g = float_graph("logistic", [(1, 4)], {}, None, (1, 4))
    from edgekit.passes.quantize import quantize_weights_only
    with pytest.raises(EdgekitError, match=r"layer 'op': logistic has no weight-only"):
        edgekit.generate(quantize_weights_only(g), tmp_path / "w", board="host")
