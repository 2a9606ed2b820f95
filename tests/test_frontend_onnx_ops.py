"""Single ops through ONNX: each small model exercises ONNX ops the zoo does not (or not in that form),
and torch -> ONNX -> edgekit must be the graph torch -> edgekit makes, with identical float outputs and
identical int8 outputs (the same calibration gives the same parameters). A few hand-written ONNX graphs
cover what torch does not export (uneven pads from SAME_UPPER, a Resize with sizes, opset 11 Clip)."""
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import edgekit
from edgekit import quant_math
from edgekit.passes.fuse import prepare_float
from test_frontend_onnx import _float_out, _onnx_model, _signature, export
from test_ops_norm_attn import Attentions, CrossAttentionOtherWidths

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


class Arith(nn.Module):
    """Sub / Mul / Div with constants and broadcasting, (x - y) ** 2, rsqrt, clamp to any bounds."""

    def __init__(self):
        super().__init__()
        self.shift = nn.Parameter(torch.linspace(-1, 1, 4).reshape(1, 4, 1, 1))
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = x - self.shift
        gate = y.mean(dim=(2, 3), keepdim=True)
        z = (y * gate) / 3 + torch.rsqrt(x * x + 1)
        return torch.clamp(self.conv(z), -1.5, 2.0) + (x - y) ** 2


class Activations(nn.Module):
    def __init__(self):
        super().__init__()
        self.prelu = nn.PReLU(4)
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 1) for _ in range(4))

    def forward(self, x):
        a = F.elu(self.convs[0](x)) + F.leaky_relu(x, 0.2)
        b = F.gelu(self.convs[1](a)) * torch.sigmoid(a) + F.gelu(a, approximate="tanh")
        c = self.prelu(self.convs[2](b)) + F.hardsigmoid(b) * torch.tanh(b)
        return F.hardswish(self.convs[3](c)) + F.silu(c) + F.relu6(c)


class Structure(nn.Module):
    """Grouped and uneven-'same' convolutions, a transposed convolution, bilinear resizes, reflect and
    replicate padding, a split with sizes, a slice, amax over the channels, softmax over the channels."""

    def __init__(self):
        super().__init__()
        self.grouped = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.same = nn.Conv2d(8, 8, 4, padding="same")
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)

    def forward(self, x):
        y = self.same(F.pad(self.grouped(x), (1, 1, 1, 1), mode="reflect")[:, :, 1:-1, 1:-1])
        a, b = torch.split(y, [3, 5], dim=1)
        a = F.interpolate(F.pad(a, (1, 0, 2, 1), mode="replicate"), size=(8, 8), mode="bilinear")
        b = F.interpolate(b, scale_factor=2, mode="bilinear", align_corners=True)
        m = torch.amax(b, dim=1, keepdim=True)
        return torch.cat([a, b[:, 1:4], self.up(y), m], 1).softmax(dim=1)


class Signal(nn.Module):
    """1-D: uneven pooling pads, average pooling, nearest upsampling of an (N, C, L) signal, a log-softmax."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 6, 3, padding=1)
        self.pool = nn.MaxPool1d(3, stride=2, padding=1)
        self.avg = nn.AvgPool1d(2)
        self.up = nn.Upsample(scale_factor=2)
        self.fc = nn.Linear(6 * 8, 5)

    def forward(self, x):
        y = self.up(self.avg(self.pool(torch.relu(self.conv(x)))))
        return F.log_softmax(self.fc(y.flatten(1)), dim=-1)


class Sequence(nn.Module):
    """A two-layer LSTM returning the whole sequence, a Linear on (N, L, C), attention-like products
    between activations (bmm with a transposed operand), softmax over the last axis, x[:, 0]."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(6, 8, num_layers=2, batch_first=True)
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        y, _ = self.lstm(x)
        q = self.proj(y)
        att = torch.softmax(torch.bmm(q, y.transpose(1, 2)), dim=-1)
        return torch.bmm(att, y)[:, 0] + y.permute(0, 2, 1).mean(-1)


