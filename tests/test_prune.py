"""Structured pruning: channels and neurons removed for real, through every join the models use."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import edgekit
from edgekit import models, train
from edgekit.compress import fxgraph, report
from edgekit.compress.prune import analyse, choose, remove, score
from edgekit.errors import EdgekitError

IMAGE = (1, 8, 8)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _randomized(model, seed=0):
    """A model with random BatchNorm statistics, so folded scales differ per channel."""
    torch.manual_seed(seed)
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def test_analysis_finds_the_prunable_layers():
    ex = torch.zeros((1,) + IMAGE)
    names = lambda m, x: [(p.name, p.channels) for p in analyse(m, x).prunable]  # noqa: E731
    assert names(models.DigitsCNN(), ex) == [("conv1", 16), ("conv2", 32), ("pw", 32)]
    # the residual add ties the stem to the block's last conv; the concat and the depthwise
    # convolutions (one with a channel multiplier) follow the stem's channels
    assert names(models.DigitsResCNN(), ex) == [("stem.0+block.3", 16), ("block.0", 16), ("head.0", 32)]
    assert names(models.digits_mlp(), ex) == [("1", 300), ("3", 100)]
    assert names(models.ds_cnn_kws(), torch.zeros(1, 1, 49, 10)) == [(str(i), 64) for i in (1, 7, 13, 19, 25)]


@pytest.mark.parametrize("make,shape,expected", [
    (models.DigitsCNN, IMAGE, {"conv1": (1, 8), "conv2": (8, 16), "dw": (16, 16), "pw": (16, 16), "fc": (16, 10)}),
    (models.DigitsResCNN, IMAGE, {"stem.0": (1, 8), "block.0": (8, 8), "block.3": (8, 8), "branch_a.0": (8, 8),
                                  "branch_b.0": (8, 16), "head.0": (24, 16), "head.5": (64, 10)}),
    (models.digits_mlp, (64,), {"1": (64, 150), "3": (150, 50), "5": (50, 10)}),
])
def test_pruning_rebuilds_smaller_layers(make, shape, expected):
    model = _randomized(make())
    before = _state(model)
    pruned = edgekit.prune(model, 0.5, input_shape=shape, show_progress=False)
    assert _same_state(before, _state(model)), "the input model was modified"
    for name, (cin, cout) in expected.items():
        m = pruned.get_submodule(name)
        got = (m.in_features, m.out_features) if isinstance(m, nn.Linear) else (m.in_channels, m.out_channels)
        assert got == (cin, cout), name
        if isinstance(m, nn.Conv2d) and m.groups > 1:
            assert m.groups == m.in_channels  # still depthwise
    for m in pruned.modules():  # no masks, no hooks: plain layers
        assert not getattr(m, "_forward_pre_hooks", None)
        assert not any("mask" in n for n, _ in m.named_buffers(recurse=False))
    x = np.random.default_rng(0).uniform(0, 1, (4,) + shape).astype(np.float32)
    assert fxgraph.count_parameters(pruned) < fxgraph.count_parameters(model) * 0.45
    assert report.macs(pruned, x) < report.macs(model, x) * 0.45
    # exportable and convertible to int8 C by edgekit's own frontend
    graph = edgekit.quantize(pruned, x)
    assert graph.is_quantized()
    assert pruned(torch.as_tensor(x)).shape == (4, 10)


def _zero_consumers(model, a, removed):
    """Zero every weight that reads a removed channel: the model no longer depends on those channels."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, use in a.layers.items():
            if use.kind not in ("conv", "linear"):
                continue
            cols = [i for i, atom in enumerate(use.in_atoms) if a.uf.find(int(atom)) in removed]
            model.get_submodule(name).weight[:, cols] = 0.0
    return model


@pytest.mark.parametrize("make,shape", [(models.DigitsCNN, IMAGE), (models.DigitsResCNN, IMAGE),
                                        (models.digits_mlp, (64,)), (lambda: models.ds_cnn_kws(filters=16),
                                                                     (1, 49, 10))])
