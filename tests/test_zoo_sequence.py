"""Sequence architectures (ops-sequence): PyTorch -> edgekit -> C, bit for bit, trained on the synthetic
keyword sequences of tests/zoo/sequence_data.py (fixed seed) with int8 accuracy within 1 pp of float;
exported to .tflite and run by tflite-runtime (BUILTIN_REF) and TFLite Micro; budgets on the MCU boards;
the emulated Cortex-M4 runs one whole model bit-exact."""
import shutil

import numpy as np
import pytest
import torch

import edgekit
from edgekit import quant_math as qm
from edgekit import train
from edgekit.errors import EdgekitError
from edgekit.frontends.tflite import load_tflite
from test_ops_sequence import run_stateful
from zoo.lstm_kws import LSTMKWS
from zoo.sequence_data import keyword_sequences, split


@pytest.fixture(scope="module")
def sequences():
    return split(*keyword_sequences())


@pytest.fixture(scope="module")
def trained_lstm(sequences):
    xtr, ytr, _, _ = sequences
    train.seed_everything(0)
    model = LSTMKWS(hidden=16, head="all")
    return train.train_classifier(model, xtr, ytr, epochs=12, show_progress=False)


def _int8_inputs(q, x):
    p = q.tensors[q.inputs[0]].quant
    return qm.quantize(edgekit.api.to_ir_inputs(q, x), p.scale[0], p.zero_point[0])


def test_lstm_frontend_matches_torch():
    """Two stacked layers, the output sequence itself: the float IR computes what torch computes."""
    torch.manual_seed(0)
    model = LSTMKWS(channels=5, hidden=7, steps=9, layers=2, head="sequence").eval()
    x = np.random.default_rng(0).normal(0, 1, (6, 9, 5)).astype(np.float32)
    g = edgekit.load(model, example_input=x[:1])
    assert [op.kind for op in g.ops] == ["lstm", "lstm"]
    from edgekit import reference
    got = reference.run(g, x)[0]
    with torch.no_grad():
        want = model(torch.as_tensor(x)).numpy()
    assert np.abs(got - want).max() < 1e-5


def test_lstm_kws_trained_int8_c_tflite(trained_lstm, sequences, tmp_path):
    xtr, _, xte, yte = sequences
    acc_float = train.accuracy(train.predict(trained_lstm, xte), yte)
    q = edgekit.quantize(trained_lstm, xtr[:200])
    acc_int8 = train.accuracy(edgekit.reference_run(q, xte), yte)
    assert acc_float > 0.85, acc_float
    assert acc_int8 >= acc_float - 0.01, (acc_float, acc_int8)

    x_q = _int8_inputs(q, xte[:24])
    edgekit.generate(q, tmp_path / "c", board="host")
    edgekit.build(tmp_path / "c", sanitize=True)
    y_c = edgekit.run(tmp_path / "c", x_q, int8=True, sanitize=True)
    assert np.array_equal(y_c, edgekit.reference_run(q, x_q, int8=True))

    path = edgekit.export_tflite(q, tmp_path / "lstm_kws.tflite", io="int8")
    y_tfl = run_stateful("tflite", path, x_q).reshape(y_c.shape)
    assert np.array_equal(y_c, y_tfl), f"{int(np.sum(y_c != y_tfl))} outputs differ from tflite-runtime"
    # TFLite Micro's integer LSTM uses its own int16 sigmoid / tanh: the logits may move by a step or two.
    y_tflm = run_stateful("tflm", path, x_q).reshape(y_c.shape).astype(np.int64)
    assert np.abs(y_tflm - y_c).max() <= 3
    assert np.array_equal(y_tflm.argmax(axis=1), y_c.argmax(axis=1))
    back = load_tflite(path)
    assert [op.kind for op in back.ops] == [op.kind for op in q.ops]
    assert np.array_equal(edgekit.reference_run(back, x_q, int8=True), y_c)


