"""Dense-prediction architectures that need the structure ops (issue 10): a tiny U-Net (ConvTranspose2d,
nearest Upsample, skip concats) segmenting the strokes of 16x16 digits, trained; a YOLOv8n-like detector
(C2f chunk, SPPF max-pool 5/1/2, nearest upsample, two heads) with random weights. Each: the host C (ASan +
UBSan) == reference == tflite-runtime (and TFLite Micro for one-output models), the export imports back, and
`generate` fits it or refuses it with exact numbers on mps2-an386 and nucleo-f446re."""
import numpy as np
import pytest
import torch

import edgekit
from edgekit import train
from edgekit.errors import EdgekitError
from test_ops_structure import int8_everywhere
from test_zoo_structure import budget_or_refusal, digits16
from zoo.unet_tiny import UNetTiny
from zoo.yolov8n_like import YoloV8nLike


def test_unet_tiny_segments_bit_exact_and_accurate(digits, cbuild, tmp_path):
    """Per-pixel stroke / background of 16x16 digits: pixel accuracy of the int8 copy within 1 pp of float."""
    x_train, _, x_test, _ = digits16(digits)
    masks = lambda x: (x[:, 0] > 0.3).astype(np.int64)  # noqa: E731
    train.seed_everything(0)
    model = train.train_classifier(UNetTiny(), x_train[:600], masks(x_train[:600]), epochs=4,
                                   show_progress=False).eval()
    q = edgekit.quantize(model, x_train[:100])
    assert {"transpose_conv2d", "resize_nearest", "concat"} <= {op.kind for op in q.ops}
    int8_everywhere(q, x_test[:8], tmp_path, cbuild)
    pixel_acc = lambda logits: float((np.asarray(logits).argmax(axis=1) == masks(x_test)).mean())  # noqa: E731
    float_acc = pixel_acc(train.predict(model, x_test))
    int8_acc = pixel_acc(edgekit.reference_run(q, x_test))
    assert float_acc > 0.9 and int8_acc >= float_acc - 0.01, (float_acc, int8_acc)
    for board in ("mps2-an386", "nucleo-f446re"):
        assert " B (" in budget_or_refusal(q, board, tmp_path / board)


@pytest.mark.parametrize("act", ["relu", "silu"])
def test_yolov8n_like_structure_bit_exact(act, cbuild, tmp_path):
    """Random weights (a detector's accuracy on digits says little): C == reference == TFLite == TFLM, both
    heads; SiLU comes from the pointwise ops (ops-pointwise), ReLU checks the same structure on its own."""
    torch.manual_seed(0)
    model = YoloV8nLike(act={"relu": torch.nn.ReLU, "silu": torch.nn.SiLU}[act]).eval()
    x = np.random.default_rng(7).uniform(0, 1, (24, 1, 32, 32)).astype(np.float32)
    try:
        g = edgekit.load(model, x[:1])
    except EdgekitError as exc:
        if act == "silu" and "silu" in str(exc):
            pytest.skip("SiLU lands with the pointwise ops (ops-pointwise branch)")
        raise
    kinds = {op.kind for op in g.ops}
    assert {"split", "max_pool2d", "resize_nearest", "concat"} <= kinds, kinds
    q = int8_everywhere(g, x, tmp_path, cbuild)
    for board in ("mps2-an386", "nucleo-f446re"):
        assert " B (" in budget_or_refusal(q, board, tmp_path / board)