class Norms(nn.Module):
    """GroupNorm (torch exports it as Reshape -> InstanceNormalization -> Reshape -> Mul -> Add before opset
    18), InstanceNorm2d, GroupNorm(affine=False), LayerNorm over the last dim, sum and amin over channels."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.gn, self.inn = nn.GroupNorm(2, 8), nn.InstanceNorm2d(8, affine=True)
        self.plain, self.ln = nn.GroupNorm(4, 8, affine=False), nn.LayerNorm(6)
        for m in (self.gn, self.inn, self.ln):
            nn.init.normal_(m.weight, 1.0, 0.3)
            nn.init.normal_(m.bias, 0.0, 0.3)

    def forward(self, x):
        y = self.plain(self.inn(self.gn(self.conv(x))))
        return self.ln(y) + y.sum(1, keepdim=True) - torch.amin(y, dim=1, keepdim=True)


class SequenceNorm(nn.Module):
    """LayerNormalization on (N, L, C) after a Linear, ReduceSum over the features."""

    def __init__(self):
        super().__init__()
        self.fc, self.ln = nn.Linear(6, 8), nn.LayerNorm(8)

    def forward(self, x):
        return self.ln(self.fc(x)).sum(-1)


class Encoder(nn.Module):
    """nn.TransformerEncoder of two post-norm ReLU layers (batch_first) after a Linear embedding."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, activation="relu")
        self.embed = nn.Linear(4, 8)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, x):
        return self.encoder(self.embed(x))


class RecurrentPooling(nn.Module):
    """A submodule holding an LSTM (time-major inside the export: a batch-moving Transpose) and a softmax
    attention pooling over its steps: not a MultiheadAttention block, converted op by op."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(6, 8, batch_first=True)
        self.score = nn.Linear(8, 1)

    def forward(self, x):
        y, _ = self.lstm(x)
        w = torch.softmax(self.score(y), dim=1)
        return torch.bmm(y.transpose(1, 2), w)[:, :, 0]


class PooledSequence(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = RecurrentPooling()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.pool(x))


MODELS = {
    "recurrent_pooling": (PooledSequence, (5, 6)),
    # exported nn.MultiheadAttention is sequence first inside: recognised as a whole (self attention with its
    # weights returned and ignored, cross attention with a packed k|v, separate q / k / v with kdim / vdim)
    "attentions": (Attentions, (5, 6)),
    "cross_attention_kdim": (CrossAttentionOtherWidths, (5, 4)),
    "transformer_encoder": (Encoder, (6, 4)),
    "norms": (Norms, (4, 6, 6)),
    "sequence_norm": (SequenceNorm, (5, 6)),
    "arith": (Arith, (4, 6, 6)),
    "activations": (Activations, (4, 5, 5)),
    "structure": (Structure, (4, 4, 4)),
    "signal": (Signal, (3, 16)),
    "sequence": (Sequence, (5, 6)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_op_through_onnx_is_the_same_graph(name, tmp_path):
    torch.manual_seed(0)
    model = MODELS[name][0]().eval()
    x = np.random.default_rng(0).normal(size=(8,) + MODELS[name][1]).astype(np.float32)
    path = export(model, x, tmp_path / f"{name}.onnx", fold=False)
    a, b = prepare_float(edgekit.load(path)), prepare_float(edgekit.load(model, x[:1]))
    assert _signature(a) == _signature(b)
    for op_a, op_b in zip(a.ops, b.ops):
        for ta, tb in zip(op_a.inputs, op_b.inputs):
            if a.tensors[ta].is_constant:
                np.testing.assert_allclose(a.tensors[ta].data, b.tensors[tb].data, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        want = model(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(_float_out(a, x), want, rtol=1e-4, atol=1e-4)
    qa, qb = edgekit.quantize(path, x), edgekit.quantize(model, x)
    ya, yb = (_int8(q, x) for q in (qa, qb))
    assert np.array_equal(ya, yb)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = sess.get_inputs()[0].name
    np.testing.assert_allclose(np.concatenate([sess.run(None, {feed: x[i:i + 1]})[0] for i in range(2)]), want[:2],
                               rtol=1e-4, atol=1e-4)


class SequenceFirstAttention(nn.Module):
    """nn.MultiheadAttention(batch_first=False) between the model's own transposes (N, L, E) <-> (L, N, E)."""

    def __init__(self, batch_first=False, mask=False):
        super().__init__()
        self.batch_first, self.mask = batch_first, mask
        self.embed = nn.Linear(6, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)

    def forward(self, x):
        e = self.embed(x)
        e = e if self.batch_first else e.transpose(0, 1)
        mask = torch.triu(torch.full((5, 5), float("-inf")), 1) if self.mask else None
        y = self.attn(e, e, e, need_weights=False, attn_mask=mask)[0]
        return y if self.batch_first else y.transpose(0, 1)


