"""ONNX -> IR: torch -> ONNX -> edgekit is the graph torch -> edgekit makes, with the same outputs;
onnxruntime's float outputs are within the usual int8 error of edgekit's; a QDQ model's own scales and
zero points are the ones edgekit runs; what cannot be converted is listed in one error."""
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import edgekit
from edgekit import cli, models, quant_math, reference
from edgekit.errors import EdgekitError
from edgekit.layout import from_ir, to_ir
from edgekit.passes.fuse import prepare_float

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def export(model, sample, path, fold=True):
    """torch -> ONNX with the TorchScript exporter, opset 17 (the dynamo one needs onnxscript, not installed
    here). ``fold=False``: the exporter leaves BatchNorm to edgekit instead of folding it into the
    convolutions in float32 itself (which moves a weight or a calibrated range by an ulp)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.as_tensor(sample[:1]),), str(path), dynamo=False, opset_version=17,
                          do_constant_folding=fold)
    return path


def _float_out(graph, x):
    name = graph.inputs[0]
    y = reference.run(graph, to_ir(x, graph.source_layouts[name], graph.tensors[name].shape[1:]))[0]
    return from_ir(y, graph.source_layouts[graph.outputs[0]])


def _int8_out(q, x):
    """The raw int8 outputs of an int8 graph on float inputs."""
    name = q.inputs[0]
    p = q.tensors[name].quant
    xq = quant_math.quantize(to_ir(x, q.source_layouts[name], q.tensors[name].shape[1:]), p.scale[0], p.zero_point[0])
    return reference.run(q, xq)[0].reshape(len(x), -1)


class OpZoo(nn.Module):
    """The ONNX ops the frontend maps that the demo models do not export: Pad, AveragePool and MaxPool
    with padding and ceil_mode (count_include_pad=False), a BatchNormalization with no conv before it,
    Clip (ReLU6), Concat, Reshape through Shape / Gather (x.view(x.size(0), -1)), Dropout, Softmax."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.avg = nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)
        self.max = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.fc = nn.Linear(16 * 3 * 4, 6)
        self.drop = nn.Dropout(0.2)

    def forward(self, x):
        x = F.relu6(self.conv(F.pad(self.bn(x), (1, 2, 0, 1))))
        x = torch.cat([self.avg(x), self.max(x)], 1)
        x = self.drop(x.view(x.size(0), -1))
        return torch.softmax(self.fc(x), dim=1)


def _randomise_bn(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g) * 0.3 + 1)
    return model


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 8, 5, stride=2, padding=2)
        self.c2 = nn.Conv1d(8, 8, 3, dilation=2, groups=8)
        self.fc = nn.Linear(8 * 4, 5)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.c2(torch.relu(self.c1(x)))), 1))


def _random_models():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    return {
        "opzoo": (_randomise_bn(OpZoo()), rng.normal(size=(32, 3, 10, 10)).astype(np.float32)),
        "ds_cnn_kws": (_randomise_bn(models.ds_cnn_kws(filters=16)), rng.normal(size=(32, 1, 49, 10)).astype(np.float32)),
        "conv1d": (Conv1dNet(), rng.normal(size=(32, 3, 16)).astype(np.float32)),
    }


@pytest.fixture(scope="module")
def test_models(trained_mlp, trained_cnn, trained_rescnn, digits, digits_flat):
    found = {"mlp": (trained_mlp, digits_flat.x_test[:64]), "cnn": (trained_cnn, digits.x_test[:64]),
             "rescnn": (trained_rescnn, digits.x_test[:64])}
    found.update(_random_models())
    return found


MODELS = ["mlp", "cnn", "rescnn", "opzoo", "ds_cnn_kws", "conv1d"]


def _signature(graph):
    """Ops, output shapes and attributes."""
    return [(op.kind, tuple(graph.tensors[op.outputs[0]].shape), dict(op.attrs)) for op in graph.ops]


WEIGHTED = ("conv2d", "depthwise_conv2d", "transpose_conv2d", "fully_connected", "lstm")


