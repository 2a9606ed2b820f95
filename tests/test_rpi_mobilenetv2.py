"""MobileNetV2 (torchvision's architecture, edgekit.models.MobileNetV2) on the Raspberry Pi boards:
quantized with random calibration data, generated with the board's four threads, built with the
board's cross compiler, run under qemu-aarch64 (-cpu cortex-a72 / cortex-a76) and compared bit for
bit with the reference. The fast test runs width 0.35 at 96x96 (every block kind: expansion 1 and 6,
strides 1 and 2, residual adds, the 1280-wide last 1x1, global mean, a 10-way classifier); the
slow one the Pi-sized standard model, width 1.0 at 224x224 (3.5 M int8 weights), one image."""
import shutil

import numpy as np
import pytest

import edgekit
from edgekit.codegen.project import load_project
from edgekit.models import MobileNetV2

pytestmark = pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None or shutil.which("qemu-aarch64") is None,
                                reason="needs aarch64-linux-gnu-gcc and qemu-aarch64 (scripts/setup.sh)")


def test_architecture_is_torchvisions():
    """torchvision's mobilenet_v2() has 3,504,872 parameters and 52 convolutions (17 blocks, 16 of them
    with an expansion); width 0.35 keeps the 1280-wide last layer."""
    import torch
    m = MobileNetV2()
    assert sum(p.numel() for p in m.parameters()) == 3_504_872
    assert sum(isinstance(x, torch.nn.Conv2d) for x in m.modules()) == 52
    assert MobileNetV2(width=0.35).features[-1][0].out_channels == 1280
    assert m(torch.zeros(1, 3, 224, 224)).shape == (1, 1000)


def _quantized(width: float, size: int, images: int, classes: int = 1000):
    import torch
    torch.manual_seed(0)
    x = np.random.default_rng(0).uniform(-1, 1, (8 + images, 3, size, size)).astype(np.float32)
    return edgekit.quantize(MobileNetV2(classes, width=width).eval(), x[:8]), x[8:]


def _bit_exact_on_both_pis(q, x, tmp_path):
    want = edgekit.reference_run(q, x)
    for board in ("rpi4", "rpi5"):
        d = tmp_path / board
        edgekit.generate(q, d, board=board)  # threads: the board's 4 cores
        edgekit.build(d)
        record = load_project(d)
        splits = {l.get("split") for l in record["layers"] if l["kind"] == "conv2d"}
        assert record["threads"] == 4 and {"rows", "channels"} <= splits, splits  # 3x3 layers: channel blocks
        assert np.array_equal(edgekit.run(d, x), want), board


def test_mobilenetv2_035_96_bit_exact_on_both_pis(tmp_path):
    q, x = _quantized(0.35, 96, 2, classes=10)
    _bit_exact_on_both_pis(q, x, tmp_path)


@pytest.mark.slow
def test_mobilenetv2_224_bit_exact_on_both_pis(tmp_path):
    q, x = _quantized(1.0, 224, 1)
    _bit_exact_on_both_pis(q, x, tmp_path)