def test_sequence_first_attention_is_the_batch_first_graph(tmp_path):
    """torch refuses nothing here but edgekit's PyTorch frontend does (a sequence-first module); through ONNX
    the block reads and writes the (L, 1, E) tensors as relabelled views of the (1, L, E) ones: the graph and
    the int8 outputs of the same weights in a batch_first=True module."""
    torch.manual_seed(0)
    seq, bf = SequenceFirstAttention().eval(), SequenceFirstAttention(batch_first=True).eval()
    bf.load_state_dict(seq.state_dict())
    x = np.random.default_rng(0).normal(size=(8, 5, 6)).astype(np.float32)
    path = export(seq, x, tmp_path / "seq.onnx", fold=False)
    a, b = prepare_float(edgekit.load(path)), prepare_float(edgekit.load(bf, x[:1]))
    assert _signature(a) == _signature(b)
    with torch.no_grad():
        np.testing.assert_allclose(_float_out(a, x), seq(torch.as_tensor(x)).numpy(), rtol=1e-4, atol=1e-4)
    assert np.array_equal(_int8(edgekit.quantize(path, x), x), _int8(edgekit.quantize(bf, x), x))


def test_attention_refusals(tmp_path):
    """A masked attention is refused as a whole (the block is run against the plain formula); a
    sequence-first TransformerEncoderLayer reads the (L, N, E) tensor with ops that keep the batch first."""
    from edgekit.errors import EdgekitError

    x = np.random.default_rng(0).normal(size=(2, 5, 6)).astype(np.float32)
    path = export(SequenceFirstAttention(batch_first=True, mask=True), x, tmp_path / "mask.onnx", fold=False)
    with pytest.raises(EdgekitError, match=r"'/attn/MultiHeadAttention' \(MultiHeadAttention\): an attention block "
                                           "that is not a plain multi-head attention"):
        edgekit.load(path)

    class SequenceFirstEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(6, 8)
            self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)

        def forward(self, x):
            return self.layer(self.embed(x).transpose(0, 1)).transpose(0, 1)

    path = export(SequenceFirstEncoder(), x, tmp_path / "encoder.onnx", fold=False)
    with pytest.raises(EdgekitError, match=r"moves the batch dimension .*not by \['Add'\]"):
        edgekit.load(path)


def _int8(q, x):
    p = q.tensors[q.inputs[0]].quant
    return edgekit.reference_run(q, quant_math.quantize(edgekit.api.to_ir_inputs(q, x), p.scale[0], p.zero_point[0]),
                                 int8=True)


