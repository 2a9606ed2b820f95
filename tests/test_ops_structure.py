"""Structure ops (issue 10): rank-3 (N, L, C) tensors, layouts, and the layout / shape / window ops.

Each op: the float reference equals PyTorch; the int8 reference equals tflite-runtime's reference
kernels (BUILTIN_REF) through `edgekit export`; the generated C equals the reference under ASan + UBSan;
the exported file imports back to the same outputs, and TensorFlow Lite Micro runs it with the same outputs.
"""
import numpy as np
import pytest
import torch
from torch import nn

import edgekit
from edgekit import quant_math as qm
from edgekit import reference
from edgekit.frontends.tflite import load_tflite
from edgekit.layout import from_ir, to_ir
from helpers import c_matches_reference
from test_tflite_models import tflm_run
from test_tflite_reference import tflite_run


def float_matches_torch(model, x, atol=1e-4):
    """The float IR (before and after BN folding) computes what PyTorch computes."""
    from edgekit.passes.fuse import prepare_float
    model.eval()
    with torch.no_grad():
        want = model(torch.as_tensor(x))
    wants = want if isinstance(want, (tuple, list)) else (want,)
    g = edgekit.load(model, x[:1])
    for graph in (g, prepare_float(g)):
        name = graph.inputs[0]
        got = reference.run(graph, to_ir(x, graph.source_layouts[name], graph.tensors[name].shape[1:]))
        for out_name, y, w in zip(graph.outputs, got, wants):
            np.testing.assert_allclose(from_ir(y, graph.source_layouts[out_name]), w.numpy(), atol=atol, rtol=1e-4)
    return g


def int8_everywhere(model, x, tmp_path, cbuild):
    """Quantize ``model`` (a module or its float graph) on ``x``; the C (ASan + UBSan) equals the reference, the .tflite export equals it in
    tflite-runtime (BUILTIN_REF) and TFLite Micro, and the file imports back to the same outputs.
    Returns the int8 graph."""
    q = edgekit.quantize(model, x)
    x_ir = edgekit.api.to_ir_inputs(q, x)
    p = q.tensors[q.inputs[0]].quant
    x_q = qm.quantize(x_ir, p.scale[0], p.zero_point[0])
    got, ref = c_matches_reference(q, tmp_path / "c", cbuild, {q.inputs[0]: x_q})
    assert np.array_equal(got, ref), f"{int(np.sum(got != ref))} C outputs differ from the reference"
    path = edgekit.export_tflite(q, tmp_path / "m.tflite", io="int8")
    ref_outs = reference.run(q, x_q)
    for y_t, y_r in zip(tflite_run(path, [x_q]), ref_outs):
        assert np.array_equal(y_t.reshape(y_r.shape), y_r), "tflite-runtime differs from the reference"
    if len(q.outputs) == 1:
        y_m = tflm_run(path, x_q)
        assert np.array_equal(y_m.reshape(ref_outs[0].shape), ref_outs[0]), "TFLite Micro differs"
    back = load_tflite(path)
    for y_b, y_r in zip(reference.run(back, x_q), ref_outs):
        assert np.array_equal(y_b.reshape(y_r.shape), y_r), "the imported .tflite differs"
    return q


# ---------------------------------------------------------------------------
# rank-3 tensors
# ---------------------------------------------------------------------------

