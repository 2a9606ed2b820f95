"""The structure architectures on the emulated Cortex-M4 (mps2-an386 in QEMU): ShuffleNetV2 (chunk,
channel shuffle), a U-Net (a ConvTranspose2d decoder step and an Upsample + concat one) and M5 (a 1-D
model: Conv1d, MaxPool1d, permute, Linear on (N, L, C), log_softmax). Each is generated for the board,
built with arm-none-eabi-gcc, flashed over the emulated serial port and run there on two inputs through
the serial protocol (`edgekit profile`): its outputs must equal the numpy reference bit for bit.

Random weights and small sizes: the DSP kernels and the layout ops are what is tested here (the trained
copies' accuracy is tested on the host, tests/test_zoo_structure*.py); each test is one build and one
QEMU run."""
import shutil

import numpy as np
import pytest
import torch

import edgekit
from zoo.m5 import M5
from zoo.shufflenet_v2 import ShuffleNetV2
from zoo.unet_tiny import UNetTiny

pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(shutil.which("qemu-system-arm") is None or shutil.which("arm-none-eabi-gcc") is None,
                                 reason="needs qemu-system-arm and arm-none-eabi-gcc (make setup)")]


def bit_exact_on_m4(model, x_calibration, x, tmp_path) -> dict:
    """Quantize on ``x_calibration``, generate + build for mps2-an386, run ``x`` over the serial protocol."""
    from edgekit.device.emulator import Emulator
    from edgekit.device.flash import flash_project
    from edgekit.device.profile import profile

    q = edgekit.quantize(model.eval(), x_calibration)
    out = tmp_path / "m4"
    edgekit.generate(q, out, board="mps2-an386")
    edgekit.build(out)
    with Emulator("mps2-an386") as emu:
        flash_project(out, emu.url, show_progress=False)
        report = profile(emu.url, x, project_dir=out, show_progress=False)
    assert report["unit"] == "emulated instructions" and report["runs"] == len(x)
    assert report["bit_exact"], report["mismatches"]
    return {op.kind for op in q.ops}


def test_shufflenet_v2_on_emulated_m4(rng, tmp_path):
    torch.manual_seed(0)
    x = rng.normal(0, 1, (34, 1, 16, 16)).astype(np.float32)
    kinds = bit_exact_on_m4(ShuffleNetV2(width=(8, 16, 32)), x[:32], x[32:], tmp_path)
    assert {"split", "transpose", "depthwise_conv2d", "concat"} <= kinds


@pytest.mark.parametrize("upsample", ["nearest", "bilinear"])
def test_unet_on_emulated_m4(upsample, rng, tmp_path):
    torch.manual_seed(0)
    x = rng.normal(0, 1, (34, 1, 8, 8)).astype(np.float32)
    kinds = bit_exact_on_m4(UNetTiny(width=4, upsample=upsample), x[:32], x[32:], tmp_path)
    assert {"transpose_conv2d", f"resize_{upsample}", "concat"} <= kinds


def test_m5_on_emulated_m4(rng, tmp_path):
    torch.manual_seed(0)
    x = rng.normal(0, 1, (34, 1, 256)).astype(np.float32)
    kinds = bit_exact_on_m4(M5(channels=8), x[:32], x[32:], tmp_path)
    assert {"conv2d", "max_pool2d", "fully_connected", "log_softmax"} <= kinds
