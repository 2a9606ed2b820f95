"""Architectures that need the pointwise ops (issue 10), MCU-sized, trained on digits (upsampled
to 16x16): MobileNetV3-small (Hardswish, Hardsigmoid, SE multiply), EfficientNet-B0-style (SiLU,
Sigmoid gate, SE multiply), a YOLOv3-tiny-like backbone (LeakyReLU(0.1)) and the two-head detector.

For each (fast, seeded initial weights calibrated on digits): the host C build (ASan + UBSan) is
bit-exact with the numpy reference, the .tflite export runs in tflite-runtime's reference kernels
and in TensorFlow Lite Micro with the same outputs and reads back, and `generate` fits it or refuses
it with exact numbers on mps2-an386 and nucleo-f446re; MobileNetV3-small also runs bit-exact on the
emulated Cortex-M4. Slow (training): the digits-trained copy's int8 accuracy on the 360 held-out
images is within 1 pp of float (bench/bench_architectures.py records the numbers).
"""
import shutil

import numpy as np
import pytest
import torch

import edgekit
from edgekit import quant_math as qm
from edgekit import train
from edgekit.errors import EdgekitError
from edgekit.frontends.tflite import load_tflite
from helpers import c_matches_reference, tflite_run
from zoo.efficientnet_b0 import EfficientNetB0Style
from zoo.mobilenetv3_small import MobileNetV3Small
from zoo.yolov3_tiny import YoloV3Tiny, YoloV3TinyBackbone

ARCHITECTURES = {"mobilenetv3_small": (MobileNetV3Small, 12), "efficientnet_b0": (EfficientNetB0Style, 12),
                 "yolov3_tiny_backbone": (YoloV3TinyBackbone, 10)}


def digits16(digits):
    """Digits 8x8 upsampled (nearest) to 16x16: room for the stride-2 stems."""
    up = lambda x: np.ascontiguousarray(x.repeat(2, axis=2).repeat(2, axis=3))  # noqa: E731
    return up(digits.x_train), digits.y_train, up(digits.x_test), digits.y_test


def trained(name, digits):
    make, epochs = ARCHITECTURES[name]
    x_train, y_train, _, _ = digits16(digits)
    train.seed_everything(0)
    return train.train_classifier(make(), x_train, y_train, epochs=epochs, show_progress=False).eval()


@pytest.fixture(scope="module")
def zoo(digits):
    """name -> (model with seeded initial weights, its int8 graph calibrated on 64 digits, test images)."""
    cache = {}

    def get(name):
        if name not in cache:
            make, _ = ARCHITECTURES[name]
            torch.manual_seed(0)
            model = make().eval()
            x_train, _, x_test, y_test = digits16(digits)
            cache[name] = (model, edgekit.quantize(model, x_train[:64]), x_test, y_test)
        return cache[name]
    return get


def int8_vs_float(model, q, x_test, y_test) -> tuple[float, float]:
    """Held-out accuracy of the float model and of the int8 graph (numpy reference == the C)."""
    float_acc = train.accuracy(train.predict(model, x_test), y_test)
    int8_acc = train.accuracy(edgekit.reference_run(q, x_test), y_test)
    return float_acc, int8_acc


