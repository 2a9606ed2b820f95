"""PyTorch -> IR: the float reference executor reproduces PyTorch, and what
cannot be converted is refused with a message naming the layer."""
import numpy as np
import pytest
import torch
from torch import nn

import edgekit
from edgekit import models, reference
from edgekit.errors import EdgekitError
from edgekit.layout import from_ir, to_ir
from edgekit.passes.fuse import prepare_float


def _float_matches_torch(model, x, atol=1e-4):
    model.eval()
    with torch.no_grad():
        want = model(torch.as_tensor(x)).numpy()
    g = edgekit.load(model, x[:1])
    for graph in (g, prepare_float(g)):
        name = graph.inputs[0]
        got = reference.run(graph, to_ir(x, graph.source_layouts[name], graph.tensors[name].shape[1:]))[0]
        got = from_ir(got, graph.source_layouts[graph.outputs[0]])
        np.testing.assert_allclose(got, want, atol=atol, rtol=1e-4)
    return g


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 8, 5, stride=2, padding=2)
        self.c2 = nn.Conv1d(8, 8, 3, dilation=2, groups=8)
        self.fc = nn.Linear(8 * 4, 5)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.c2(torch.relu(self.c1(x)))), 1))


class PoolZoo(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.AvgPool2d(3, stride=2, padding=1)  # count_include_pad=True
        self.b = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False, ceil_mode=True)
        self.m = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.gap = nn.AdaptiveAvgPool2d(2)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.bn(x)  # a BatchNorm with no conv before it: becomes a 1x1 depthwise conv
        y = torch.cat([self.a(x), self.b(x), self.m(x)], dim=1)
        return self.gap(y).mean(dim=(2, 3))


def _randomise_bn(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g) * 0.5 + 1)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model


@pytest.mark.parametrize("make,shape", [
    (models.DigitsCNN, (4, 1, 8, 8)),
    (models.DigitsResCNN, (4, 1, 8, 8)),
    (lambda: models.digits_mlp((30, 20)), (4, 64)),
    (models.ds_cnn_kws, (2, 1, 49, 10)),
    (Conv1dNet, (3, 3, 16)),
    (PoolZoo, (2, 4, 7, 7)),
])
def test_float_reference_matches_torch(make, shape):
    torch.manual_seed(0)
    model = _randomise_bn(make())
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    _float_matches_torch(model, x)


def test_flatten_of_spatial_tensor_permutes_linear_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 6))
    x = np.random.default_rng(1).normal(size=(5, 2, 6, 6)).astype(np.float32)
    g = _float_matches_torch(model, x)
    assert [op.kind for op in g.ops].count("reshape") == 1  # no transpose on the device


def test_bn_and_relu_are_folded():
    g = prepare_float(edgekit.load(models.DigitsCNN(), np.zeros((1, 1, 8, 8), np.float32)))
    kinds = [op.kind for op in g.ops]
    assert "batch_norm" not in kinds and "relu" not in kinds
    assert [op.attrs.get("activation") for op in g.ops if op.kind == "conv2d"] == ["relu", "relu", "relu"]


def test_zero_pad_is_folded_into_the_convolution():
    g = prepare_float(edgekit.load(models.ds_cnn_kws(), np.zeros((1, 1, 49, 10), np.float32)))
    first = g.ops[0]
    assert first.kind == "conv2d" and first.attrs["padding"] == (4, 5, 1, 1)
    assert g.tensors[first.outputs[0]].shape == (1, 25, 5, 64)


def test_unsupported_layer_names_the_module():
    model = nn.Sequential(nn.Linear(4, 4), nn.Softplus(), nn.Linear(4, 2))
    with pytest.raises(EdgekitError) as err:
        edgekit.load(model, np.zeros((1, 4), np.float32))
    msg = str(err.value)
    assert "layer '1'" in msg and "Softplus" in msg and "softplus" in msg and "edgekit supports" in msg


def test_grouped_convolution_is_split_into_groups():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2))
    g = _float_matches_torch(model, np.random.default_rng(0).normal(size=(2, 4, 6, 6)).astype(np.float32))
    assert [op.kind for op in g.ops] == ["split", "conv2d", "conv2d", "concat"]


def test_nan_weights_are_refused():
    model = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight[1, 2] = float("nan")
    with pytest.raises(EdgekitError, match=r"layer '0'.*NaN or inf.*weight"):
        edgekit.load(model, np.zeros((1, 4), np.float32))


def test_training_mode_batchnorm_is_exported_in_eval_mode():
    model = models.DigitsCNN().train()
    g = edgekit.load(model, np.zeros((1, 1, 8, 8), np.float32))  # load() puts the model in eval mode
    assert any(op.kind == "batch_norm" for op in g.ops)
