"""Unstructured pruning, low-rank factorization, distillation, and fine-tuning that keeps them."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import edgekit
from edgekit import models, train
from edgekit.compress import fxgraph
from edgekit.compress.finetune import WeightConstraints, distillation_loss, finetune
from edgekit.compress.sparsify import sparsity_of
from edgekit.errors import EdgekitError


def _acc(model, data):
    return train.accuracy(train.predict(model, data.x_test), data.y_test)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------
# sparsify
# ---------------------------------------------------------------------------

def test_sparsify_zeroes_the_smallest_weights_per_layer():
    torch.manual_seed(0)
    model = models.DigitsCNN().eval()
    before = _state(model)
    sparse = edgekit.sparsify(model, 0.75, show_progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for (name, m), (_, orig) in zip(fxgraph.weight_layers(sparse), fxgraph.weight_layers(model)):
        w, o = m.weight.detach(), orig.weight.detach()
        zeros = (w == 0)
        assert int(zeros.sum()) == round(0.75 * w.numel()), name
        # exactly the smallest magnitudes went, the rest is untouched
        assert float(o[zeros].abs().max()) <= float(o[~zeros].abs().min())
        assert torch.equal(w[~zeros], o[~zeros])
    assert sparsity_of(sparse)["total"] == pytest.approx(0.75, abs=0.01)


def test_sparsify_global_and_per_layer():
    torch.manual_seed(0)
    model = models.digits_mlp().eval()
    with torch.no_grad():
        model[5].weight *= 10  # the last layer's weights are larger: global pruning spares them
    g = edgekit.sparsify(model, 0.9, scope="global", show_progress=False)
    s = sparsity_of(g)
    assert s["total"] == pytest.approx(0.9, abs=1e-4)
    assert s["5"] < s["1"]
    per = edgekit.sparsify(model, 0.5, layers={"3": 0.95}, exclude=["5"], show_progress=False)
    s = sparsity_of(per)
    assert s["1"] == pytest.approx(0.5, abs=1e-4) and s["3"] == pytest.approx(0.95, abs=1e-4) and s["5"] == 0.0
    with pytest.raises(EdgekitError, match="no Conv/Linear layer named 'fc9'"):
        edgekit.sparsify(model, 0.5, exclude=["fc9"], show_progress=False)
    with pytest.raises(EdgekitError, match="fraction in \\[0, 1\\)"):
        edgekit.sparsify(model, 1.2, show_progress=False)


def test_iterative_sparsify_keeps_zeros_through_fine_tuning(trained_mlp, digits_flat):
    sparse = edgekit.sparsify(trained_mlp, 0.9, scope="global", data=digits_flat, steps=3, epochs=2,
                              show_progress=False)
    s = sparsity_of(sparse)
    assert s["total"] == pytest.approx(0.9, abs=1e-4)
    assert _acc(sparse, digits_flat) >= _acc(trained_mlp, digits_flat) - 0.03
    one_shot = edgekit.sparsify(trained_mlp, 0.9, scope="global", show_progress=False)
    assert _acc(sparse, digits_flat) > _acc(one_shot, digits_flat)
    # the zeros reach the int8 graph as zeros
    graph = edgekit.quantize(sparse, digits_flat.x_train[:64])
    w = [graph.tensors[op.inputs[1]].data for op in graph.ops if op.kind == "fully_connected"]
    assert sum(int(np.sum(x == 0)) for x in w) == round(0.9 * sum(x.size for x in w))


# ---------------------------------------------------------------------------
# fine-tuning constraints
# ---------------------------------------------------------------------------

def test_fine_tuning_keeps_clusters_and_zeros(trained_mlp, digits_flat):
    model = copy.deepcopy(trained_mlp)
    with torch.no_grad():  # cluster layer 1 to 8 shared values (one of them zero), layer 3 per channel to 4
        w = model[1].weight
        edges = torch.quantile(w.flatten(), torch.linspace(0, 1, 9)[1:-1])
        codes = torch.bucketize(w, edges)
        centroids = torch.tensor([float(w[codes == k].mean()) for k in range(8)])
        centroids[3] = 0.0
        w.copy_(centroids[codes])
        w3 = model[3].weight
        for row in w3:
            q = torch.quantile(row, torch.tensor([0.25, 0.5, 0.75]))
            c = torch.bucketize(row, q)
            row.copy_(torch.stack([row[c == k].mean() for k in range(4)])[c])
    zeros_before = model[1].weight == 0
    finetune(model, digits_flat, epochs=2, show_progress=False)
    w = model[1].weight.detach()
    assert len(torch.unique(w)) == 8
    assert torch.equal(w == 0, zeros_before)  # the zero cluster stays zero
    assert all(len(torch.unique(row)) <= 4 for row in model[3].weight.detach())
    assert not torch.equal(w, torch.as_tensor(centroids[codes]))  # the centroids did train
    assert len(torch.unique(model[5].weight)) == model[5].weight.numel()  # a dense layer stays free


def test_constraints_leave_dense_layers_alone():
    torch.manual_seed(0)
    assert not WeightConstraints(models.DigitsCNN())


# ---------------------------------------------------------------------------
# low-rank factorization
# ---------------------------------------------------------------------------

def test_factorize_by_rank_is_the_truncated_svd():
    torch.manual_seed(0)
    model = models.digits_mlp().eval()
    small = edgekit.factorize(model, rank=16, layers=["1", "3"])
    assert isinstance(small[1], nn.Sequential) and isinstance(small[3], nn.Sequential)
    assert small[1][0].out_features == 16 and small[1][0].bias is None
    assert fxgraph.count_parameters(small) < fxgraph.count_parameters(model) / 3
    w = model[1].weight.detach().double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    best = (u[:, :16] * s[:16]) @ vh[:16]
    product = small[1][1].weight.detach().double() @ small[1][0].weight.detach().double()
    torch.testing.assert_close(product, best, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(small[1][1].bias, model[1].bias)
    x = torch.rand(5, 64)
    assert small(x).shape == (5, 10)
    edgekit.quantize(small, x.numpy())  # converts to int8 like any model


def test_factorize_by_energy_and_1x1_convs():
    torch.manual_seed(0)
    model = models.DigitsCNN().eval()
    with torch.no_grad():  # make pw exactly rank 4
        model.pw.weight.copy_((torch.randn(32, 4) @ torch.randn(4, 32)).reshape(32, 32, 1, 1))
    small = edgekit.factorize(model, energy=0.999)
    assert isinstance(small.pw, nn.Sequential) and small.pw[0].out_channels == 4
    assert small.conv2 is not model.conv2 and isinstance(small.conv2, nn.Conv2d)  # 3x3 convs are left alone
    assert isinstance(small.fc, nn.Linear)  # 32x10 at any useful rank would not be smaller
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(small(x), model(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(EdgekitError, match="exactly one of rank"):
        edgekit.factorize(model, rank=2, energy=0.5)
    with pytest.raises(EdgekitError, match="layer 'conv2' cannot be factorized"):
        edgekit.factorize(model, rank=2, layers=["conv2"])


# ---------------------------------------------------------------------------
# distillation
# ---------------------------------------------------------------------------

def test_distillation_loss_is_hinton():
    torch.manual_seed(0)
    teacher, student = nn.Linear(4, 3), nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    t, s = teacher(x).detach(), student(x)
    T, alpha = 3.0, 0.6
    p, q = F.softmax(t / T, 1), F.log_softmax(s / T, 1)
    expected = alpha * T * T * (p * (torch.log(p) - q)).sum(1).mean() + (1 - alpha) * F.cross_entropy(s, y)
    torch.testing.assert_close(distillation_loss(teacher, T, alpha)(student, x, y), expected)


def test_distill_recovers_a_pruned_student(trained_cnn, digits):
    teacher_state = _state(trained_cnn)
    student = edgekit.prune(trained_cnn, 0.5, data=digits, show_progress=False)
    before = _acc(student, digits)
    distilled = edgekit.distill(student, trained_cnn, digits, epochs=4, show_progress=False)
    assert all(torch.equal(teacher_state[k], v) for k, v in trained_cnn.state_dict().items())
    assert _acc(distilled, digits) > before + 0.2
    assert _acc(distilled, digits) >= _acc(trained_cnn, digits) - 0.05
    with pytest.raises(EdgekitError, match="temperature"):
        edgekit.distill(student, trained_cnn, digits, temperature=0)
