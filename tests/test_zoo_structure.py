"""Architectures that need the structure ops (issue 10), MCU-sized and trained: TC-ResNet, an IMU
1-D CNN and M5 on a synthetic signal set (tests/zoo/signals.py), ShuffleNetV2 on digits (16x16).

For each: the host C build (ASan + UBSan) is bit-exact with the numpy reference; the int8 accuracy of
the trained copy on held-out data is within 1 pp of float; the .tflite export runs in tflite-runtime
(BUILTIN_REF) and TensorFlow Lite Micro with the same outputs and imports back; `generate` fits it or
refuses it with exact numbers on mps2-an386 and nucleo-f446re.
"""
import numpy as np
import pytest

import edgekit
from edgekit import train
from edgekit.errors import EdgekitError
from test_ops_structure import int8_everywhere
from zoo.imu_cnn import IMUCNN
from zoo.m5 import M5, m5_loss
from zoo.shufflenet_v2 import ShuffleNetV2
from zoo.signals import signals
from zoo.tc_resnet import TCResNet


def digits16(digits):
    up = lambda x: np.ascontiguousarray(x.repeat(2, axis=2).repeat(2, axis=3))  # noqa: E731
    return up(digits.x_train), digits.y_train, up(digits.x_test), digits.y_test


# name -> (model factory, data factory, epochs, ops the graph must contain[, training loss])
ARCHITECTURES = {
    "tc_resnet": (TCResNet, lambda d: signals(8, 32), 12, {"conv2d", "max_pool2d", "avg_pool2d", "mean", "add"}),
    "imu_cnn": (IMUCNN, lambda d: signals(6, 64), 12, {"conv2d", "max_pool2d", "mean", "concat"}),
    "m5": (M5, lambda d: signals(1, 256), 15, {"conv2d", "max_pool2d", "log_softmax"}, m5_loss),
    "shufflenet_v2": (ShuffleNetV2, digits16, 10, {"split", "transpose", "depthwise_conv2d", "concat"}),
}


@pytest.fixture(scope="module")
def zoo(digits):
    cache = {}

    def get(name):
        if name not in cache:
            make, data, epochs, _, *loss = ARCHITECTURES[name]
            x_train, y_train, x_test, y_test = data(digits)
            train.seed_everything(0)
            model = train.train_classifier(make(), x_train, y_train, epochs=epochs, show_progress=False,
                                           loss_fn=loss[0] if loss else None).eval()
            cache[name] = (model, x_train, x_test, y_test)
        return cache[name]
    return get


def budget_or_refusal(q, board, out) -> str:
    try:
        return "\n".join(edgekit.generate(q, out, board=board)["budget_before_build"])
    except EdgekitError as exc:
        return str(exc)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_architecture_bit_exact_accurate_and_sized(name, zoo, cbuild, tmp_path):
    model, x_train, x_test, y_test = zoo(name)
    g = edgekit.load(model, x_train[:1])
    q = edgekit.quantize(g, x_train[:200])
    assert ARCHITECTURES[name][3] <= {op.kind for op in q.ops}
    int8_everywhere(q, x_test[:16], tmp_path, cbuild)  # C (ASan + UBSan) == reference == TFLite == TFLM
    float_acc = train.accuracy(train.predict(model, x_test), y_test)
    int8_acc = train.accuracy(edgekit.reference_run(q, x_test), y_test)
    assert float_acc > 0.8, f"float accuracy {float_acc:.3f}: the copy did not train"
    assert int8_acc >= float_acc - 0.01, f"int8 {int8_acc:.4f} vs float {float_acc:.4f}"
    for board in ("mps2-an386", "nucleo-f446re"):
        text = budget_or_refusal(q, board, tmp_path / board)
        assert " B (" in text, text  # exact byte counts, fitting or not

