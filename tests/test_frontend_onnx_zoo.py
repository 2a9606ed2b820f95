"""Every architecture of tests/zoo/ through ONNX: torch -> ONNX (torch.onnx.export, the TorchScript exporter,
opset 17) -> edgekit is the graph torch -> edgekit makes (same ops, shapes, attributes, layer names,
weights) with bit-identical float and int8 outputs (exported with BatchNorm left to edgekit;
test_frontend_onnx covers the exporter's own folding); onnxruntime's float outputs are within int8 error of the
int8 graph; QDQ models (onnxruntime's quantize_static) keep their own parameters. Small inputs, few samples: the
point is the mapping, not accuracy (the zoo modules train these models)."""
import numpy as np
import pytest
import torch

import edgekit
from edgekit.passes.fuse import prepare_float
from test_frontend_onnx import _qdq, _signature, assert_same_graph, export
from zoo.efficientnet_b0 import EfficientNetB0Style
from zoo.gru_kws import GRUKWS
from zoo.imu_cnn import IMUCNN
from zoo.kws_transformer import KeywordTransformer
from zoo.lstm_kws import LSTMKWS
from zoo.m5 import M5
from zoo.mobilenetv3_small import MobileNetV3Small
from zoo.shufflenet_v2 import ShuffleNetV2
from zoo.tc_resnet import TCResNet
from zoo.unet_tiny import UNetTiny
from zoo.yolov3_tiny import YoloV3Tiny
from zoo.yolov8n_like import YoloV8nLike

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

# name: (constructor, input shape of one sample)
ZOO = {
    "efficientnet_b0": (EfficientNetB0Style, (1, 32, 32)),
    "mobilenetv3_small": (MobileNetV3Small, (1, 32, 32)),
    "yolov3_tiny": (YoloV3Tiny, (1, 32, 32)),
    "yolov8n_like": (YoloV8nLike, (1, 32, 32)),
    "shufflenet_v2": (ShuffleNetV2, (1, 32, 32)),
    "unet_tiny": (UNetTiny, (1, 16, 16)),
    "imu_cnn": (IMUCNN, (6, 64)),
    "m5": (M5, (1, 800)),
    "tc_resnet": (TCResNet, (8, 49)),
    "lstm_kws": (LSTMKWS, (16, 8)),
    "gru_kws": (GRUKWS, (16, 8)),
    # nn.TransformerEncoderLayer: its exported self attention is recognised as a whole (sequence first inside)
    "kws_transformer": (lambda: _keyword_transformer("gelu"), (16, 8)),
    "kws_transformer_relu": (lambda: _keyword_transformer("relu"), (16, 8)),
}


def _keyword_transformer(activation):
    """Class token and position embedding as training leaves them, not at their zero / 0.02 start: an
    all-zero class token through the pre-norm LayerNorm alone is ~10 output steps of int8 error against
    torch's own float outputs, which says nothing about the ONNX mapping."""
    model = KeywordTransformer(activation=activation)
    torch.nn.init.normal_(model.cls_token, 0, 0.5)
    torch.nn.init.normal_(model.position, 0, 0.5)
    return model


def _model(name):
    torch.manual_seed(0)
    model = ZOO[name][0]().eval()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():  # BatchNorm statistics that do something
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    x = np.random.default_rng(0).normal(size=(12,) + ZOO[name][1]).astype(np.float32)
    return model, x


def _int8_outputs(q, x):
    """The raw int8 outputs of an int8 graph on float inputs."""
    from edgekit import quant_math

    p = q.tensors[q.inputs[0]].quant
    xq = quant_math.quantize(edgekit.api.to_ir_inputs(q, x), p.scale[0], p.zero_point[0])
    return _outputs(edgekit.reference_run(q, xq, int8=True))


