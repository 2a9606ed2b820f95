"""Every zoo architecture (tests/zoo/) fits mps2-an386 and nucleo-f446re or is refused with exact numbers.

`generate` only (no build): random weights, a few random calibration inputs. A model that fits reports
its flash and RAM needs, and they are the project's own weight and arena bytes; a model that does not
fit is refused naming the part, what it needs (the sum of its terms), what the board has, and by how
much it is over (the difference). The MCU-sized copies the other zoo tests use fit both boards; larger
copies at deployment sizes show the refusal on the smaller board."""
import re

import numpy as np
import pytest
import torch

import edgekit
from edgekit.boards import load_board
from edgekit.errors import EdgekitError
from zoo.efficientnet_b0 import EfficientNetB0Style
from zoo.gru_kws import GRUKWS
from zoo.imu_cnn import IMUCNN
from zoo.kws_transformer import KeywordTransformer
from zoo.lstm_kws import LSTMKWS
from zoo.m5 import M5
from zoo.mobilenetv3_small import MobileNetV3Small
from zoo.shufflenet_v2 import ShuffleNetV2
from zoo.tc_resnet import TCResNet
from zoo.unet_tiny import UNetTiny
from zoo.yolov3_tiny import YoloV3Tiny, YoloV3TinyBackbone
from zoo.yolov8n_like import YoloV8nLike

BOARDS = ("mps2-an386", "nucleo-f446re")
FITS_BOTH = {"mps2-an386": True, "nucleo-f446re": True}
# name -> (model factory, input shape (N=1, torch layout), fits per board)
ARCHITECTURES = {
    "mobilenetv3_small": (MobileNetV3Small, (1, 1, 16, 16), FITS_BOTH),
    "efficientnet_b0": (EfficientNetB0Style, (1, 1, 16, 16), FITS_BOTH),
    "shufflenet_v2": (ShuffleNetV2, (1, 1, 16, 16), FITS_BOTH),
    "yolov3_tiny_backbone": (YoloV3TinyBackbone, (1, 1, 16, 16), FITS_BOTH),
    "yolov3_tiny": (YoloV3Tiny, (1, 1, 16, 16), FITS_BOTH),
    "yolov8n_like": (YoloV8nLike, (1, 1, 32, 32), FITS_BOTH),
    "unet_tiny": (UNetTiny, (1, 1, 16, 16), FITS_BOTH),
    "unet_tiny_bilinear": (lambda: UNetTiny(upsample="bilinear"), (1, 1, 16, 16), FITS_BOTH),
    "tc_resnet": (TCResNet, (1, 8, 32), FITS_BOTH),
    "imu_cnn": (IMUCNN, (1, 6, 64), FITS_BOTH),
    "m5": (M5, (1, 1, 256), FITS_BOTH),
    "lstm_kws": (LSTMKWS, (1, 16, 8), FITS_BOTH),
    "gru_kws": (GRUKWS, (1, 16, 8), FITS_BOTH),
    "kws_transformer": (KeywordTransformer, (1, 16, 8), FITS_BOTH),
    "kws_transformer_relu": (lambda: KeywordTransformer(activation="relu"), (1, 16, 8), FITS_BOTH),
    # deployment sizes: a 96x96 U-Net's activations (RAM), a wide ShuffleNetV2's weights (flash)
    "unet_tiny_96x96_width16": (lambda: UNetTiny(width=16), (1, 1, 96, 96),
                                {"mps2-an386": True, "nucleo-f446re": False}),
    "shufflenet_v2_wide": (lambda: ShuffleNetV2(width=(64, 256, 1024)), (1, 1, 16, 16),
                           {"mps2-an386": True, "nucleo-f446re": False}),
}

NUMBER = r"([\d,]+) B \([\d.]+ KiB\)"


def _n(text: str) -> int:
    return int(text.replace(",", ""))


@pytest.fixture(scope="module")
def quantized():
    cache = {}

    def get(name):
        if name not in cache:
            make, shape, _ = ARCHITECTURES[name]
            torch.manual_seed(0)
            x = np.random.default_rng(0).normal(0, 1, (4,) + shape[1:]).astype(np.float32)
            cache[name] = edgekit.quantize(make().eval(), x)
        return cache[name]
    return get


@pytest.mark.parametrize("board", BOARDS)
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_fits_or_is_refused_with_exact_numbers(name, board, quantized, tmp_path):
    q = quantized(name)
    app = load_board(board).get("app")
    try:
        record = edgekit.generate(q, tmp_path / "p", board=board)
    except EdgekitError as exc:
        text = str(exc)
        assert not ARCHITECTURES[name][2][board], f"{name} should fit {board}: {text}"
        assert text.startswith(f"the model does not fit {board}:"), text
        over = re.findall(rf"(flash|RAM): needs {NUMBER} = (.*), the board has {NUMBER}: {NUMBER} too much", text)
        assert over, text
        for part, need, terms, has, too_much in over:
            assert _n(has) == app["flash_size" if part == "flash" else "ram_size"]
            assert _n(too_much) == _n(need) - _n(has) > 0
            assert _n(need) == sum(_n(t) for t in re.findall(NUMBER, terms)) + (2048 if part == "RAM" else 0), text
        return
    assert ARCHITECTURES[name][2][board], f"{name} should not fit {board}: {record['budget_before_build']}"
    flash, ram = record["budget_before_build"]
    flash_need, flash_has, weights = map(_n, re.fullmatch(rf"flash: ~{NUMBER} of {NUMBER} \(weights {NUMBER}\)",
                                                          flash).groups())
    ram_need, ram_has, arena, stack = map(_n, re.fullmatch(rf"RAM:   ~{NUMBER} of {NUMBER} \(arena {NUMBER}, "
                                                           rf"stack {NUMBER}\)", ram).groups())
    assert weights == record["weight_bytes"] and arena == record["arena_bytes"]
    assert (flash_has, ram_has) == (app["flash_size"], app["ram_size"])
    assert weights < flash_need <= flash_has and ram_need == arena + stack + 2048 <= ram_has
