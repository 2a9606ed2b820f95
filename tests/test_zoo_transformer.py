"""The tiny keyword transformer (tests/zoo/kws_transformer.py: Linear embedding on (N, L, C), class
token, learned position embedding, pre-norm encoder with LayerNorm, two-head self-attention and a GELU
MLP): trained on the synthetic keyword sequences of tests/zoo/sequence_data.py (fixed seed), int8
accuracy from the generated C's outputs within 1 pp of float, the host C bit-exact with the reference,
the export run by tflite-runtime with the same outputs, budgets on the MCU boards, and one run on the
emulated Cortex-M4 bit-exact. TFLite Micro has no GELU kernel: the ReLU variant is checked there
(tests/test_ops_norm_attn.py)."""
import shutil

import numpy as np
import pytest

import edgekit
from edgekit import quant_math as qm
from edgekit import train
from edgekit.frontends.tflite import load_tflite
from test_ops_sequence import run_stateful
from zoo.kws_transformer import KeywordTransformer
from zoo.sequence_data import keyword_sequences, split


@pytest.fixture(scope="module")
def sequences():
    return split(*keyword_sequences())


@pytest.fixture(scope="module")
def trained(sequences):
    xtr, ytr, _, _ = sequences
    train.seed_everything(0)
    model = train.train_classifier(KeywordTransformer(), xtr, ytr, epochs=40, show_progress=False)
    return model, edgekit.quantize(model, xtr[:200])


def _int8_inputs(q, x):
    p = q.tensors[q.inputs[0]].quant
    return qm.quantize(edgekit.api.to_ir_inputs(q, x), p.scale[0], p.zero_point[0])


def test_keyword_transformer_trained_int8_c_tflite(trained, sequences, tmp_path):
    model, q = trained
    _, _, xte, yte = sequences
    kinds = {op.kind for op in q.ops}
    assert {"batch_matmul", "softmax", "gelu", "rsqrt", "reduce_mean", "concat"} <= kinds
    acc_float = train.accuracy(train.predict(model, xte), yte)
    x_q = _int8_inputs(q, xte)
    edgekit.generate(q, tmp_path / "c", board="host")
    edgekit.build(tmp_path / "c", sanitize=True)
    y_c = edgekit.run(tmp_path / "c", x_q, int8=True, sanitize=True)
    ref = edgekit.reference_run(q, x_q, int8=True)
    assert np.array_equal(y_c, ref), f"{int(np.sum(y_c != ref))} C outputs differ from the reference"
    acc_c = train.accuracy(y_c.astype(np.float32), yte)
    assert acc_float > 0.85, acc_float
    assert acc_c >= acc_float - 0.01, (acc_float, acc_c)

    path = edgekit.export_tflite(q, tmp_path / "kwt.tflite", io="int8")
    y_tfl = run_stateful("tflite", path, x_q[:40]).reshape(ref[:40].shape)
    assert np.array_equal(y_tfl, ref[:40]), f"{int(np.sum(y_tfl != ref[:40]))} outputs differ from tflite-runtime"
    back = load_tflite(path)
    assert np.array_equal(edgekit.reference_run(back, x_q[:40], int8=True), ref[:40])


@pytest.mark.parametrize("board", ["mps2-an386", "nucleo-f446re"])
def test_keyword_transformer_budget(trained, tmp_path, board):
    _, q = trained
    record = edgekit.generate(q, tmp_path / board, board=board)
    assert record["budget_before_build"]


@pytest.mark.qemu
@pytest.mark.skipif(shutil.which("qemu-system-arm") is None or shutil.which("arm-none-eabi-gcc") is None,
                    reason="needs qemu-system-arm and arm-none-eabi-gcc (make setup)")
def test_keyword_transformer_on_emulated_m4(trained, sequences, tmp_path):
    from edgekit.device.emulator import Emulator
    from edgekit.device.flash import flash_project
    from edgekit.device.profile import profile

    _, q = trained
    out = tmp_path / "m4"
    with Emulator("mps2-an386") as emu:
        edgekit.generate(q, out, board="mps2-an386")
        edgekit.build(out)
        flash_project(out, emu.url, show_progress=False)
        report = profile(emu.url, sequences[2][:4], project_dir=out, labels=sequences[3][:4], show_progress=False)
    assert report["bit_exact"], report["mismatches"]
    assert report["unit"] == "emulated instructions"