def test_hand_written_graphs_against_onnxruntime(tmp_path):
    """What torch does not export: SAME_UPPER pads (uneven), opset 11 Clip with a missing max, a Resize given
    sizes, Squeeze / Unsqueeze with axes inputs, a Gather of consecutive indices, a GlobalMaxPool."""
    from onnx import helper

    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3, 2, 2)).astype(np.float32)
    model = _onnx_model([
        helper.make_node("Conv", ["x", "w"], ["c"], auto_pad="SAME_UPPER", strides=[2, 2], name="/conv/Conv"),
        helper.make_node("Clip", ["c", "lo", ""], ["r"], name="/act/Clip"),
        helper.make_node("Resize", ["r", "", "", "sizes"], ["u"], mode="nearest", nearest_mode="floor",
                         coordinate_transformation_mode="asymmetric", name="/up/Resize"),
        helper.make_node("GlobalMaxPool", ["u"], ["g"], name="/gmp/GlobalMaxPool"),
        helper.make_node("Squeeze", ["g", "axes"], ["s"], name="/sq/Squeeze"),
        helper.make_node("Gather", ["s", "idx"], ["t"], axis=1, name="/take/Gather"),
        helper.make_node("Unsqueeze", ["t", "axes"], ["y"], name="/unsq/Unsqueeze")],
        [("x", [1, 3, 7, 7])], ["y"],
        [("w", w), ("lo", np.float32(0.0)), ("sizes", np.array([1, 4, 8, 8], np.int64)),
         ("axes", np.array([2, 3], np.int64)), ("idx", np.array([1, 2], np.int64))], opset=13)
    for t in model.graph.initializer:  # integer initializers keep their type
        if t.name in ("sizes", "axes", "idx"):
            t.CopyFrom(onnx.numpy_helper.from_array(dict(sizes=np.array([1, 4, 8, 8], np.int64),
                                                         axes=np.array([2, 3], np.int64),
                                                         idx=np.array([1, 2], np.int64))[t.name], t.name))
    onnx.save(model, tmp_path / "m.onnx")
    g = edgekit.load(tmp_path / "m.onnx")
    kinds = [op.kind for op in g.ops]
    assert kinds[:3] == ["conv2d", "relu", "resize_nearest"] and "slice" in kinds
    assert g.ops[0].attrs["padding"] == (0, 1, 0, 1)  # SAME_UPPER: the extra row and column at the end
    x = rng.normal(size=(6, 3, 7, 7)).astype(np.float32)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    want = np.concatenate([sess.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])
    np.testing.assert_allclose(_float_out(g, x).reshape(want.shape), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("opset", [18, 21])
def test_group_normalization_node_against_onnxruntime(opset, tmp_path):
    """A GroupNormalization node as other exporters write it (torch never does): opset 18's scale and bias
    per group, opset 21's per channel."""
    from onnx import helper

    rng = np.random.default_rng(0)
    per = 2 if opset == 18 else 6  # 6 channels in 2 groups
    model = _onnx_model([helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=2, epsilon=1e-5,
                                          name="/gn/GroupNormalization")], [("x", [1, 6, 4, 5])], ["y"],
                        [("s", rng.normal(1, 0.3, per)), ("b", rng.normal(0, 0.3, per))], opset=opset)
    onnx.save(model, tmp_path / "gn.onnx")
    g = edgekit.load(tmp_path / "gn.onnx")
    x = rng.normal(size=(4, 6, 4, 5)).astype(np.float32)
    sess = ort.InferenceSession(str(tmp_path / "gn.onnx"), providers=["CPUExecutionProvider"])
    want = np.concatenate([sess.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])
    np.testing.assert_allclose(_float_out(g, x), want, rtol=1e-4, atol=1e-4)


def test_nhwc_input_of_a_tensorflow_style_export_needs_no_transpose(tmp_path):
    """tf2onnx-style graphs take NHWC and transpose to NCHW for the Conv: edgekit keeps the input NHWC, so
    the transposes are relabellings and no TRANSPOSE op runs; outputs equal onnxruntime's."""
    from onnx import helper

    rng = np.random.default_rng(0)
    model = _onnx_model([helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2], name="/in/Transpose"),
                         helper.make_node("Conv", ["t", "w"], ["c"], pads=[1, 1, 1, 1], name="/conv/Conv"),
                         helper.make_node("Relu", ["c"], ["r"], name="/act/Relu"),
                         helper.make_node("Transpose", ["r"], ["y"], perm=[0, 2, 3, 1], name="/out/Transpose")],
                        [("x", [1, 6, 6, 3])], ["y"], [("w", rng.normal(size=(4, 3, 3, 3)))])
    onnx.save(model, tmp_path / "nhwc.onnx")
    g = edgekit.load(tmp_path / "nhwc.onnx")
    assert [op.kind for op in g.ops] == ["conv2d", "relu"]
    assert g.source_layouts[g.inputs[0]] == "NHWC" and g.source_layouts[g.outputs[0]] == "NHWC"
    x = rng.normal(size=(3, 6, 6, 3)).astype(np.float32)
    sess = ort.InferenceSession(str(tmp_path / "nhwc.onnx"), providers=["CPUExecutionProvider"])
    want = np.concatenate([sess.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])
    np.testing.assert_allclose(edgekit.reference_run(g, x), want, rtol=1e-5, atol=1e-5)
