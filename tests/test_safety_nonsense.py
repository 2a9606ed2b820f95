"""Nonsense data (issue 11, class 7): each input that used to pass silently gets a clear refusal (or,
where legal but almost surely a mistake, a warning) naming the check that fired."""
import json
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import edgekit
from edgekit import cli
from edgekit.errors import EdgekitError
from edgekit.safety import check_graph_shapes, check_labels, check_percentile

from helpers import float_graph, quantize_with_random_data, tiny_quantized_fc


def _float_fc():
    rng = np.random.default_rng(0)
    return float_graph("fully_connected", [(1, 4)], dict(activation="none"), {"w": rng.normal(0, 1, (3, 4))}, (1, 3))


def main(capsys, *argv):
    """The command line in this process: (exit code, stderr)."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse: usage errors
        code = exc.code
    return code, capsys.readouterr().err


def test_int8_calibration_is_refused():
    x = np.random.default_rng(0).integers(-128, 128, (16, 4), dtype=np.int8)
    with pytest.raises(EdgekitError, match="calibration set is an int8 array"):
        edgekit.quantize(_float_fc(), x)


@pytest.mark.parametrize("value", [0.0, 3.0, -1.5])
def test_constant_calibration_is_refused(value):
    with pytest.raises(EdgekitError, match="calibration set is constant"):
        edgekit.quantize(_float_fc(), np.full((16, 4), value, np.float32))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.floats(allow_nan=True, allow_infinity=True).filter(lambda p: not 50 < p <= 100))
def test_percentiles_outside_the_range_are_refused(p):
    with pytest.raises(EdgekitError, match="--percentile"):
        check_percentile(p)


@pytest.mark.parametrize("p", ["0", "-5", "101", "nan", "50"])
def test_percentile_on_the_command_line_is_a_usage_error(capsys, p):
    code, err = main(capsys, "generate", "m.pt2", "--calib", "c.npy", "-o", "out", "--percentile", p)
    assert code == 2 and "--percentile" in err


def test_percentile_through_the_api():
    x = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    with pytest.raises(EdgekitError, match="--percentile 0"):
        edgekit.quantize(_float_fc(), x, observer="percentile", percentile=0)


@pytest.fixture(scope="module")
def host_project(tmp_path_factory):
    out = tmp_path_factory.mktemp("nonsense") / "out"
    g = tiny_quantized_fc()
    edgekit.generate(g, out)
    edgekit.build(out)
    return out, g


def test_int8_inputs_without_int8_are_refused(host_project):
    out, g = host_project
    x = np.zeros((2, 4), np.int8)
    with pytest.raises(EdgekitError, match="int8 array.*--int8"):
        edgekit.run(out, x)
    from edgekit.device.profile import _prepare_inputs
    record = edgekit.api.load_project(out)
    with pytest.raises(EdgekitError, match="int8 array.*--int8"):
        _prepare_inputs(record, g, x, int8=False)


def test_nan_inputs_to_profile_are_refused(host_project):
    out, g = host_project
    from edgekit.device.profile import _prepare_inputs
    x = np.zeros((2, 4), np.float32)
    x[1, 2] = np.nan
    with pytest.raises(EdgekitError, match="NaN"):
        _prepare_inputs(edgekit.api.load_project(out), g, x, int8=False)


@pytest.mark.parametrize("labels", [np.array([0.5, 1.0]), np.array(["cat", "dog"]), np.array([[0, 1], [1, 0]]),
                                    np.array([1, -1]), np.array([True, False])])
def test_labels_must_be_class_indices(labels):
    with pytest.raises(EdgekitError, match="labels"):
        check_labels(labels, 2)
    assert list(check_labels(np.array([1.0, 0.0]), 2)) == [1, 0]  # whole floats are indices


def test_thresholds_refuses_float_labels_on_the_command_line(capsys, host_project, tmp_path):
    out, _ = host_project
    np.save(tmp_path / "x.npy", np.zeros((3, 4), np.float32))
    np.save(tmp_path / "y.npy", np.array([0.2, 0.7, 0.1]))
    code, err = main(capsys, "thresholds", "--project", out, "--inputs", tmp_path / "x.npy", "--labels",
                     tmp_path / "y.npy")
    assert code == 1 and "not whole numbers" in err


def test_an_exit_threshold_above_one_is_refused(capsys, tmp_path):
    code, err = main(capsys, "generate", "m.pt2", "-o", tmp_path / "o", "--exit-threshold", "2.0")
    assert code == 1 and "probability (0 to 1)" in err
    from edgekit.safety import check_exit_threshold
    check_exit_threshold("2.0", "margin")  # logits: legal


@pytest.mark.parametrize("argv", [["exits", "m.pt2", "--after", "c", "-o", "x.pt2", "--epochs", "-1"],
                                  ["demo", "--epochs", "0"], ["profile", "--port", "p", "--inputs", "x", "--runs", "0"],
                                  ["profile", "--port", "p", "--inputs", "x", "--timeout", "-1"]])
def test_non_positive_counts_are_usage_errors(capsys, argv):
    code, err = main(capsys, *argv)
    assert code == 2 and "must be" in err


def test_weight_only_on_an_int8_tflite_is_refused(capsys, tmp_path):
    path = edgekit.export_tflite(tiny_quantized_fc(), tmp_path / "m.tflite", io="int8")
    code, err = main(capsys, "generate", path, "--weight-only", "-o", tmp_path / "o")
    assert code == 1 and "--weight-only applies to float models" in err
    with pytest.raises(EdgekitError, match="already int8"):
        edgekit.quantize(path, np.random.default_rng(0).normal(size=(4, 4)).astype(np.float32), weight_only=True)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(dims=st.lists(st.integers(-3, 3), min_size=2, max_size=4).filter(lambda d: min(d) <= 0))
def test_zero_size_and_negative_shapes_are_refused(dims):
    g = tiny_quantized_fc()
    name = g.ops[0].outputs[0]
    g.tensors[name].shape = tuple(dims)
    with pytest.raises(EdgekitError, match="every dimension must be positive"):
        check_graph_shapes(g)


def test_degenerate_tflite_shapes_are_refused(tmp_path):
    """A .tflite whose tensors have a zero or negative dimension: refused at load, naming the tensor."""
    for dims in ((1, 0), (1, -4)):
        g = tiny_quantized_fc()
        name = g.outputs[0]
        g.tensors[name].shape = dims
        try:
            path = edgekit.export_tflite(g, tmp_path / "bad.tflite", io="int8")
        except EdgekitError:
            continue  # the exporter itself refuses it: also clear
        with pytest.raises(EdgekitError):
            g2 = edgekit.load(path)
            edgekit.generate(g2, tmp_path / "o")


@pytest.mark.parametrize("board", ["host", "rpi4"])
def test_absurd_arenas_are_refused_on_os_boards(tmp_path, board):
    rng = np.random.default_rng(0)
    g = quantize_with_random_data(float_graph("relu", [(1, 4)], {}, out_shape=(1, 4)), rng)
    for t in g.tensors.values():
        t.shape = (1, 40000, 40000, 1)  # 1.6 GB per tensor
    with pytest.raises(EdgekitError, match="static C array"):
        edgekit.generate(g, tmp_path / "o", board=board)
    assert not (tmp_path / "o").exists()


def test_a_pt2_with_a_bad_crc_is_refused(tmp_path):
    """(The full class is in test_safety_pt2.py: every truncation and bit flip.)"""
    import torch
    from torch import nn
    torch.export.save(torch.export.export(nn.Linear(4, 2).eval(), (torch.randn(1, 4),)), tmp_path / "m.pt2")
    data = bytearray((tmp_path / "m.pt2").read_bytes())
    with zipfile.ZipFile(tmp_path / "m.pt2") as z:
        info = next(i for i in z.infolist() if i.filename.endswith("weight_0"))
    off = info.header_offset
    start = off + 30 + int.from_bytes(data[off + 26:off + 28], "little") + int.from_bytes(data[off + 28:off + 30], "little")
    data[start] ^= 1
    (tmp_path / "bad.pt2").write_bytes(bytes(data))
    with pytest.raises(EdgekitError, match="damaged"):
        edgekit.load(tmp_path / "bad.pt2")


def test_a_single_calibration_sample_is_a_warning(capsys, tmp_path):
    from edgekit.safety import EdgekitWarning
    x = np.random.default_rng(0).normal(size=(1, 4)).astype(np.float32)
    with pytest.warns(EdgekitWarning, match="one sample"):
        edgekit.quantize(_float_fc(), x)
    # on the command line: one line on stderr, and the work goes on
    import torch
    from torch import nn
    torch.export.save(torch.export.export(nn.Linear(4, 3).eval(), (torch.randn(1, 4),)), tmp_path / "m.pt2")
    np.save(tmp_path / "c.npy", x)
    code, err = main(capsys, "generate", tmp_path / "m.pt2", "--calib", tmp_path / "c.npy", "-o", tmp_path / "o")
    assert code == 0 and "edgekit: warning: the calibration set has one sample" in err
