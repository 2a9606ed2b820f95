"""Whole models through .tflite: PyTorch -> edgekit's int8 export -> import ->
generated C, bit for bit equal to tflite-runtime's reference kernels
(BUILTIN_REF) and to TensorFlow Lite Micro itself (the tflite-micro package's
interpreter, the code an MCU would run); the importer's errors (unsupported ops listed at once, corrupted
files) and the `edgekit export` command."""
import subprocess
import sys

import numpy as np
import pytest

import edgekit
from edgekit import models, quant_math as qm
from edgekit.errors import EdgekitError
from edgekit.export.tflite import _Model
from edgekit.frontends import tflite_schema as S
from edgekit.frontends.tflite import load_tflite
from edgekit.ir import QuantParams
from test_tflite_reference import tflite_run

EDGEKIT = [sys.executable, "-m", "edgekit.cli"]


def tflm_run(path, x: np.ndarray) -> np.ndarray:
    """Run a one-input, one-output .tflite sample by sample in TensorFlow Lite Micro."""
    from tflite_micro.python.tflite_micro import runtime  # the test extra installs it

    interp = runtime.Interpreter.from_file(str(path))
    d = interp.get_input_details(0)
    outs = []
    for i in range(x.shape[0]):
        interp.set_input(x[i:i + 1].reshape(d["shape"]).astype(d["dtype"]), 0)
        interp.invoke()
        outs.append(interp.get_output(0).copy())
    return np.concatenate(outs)


def _kws_model():
    import torch
    torch.manual_seed(0)
    model = models.ds_cnn_kws(filters=32).eval()
    x = np.random.default_rng(0).normal(0, 1, (64, 1, 49, 10)).astype(np.float32)
    return model, x[:48], x[48:]


def _case(request, name):
    if name == "kws":
        return _kws_model()
    model = request.getfixturevalue(name)
    data = request.getfixturevalue("digits_flat" if name == "trained_mlp" else "digits")
    return model, data.x_train[:200], data.x_test[:60]


@pytest.mark.parametrize("name", ["trained_cnn", "trained_mlp", "trained_rescnn", "kws"])
def test_roundtrip_c_equals_tflite_reference(request, name, tmp_path):
    model, calib, x_test = _case(request, name)
    q = edgekit.quantize(model, calib)
    x_ir = edgekit.api.to_ir_inputs(q, x_test)
    p = q.tensors[q.inputs[0]].quant
    x_q = qm.quantize(x_ir, p.scale[0], p.zero_point[0])

    # int8 I/O: the raw tensors.
    path = edgekit.export_tflite(q, tmp_path / "m8.tflite", io="int8")
    g = load_tflite(path)
    edgekit.generate(g, tmp_path / "c8")
    edgekit.build(tmp_path / "c8")
    y_c = edgekit.run(tmp_path / "c8", x_q, int8=True)
    y_tfl = tflite_run(path, [x_q])[0].reshape(y_c.shape)
    assert np.array_equal(y_c, y_tfl), f"{int(np.sum(y_c != y_tfl))} int8 outputs differ from TFLite"
    assert np.array_equal(y_c, edgekit.reference_run(q, x_q, int8=True))  # and from the PyTorch path's own graph
    y_tflm = tflm_run(path, x_q).reshape(y_c.shape)
    assert np.array_equal(y_c, y_tflm), f"{int(np.sum(y_c != y_tflm))} int8 outputs differ from TFLite Micro"

    # float I/O: QUANTIZE / DEQUANTIZE at the edges, NHWC floats in and out.
    path = edgekit.export_tflite(q, tmp_path / "mf.tflite")
    g = load_tflite(path)
    assert g.is_quantized() and g.source_layouts[g.inputs[0]] in ("NHWC", "NC")
    edgekit.generate(g, tmp_path / "cf")
    edgekit.build(tmp_path / "cf")
    y_c = edgekit.run(tmp_path / "cf", x_ir)
    y_tfl = tflite_run(path, [x_ir])[0].reshape(y_c.shape)
    assert np.array_equal(y_c, y_tfl), f"{int(np.sum(y_c != y_tfl))} float outputs differ from TFLite"
    y_tflm = tflm_run(path, x_ir).reshape(y_c.shape)
    assert np.array_equal(y_c, y_tflm), f"{int(np.sum(y_c != y_tflm))} float outputs differ from TFLite Micro"


