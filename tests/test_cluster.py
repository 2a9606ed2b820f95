"""edgekit.cluster: k-means weight sharing, fine-tuned centroids, and what
quantization and the weight encodings make of it."""
import numpy as np
import pytest
import torch
from torch import nn

import edgekit
from edgekit import train
from edgekit.errors import EdgekitError
from edgekit.passes.quantize import shares_values


def _small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, groups=6), nn.ReLU(),
                         nn.Flatten(), nn.Linear(6 * 6 * 6, 10)).eval()


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("weight")}


@pytest.mark.parametrize("bits", [1, 2, 3, 5])
@pytest.mark.parametrize("per_channel", [False, True])
def test_at_most_2_to_the_bits_values(bits, per_channel):
    model = _small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clustered = edgekit.cluster(model, bits, per_channel=per_channel, show_progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), "the input model was changed"
    for name, w in _weights(clustered).items():
        groups = w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)
        for g in groups:
            assert 1 <= torch.unique(g).numel() <= 2 ** bits, name
        # each weight went to a nearby centroid: clustering is a small change at 5 bits
        if bits == 5:
            original = dict(model.named_parameters())[name]
            assert (w - original).abs().max() < 0.25 * original.abs().max()


def test_deterministic():
    a = _weights(edgekit.cluster(_small_model(), 3, show_progress=False))
    b = _weights(edgekit.cluster(_small_model(), 3, show_progress=False))
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_pruned_zeros_stay_zero_through_fine_tuning():
    model = _small_model()
    with torch.no_grad():
        for w in _weights(model):
            p = dict(model.named_parameters())[w]
            p[p.abs() < p.abs().median()] = 0.0
    zeros = {n: (w == 0) for n, w in _weights(model).items()}
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (64, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, 64)
    plain = edgekit.cluster(model, 2, show_progress=False)
    tuned = edgekit.cluster(model, 2, data=(x, y), epochs=3, lr=1e-2, show_progress=False)
    for name, w in _weights(tuned).items():
        assert torch.equal(w == 0, zeros[name]), f"{name}: sparsity changed"
        assert torch.unique(w).numel() <= 4
        # same assignment: weights that shared a centroid before fine-tuning still share one
        before = _weights(plain)[name].reshape(-1)
        _, label_before = torch.unique(before, return_inverse=True)
        _, label_after = torch.unique(w.reshape(-1), return_inverse=True)
        pairs = set(zip(label_before.tolist(), label_after.tolist()))
        assert len({a for a, _ in pairs}) == len(pairs), f"{name}: a cluster was split"
        assert not torch.equal(before, w.reshape(-1)), f"{name}: fine-tuning changed nothing"


def test_fine_tuning_recovers_loss(trained_mlp, digits_flat):
    d = digits_flat
    loss = nn.CrossEntropyLoss()

    def train_loss(m):
        with torch.no_grad():
            return float(loss(m(torch.as_tensor(d.x_train)), torch.as_tensor(d.y_train)))

    plain = edgekit.cluster(trained_mlp, 2, show_progress=False)
    tuned = edgekit.cluster(trained_mlp, 2, data=d, epochs=4, show_progress=False)
    assert train_loss(tuned) < train_loss(plain)
    assert train.accuracy(train.predict(tuned, d.x_test), d.y_test) > 0.9


def test_clustered_layers_keep_one_codebook_after_quantization(trained_mlp, digits_flat, cbuild, tmp_path):
    from edgekit.codegen.project import filter_rows
    from edgekit.codegen.weights import encode_filter
    from helpers import run_c

    d = digits_flat
    clustered = edgekit.cluster(trained_mlp, 4, show_progress=False)
    q = edgekit.quantize(clustered, d.x_train[:200])
    for op in q.ops:
        if op.kind == "fully_connected":
            w = q.tensors[op.inputs[1]]
            assert np.unique(w.data).size <= 16
            assert np.all(w.quant.scale == w.quant.scale[0]), "a clustered layer has one weight scale"
            enc = encode_filter("w", filter_rows(q, op), "codebook")
            assert enc.fields == {"bits": 4, "codebook_stride": 0}
    record = edgekit.generate(q, tmp_path, weights="codebook")
    model_c = (tmp_path / "model.c").read_text()
    assert model_c.count("ek_layer_quant") == 3 and ", 0 };" in model_c  # one multiplier per layer
    x = edgekit.api.to_ir_inputs(q, d.x_test)
    from edgekit import quant_math as qm
    p = q.tensors[q.inputs[0]].quant
    x_q = qm.quantize(x, p.scale[0], p.zero_point[0])
    got = run_c(cbuild.build(tmp_path), [x_q], 10)
    assert np.array_equal(got, edgekit.reference_run(q, x_q, int8=True))
    float_acc = train.accuracy(train.predict(clustered, d.x_test), d.y_test)
    assert train.accuracy(got, d.y_test) >= float_acc - 0.01
    assert record["weight_bytes"] < record["float_weight_bytes"] / 6


def test_batchnorm_is_folded_so_the_deployed_layers_share_values(trained_cnn, digits):
    clustered = edgekit.cluster(trained_cnn, 4, show_progress=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in clustered.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in trained_cnn.modules()), "the input model was changed"
    q = edgekit.quantize(clustered, digits.x_train[:100])
    for op in q.ops:
        if op.kind in ("conv2d", "depthwise_conv2d", "fully_connected"):
            assert np.unique(q.tensors[op.inputs[1]].data).size <= 16, op.name
    float_acc = train.accuracy(train.predict(trained_cnn, digits.x_test), digits.y_test)
    assert train.accuracy(edgekit.reference_run(q, digits.x_test), digits.y_test) > float_acc - 0.03


def test_shares_values_tells_clustered_from_trained_and_pruned():
    rng = np.random.default_rng(0)
    w = rng.normal(0, 1, (32, 64))
    assert not shares_values(w)
    pruned = w.copy()
    pruned[np.abs(pruned) < 1.5] = 0
    assert not shares_values(pruned)
    clustered = rng.choice(rng.normal(0, 1, 16), (32, 64))
    assert shares_values(clustered)
    clustered[rng.random(clustered.shape) < 0.9] = 0
    assert shares_values(clustered)
    assert not shares_values(rng.normal(0, 1, (3, 3)))  # a tiny layer with distinct weights


def test_bad_arguments():
    model = _small_model()
    for bits in (0, 9, 2.5):
        with pytest.raises(EdgekitError, match="bits"):
            edgekit.cluster(model, bits, show_progress=False)
    with pytest.raises(EdgekitError, match="needs data"):
        edgekit.cluster(model, 2, epochs=2, show_progress=False)
    with pytest.raises(EdgekitError, match="no Conv1d"):
        edgekit.cluster(nn.Sequential(nn.ReLU()), 2, show_progress=False)
    with pytest.raises(EdgekitError, match="nn.Module"):
        edgekit.cluster("model.pt2", 2, show_progress=False)
    with pytest.raises(EdgekitError, match="samples"):
        edgekit.cluster(model, 2, data=(np.zeros((4, 1, 8, 8)), np.zeros(3)), epochs=1, show_progress=False)
