"""The `edgekit` command, run as a user runs it: real files, real processes."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgekit import models

EDGEKIT = [sys.executable, "-m", "edgekit.cli"]


def edgekit(*args, cwd=None):
    return subprocess.run(EDGEKIT + [str(a) for a in args], capture_output=True, text=True, cwd=cwd, timeout=600)


def assert_clean_failure(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "edgekit: error:" in proc.stderr
    for n in needles:
        assert n in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def saved_cnn(tmp_path_factory, trained_cnn, digits):
    d = tmp_path_factory.mktemp("cli")
    ep = torch.export.export(trained_cnn.eval(), (torch.as_tensor(digits.x_train[:1]),))
    torch.export.save(ep, d / "model.pt2")
    np.save(d / "calib.npy", digits.x_train[:128])
    np.save(d / "x.npy", digits.x_test[:40])
    return d


def test_generate_build_run(saved_cnn, digits, tmp_path):
    d = saved_cnn
    out = tmp_path / "out"
    p = edgekit("generate", d / "model.pt2", "--calib", d / "calib.npy", "--board", "host", "-o", out)
    assert p.returncode == 0, p.stderr
    assert "generated" in p.stdout and (out / "model.c").exists() and (out / "kernels" / "ek_conv2d_s8.c").exists()
    p = edgekit("build", out)
    assert p.returncode == 0, p.stderr
    p = edgekit("run", out, "--inputs", d / "x.npy", "--output", tmp_path / "y.npy")
    assert p.returncode == 0, p.stderr
    y = np.load(tmp_path / "y.npy")
    assert y.shape == (40, 10) and y.dtype == np.float32
    assert (y.argmax(1) == digits.y_test[:40]).mean() > 0.85
    # raw int8 in and out, NHWC, exactly what the C sees
    x_q = np.random.default_rng(0).integers(-128, 128, (5, 8, 8, 1)).astype(np.int8)
    np.save(tmp_path / "xq.npy", x_q)
    p = edgekit("run", out, "--int8", "--inputs", tmp_path / "xq.npy", "--output", tmp_path / "yq.npy")
    assert p.returncode == 0, p.stderr
    yq = np.load(tmp_path / "yq.npy")
    assert yq.dtype == np.int8 and yq.shape == (5, 10)


def test_missing_model_file(tmp_path):
    assert_clean_failure(edgekit("generate", tmp_path / "nope.pt2", "--calib", "x.npy", "-o", tmp_path / "o"),
                         "not found")


def test_missing_calibration_file(saved_cnn, tmp_path):
    assert_clean_failure(edgekit("generate", saved_cnn / "model.pt2", "--calib", tmp_path / "c.npy",
                                 "-o", tmp_path / "o"), "calibration file not found")


def test_calibration_of_the_wrong_shape(saved_cnn, tmp_path):
    np.save(tmp_path / "c.npy", np.zeros((10, 1, 9, 9), np.float32))
    assert_clean_failure(edgekit("generate", saved_cnn / "model.pt2", "--calib", tmp_path / "c.npy",
                                 "-o", tmp_path / "o"), "[1, 9, 9]", "[1, 8, 8]")


def test_empty_calibration_set(saved_cnn, tmp_path):
    np.save(tmp_path / "c.npy", np.zeros((0, 1, 8, 8), np.float32))
    assert_clean_failure(edgekit("generate", saved_cnn / "model.pt2", "--calib", tmp_path / "c.npy",
                                 "-o", tmp_path / "o"), "empty")


def test_nan_in_calibration(saved_cnn, tmp_path):
    c = np.zeros((4, 1, 8, 8), np.float32)
    c[1, 0, 2, 2] = np.nan
    np.save(tmp_path / "c.npy", c)
    assert_clean_failure(edgekit("generate", saved_cnn / "model.pt2", "--calib", tmp_path / "c.npy",
                                 "-o", tmp_path / "o"), "NaN")


def test_unsupported_layer(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Softplus(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)).eval()
    torch.export.save(torch.export.export(model, (torch.zeros(1, 1, 8, 8),)), tmp_path / "m.pt2")
    np.save(tmp_path / "c.npy", np.random.default_rng(0).random((4, 1, 8, 8), np.float32))
    assert_clean_failure(edgekit("generate", tmp_path / "m.pt2", "--calib", tmp_path / "c.npy", "-o", tmp_path / "o"),
                         "layer '1'", "Softplus", "softplus")
    assert not (tmp_path / "o").exists()


def test_nan_weights(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    with torch.no_grad():
        model[1].bias[3] = float("inf")
    torch.export.save(torch.export.export(model, (torch.zeros(1, 1, 8, 8),)), tmp_path / "m.pt2")
    np.save(tmp_path / "c.npy", np.zeros((4, 1, 8, 8), np.float32))
    assert_clean_failure(edgekit("generate", tmp_path / "m.pt2", "--calib", tmp_path / "c.npy", "-o", tmp_path / "o"),
                         "layer '1'", "NaN or inf", "bias")


def test_not_a_model_file(tmp_path):
    (tmp_path / "m.pt2").write_bytes(b"this is not a zip archive")
    assert_clean_failure(edgekit("generate", tmp_path / "m.pt2", "--calib", "c.npy", "-o", tmp_path / "o"),
                         "torch.export")


def test_unknown_board(saved_cnn, tmp_path):
    assert_clean_failure(edgekit("generate", saved_cnn / "model.pt2", "--calib", saved_cnn / "calib.npy",
                                 "--board", "nosuchboard", "-o", tmp_path / "o"), "unknown board", "host")


def test_run_before_build_and_on_a_non_project(saved_cnn, tmp_path):
    assert_clean_failure(edgekit("run", tmp_path, "--inputs", saved_cnn / "x.npy"), "not an edgekit project")
    out = tmp_path / "out"
    assert edgekit("generate", saved_cnn / "model.pt2", "--calib", saved_cnn / "calib.npy", "-o", out).returncode == 0
    assert_clean_failure(edgekit("run", out, "--inputs", saved_cnn / "x.npy"), "edgekit build")


def test_run_with_inputs_of_the_wrong_shape(saved_cnn, tmp_path):
    out = tmp_path / "out"
    assert edgekit("generate", saved_cnn / "model.pt2", "--calib", saved_cnn / "calib.npy", "-o", out).returncode == 0
    assert edgekit("build", out).returncode == 0
    np.save(tmp_path / "bad.npy", np.zeros((3, 64), np.float32))
    assert_clean_failure(edgekit("run", out, "--inputs", tmp_path / "bad.npy"), "expects")


def test_stack_option_is_for_microcontrollers(saved_cnn, tmp_path):
    out = tmp_path / "out"
    assert edgekit("generate", saved_cnn / "model.pt2", "--calib", saved_cnn / "calib.npy", "-o", out).returncode == 0
    assert_clean_failure(edgekit("build", out, "--stack", "auto"), "microcontroller")
    assert_clean_failure(edgekit("build", out, "--stack", "lots"), "give a number of bytes, or auto")


def test_boards_lists_host():
    p = edgekit("boards")
    assert p.returncode == 0 and "host" in p.stdout


def test_generate_with_encoded_weights(saved_cnn, tmp_path):
    d = saved_cnn
    out = tmp_path / "out"
    p = edgekit("generate", d / "model.pt2", "--calib", d / "calib.npy", "--board", "host", "--weights", "huffman",
                "-o", out)
    assert p.returncode == 0, p.stderr
    assert (out / "kernels" / "ek_conv2d_s8_huffman.c").exists() and (out / "include" / "ek_decode.h").exists()
    assert not (out / "kernels" / "ek_conv2d_s8.c").exists()
    assert edgekit("build", out).returncode == 0
    p = edgekit("run", out, "--inputs", d / "x.npy", "--output", tmp_path / "y.npy")
    assert p.returncode == 0, p.stderr
    # back to dense in the same directory: the encoded kernels and the decoder header go away
    p = edgekit("generate", d / "model.pt2", "--calib", d / "calib.npy", "-o", out)
    assert p.returncode == 0, p.stderr
    assert not (out / "kernels" / "ek_conv2d_s8_huffman.c").exists() and not (out / "include" / "ek_decode.h").exists()
    assert edgekit("build", out).returncode == 0


def test_encoded_weights_refused_for_weight_only(saved_cnn, tmp_path):
    assert_clean_failure(edgekit("generate", saved_cnn / "model.pt2", "--calib", saved_cnn / "calib.npy",
                                 "--weight-only", "--weights", "codebook", "-o", tmp_path / "o"), "weight-only")


def test_unknown_weights_choice(saved_cnn, tmp_path):
    p = edgekit("generate", saved_cnn / "model.pt2", "--calib", saved_cnn / "calib.npy", "--weights", "zip",
                "-o", tmp_path / "o")
    assert p.returncode == 2 and "invalid choice" in p.stderr and "Traceback" not in p.stderr


def test_host_demo(tmp_path):
    """`edgekit demo --board host`, shortened: trained, quantized, generated, built and run as C,
    its outputs equal to the reference."""
    proc = edgekit("demo", "--board", "host", "--epochs", "3", "-o", tmp_path / "demo")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "C outputs equal the numpy reference" in proc.stdout and "yes, bit for bit" in proc.stdout