def _toy_model(extra_ops):
    """A tiny int8 model: CONV_2D, then the given (code, name) ops chained on its output."""
    m = _Model()
    qp = QuantParams.per_tensor(0.05, 3)
    x = m.tensor("x", (1, 4, 4, 2), "int8", qp)
    w = m.constant("w", np.ones((3, 1, 1, 2), np.int8), "int8",
                   QuantParams(np.full(3, 0.01), np.zeros(3, np.int64), 0))
    b = m.constant("b", np.zeros(3, np.int32), "int32", QuantParams(np.full(3, 0.0005), np.zeros(3, np.int64), 0))
    prev = m.tensor("conv_out", (1, 4, 4, 3), "int8", qp)
    m.op(S.CONV_2D, [x, w, b], [prev], "Conv2DOptions", {0: S.Scalar("b", S.VALID), 1: S.Scalar("i", 1),
                                                         2: S.Scalar("i", 1)})
    for code, out_name in extra_ops:
        out = m.tensor(out_name, (1, 4, 4, 3), "int8", qp)
        m.op(code, [prev], [out])
        prev = out
    return m.serialize([x], [prev], "toy")


def test_unsupported_ops_are_listed_at_once(tmp_path):
    path = tmp_path / "toy.tflite"
    path.write_bytes(_toy_model([(8, "floor_out"), (47, "exp_out"), (S.RELU6, "relu6_out")]))
    with pytest.raises(EdgekitError) as exc:
        load_tflite(path)
    msg = str(exc.value)
    assert "2 operator(s)" in msg
    assert "operator 1 FLOOR (output 'floor_out')" in msg
    assert "operator 2 EXP (output 'exp_out')" in msg
    assert "relu6_out" not in msg  # supported ops are not listed


def test_supported_toy_model_imports(tmp_path):
    path = tmp_path / "toy.tflite"
    path.write_bytes(_toy_model([(S.RELU6, "relu6_out")]))
    g = load_tflite(path)
    assert [op.kind for op in g.ops] == ["conv2d", "relu6"]


def test_not_a_tflite_file(tmp_path):
    path = tmp_path / "junk.tflite"
    path.write_bytes(b"PK\x03\x04 this is a zip, not a flatbuffer")
    with pytest.raises(EdgekitError, match="not a valid .tflite file"):
        load_tflite(path)


def test_truncated_and_corrupted_files_never_crash(trained_cnn, digits, tmp_path):
    """Random truncations and byte flips: a graph or an EdgekitError, nothing else."""
    q = edgekit.quantize(trained_cnn, digits.x_train[:50])
    good = bytes(edgekit.export_tflite(q, tmp_path / "good.tflite").read_bytes())
    rng = np.random.default_rng(7)
    path = tmp_path / "bad.tflite"
    outcomes = {"graph": 0, "error": 0}
    for i in range(400):
        data = bytearray(good)
        if i % 4 == 0:
            data = data[:int(rng.integers(0, len(data)))]
        else:
            for _ in range(int(rng.integers(1, 8))):
                # Flip bytes in the structure (the first and last few KB), where offsets and vtables live.
                pos = int(rng.integers(0, 4096)) if rng.random() < 0.5 else int(rng.integers(0, len(data)))
                data[min(pos, len(data) - 1)] ^= int(rng.integers(1, 256))
        path.write_bytes(bytes(data))
        try:
            load_tflite(path)
            outcomes["graph"] += 1
        except EdgekitError as exc:
            assert str(exc), "an error must say what is wrong"
            outcomes["error"] += 1
    assert outcomes["error"] > 100  # the fuzzing really broke files
    assert path.stat().st_size > 0


def test_cli_export_generate_build_run(trained_cnn, digits, tmp_path):
    import torch
    ep = torch.export.export(trained_cnn.eval(), (torch.as_tensor(digits.x_train[:1]),))
    torch.export.save(ep, tmp_path / "m.pt2")
    np.save(tmp_path / "calib.npy", digits.x_train[:100])

    def run(*args):
        proc = subprocess.run(EDGEKIT + [str(a) for a in args], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        return proc

    run("export", tmp_path / "m.pt2", "--calib", tmp_path / "calib.npy", "-o", tmp_path / "m.tflite", "--int8-io")
    run("generate", tmp_path / "m.tflite", "--board", "host", "-o", tmp_path / "out")
    run("build", tmp_path / "out")
    g = load_tflite(tmp_path / "m.tflite")
    p = g.tensors[g.inputs[0]].quant
    x_q = qm.quantize(digits.x_test[:30].transpose(0, 2, 3, 1), p.scale[0], p.zero_point[0])
    np.save(tmp_path / "xq.npy", x_q)
    run("run", tmp_path / "out", "--int8", "--inputs", tmp_path / "xq.npy", "--output", tmp_path / "yq.npy")
    y = np.load(tmp_path / "yq.npy")
    assert np.array_equal(y, tflite_run(tmp_path / "m.tflite", [x_q])[0])

    (tmp_path / "cut.tflite").write_bytes((tmp_path / "m.tflite").read_bytes()[:500])
    proc = subprocess.run(EDGEKIT + ["generate", str(tmp_path / "cut.tflite"), "-o", str(tmp_path / "o2")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "not a valid .tflite file" in proc.stderr