def assert_same_graph(a, b):
    """The same ops, shapes and attributes; weighted layers keep their module names; the same constants."""
    assert _signature(a) == _signature(b)
    assert [op.name for op in a.ops if op.kind in WEIGHTED] == [op.name for op in b.ops if op.kind in WEIGHTED]
    for op_a, op_b in zip(a.ops, b.ops):
        for ta, tb in zip(op_a.inputs, op_b.inputs):
            assert a.tensors[ta].is_constant == b.tensors[tb].is_constant
            if a.tensors[ta].is_constant:
                np.testing.assert_allclose(a.tensors[ta].data, b.tensors[tb].data, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_torch_onnx_edgekit_equals_torch_edgekit(test_models, name, tmp_path):
    model, x = test_models[name]
    path = export(model, x, tmp_path / f"{name}.onnx")
    via_onnx, direct = edgekit.load(path), edgekit.load(model, x[:1])
    assert via_onnx.source_layouts[via_onnx.inputs[0]] == direct.source_layouts[direct.inputs[0]]
    # the exporter folds BatchNorm into the convolutions itself: compare after edgekit folds its own
    a, b = prepare_float(via_onnx), prepare_float(direct)
    assert_same_graph(a, b)
    with torch.no_grad():
        want = model.eval()(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(_float_out(a, x), want, rtol=1e-4, atol=1e-5)
    # int8: the same calibration gives the same parameters and outputs (up to float rounding in the
    # exporter's BatchNorm folding, which can move a calibrated range by an ulp)
    qa, qb = edgekit.quantize(path, x), edgekit.quantize(model, x)
    ya, yb = _int8_out(qa, x), _int8_out(qb, x)
    assert np.abs(ya.astype(int) - yb.astype(int)).max() <= 1
    assert (ya == yb).mean() >= 0.99
    for (ta, tb) in zip(qa.tensors.values(), qb.tensors.values()):
        if ta.quant is not None and ta.quant.is_per_tensor and not ta.is_constant:
            assert ta.quant.scale[0] == pytest.approx(tb.quant.scale[0], rel=1e-5)
            assert abs(int(ta.quant.zero_point[0]) - int(tb.quant.zero_point[0])) <= 1


@pytest.mark.parametrize("name", ["cnn", "rescnn", "ds_cnn_kws"])
def test_onnxruntime_float_within_int8_error(test_models, name, tmp_path):
    model, x = test_models[name]
    path = export(model, x, tmp_path / f"{name}.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = sess.get_inputs()[0].name
    want = np.concatenate([sess.run(None, {feed: x[i:i + 1]})[0] for i in range(len(x))])
    q = edgekit.quantize(path, x)
    got = edgekit.reference_run(q, x)
    step = q.tensors[q.outputs[0]].quant.scale[0]
    err = np.abs(got - want)
    assert err.mean() <= 2 * step and err.max() <= 8 * step, (err.mean() / step, err.max() / step)
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.95


class _Samples:
    def __init__(self, name, x):
        self.items = iter([{name: x[i:i + 1]} for i in range(len(x))])

    def get_next(self):
        return next(self.items, None)


def _qdq(float_path, out_path, x, activation, per_channel):
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    name = onnx.load(str(float_path)).graph.input[0].name
    quantize_static(str(float_path), str(out_path), _Samples(name, x), quant_format=QuantFormat.QDQ,
                    activation_type=getattr(QuantType, activation), weight_type=QuantType.QInt8,
                    per_channel=per_channel)
    return out_path


def _qdq_params(path):
    """({tensor name: (scales, zero points)} of every DequantizeLinear, the int8 weight of each Conv / Gemm
    in node order)."""
    from onnx import numpy_helper

    model = onnx.load(str(path))
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    params, dequantized_from = {}, {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear":
            params[node.input[0]] = (consts[node.input[1]], consts[node.input[2]])
            dequantized_from[node.output[0]] = node.input[0]
    weights = [consts[dequantized_from[n.input[1]]] for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    return params, consts, weights


@pytest.mark.parametrize("activation,per_channel", [("QInt8", True), ("QUInt8", False)])
def test_qdq_model_keeps_its_scales_and_zero_points(trained_cnn, digits, tmp_path, activation, per_channel):
    float_path = export(trained_cnn, digits.x_train, tmp_path / "cnn.onnx")
    path = _qdq(float_path, tmp_path / "cnn_qdq.onnx", digits.x_train[:64], activation, per_channel)
    params, consts, onnx_weights = _qdq_params(path)
    shift = 128 if activation == "QUInt8" else 0
    activation_scales = {(float(np.float64(s)), int(z) - shift) for s, z in
                         (v for k, v in params.items() if k not in consts)}
    # quantized with a different calibration set on purpose: the model's own parameters must win
    q = edgekit.quantize(path, digits.x_test[:32])
    used = {(float(np.float64(t.quant.scale[0])), int(t.quant.zero_point[0]))
            for t in q.tensors.values() if not t.is_constant and t.quant is not None}
    # the CNN has no softmax: every activation's parameters are the model's
    assert len(used) >= 5 and used <= activation_scales
    weights = [q.tensors[op.inputs[1]] for op in q.ops if op.kind in ("conv2d", "depthwise_conv2d", "fully_connected")]
    assert len(weights) == len(onnx_weights) == 5
    for op, w, ow in zip([op for op in q.ops if op.kind in ("conv2d", "depthwise_conv2d", "fully_connected")],
                         weights, onnx_weights):
        if op.kind == "conv2d":
            ow = ow.transpose(0, 2, 3, 1)  # OIHW -> OHWI
        elif op.kind == "depthwise_conv2d":
            ow = ow.transpose(1, 2, 3, 0)  # O1HW -> 1HWO
        assert ow.dtype == np.int8 and np.array_equal(w.data, ow), f"{op.name}: int8 weights differ from the QDQ model's"
    # onnxruntime runs the QDQ model in integers too: the outputs agree to one step
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = sess.get_inputs()[0].name
    x = digits.x_test[:100]
    want = np.concatenate([sess.run(None, {feed: x[i:i + 1]})[0] for i in range(len(x))])
    got = edgekit.reference_run(q, x)
    step = q.tensors[q.outputs[0]].quant.scale[0]
    assert np.abs(got - want).max() <= 1.01 * step
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.98


def test_generate_an_onnx_model_from_the_command_line(trained_cnn, digits, tmp_path):
    """`edgekit generate model.onnx --calib c.npy`, float and QDQ; the C program equals the reference."""
    float_path = export(trained_cnn, digits.x_train, tmp_path / "cnn.onnx")
    qdq_path = _qdq(float_path, tmp_path / "cnn_qdq.onnx", digits.x_train[:64], "QInt8", True)
    np.save(tmp_path / "c.npy", digits.x_train[:64])
    for path in (float_path, qdq_path):
        out = tmp_path / path.stem
        assert cli.main(["generate", str(path), "--calib", str(tmp_path / "c.npy"), "-o", str(out)]) == 0
        edgekit.build(out)
        graph = edgekit.ir_io.load_graph(out)
        y = edgekit.run(out, digits.x_test[:50])
        assert np.array_equal(y, edgekit.reference_run(graph, digits.x_test[:50]))
        assert (y.argmax(1) == digits.y_test[:50]).mean() > 0.85


def _onnx_model(nodes, inputs, outputs, initializers=(), opset=13):
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
                              [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in initializers])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_matmul_and_bias_add_against_onnxruntime(tmp_path):
    """MatMul + Add (what exporters emit for x @ W + b), reading a flattened NCHW tensor: the Add becomes
    the layer's bias and the flattening a permutation of its weight columns."""
    from onnx import helper

    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(2 * 3 * 3, 5)).astype(np.float32), rng.normal(size=5).astype(np.float32)
    model = _onnx_model([helper.make_node("Relu", ["x"], ["r"], name="/act/Relu"),
                         helper.make_node("Flatten", ["r"], ["f"], name="/flatten/Flatten"),
                         helper.make_node("MatMul", ["f", "w"], ["m"], name="/fc/MatMul"),
                         helper.make_node("Add", ["m", "b"], ["y"], name="/fc/Add")],
                        [("x", [1, 2, 3, 3])], ["y"], [("w", w), ("b", b)])
    onnx.save(model, tmp_path / "m.onnx")
    g = edgekit.load(tmp_path / "m.onnx")
    assert [op.kind for op in g.ops] == ["relu", "reshape", "fully_connected"] and len(g.ops[-1].inputs) == 3
    x = rng.normal(size=(8, 2, 3, 3)).astype(np.float32)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    want = np.concatenate([sess.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])
    np.testing.assert_allclose(_float_out(g, x), want, rtol=1e-5, atol=1e-5)


def test_unsupported_ops_are_listed_in_one_error(tmp_path):
    from onnx import helper

    model = _onnx_model([helper.make_node("Conv", ["x", "w"], ["a"], name="/conv/Conv"),
                         helper.make_node("Softplus", ["a"], ["b"], name="/act/Softplus"),
                         helper.make_node("Pad", ["b", "p"], ["c"], mode="wrap", name="/pad/Pad"),
                         helper.make_node("Sigmoid", ["c"], ["d"], name="/act2/Sigmoid"),
                         helper.make_node("Flatten", ["a"], ["e"], name="/flat/Flatten"),
                         helper.make_node("Erf", ["e"], ["y"], name="erf")],
                        [("x", [1, 2, 5, 5])], ["y", "d"], [("w", np.ones((4, 2, 3, 3))),
                                                            ("p", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))])
    onnx.save(model, tmp_path / "m.onnx")
    with pytest.raises(EdgekitError) as e:
        edgekit.load(tmp_path / "m.onnx")
    text = str(e.value)
    # every node that cannot be converted, once, by name and op type (the Pad reads the Softplus: not repeated;
    # the Sigmoid after it is fine but reads nothing converted: not listed either)
    assert "2 operations of this ONNX model are not supported" in text
    assert "ONNX node '/act/Softplus' (Softplus): this operation is not supported" in text
    assert "ONNX node 'erf' (Erf): this operation is not supported" in text
    assert "Sigmoid" not in text.split("edgekit supports")[0] and "Pad" not in text.split("edgekit supports")[0]
    assert "edgekit supports: Conv" in text
    wrap = _onnx_model([helper.make_node("Pad", ["x", "p"], ["y"], mode="wrap", name="/pad/Pad")],
                       [("x", [1, 2, 5, 5])], ["y"], [("p", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))])
    with pytest.raises(EdgekitError, match=r"ONNX node '/pad/Pad' \(Pad\): padding mode 'wrap'"):
        edgekit.load(wrap)
    # the command line: one clear line, no traceback
    np.save(tmp_path / "c.npy", np.zeros((2, 2, 5, 5), np.float32))
    assert cli.main(["generate", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "c.npy"), "-o",
                     str(tmp_path / "out")]) == 1


