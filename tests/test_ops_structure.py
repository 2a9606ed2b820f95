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
    """Quantize ``model`` (a module or its float graph) on ``x``; the C (ASan + UBSan) equals the reference,
    the .tflite export equals it in tflite-runtime (BUILTIN_REF) and TFLite Micro (one-output models), and the
    file imports back to the same outputs.
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


def test_tflite_conv1d_as_keras_writes_it_imports_as_rank3(tmp_path):
    """A Conv1D in .tflite is RESHAPE (1, L, C) -> (1, 1, L, C), CONV_2D, RESHAPE back: the importer keeps
    the rank-3 tensors (free reshapes around the 2-D op) and computes what tflite-runtime does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 5, 3), nn.ReLU())
    x = np.random.default_rng(11).normal(size=(12, 3, 10)).astype(np.float32)
    q = edgekit.quantize(model, x)
    path = edgekit.export_tflite(q, tmp_path / "conv1d.tflite", io="int8")
    g = load_tflite(path)
    assert g.tensors[g.inputs[0]].shape == (1, 10, 3) and g.source_layouts[g.inputs[0]] == "NLC"
    assert [op.kind for op in g.ops] == ["reshape", "conv2d", "reshape"]
    assert g.tensors[g.outputs[0]].shape == (1, 8, 5)
    p = g.tensors[g.inputs[0]].quant
    x_q = qm.quantize(x.transpose(0, 2, 1), p.scale[0], p.zero_point[0])
    assert np.array_equal(reference.run(g, x_q)[0], tflite_run(path, [x_q])[0].reshape(12, 8, 5))


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


# ---------------------------------------------------------------------------
# transpose / split / slice one by one: random shapes and parameters, reference == TFLite == C
# ---------------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from edgekit.ir import Graph, Op, Tensor  # noqa: E402
from helpers import quantize_with_random_data  # noqa: E402