@pytest.mark.parametrize("board", ["mps2-an386", "nucleo-f446re"])
def test_lstm_kws_budget(trained_lstm, sequences, tmp_path, board):
    q = edgekit.quantize(trained_lstm, sequences[0][:200])
    record = edgekit.generate(q, tmp_path / board, board=board)
    assert record["budget_before_build"] and record["scratch_bytes"] >= 2 * 5 * 16


def test_lstm_kws_last_step(sequences, tmp_path):
    """The usual head, output[:, -1]: needs the slicing of ops-structure (aten.select)."""
    model = LSTMKWS(head="last").eval()
    try:
        q = edgekit.quantize(model, sequences[0][:64])
    except EdgekitError as exc:
        if "select" in str(exc):
            pytest.xfail("output[:, -1] (aten.select) comes with ops-structure's slicing")
        raise
    x_q = _int8_inputs(q, sequences[2][:8])
    ref = edgekit.reference_run(q, x_q, int8=True)
    assert ref.shape == (8, 4)
    edgekit.generate(q, tmp_path / "c", board="host")
    edgekit.build(tmp_path / "c", sanitize=True)
    assert np.array_equal(edgekit.run(tmp_path / "c", x_q, int8=True, sanitize=True), ref)
    path = edgekit.export_tflite(q, tmp_path / "last.tflite", io="int8")
    assert np.array_equal(run_stateful("tflite", path, x_q).reshape(ref.shape), ref)