def test_bad_onnx_inputs_are_refused_clearly(tmp_path):
    from onnx import helper

    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(EdgekitError, match="not a readable ONNX model"):
        edgekit.load(tmp_path / "junk.onnx")
    clip = _onnx_model([helper.make_node("Clip", ["x", "lo", "hi"], ["y"], name="/c/Clip")], [("x", [1, 4])], ["y"],
                       [("lo", np.float32(1)), ("hi", np.float32(-1))])
    with pytest.raises(EdgekitError, match=r"'/c/Clip' \(Clip\): clamp bounds min=1.0 > max=-1.0"):
        edgekit.load(clip)
    conv3d = _onnx_model([helper.make_node("Conv", ["x", "w"], ["y"], name="/g/Conv")],
                         [("x", [1, 4, 5, 5])], ["y"], [("w", np.ones((4, 4, 3, 3, 3)))])
    with pytest.raises(EdgekitError, match="a 3-D convolution"):
        edgekit.load(conv3d)
    seq_first = _onnx_model([helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2], name="/attn/Transpose"),
                             helper.make_node("Relu", ["t"], ["y"], name="/attn/Relu")], [("x", [1, 5, 4])], ["y"])
    with pytest.raises(EdgekitError, match=r"'/attn/Transpose' \(Transpose\): a transpose \[1, 0, 2\] that moves the "
                                           "batch dimension"):
        edgekit.load(seq_first)
    dynamic = _onnx_model([helper.make_node("Relu", ["x"], ["y"])], [("x", [1, "h", 4])], ["y"])
    with pytest.raises(EdgekitError, match="fixed sizes"):
        edgekit.load(dynamic)
    batch = _onnx_model([helper.make_node("Relu", ["x"], ["y"])], [("x", [4, 3, 8])], ["y"])
    with pytest.raises(EdgekitError, match=r"input 'x' has a fixed batch of 4 \(shape \[4, 3, 8\]\)"):
        edgekit.load(batch)