def _onnxruntime_runs(path, x):
    """onnxruntime's outputs, one sample at a time (the exported models have batch 1)."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = sess.get_inputs()[0].name
    return [sess.run(None, {feed: x[i:i + 1]}) for i in range(len(x))]


def _outputs(y):
    return list(y) if isinstance(y, (list, tuple)) else [y]


def assert_int8_identical_and_near_onnxruntime(path, model, x):
    """int8 through ONNX: the same calibration, the same parameters, the same outputs as through torch; and
    onnxruntime's float outputs within the int8 graph's error."""
    qa, qb = edgekit.quantize(path, x), edgekit.quantize(model, x)
    for ya, yb in zip(_int8_outputs(qa, x), _int8_outputs(qb, x)):
        assert np.array_equal(ya, yb), (np.abs(ya.astype(int) - yb.astype(int)).max(), (ya != yb).mean())
    runs = _onnxruntime_runs(path, x)
    for k, got in enumerate(_outputs(edgekit.reference_run(qa, x))):
        want = np.concatenate([r[k] for r in runs])
        step = qa.tensors[qa.outputs[k]].quant.scale[0]
        err = np.abs(got - want)
        assert err.mean() <= 3 * step and err.max() <= 16 * step, (k, err.mean() / step, err.max() / step)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_through_onnx_is_the_same_graph(name, tmp_path):
    model, x = _model(name)
    path = export(model, x, tmp_path / f"{name}.onnx", fold=False)  # BatchNorm folded by edgekit: bit-identical
    a, b = prepare_float(edgekit.load(path)), prepare_float(edgekit.load(model, x[:1]))
    assert [a.source_layouts[n] for n in a.inputs] == [b.source_layouts[n] for n in b.inputs]
    assert_same_graph(a, b)
    with torch.no_grad():
        want = _outputs(model(torch.as_tensor(x[:4])))
    got = _outputs(edgekit.reference_run(a, x[:4]))
    for g_, w_ in zip(got, want):
        np.testing.assert_allclose(g_, w_.numpy(), rtol=1e-4, atol=1e-4)
    assert_int8_identical_and_near_onnxruntime(path, model, x)


@pytest.mark.parametrize("name", ["imu_cnn", "m5", "tc_resnet", "mobilenetv3_small", "shufflenet_v2", "yolov8n_like",
                                  "unet_tiny"])
def test_qdq_zoo_model_keeps_its_parameters(name, tmp_path):
    """A zoo model quantized by onnxruntime (quantize_static, QDQ, per-channel int8 weights; it drops ReLUs
    into the activation ranges): edgekit runs the model's own activation parameters whatever its own
    calibration says, and agrees with onnxruntime's integer execution to a step or two."""
    model, x = _model(name)
    float_path = export(model, x, tmp_path / f"{name}.onnx")
    path = _qdq(float_path, tmp_path / f"{name}_qdq.onnx", x, "QInt8", True)
    from onnx import numpy_helper
    m = onnx.load(str(path))
    consts = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    theirs = {(float(consts[n.input[1]]), int(consts[n.input[2]])) for n in m.graph.node
              if n.op_type == "QuantizeLinear" and n.input[0] not in consts}
    q = edgekit.quantize(path, x[:4] * 3)  # another calibration on purpose: the model's parameters win
    # except where edgekit's int8 ops fix them: LOGISTIC / TANH / SOFTMAX outputs, and one set of parameters
    # for all the tensors a CONCATENATION or SPLIT joins (and those a MAX_POOL / RESHAPE / ... passes it to)
    fixed = {op.outputs[0] for op in q.ops if op.kind in ("logistic", "tanh", "softmax", "log_softmax")}
    fixed |= {n for op in q.ops if op.kind in ("concat", "split") for n in op.inputs + op.outputs}
    same = [op for op in q.ops if op.kind in ("max_pool2d", "reshape", "resize_nearest", "slice", "transpose", "pad")]
    while True:  # ops whose output keeps its input's parameters carry a joined set along
        grown = fixed | {n for op in same if {op.inputs[0], op.outputs[0]} & fixed for n in (op.inputs[0], op.outputs[0])}
        if grown == fixed:
            break
        fixed = grown
    given = set(q.meta.get("activation_params", {})) - fixed
    used = {(float(t.quant.scale[0]), int(t.quant.zero_point[0])) for n, t in q.tensors.items() if n in given}
    assert len(given) >= 3 and used <= theirs
    runs = _onnxruntime_runs(path, x)
    for k, got in enumerate(_outputs(edgekit.reference_run(q, x))):
        want = np.concatenate([r[k] for r in runs])
        step = q.tensors[q.outputs[k]].quant.scale[0]
        assert np.abs(got - want).max() <= 2.01 * step


@pytest.mark.parametrize("name", ["kws_transformer", "kws_transformer_relu"])
def test_qdq_keyword_transformer(name, tmp_path):
    """The keyword transformer quantized by onnxruntime: its Q/DQ pairs inside the exported attention block are
    looked through (the block is converted whole; edgekit calibrates its inner tensors), those inside GELU's
    Erf formula too (one GELU), the others keep the model's parameters. Measured, mean |error| against the
    float model in output steps: ReLU 1.32 (onnxruntime's own QDQ execution 1.38), GELU 1.66 (1.49); within
    4 steps of onnxruntime."""
    model, x = _model(name)
    path = _qdq(export(model, x, tmp_path / "kwt.onnx"), tmp_path / "kwt_qdq.onnx", x, "QInt8", True)
    from onnx import numpy_helper
    m = onnx.load(str(path))
    consts = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    theirs = {(float(consts[n.input[1]]), int(consts[n.input[2]])) for n in m.graph.node
              if n.op_type == "QuantizeLinear" and n.input[0] not in consts}
    q = edgekit.quantize(path, x)
    given = set(q.meta.get("activation_params", {})) - {op.outputs[0] for op in q.ops if op.kind == "softmax"}
    given -= {n for op in q.ops if op.kind == "concat" for n in op.inputs + op.outputs}
    assert len(given) >= 3
    assert {(float(t.quant.scale[0]), int(t.quant.zero_point[0])) for n, t in q.tensors.items() if n in given} <= theirs
    got = edgekit.reference_run(q, x)
    want = np.concatenate([r[0] for r in _onnxruntime_runs(path, x)])
    with torch.no_grad():
        exact = model(torch.as_tensor(x)).numpy()
    step = q.tensors[q.outputs[0]].quant.scale[0]
    assert np.abs(got - want).max() <= 4.01 * step
    assert np.abs(got - exact).mean() <= 1.25 * np.abs(want - exact).mean()
    assert ("gelu" in {op.kind for op in q.ops}) == (name == "kws_transformer")


@pytest.mark.parametrize("name", ["mobilenetv3_small", "shufflenet_v2", "lstm_kws"])
def test_opset_11_export_is_the_same_graph(name, tmp_path):
    """Older exports spell some ops differently: Hardswish as x * HardSigmoid(x) (before opset 14),
    Unsqueeze / Squeeze / Split with attributes instead of inputs (before 13), which the constant folding
    must evaluate at the model's own opset."""
    import warnings

    model, x = _model(name)
    path = tmp_path / f"{name}_11.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.as_tensor(x[:1]),), str(path), dynamo=False, opset_version=11,
                          do_constant_folding=False)
    a, b = prepare_float(edgekit.load(path)), prepare_float(edgekit.load(model, x[:1]))
    assert _signature(a) == _signature(b)
    for ya, yb in zip(_outputs(edgekit.reference_run(a, x[:4])), _outputs(edgekit.reference_run(b, x[:4]))):
        np.testing.assert_array_equal(ya, yb)
