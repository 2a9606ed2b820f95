"""Normalization, reduction and attention ops (issue 10): mean / sum / amax / amin over any axes,
LayerNorm, GroupNorm, InstanceNorm, nn.MultiheadAttention and nn.TransformerEncoderLayer.

Reductions are ops of their own (MEAN over any axes, REDUCE_MIN); the int8 MEAN follows tflite-runtime's
reference kernel, checked over random shapes, axes and quantization parameters (hypothesis): reference ==
tflite-runtime (BUILTIN_REF), C (ASan + UBSan) == reference, export -> import gives the same outputs. The
norms and attention are lowered to ops TFLite has (as its converter does); each model: the float IR equals
PyTorch, the C equals the int8 reference, tflite-runtime and TFLite Micro run the export with the same outputs,
and the file imports back.
"""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from edgekit.errors import EdgekitError
from helpers import float_graph, tflite_run
from test_kernels_c import input_range
from hypothesis import settings
from test_kernels_c import EXAMPLES, SETTINGS
from test_ops_pointwise import _all_checks
from test_ops_structure import float_matches_torch, int8_everywhere

# ---------------------------------------------------------------------------
# reductions
# ---------------------------------------------------------------------------

FEWER = settings(SETTINGS, max_examples=max(4, EXAMPLES // 4))  # each example: export, tflite-runtime, gcc, run

REDUCE_CASES = [((1, 7), (1,)), ((1, 5, 6), (1,)), ((1, 5, 6), (2,)), ((1, 5, 6), (1, 2)),
                ((1, 3, 4, 5), (3,)), ((1, 3, 4, 5), (1,)), ((1, 3, 4, 5), (2, 3)), ((1, 3, 4, 5), (1, 3)),
                ((1, 3, 4, 5), (1, 2, 3)), ((1, 16, 2, 3), (1, 3)), ((1, 1, 9, 4), (2,))]


@given(st.sampled_from(REDUCE_CASES), input_range(), st.integers(0, 2 ** 31))
@FEWER
def test_reduce_mean_any_axes(cbuild, case, in_range, seed):
    shape, axes = case
    out = tuple(1 if a in axes else s for a, s in enumerate(shape))
    g = float_graph("reduce_mean", [shape], dict(axes=axes), None, out)
    _all_checks(g, np.random.default_rng(seed), cbuild, {"x0": in_range})


@given(st.sampled_from([c for c in REDUCE_CASES if c[1] != (1, 3)]), st.integers(0, 2 ** 31))
@settings(SETTINGS, max_examples=max(3, EXAMPLES // 8))  # an exact minimum: few cases show it
def test_reduce_min(cbuild, case, seed):
    shape, axes = case
    out = tuple(1 if a in axes else s for a, s in enumerate(shape))
    g = float_graph("reduce_min", [shape], dict(axes=axes), None, out)
    _all_checks(g, np.random.default_rng(seed), cbuild, {"x0": (-2.0, 1.0)})


def test_reduce_mean_shared_parameters(tmp_path, cbuild):
    """Input and output sharing parameters: tflite-runtime 2.14's MEAN with dims kept still requantizes
    (no truncating shortcut), and so do the reference and the C."""
    from edgekit import reference
    from edgekit.export.tflite import export_tflite
    from edgekit.passes.quantize import derive_kernel_params
    from helpers import c_matches_reference, quantize_with_random_data
    rng = np.random.default_rng(3)
    g = quantize_with_random_data(float_graph("reduce_mean", [(1, 4, 6)], dict(axes=(2,)), None, (1, 4, 1)), rng)
    g.tensors["y"].quant = g.tensors["x0"].quant
    derive_kernel_params(g)
    q = rng.integers(-128, 128, size=(40, 4, 6)).astype(np.int8)
    ref = reference.run(g, q)[0]
    got = tflite_run(export_tflite(g, tmp_path / "m.tflite", io="int8"), [q])[0]
    assert np.array_equal(got.reshape(ref.shape), ref)
    c_out, c_ref = c_matches_reference(g, tmp_path / "c", cbuild, {"x0": q})
    assert np.array_equal(c_out, c_ref)


class Reductions(nn.Module):
    """mean / sum / amax / amin over the channels, one spatial dim, the sequence axis, a feature axis, and
    dims that are not neighbours in the IR (amin over C and H of NCHW: one TRANSPOSE first)."""

    def forward(self, x):
        seq = x.flatten(2).transpose(1, 2)  # (N, H * W, C)
        return (x.mean(dim=1, keepdim=True), x.sum(dim=3), x.amin(dim=2), seq.mean(1), seq.sum(-1),
                seq.amax(1, keepdim=True), x.mean(dim=(1, 3)), x.amin(dim=(1, 2)))


def test_reductions_everywhere(tmp_path, cbuild):
    x = np.random.default_rng(11).normal(size=(24, 3, 5, 6)).astype(np.float32)
    g = float_matches_torch(Reductions(), x)
    kinds = [op.kind for op in g.ops]
    assert kinds.count("reduce_mean") == 4 and kinds.count("mean") == 1 and kinds.count("reduce_min") == 2 and kinds.count("mul") == 2
    int8_everywhere(g, x, tmp_path, cbuild)


def test_sum_in_tflite_is_refused_by_name(tmp_path, monkeypatch):
    """A .tflite with an int8 SUM is refused with the reason (tflite-runtime's int8 SUM casts without
    saturating); edgekit itself writes a sum as MEAN then MUL by the count."""
    import edgekit
    from edgekit.export import tflite as exporter
    from edgekit.frontends import tflite_schema as S
    from edgekit.frontends.tflite import load_tflite

    x = np.random.default_rng(1).normal(size=(8, 6, 4)).astype(np.float32)
    q = edgekit.quantize(float_matches_torch(SeqMean(), x), x)
    assert [op.kind for op in q.ops] == ["reduce_mean", "reshape"]
    real_op = exporter._Model.op

    def as_sum(self, code, *args, **kwargs):  # the same operator under SUM's code
        return real_op(self, S.SUM if code == S.MEAN else code, *args, **kwargs)

    monkeypatch.setattr(exporter._Model, "op", as_sum)
    path = edgekit.export_tflite(q, tmp_path / "m.tflite", io="int8")
    with pytest.raises(EdgekitError, match="int8 SUM is not supported"):
        load_tflite(path)


class SeqMean(nn.Module):
    def forward(self, x):
        return x.mean(-1)


# ---------------------------------------------------------------------------
# normalization
# ---------------------------------------------------------------------------

class Norms(nn.Module):
    """LayerNorm on a sequence's features and over (C, H, W), GroupNorm, InstanceNorm2d (affine) and
    InstanceNorm1d on an (N, C, L) signal."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.ln = nn.LayerNorm(8)
        self.ln_chw = nn.LayerNorm([8, 5, 6])
        self.gn = nn.GroupNorm(2, 8)
        self.inorm = nn.InstanceNorm2d(8, affine=True)
        self.inorm1d = nn.InstanceNorm1d(8)

    def forward(self, x):
        y = self.conv(x)
        seq = self.ln(y.flatten(2).transpose(1, 2))
        return seq, self.ln_chw(y), self.gn(y), self.inorm(y), self.inorm1d(y.flatten(2))


def _randomize(model, seed):
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) or (isinstance(m, nn.InstanceNorm2d) and m.affine):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return model


def test_norms_everywhere(tmp_path, cbuild):
    x = np.random.default_rng(12).normal(size=(24, 3, 5, 6)).astype(np.float32)
    g = float_matches_torch(_randomize(Norms(), 0), x, atol=1e-3)
    assert [op.kind for op in g.ops].count("rsqrt") == 5
    int8_everywhere(g, x, tmp_path, cbuild)


class NormsOneOutput(nn.Module):
    """GroupNorm, InstanceNorm, a channel mean, amin over dims that are not IR neighbours and a sum, summed
    into one output so TFLite Micro checks them too."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.inorm = nn.InstanceNorm2d(8)

    def forward(self, x):
        y = self.conv(x)
        return (self.gn(y) + self.inorm(y) + y.mean(1, keepdim=True) - y.amin(dim=(1, 2), keepdim=True)
                + y.sum(3, keepdim=True))


def test_norms_and_reductions_in_tflite_micro(tmp_path, cbuild):
    x = np.random.default_rng(17).normal(size=(24, 3, 5, 6)).astype(np.float32)
    g = float_matches_torch(_randomize(NormsOneOutput(), 6), x, atol=1e-3)
    int8_everywhere(g, x, tmp_path, cbuild)


class LayerNormOnly(nn.Module):
    def __init__(self, features: int = 16):
        super().__init__()
        self.fc = nn.Linear(6, features)
        self.ln = nn.LayerNorm(features)

    def forward(self, x):
        return self.ln(self.fc(x))


SHAPES = settings(SETTINGS, max_examples=max(3, EXAMPLES // 8))  # each example: a whole model everywhere


@given(st.integers(1, 6), st.integers(2, 12), st.integers(0, 2 ** 31))
@SHAPES
def test_layer_norm_shapes(cbuild, steps, features, seed):
    """LayerNorm over random sequence lengths and widths, with random weights: float == torch, int8 C ==
    reference == tflite-runtime == TFLite Micro, imported back."""
    import tempfile
    from pathlib import Path
    model = _randomize(LayerNormOnly(features), seed % 1000)
    x = np.random.default_rng(seed).normal(size=(16, steps, 6)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        int8_everywhere(float_matches_torch(model, x, atol=1e-3), x, Path(tmp), cbuild)


@given(st.integers(2, 6), st.sampled_from([1, 2, 3]), st.integers(2, 4), st.integers(0, 2 ** 31))
@SHAPES
def test_multihead_attention_shapes(cbuild, steps, heads, depth, seed):
    """nn.MultiheadAttention over random lengths, head counts and head widths."""
    import tempfile
    from pathlib import Path
    torch.manual_seed(seed % 1000)
    model = SelfAttention(heads * depth, heads)
    x = np.random.default_rng(seed).normal(size=(16, steps, 5)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        int8_everywhere(float_matches_torch(model, x, atol=1e-4), x, Path(tmp), cbuild)


class SelfAttention(nn.Module):
    def __init__(self, embed: int, heads: int):
        super().__init__()
        self.embed = nn.Linear(5, embed)
        self.attn = nn.MultiheadAttention(embed, heads, batch_first=True)

    def forward(self, x):
        e = self.embed(x)
        return self.attn(e, e, e, need_weights=False)[0]


def test_layer_norm_weight_only_refusal(tmp_path):
    """Weight-only mode refuses the lowered LayerNorm naming the layer (TFLite Micro runs it: the
    keyword transformer test below)."""
    import edgekit
    x = np.random.default_rng(13).normal(size=(24, 7, 6)).astype(np.float32)
    model = _randomize(LayerNormOnly(), 1)
    w = edgekit.quantize(model, x, weight_only=True)
    with pytest.raises(EdgekitError, match="layer 'ln'"):
        edgekit.generate(w, tmp_path / "wo", "host")


# ---------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------

class Attentions(nn.Module):
    """nn.MultiheadAttention with two heads as self-attention (weights returned and ignored) and as
    cross-attention (query from another projection, need_weights=False)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.self_attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.query = nn.Linear(6, 8)
        self.cross = nn.MultiheadAttention(8, 4, batch_first=True, bias=False)

    def forward(self, x):
        e = self.embed(x)
        a, _ = self.self_attn(e, e, e)
        c, _ = self.cross(self.query(x), a, a, need_weights=False)
        return c


def test_multihead_attention_everywhere(tmp_path, cbuild):
    torch.manual_seed(2)
    x = np.random.default_rng(14).normal(size=(24, 5, 6)).astype(np.float32)
    g = float_matches_torch(Attentions(), x, atol=1e-4)
    kinds = [op.kind for op in g.ops]
    assert kinds.count("batch_matmul") == 4 and kinds.count("softmax") == 2
    int8_everywhere(g, x, tmp_path, cbuild)


class CrossAttentionOtherWidths(nn.Module):
    """Keys and values of another width than the queries (kdim, vdim: separate q / k / v weights)."""

    def __init__(self):
        super().__init__()
        self.query = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, kdim=4, vdim=4)

    def forward(self, x):
        return self.attn(self.query(x), x, x, need_weights=False)[0]


def test_cross_attention_with_kdim_vdim_everywhere(tmp_path, cbuild):
    torch.manual_seed(6)
    x = np.random.default_rng(18).normal(size=(24, 5, 4)).astype(np.float32)
    g = float_matches_torch(CrossAttentionOtherWidths(), x, atol=1e-4)
    int8_everywhere(g, x, tmp_path, cbuild)


def test_transformer_encoder_layer_everywhere(tmp_path, cbuild):
    """nn.TransformerEncoder of two post-norm ReLU layers, in TFLite Micro too (one output). The pre-norm
    GELU layer is the zoo's keyword transformer (tests/test_zoo_transformer.py: tflite-runtime; TFLite Micro
    has no GELU kernel)."""
    torch.manual_seed(3)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=False,
                                       activation="relu")
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    model = _randomize(nn.Sequential(nn.Linear(4, 8), encoder), 4)
    x = np.random.default_rng(15).normal(size=(24, 6, 4)).astype(np.float32)
    g = float_matches_torch(model, x, atol=1e-3)
    int8_everywhere(g, x, tmp_path, cbuild)


def test_attention_refusals():
    """A sequence-first nn.MultiheadAttention and one with add_zero_attn (a zero key / value row the lowering
    does not add) are refused naming the layer."""
    import edgekit

    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    class ZeroAttn(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True, add_zero_attn=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    with pytest.raises(EdgekitError, match="layer 'attn'.*sequence-first"):
        edgekit.load(SeqFirst(), np.zeros((1, 5, 8), np.float32))
    with pytest.raises(EdgekitError, match="layer 'attn'.*add_zero_attn"):
        edgekit.load(ZeroAttn(), np.zeros((1, 5, 8), np.float32))


def test_keyword_transformer_structure_everywhere(tmp_path, cbuild):
    """The zoo's keyword transformer (ReLU variant, untrained weights): class token (a constant part of a
    concatenation), position embedding, pre-norm encoder, class-token head; in TFLite Micro too."""
    from zoo.kws_transformer import KeywordTransformer
    torch.manual_seed(5)
    model = _randomize(KeywordTransformer(steps=6, activation="relu"), 5)
    nn.init.normal_(model.cls_token, 0, 0.5)
    x = np.random.default_rng(16).normal(size=(24, 6, 8)).astype(np.float32)
    g = float_matches_torch(model, x, atol=1e-3)
    assert any(op.kind == "concat" and any(g.tensors[n].is_constant for n in op.inputs) for op in g.ops)
    int8_everywhere(g, x, tmp_path, cbuild)