OP_SETTINGS = settings(max_examples=8, deadline=None, derandomize=True,
                       suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def one_op_graph(kind, in_shape, out_shapes, attrs) -> Graph:
    g = Graph()
    g.add_tensor(Tensor("x", tuple(in_shape)))
    g.inputs.append("x")
    g.source_layouts["x"] = "NHWC"
    outs = []
    for i, shape in enumerate(out_shapes):
        outs.append(f"y{i}")
        g.add_tensor(Tensor(outs[-1], tuple(shape)))
        g.outputs.append(outs[-1])
        g.source_layouts[outs[-1]] = "NHWC"
    g.ops.append(Op(kind, "op", ["x"], outs, dict(attrs)))
    return g


def check_op(g, seed, tmp_path, cbuild):
    """int8 graph of ``g``: reference == tflite-runtime (BUILTIN_REF) == the C kernel (ASan + UBSan) ==
    the re-imported .tflite."""
    rng = np.random.default_rng(seed)
    q = quantize_with_random_data(g, rng)
    x = rng.integers(-128, 128, size=(6,) + q.tensors["x"].shape[1:]).astype(np.int8)
    ref = reference.run(q, x)
    path = edgekit.export_tflite(q, tmp_path / "op.tflite", io="int8")
    for got, want in zip(tflite_run(path, [x]), ref):
        assert np.array_equal(got.reshape(want.shape), want), "TFLite differs from the reference"
    for got, want in zip(reference.run(load_tflite(path), x), ref):
        assert np.array_equal(got.reshape(want.shape), want), "the imported .tflite differs"
    got, want = c_matches_reference(q, tmp_path / "c", cbuild, {"x": x})
    assert np.array_equal(got, want), "C differs from the reference"


ranks = st.lists(st.integers(1, 5), min_size=2, max_size=3).map(lambda s: [1] + s)  # model inputs: rank 3 or 4


@given(ranks, st.randoms(use_true_random=False), st.integers(0, 2 ** 31))
@OP_SETTINGS
def test_transpose_s8(tmp_path_factory, cbuild, shape, r, seed):
    rest = list(range(1, len(shape)))
    r.shuffle(rest)
    perm = [0] + rest
    g = one_op_graph("transpose", shape, [[shape[p] for p in perm]], dict(perm=tuple(perm)))
    check_op(g, seed, tmp_path_factory.mktemp("t"), cbuild)


@given(ranks, st.integers(1, 3), st.integers(2, 3), st.booleans(), st.integers(0, 2 ** 31))
@OP_SETTINGS
def test_split_s8(tmp_path_factory, cbuild, shape, axis_pick, pieces, equal, seed):
    axis = 1 + axis_pick % (len(shape) - 1)
    rng = np.random.default_rng(seed)
    sizes = [int(s) for s in (np.full(pieces, 2) if equal else rng.integers(1, 4, pieces))]
    shape = list(shape)
    shape[axis] = sum(sizes)
    outs = [shape[:axis] + [s] + shape[axis + 1:] for s in sizes]
    check_op(one_op_graph("split", shape, outs, dict(axis=axis)), seed, tmp_path_factory.mktemp("s"), cbuild)


@given(ranks, st.integers(0, 2 ** 31))
@OP_SETTINGS
def test_strided_slice_s8(tmp_path_factory, cbuild, shape, seed):
    rng = np.random.default_rng(seed)
    shape = [1] + [s + 2 for s in shape[1:]]
    begin, end, strides, out = [0], [1], [1], [1]
    for size in shape[1:]:
        b = int(rng.integers(0, size))
        e = int(rng.integers(b + 1, size + 1))
        s = int(rng.integers(1, 3))
        begin.append(b)
        end.append(e)
        strides.append(s)
        out.append(-(-(e - b) // s))
    g = one_op_graph("slice", shape, [out], dict(begin=tuple(begin), end=tuple(end), strides=tuple(strides)))
    check_op(g, seed, tmp_path_factory.mktemp("sl"), cbuild)


# ---------------------------------------------------------------------------
# the everyday structure ops through PyTorch
# ---------------------------------------------------------------------------

class StructureZoo(nn.Module):
    """grouped Conv1d, MaxPool1d / AvgPool1d, chunk, Linear on (N, L, C), softmax over L, mean(-1),
    x[:, a:b:s], x[:, :, -1], AdaptiveAvgPool1d(1)."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv1d(4, 8, 3, padding=1, groups=2)
        self.mp = nn.MaxPool1d(3, 2, 1)
        self.ap = nn.AvgPool1d(2)
        self.gap = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.ap(self.mp(torch.relu(self.c(x))))  # (N, 8, 4)
        a, b = torch.chunk(y, 2, dim=1)
        z = self.fc(a.permute(0, 2, 1))  # (N, 4, 3): every time step
        return torch.softmax(z, dim=1), y.mean(-1), y[:, 1:7:2], y[:, :, -1], self.gap(b)


class Pools2d(nn.Module):
    """grouped Conv2d, AdaptiveAvg/MaxPool2d to sizes that do not divide the input, amax over H, W."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(4, 6, 3, groups=2)
        self.a = nn.AdaptiveAvgPool2d((3, 1))  # 7 -> 3: bins of 3 at stride 2; 7 -> 1: global
        self.m = nn.AdaptiveMaxPool2d(3)

    def forward(self, x):
        y = self.c(x)  # (N, 6, 7, 7)
        return self.a(y), self.m(y), y.amax(dim=(2, 3))


@pytest.mark.parametrize("make,shape", [(StructureZoo, (40, 4, 16)), (Pools2d, (40, 4, 9, 9))])
def test_structure_ops_everywhere(make, shape, tmp_path, cbuild):
    torch.manual_seed(0)
    x = np.random.default_rng(4).normal(size=shape).astype(np.float32)
    g = float_matches_torch(make(), x)
    int8_everywhere(g, x, tmp_path, cbuild)


class UnevenAdaptivePools(nn.Module):
    """Adaptive pools whose bins differ in size (8 -> 3: bins of 3, 4, 3; 9 -> 5: 2, 3, 2, 2, 2; 3 -> 4:
    overlapping bins), 2-d and 1-d: lowered to slices + pools + concat."""

    def __init__(self):
        super().__init__()
        self.a = nn.AdaptiveAvgPool2d((3, 5))
        self.m = nn.AdaptiveMaxPool2d((4, 3))
        self.a1 = nn.AdaptiveAvgPool1d(5)
        self.m1 = nn.AdaptiveMaxPool1d(3)

    def forward(self, x):  # (N, 3, 8, 9)
        return self.a(x), self.m(x[:, :, :3]), self.a1(x[:, :, 0]), self.m1(x[:, :, :, 1])


def test_uneven_adaptive_bins_everywhere(tmp_path, cbuild):
    torch.manual_seed(0)
    x = np.random.default_rng(5).normal(size=(24, 3, 8, 9)).astype(np.float32)
    g = float_matches_torch(UnevenAdaptivePools(), x)
    assert {"slice", "concat"} <= {op.kind for op in g.ops}
    int8_everywhere(g, x, tmp_path, cbuild)


@given(st.integers(1, 24), st.integers(1, 24))
@settings(max_examples=60, deadline=None, derandomize=True)
def test_adaptive_runs_are_torchs_bins(n, o):
    """Every (size, output) pair: the runs the frontend pools are exactly torch's bins, in order."""
    from edgekit.frontends.pytorch import _adaptive_runs
    bins = [(start + k * step, start + k * step + size) for start, size, step, count in _adaptive_runs(n, o)
            for k in range(count)]
    assert bins == [(i * n // o, -(-(i + 1) * n // o)) for i in range(o)]


@given(st.integers(2, 40), st.integers(1, 3), st.floats(0.05, 8.0), st.integers(0, 2 ** 31))
@OP_SETTINGS
def test_log_softmax_s8(tmp_path_factory, cbuild, depth, rows, spread, seed):
    shape = [1, rows, depth] if rows > 1 else [1, depth]
    g = one_op_graph("log_softmax", shape, [shape], {})
    rng = np.random.default_rng(seed)
    q = quantize_with_random_data(g, rng, {"x": (-spread, spread)})
    x = rng.integers(-128, 128, size=(8,) + q.tensors["x"].shape[1:]).astype(np.int8)
    ref = reference.run(q, x)[0]
    tmp = tmp_path_factory.mktemp("ls")
    path = edgekit.export_tflite(q, tmp / "op.tflite", io="int8")
    assert np.array_equal(tflite_run(path, [x])[0].reshape(ref.shape), ref), "TFLite differs from the reference"
    assert np.array_equal(reference.run(load_tflite(path), x)[0], ref)
    got, want = c_matches_reference(q, tmp / "c", cbuild, {"x": x})
    assert np.array_equal(got, want), "C differs from the reference"


class Upsampling(nn.Module):
    """nn.Upsample(nearest) x2, F.interpolate to a size (non-integer factor), nearest-exact, on 1-D too;
    concatenated with a skip connection as U-Net / YOLO necks do."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")

    def forward(self, x):
        y = self.down(x)  # (N, 4, 4, 4)
        joined = torch.cat([self.up(y), x], dim=1)  # (N, 7, 8, 8)
        odd = nn.functional.interpolate(y, size=(7, 5), mode="nearest")
        exact = nn.functional.interpolate(y, size=(6, 6), mode="nearest-exact")
        line = nn.functional.interpolate(y.flatten(2), scale_factor=3, mode="nearest")  # (N, 4, 48)
        return joined, odd, exact, line


def test_upsample_nearest_everywhere(tmp_path, cbuild):
    torch.manual_seed(0)
    x = np.random.default_rng(5).normal(size=(24, 3, 8, 8)).astype(np.float32)
    g = float_matches_torch(Upsampling(), x)
    assert [op.kind for op in g.ops].count("resize_nearest") == 4
    int8_everywhere(g, x, tmp_path, cbuild)


class Decoder(nn.Module):
    """ConvTranspose2d as U-Net decoders use it (2x2 stride 2), a 3x3 stride 2 with padding 1 and
    output_padding 1 (no TFLite padding: exported as the full output + STRIDED_SLICE), and a skip concat."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.up2 = nn.ConvTranspose2d(6, 4, 2, stride=2)
        self.up3 = nn.ConvTranspose2d(6, 5, 3, stride=2, padding=1, output_padding=1)

    def forward(self, x):
        y = torch.relu(self.down(x))
        return torch.cat([self.up2(y), x], dim=1), self.up3(y)


def test_conv_transpose_everywhere(tmp_path, cbuild):
    torch.manual_seed(0)
    x = np.random.default_rng(6).normal(size=(24, 3, 8, 8)).astype(np.float32)
    g = float_matches_torch(Decoder(), x)
    assert [op.kind for op in g.ops].count("transpose_conv2d") == 2
    int8_everywhere(g, x, tmp_path, cbuild)


class Bilinear(nn.Module):
    """Upsample bilinear (align_corners False: half-pixel centres; True), x2 and to an odd size."""

    def forward(self, x):
        up = nn.functional.interpolate
        return (up(x, scale_factor=2, mode="bilinear", align_corners=False),
                up(x, size=(7, 9), mode="bilinear", align_corners=True),
                up(x, size=(5, 3), mode="bilinear", align_corners=False))


def test_upsample_bilinear_everywhere(tmp_path, cbuild):
    x = np.random.default_rng(8).normal(size=(24, 3, 4, 6)).astype(np.float32)
    g = float_matches_torch(Bilinear(), x)
    assert [op.kind for op in g.ops].count("resize_bilinear") == 3
    q = int8_everywhere(g, x, tmp_path, cbuild)
    # the int8 interpolation stays within a few steps of torch's float one (TFLite's 1/1024 weights)
    with torch.no_grad():
        wants = Bilinear()(torch.as_tensor(x))
    for name, y_q, want in zip(q.outputs, edgekit.reference_run(q, x), wants):
        assert np.abs(y_q - want.numpy()).max() <= 3 * q.tensors[name].quant.scale[0]


class EdgePads(nn.Module):
    """ReflectionPad2d / ReplicationPad2d / F.pad(reflect | replicate) on images and (N, C, L) signals."""

    def __init__(self):
        super().__init__()
        self.reflect = nn.ReflectionPad2d((2, 1, 1, 2))
        self.replicate = nn.ReplicationPad2d(1)
        self.c = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.c(self.reflect(x))
        line = nn.functional.pad(y.flatten(2), (3, 2), mode="replicate")
        return self.replicate(y), nn.functional.pad(x, (1, 1, 1, 1), mode="reflect"), line


def test_reflect_and_replicate_padding_everywhere(tmp_path, cbuild):
    torch.manual_seed(0)
    x = np.random.default_rng(9).normal(size=(24, 3, 5, 6)).astype(np.float32)
    g = float_matches_torch(EdgePads(), x)
    int8_everywhere(g, x, tmp_path, cbuild)


class Maxes(nn.Module):
    """amax over the channels (CBAM-style spatial attention), over one spatial dim, over an (N, L, C)
    sequence's features."""

    def forward(self, x):
        seq = x.flatten(2).transpose(1, 2)  # (N, H * W, C)
        return x.amax(dim=1, keepdim=True), x.amax(dim=3), seq.amax(-1)


def test_reduce_max_everywhere(tmp_path, cbuild):
    x = np.random.default_rng(10).normal(size=(24, 3, 5, 6)).astype(np.float32)
    g = float_matches_torch(Maxes(), x)
    assert [op.kind for op in g.ops].count("reduce_max") == 3
    int8_everywhere(g, x, tmp_path, cbuild)


# ---------------------------------------------------------------------------
# weight-only mode (int8 weights, float activations)
# ---------------------------------------------------------------------------

class WeightOnlyStructure(nn.Module):
    """The structure ops the weight-only (float) kernels run: grouped conv (split / concat), chunk, channel
    shuffle (transpose), a strided slice, reflect padding (slices + concat), max / avg pooling, an uneven
    adaptive pool (slices + pools + concat), nearest upsample, amax over the channels (REDUCE_MAX), the mean,
    Linear and softmax."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1, groups=1)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.pad = nn.ReflectionPad2d(1)
        self.a = nn.AdaptiveAvgPool2d((3, 2))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.fc = nn.Linear(4, 3)

    def forward(self, x):  # (N, 3, 8, 8)
        y = torch.relu(self.g(self.c(x)))
        a, b = y.chunk(2, dim=1)
        s = torch.cat([a, b[:, 1::2]], 1)  # 6 channels
        n, c, h, w = s.shape
        s = s.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)  # channel shuffle
        p = nn.functional.max_pool2d(self.pad(s), 2)  # (N, 6, 5, 5)
        q = nn.functional.avg_pool2d(p, 2, 1)  # (N, 6, 4, 4)
        return (self.a(p), self.up(q), q.amax(dim=1, keepdim=True),
                torch.softmax(self.fc(a.mean(dim=(2, 3))), dim=1))


def test_weight_only_structure_ops(tmp_path, cbuild):
    torch.manual_seed(0)
    x = np.random.default_rng(6).normal(size=(16, 3, 8, 8)).astype(np.float32)
    g = float_matches_torch(WeightOnlyStructure(), x)
    w = edgekit.quantize(g, x, weight_only=True)
    assert {"split", "transpose", "slice", "concat", "max_pool2d", "avg_pool2d", "resize_nearest", "reduce_max",
            "mean", "softmax"} <= {op.kind for op in w.ops}
    x_ir = edgekit.api.to_ir_inputs(w, x[:4])
    got, ref = c_matches_reference(w, tmp_path / "w", cbuild, {w.inputs[0]: x_ir})
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer,module,what", [
    ("1", nn.ConvTranspose2d(3, 3, 2, stride=2), "ConvTranspose2d has no weight-only"),
    ("1", nn.Upsample(scale_factor=2, mode="bilinear"), "bilinear resize has no weight-only"),
    ("1", nn.LogSoftmax(dim=1), "log_softmax has no weight-only"),
])
def test_weight_only_refuses_the_rest_naming_the_layer(layer, module, what, tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 3, 1), module)
    x = np.random.default_rng(7).normal(size=(4, 3, 4, 4)).astype(np.float32)
    w = edgekit.quantize(model, x, weight_only=True)
    with pytest.raises(edgekit.EdgekitError, match=rf"layer '{layer}': {what}"):
        edgekit.generate(w, tmp_path / "w", board="host")