def test_removed_channels_are_exactly_the_chosen_ones(make, shape):
    """When nothing reads the chosen channels, cutting them leaves the outputs unchanged: every layer
    was sliced at the right positions (residual add, concat, depthwise multiplier, flatten included)."""
    model = _randomized(make(), seed=1)
    x = torch.as_tensor(np.random.default_rng(1).uniform(0, 1, (8,) + shape).astype(np.float32))
    a = analyse(model, x[:1])
    removed = {g for p in a.prunable for g in p.groups[::3]}
    reference = _zero_consumers(model, a, removed)
    pruned = remove(reference, a, removed, x[:1])
    assert fxgraph.count_parameters(pruned) < fxgraph.count_parameters(model)
    torch.testing.assert_close(pruned(x), reference(x), rtol=1e-5, atol=1e-5)


def test_pruned_pt2_model_round_trip(tmp_path):
    model = _randomized(models.DigitsResCNN())
    fxgraph.export_model(model, IMAGE, tmp_path / "m.pt2")
    loaded, shape = fxgraph.load_model(tmp_path / "m.pt2")
    x = torch.rand((3,) + shape)
    torch.testing.assert_close(loaded(x), model(x))
    pruned = edgekit.prune(loaded, 0.5, input_shape=shape, show_progress=False)
    fxgraph.export_model(pruned, shape, tmp_path / "small.pt2")
    graph = edgekit.load(tmp_path / "small.pt2")
    convs = {op.name: graph.tensors[op.inputs[1]].shape for op in graph.ops if op.kind == "conv2d"}
    assert convs["stem.0"][0] == 8 and convs["head.0"] == (16, 1, 1, 24)
    # and the pruned model runs as C exactly as the reference executor says
    x = np.random.default_rng(0).uniform(0, 1, (32,) + shape).astype(np.float32)
    q = edgekit.quantize(tmp_path / "small.pt2", x)
    edgekit.generate(q, tmp_path / "c")
    edgekit.build(tmp_path / "c")
    assert np.array_equal(edgekit.run(tmp_path / "c", x), edgekit.reference_run(q, x))


def test_criteria_pick_the_unimportant_channels(digits_flat):
    torch.manual_seed(0)
    model = models.digits_mlp((16, 16)).eval()
    dead, weak = [1, 5, 9], [2, 7]
    with torch.no_grad():
        model[1].bias[dead] = -100.0  # never active: APoZ 100 %
        model[1].weight[weak] *= 1e-3  # tiny weights (and small activations)
        model[1].bias[weak] = 0.0
    for criterion, expected in (("l1", weak), ("l2", weak), ("apoz", dead)):
        a = analyse(model, torch.zeros(1, 64))
        score(a, criterion, digits_flat.x_train[:300])
        layer = a.layer_named("1")
        removed = choose(a, 0.0, {"1": len(expected) / 16}, "layer")
        kept_out = [i for i, atom in enumerate(a.layers["1"].out_atoms) if a.uf.find(int(atom)) not in removed]
        assert sorted(set(range(16)) - set(kept_out)) == sorted(expected), criterion
        assert layer.channels == 16
    with pytest.raises(EdgekitError, match="apoz.*data"):
        edgekit.prune(model, 0.5, criterion="apoz", input_shape=(64,), show_progress=False)


def test_global_and_per_layer_ratios():
    model = _randomized(models.DigitsCNN())
    ex = torch.zeros((1,) + IMAGE)
    g = edgekit.prune(model, 0.5, scope="global", input_shape=IMAGE, show_progress=False)
    counts = {p.name: p.channels for p in analyse(g, ex).prunable}
    assert sum(counts.values()) == 40  # half of 16 + 32 + 32
    gradual = edgekit.prune(model, 0.5, scope="global", steps=3, input_shape=IMAGE, show_progress=False)
    assert sum(p.channels for p in analyse(gradual, ex).prunable) == 40
    per_layer = edgekit.prune(model, 0.25, layers={"conv2": 0.75, "pw": 0.0}, input_shape=IMAGE,
                              show_progress=False)
    assert {p.name: p.channels for p in analyse(per_layer, ex).prunable} == {"conv1": 12, "conv2": 8, "pw": 32}
    with pytest.raises(EdgekitError, match="no prunable layer named 'conv9'"):
        edgekit.prune(model, 0.5, layers={"conv9": 0.5}, input_shape=IMAGE, show_progress=False)
    for bad in (1.0, 1.5, -0.1, "half"):
        with pytest.raises(EdgekitError, match="fraction in \\[0, 1\\)"):
            edgekit.prune(model, bad, input_shape=IMAGE, show_progress=False)


