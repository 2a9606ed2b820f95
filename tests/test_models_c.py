"""Whole models, PyTorch -> int8 C on the host: bit-exact with the numpy
reference, int8 accuracy within 1 pp of float on the digits test split, clean
under AddressSanitizer + UndefinedBehaviorSanitizer."""
import numpy as np
import pytest

import edgekit
from edgekit import train


def _deploy(model, calib, x_test, out):
    q = edgekit.quantize(model, calib)
    record = edgekit.generate(q, out)
    edgekit.build(out)
    return q, record, edgekit.run(out, x_test)


@pytest.mark.parametrize("fixture,flat", [("trained_mlp", True), ("trained_cnn", False), ("trained_rescnn", False)])
def test_model_bit_exact_and_accurate(request, fixture, flat, tmp_path):
    model = request.getfixturevalue(fixture)
    data = request.getfixturevalue("digits_flat" if flat else "digits")
    q, record, y_c = _deploy(model, data.x_train[:300], data.x_test, tmp_path / "out")
    y_ref = edgekit.reference_run(q, data.x_test)
    assert np.array_equal(y_c, y_ref), "C outputs differ from the numpy reference"
    # Also bit-exact in the raw int8 domain.
    x_q = edgekit.api.to_ir_inputs(q, data.x_test)
    from edgekit import quant_math as qm
    p = q.tensors[q.inputs[0]].quant
    x_q = qm.quantize(x_q, p.scale[0], p.zero_point[0])
    assert np.array_equal(edgekit.run(tmp_path / "out", x_q, int8=True), edgekit.reference_run(q, x_q, int8=True))
    float_acc = train.accuracy(train.predict(model, data.x_test), data.y_test)
    int8_acc = train.accuracy(y_c, data.y_test)
    assert float_acc > 0.9
    assert int8_acc >= float_acc - 0.01, f"int8 {int8_acc:.4f} vs float {float_acc:.4f}"
    assert record["weight_bytes"] < record["float_weight_bytes"] / 3


def test_sanitizer_build_runs_clean(trained_rescnn, digits, tmp_path):
    out = tmp_path / "out"
    q = edgekit.quantize(trained_rescnn, digits.x_train[:100])
    edgekit.generate(q, out)
    edgekit.build(out, sanitize=True)
    y = edgekit.run(out, digits.x_test[:50], sanitize=True)
    assert np.array_equal(y, edgekit.reference_run(q, digits.x_test[:50]))


def test_weight_only_mode_end_to_end(trained_cnn, digits, tmp_path):
    out = tmp_path / "out"
    g = edgekit.quantize(trained_cnn, digits.x_train[:10], weight_only=True)
    record = edgekit.generate(g, out)
    assert record["mode"] == "weight_only"
    edgekit.build(out)
    y = edgekit.run(out, digits.x_test)
    np.testing.assert_allclose(y, edgekit.reference_run(g, digits.x_test), rtol=1e-4, atol=1e-4)
    float_acc = train.accuracy(train.predict(trained_cnn, digits.x_test), digits.y_test)
    assert train.accuracy(y, digits.y_test) >= float_acc - 0.01
    assert record["weight_bytes"] < record["float_weight_bytes"] / 2


def test_percentile_observer(trained_cnn, digits, tmp_path):
    q = edgekit.quantize(trained_cnn, digits.x_train[:200], observer="percentile", percentile=99.9)
    edgekit.generate(q, tmp_path)
    edgekit.build(tmp_path)
    y = edgekit.run(tmp_path, digits.x_test)
    assert np.array_equal(y, edgekit.reference_run(q, digits.x_test))
    assert train.accuracy(y, digits.y_test) > 0.9


def test_softmax_model(digits_flat, tmp_path):
    import torch
    from edgekit import models
    model = torch.nn.Sequential(models.digits_mlp((32,)), torch.nn.Softmax(dim=1))
    train.train_classifier(model[0], digits_flat.x_train, digits_flat.y_train, epochs=15, show_progress=False)
    q = edgekit.quantize(model, digits_flat.x_train[:200])
    edgekit.generate(q, tmp_path)
    edgekit.build(tmp_path)
    y = edgekit.run(tmp_path, digits_flat.x_test)
    assert np.array_equal(y, edgekit.reference_run(q, digits_flat.x_test))
    assert np.allclose(y.sum(axis=1), 1.0, atol=0.05)