def test_lstm_refusals():
    class BiLSTM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = torch.nn.LSTM(4, 6, batch_first=True, bidirectional=True)

        def forward(self, x):
            return self.rnn(x)[0]

    class FinalState(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = torch.nn.LSTM(4, 6, batch_first=True)

        def forward(self, x):
            return self.rnn(x)[1][0]

    x = torch.zeros(1, 5, 4)
    with pytest.raises(EdgekitError, match=r"layer 'rnn' \(\S*LSTM\).*bidirectional"):
        edgekit.load(BiLSTM(), example_input=x)
    with pytest.raises(EdgekitError, match=r"layer 'rnn' \(\S*LSTM\).*final states"):
        edgekit.load(FinalState(), example_input=x)


@pytest.mark.qemu
@pytest.mark.skipif(shutil.which("qemu-system-arm") is None or shutil.which("arm-none-eabi-gcc") is None,
                    reason="needs qemu-system-arm and arm-none-eabi-gcc (make setup)")
def test_lstm_kws_on_emulated_m4(trained_lstm, sequences, tmp_path):
    from edgekit.device.emulator import Emulator
    from edgekit.device.flash import flash_project
    from edgekit.device.profile import profile

    q = edgekit.quantize(trained_lstm, sequences[0][:200])
    out = tmp_path / "m4"
    with Emulator("mps2-an386") as emu:
        edgekit.generate(q, out, board="mps2-an386")
        edgekit.build(out)
        flash_project(out, emu.url, show_progress=False)
        report = profile(emu.url, sequences[2][:12], project_dir=out, labels=sequences[3][:12], show_progress=False)
    assert report["bit_exact"], report["mismatches"]
    assert report["unit"] == "emulated instructions"


class _DotAttention(torch.nn.Module):
    """Self-attention's core on (N, L, C): softmax(x x^T) x with bmm, or F.scaled_dot_product_attention."""

    def __init__(self, fused: bool):
        super().__init__()
        self.fused = fused

    def forward(self, x):
        if self.fused:
            return torch.nn.functional.scaled_dot_product_attention(x, x, x)
        return torch.bmm(torch.softmax(torch.bmm(x, x.transpose(1, 2)), -1), x)


@pytest.mark.parametrize("fused", [False, True])
def test_attention_core_torch_c_tflite(fused, tmp_path):
    """x.transpose(1, 2) costs nothing: the product reads it through BATCH_MATMUL's adj_y. The scale of
    scaled_dot_product_attention becomes the softmax's beta. Float IR == torch; int8 C == reference ==
    tflite-runtime == TFLite Micro; imported back."""
    model = _DotAttention(fused).eval()
    x = np.random.default_rng(0).normal(0, 1, (40, 6, 4)).astype(np.float32)
    g = edgekit.load(model, example_input=x[:1])
    assert [op.kind for op in g.ops] == ["batch_matmul", "softmax", "batch_matmul"]
    assert g.ops[0].attrs["adj_y"] and not g.ops[0].attrs["adj_x"]
    from edgekit import reference
    with torch.no_grad():
        want = model(torch.as_tensor(x)).numpy()
    assert np.abs(reference.run(g, x)[0] - want).max() < 1e-5

    q = edgekit.quantize(model, x[:32])
    x_q = _int8_inputs(q, x[32:])
    ref = edgekit.reference_run(q, x_q, int8=True)
    edgekit.generate(q, tmp_path / "c", board="host")
    edgekit.build(tmp_path / "c", sanitize=True)
    assert np.array_equal(edgekit.run(tmp_path / "c", x_q, int8=True, sanitize=True), ref)
    path = edgekit.export_tflite(q, tmp_path / "attention.tflite", io="int8")
    assert np.array_equal(run_stateful("tflite", path, x_q).reshape(ref.shape), ref)
    assert np.array_equal(run_stateful("tflm", path, x_q).reshape(ref.shape), ref)
    back = load_tflite(path)
    assert np.array_equal(edgekit.reference_run(back, x_q, int8=True), ref)


# ---------------------------------------------------------------------------
# GRU: unrolled into FULLY_CONNECTED / LOGISTIC / TANH / MUL / SUB / ADD (ops-pointwise's ops)
# ---------------------------------------------------------------------------

def test_gru_frontend_matches_torch():
    from zoo.gru_kws import GRUKWS
    torch.manual_seed(0)
    model = GRUKWS(channels=5, hidden=7, steps=6, layers=2, head="sequence").eval()
    x = np.random.default_rng(0).normal(0, 1, (6, 6, 5)).astype(np.float32)
    g = edgekit.load(model, example_input=x[:1])
    assert {op.kind for op in g.ops} == {"slice", "reshape", "fully_connected", "add", "logistic", "tanh", "mul",
                                         "sub", "concat"}
    from edgekit import reference
    with torch.no_grad():
        want = model(torch.as_tensor(x)).numpy()
    assert np.abs(reference.run(g, x)[0] - want).max() < 1e-5


def test_gru_kws_trained_int8_c_tflite(sequences, tmp_path):
    from zoo.gru_kws import GRUKWS
    xtr, ytr, xte, yte = sequences
    train.seed_everything(0)
    model = train.train_classifier(GRUKWS(head="all"), xtr, ytr, epochs=12, show_progress=False)
    acc_float = train.accuracy(train.predict(model, xte), yte)
    q = edgekit.quantize(model, xtr[:200])
    acc_int8 = train.accuracy(edgekit.reference_run(q, xte), yte)
    assert acc_float > 0.85 and acc_int8 >= acc_float - 0.01, (acc_float, acc_int8)

    x_q = _int8_inputs(q, xte[:24])
    record = edgekit.generate(q, tmp_path / "c", board="host")
    w = {op.inputs[1] for op in q.ops if op.kind == "fully_connected"}
    # each gate matrix is stored once although every step's FULLY_CONNECTED reads it
    assert record["weight_bytes"] < 2 * sum(q.tensors[n].nbytes for n in w) + 64 * 1024
    edgekit.build(tmp_path / "c", sanitize=True)
    y_c = edgekit.run(tmp_path / "c", x_q, int8=True, sanitize=True)
    assert np.array_equal(y_c, edgekit.reference_run(q, x_q, int8=True))
    path = edgekit.export_tflite(q, tmp_path / "gru_kws.tflite", io="int8")
    assert np.array_equal(run_stateful("tflite", path, x_q).reshape(y_c.shape), y_c)
    assert np.array_equal(run_stateful("tflm", path, x_q).reshape(y_c.shape), y_c)
    assert np.array_equal(edgekit.reference_run(load_tflite(path), x_q, int8=True), y_c)
    for board in ("mps2-an386", "nucleo-f446re"):
        assert edgekit.generate(q, tmp_path / board, board=board)["budget_before_build"]