def test_iterative_pruning_with_fine_tuning(trained_mlp, digits_flat):
    acc = lambda m: train.accuracy(train.predict(m, digits_flat.x_test), digits_flat.y_test)  # noqa: E731
    one_shot = edgekit.prune(trained_mlp, 0.6, data=digits_flat, show_progress=False)
    iterative = edgekit.prune(trained_mlp, 0.6, data=digits_flat, steps=3, epochs=2, show_progress=False)
    assert [m.out_features for m in iterative if isinstance(m, nn.Linear)] == [51, 26, 10]  # 40 % of 128, 64
    assert [m.out_features for m in one_shot if isinstance(m, nn.Linear)] == [51, 26, 10]
    assert acc(iterative) >= acc(trained_mlp) - 0.03
    assert acc(iterative) > acc(one_shot)


def test_sensitivity_scan(trained_cnn, digits):
    scan = edgekit.sensitivity(trained_cnn, digits, ratios=(0.25, 0.75), show_progress=False)
    assert scan["baseline_accuracy"] > 0.9
    assert [r["layer"] for r in scan["layers"]] == ["conv1", "conv2", "pw"]
    for row in scan["layers"]:
        accs = row["accuracy"]
        assert accs["0.75"] <= accs["0.25"] + 0.02  # pruning more hurts more
        assert row["tolerates"] in (0.0, 0.25, 0.75)
        if row["tolerates"] > 0:
            assert accs[f"{row['tolerates']:g}"] >= scan["baseline_accuracy"] - scan["tolerance"]


class _Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.norm(self.conv(x)).mean((2, 3)))


class _Sliced(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(self.conv(x)[:, :4].mean((2, 3)))


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:  # data-dependent control flow: not traceable
            return y.mean((2, 3))
        return -y.mean((2, 3))


class _Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 8, 3)
        self.b = nn.Conv2d(8, 8, 3, groups=2)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.b(self.a(x)).mean((2, 3)))


@pytest.mark.parametrize("model,message", [
    (_Gated(), "layer 'norm' \\(GroupNorm\\) has parameters the pruner does not know"),
    (_Sliced(), "operation 'getitem' \\(getitem\\) indexes into a tensor"),
    (_Branchy(), "torch.fx could not trace _Branchy"),
    (_Grouped(), "layer 'b' \\(Conv2d\\) is a grouped convolution \\(groups=2\\)"),
])
def test_unanalysable_models_name_the_blocking_op(model, message):
    before = _state(model)
    with pytest.raises(EdgekitError, match=message):
        edgekit.prune(model, 0.5, input_shape=IMAGE, show_progress=False)
    assert _same_state(before, _state(model))


class _FixedView(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).view(-1, 64))


def test_hard_coded_reshape_keeps_its_channels():
    model = _FixedView().eval()
    pruned = edgekit.prune(model, 0.5, input_shape=IMAGE, show_progress=False)
    assert pruned.c1.out_channels == 4 and pruned.c2.out_channels == 4  # c2 feeds view(-1, 64): kept
    assert pruned(torch.zeros((2,) + IMAGE)).shape == (2, 10)


def test_a_model_in_training_mode_is_left_as_it_was(digits_flat):
    model = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10))
    model.train()
    before = _state(model)
    pruned = edgekit.prune(model, 0.5, criterion="apoz", data=digits_flat, show_progress=False)
    assert model.training and all(m.training for m in model.modules())
    assert _same_state(before, _state(model)), "BatchNorm statistics of the input changed"
    assert pruned[0].out_features == 16 and pruned[1].num_features == 16
