"""torch -> ONNX with the dynamo exporter (`torch.onnx.export(..., dynamo=True)`, which needs onnxscript; opset 20
with torch 2.13) -> edgekit is the graph torch -> edgekit makes, with identical int8 outputs. One zoo model per
spelling the dynamo exporter has and the TorchScript one has not (tests/test_frontend_onnx_zoo.py covers every
zoo model with the TorchScript exporter; a script run of all 13 with dynamo=True is in the README):
node names without scopes (layers named from the "pkg.torch.onnx.name_scopes" metadata), attention through
scaled_dot_product_attention, an LSTM output transposed and reshaped instead of squeezed, AdaptiveMax/AvgPool1d
written as Unsqueeze -> ReduceMax / ReduceMean -> Squeeze, SplitToSequence / SequenceAt and CastLike (with
``optimize=False``), and the default optimizer's BatchNorm folding (the folded convolution named from its
weight)."""
import warnings

import numpy as np
import pytest
import torch

import edgekit
from edgekit.passes.fuse import prepare_float
from test_frontend_onnx import assert_same_graph
from test_frontend_onnx_zoo import _int8_outputs, _model, assert_int8_identical_and_near_onnxruntime

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def export_dynamo(model, x, path, optimize):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.as_tensor(x[:1]),), str(path), dynamo=True, optimize=optimize)
    return path


@pytest.mark.parametrize("name", ["kws_transformer", "lstm_kws", "imu_cnn", "shufflenet_v2"])
def test_dynamo_export_is_the_same_graph(name, tmp_path):
    """optimize=False: the BatchNorms stay for edgekit to fold, so the int8 outputs are bit-identical."""
    model, x = _model(name)
    path = export_dynamo(model, x, tmp_path / f"{name}.onnx", optimize=False)
    a, b = prepare_float(edgekit.load(path)), prepare_float(edgekit.load(model, x[:1]))
    assert_same_graph(a, b)
    assert_int8_identical_and_near_onnxruntime(path, model, x)


@pytest.mark.parametrize("name", ["mobilenetv3_small", "yolov8n_like"])
def test_dynamo_default_export_folds_batchnorm(name, tmp_path):
    """The default export (optimize=True) folds each BatchNorm into its convolution in float32 and gives the
    node the BatchNorm's scopes: the same graph, layers named from the convolution's weight, and the int8
    outputs at most one step apart on at most 2 % of them (the folded weights differ by float32 rounding,
    which can move a calibrated range by an ulp: yolov8n_like has 1.2 % of its outputs one step off,
    mobilenetv3_small none; the TorchScript exporter's own folding does the same)."""
    model, x = _model(name)
    path = export_dynamo(model, x, tmp_path / f"{name}.onnx", optimize=True)
    assert not any(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)
    a, b = prepare_float(edgekit.load(path)), prepare_float(edgekit.load(model, x[:1]))
    assert [op.kind for op in a.ops] == [op.kind for op in b.ops]
    assert [op.name for op in a.ops if op.kind in ("conv2d", "depthwise_conv2d")] == \
        [op.name for op in b.ops if op.kind in ("conv2d", "depthwise_conv2d")]
    qa, qb = edgekit.quantize(path, x), edgekit.quantize(model, x)
    for ya, yb in zip(_int8_outputs(qa, x), _int8_outputs(qb, x)):
        diff = np.abs(ya.astype(int) - yb.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() <= 0.02, (diff.max(), (diff > 0).mean())