class Signal1d(nn.Module):
    """Conv1d + BatchNorm1d + depthwise Conv1d on an (N, C, L) signal."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 8, 5, stride=2, padding=2)
        self.bn1 = nn.BatchNorm1d(8)
        self.c2 = nn.Conv1d(8, 8, 3, dilation=2, groups=8)
        self.bn2 = nn.BatchNorm1d(8)  # after a ReLU: not folded, a 1x1 depthwise conv on (1, L, C)
        self.fc = nn.Linear(8 * 4, 5)

    def forward(self, x):
        y = torch.relu(self.bn1(self.c1(x)))
        y = self.bn2(torch.relu(self.c2(y)))
        return self.fc(torch.flatten(y, 1))


def _randomise_bn(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def test_signal_is_rank3_in_the_ir(tmp_path, cbuild):
    torch.manual_seed(0)
    model = _randomise_bn(Signal1d())
    x = np.random.default_rng(0).normal(size=(24, 3, 16)).astype(np.float32)
    g = float_matches_torch(model, x)
    assert g.source_layouts[g.inputs[0]] == "NCL"
    assert g.tensors[g.inputs[0]].shape == (1, 16, 3)
    conv_outs = [g.tensors[op.outputs[0]].shape for op in g.ops if op.kind in ("conv2d", "depthwise_conv2d")]
    assert conv_outs == [(1, 8, 8), (1, 4, 8)]
    q = int8_everywhere(g, x, tmp_path, cbuild)
    assert [op.kind for op in q.ops].count("reshape") == 1  # the flatten; no transpose anywhere


def test_sequence_input_stays_nlc():
    """A batch_first (N, L, C) input that no (N, C, L) op reads is held as it is."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(6 * 4, 3))
    x = np.random.default_rng(1).normal(size=(5, 6, 4)).astype(np.float32)
    g = float_matches_torch(model, x)
    assert g.source_layouts[g.inputs[0]] == "NLC" and g.tensors[g.inputs[0]].shape == (1, 6, 4)
    fc = next(op for op in g.ops if op.kind == "fully_connected")
    np.testing.assert_array_equal(g.tensors[fc.inputs[1]].data, model[1].weight.detach().numpy())  # no permutation


def test_rank3_layouts_round_trip():
    x = np.arange(2 * 3 * 5, dtype=np.float32).reshape(2, 3, 5)
    ir = to_ir(x, "NCL", (5, 3))
    assert ir.shape == (2, 5, 3) and ir[1, 4, 2] == x[1, 2, 4]
    np.testing.assert_array_equal(from_ir(ir, "NCL"), x)
    np.testing.assert_array_equal(to_ir(x, "NLC", (3, 5)), x)


# ---------------------------------------------------------------------------
# permute / transpose / reshape: relabelled when possible, one TRANSPOSE otherwise
# ---------------------------------------------------------------------------

class ChannelShuffle(nn.Module):
    """ShuffleNet's shuffle: a 5-D view, transpose(1, 2), view back."""

    def __init__(self, groups=2):
        super().__init__()
        self.groups = groups
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 6, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        n, c, h, w = y.shape
        y = y.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        return self.b(y)


class PermuteZoo(nn.Module):
    """unsqueeze -> Conv2d (1, k) -> squeeze; permute back and forth; a real transpose before the output."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 5, (1, 3))

    def forward(self, x):
        y = self.c(x.unsqueeze(2)).squeeze(2)  # (N, 5, L')
        y = y.permute(0, 2, 1).permute(0, 2, 1)  # relabelled twice: back to (N, C, L)
        return y.transpose(1, 2).reshape(y.shape[0], -1, 10)  # (N, L', C), then a reshape across L and C


def test_channel_shuffle_is_one_transpose(tmp_path, cbuild):
    torch.manual_seed(0)
    x = np.random.default_rng(2).normal(size=(16, 3, 5, 5)).astype(np.float32)
    g = float_matches_torch(ChannelShuffle(), x)
    kinds = [op.kind for op in g.ops]
    assert kinds.count("transpose") == 1
    t = next(op for op in g.ops if op.kind == "transpose")
    assert g.tensors[t.inputs[0]].shape == (1, 25, 2, 4) and t.attrs["perm"] == (0, 1, 3, 2)
    int8_everywhere(g, x, tmp_path, cbuild)


def test_permutes_relabel_and_reshapes_transpose_once(tmp_path, cbuild):
    torch.manual_seed(0)
    model = PermuteZoo()
    x = np.random.default_rng(3).normal(size=(16, 3, 12)).astype(np.float32)
    g = float_matches_torch(model, x)
    assert g.source_layouts[g.inputs[0]] == "NCL"
    assert [op.kind for op in g.ops].count("transpose") == 0  # (N, L', C) is the IR order: reshape is free
    int8_everywhere(g, x, tmp_path, cbuild)