def budget_or_refusal(q, board, out) -> str:
    """`generate` for a board: the budget lines when it fits, else the refusal (with its numbers)."""
    try:
        record = edgekit.generate(q, out, board=board)
        return "\n".join(record["budget_before_build"])
    except EdgekitError as exc:
        return str(exc)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_architecture_bit_exact_and_sized(name, zoo, cbuild, tmp_path):
    _, q, x_test, _ = zoo(name)
    kinds = {op.kind for op in q.ops}
    expected = {"mobilenetv3_small": {"hard_swish", "mul", "add"}, "efficientnet_b0": {"logistic", "mul"},
                "yolov3_tiny_backbone": {"leaky_relu"}}[name]
    assert expected <= kinds, kinds
    # Host C (ASan + UBSan) == reference, on a few held-out images.
    p = q.tensors[q.inputs[0]].quant
    x_q = qm.quantize(edgekit.api.to_ir_inputs(q, x_test[:16]), p.scale[0], p.zero_point[0])
    c_out, c_ref = c_matches_reference(q, tmp_path / "c", cbuild, {q.inputs[0]: x_q})
    assert np.array_equal(c_out, c_ref)
    # The export runs in tflite-runtime's reference kernels with the same int8 outputs, and reads back.
    path = edgekit.export_tflite(q, tmp_path / "m.tflite", io="int8")
    assert np.array_equal(tflite_run(path, [x_q])[0].reshape(c_ref.shape), c_ref)
    assert np.array_equal(edgekit.reference_run(load_tflite(path), x_q, int8=True).reshape(c_ref.shape), c_ref)
    # Fits, or is refused with exact numbers, on the two Cortex-M4 boards.
    for board in ("mps2-an386", "nucleo-f446re"):
        lines = budget_or_refusal(q, board, tmp_path / board)
        assert lines.startswith("flash: ~") or ("does not fit" in lines and "too much" in lines), lines


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_trained_int8_accuracy_within_1pp(name, digits):
    model = trained(name, digits)
    x_train, _, x_test, y_test = digits16(digits)
    q = edgekit.quantize(model, x_train[:200])
    float_acc, int8_acc = int8_vs_float(model, q, x_test, y_test)
    assert float_acc > 0.85, float_acc
    assert int8_acc >= float_acc - 0.01, (float_acc, int8_acc)


def test_tflm_runs_the_exports(zoo, tmp_path):
    """TensorFlow Lite Micro (the tflite-micro package's interpreter) runs each export with the same outputs."""
    from test_tflite_models import tflm_run

    for name in ARCHITECTURES:
        _, q, x_test, _ = zoo(name)
        p = q.tensors[q.inputs[0]].quant
        x_q = qm.quantize(edgekit.api.to_ir_inputs(q, x_test[:8]), p.scale[0], p.zero_point[0])
        path = edgekit.export_tflite(q, tmp_path / f"{name}.tflite", io="int8")
        ref = edgekit.reference_run(q, x_q, int8=True)
        got = tflm_run(path, x_q).reshape(ref.shape)
        assert np.array_equal(got, ref), f"{name}: {int(np.sum(got != ref))} outputs differ from TFLM"


def test_yolov3_tiny_two_heads(cbuild, rng, tmp_path):
    """The detector: LeakyReLU(0.1) everywhere, two heads; the second needs a nearest upsample."""
    torch.manual_seed(0)
    model = YoloV3Tiny().eval()
    x = rng.normal(0, 1, (32, 1, 16, 16)).astype(np.float32)
    q = edgekit.quantize(model, x)
    x_q = rng.integers(-128, 128, size=(6,) + q.tensors[q.inputs[0]].shape[1:]).astype(np.int8)
    c_out, c_ref = c_matches_reference(q, tmp_path / "c", cbuild, {q.inputs[0]: x_q})
    assert np.array_equal(c_out, c_ref)


@pytest.mark.qemu
@pytest.mark.skipif(shutil.which("qemu-system-arm") is None or shutil.which("arm-none-eabi-gcc") is None,
                    reason="needs qemu-system-arm and arm-none-eabi-gcc (make setup)")
def test_mobilenetv3_small_on_emulated_cortex_m4(zoo, tmp_path):
    from edgekit.device.emulator import Emulator
    from edgekit.device.flash import flash_project
    from edgekit.device.profile import profile

    _, q, x_test, y_test = zoo("mobilenetv3_small")
    out = tmp_path / "m4"
    edgekit.generate(q, out, board="mps2-an386")
    edgekit.build(out)
    with Emulator("mps2-an386") as emu:
        flash_project(out, emu.url, show_progress=False)
        report = profile(emu.url, x_test[:12], project_dir=out, labels=y_test[:12], show_progress=False)
    assert report["bit_exact"], report["mismatches"]
    assert report["unit"] == "emulated instructions" and report["runs"] == 12
