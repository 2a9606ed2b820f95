"""Inputs that once ended in `edgekit: internal error` (issue 11, class 10): each is now one line,
exit 1 (2 for usage), and output paths are checked before the work starts."""
import os
import subprocess
import sys

import numpy as np
import pytest

import edgekit
from edgekit import cli
from edgekit.datasets import load_npz
from edgekit.errors import EdgekitError

from helpers import tiny_quantized_fc

EDGEKIT = [sys.executable, "-m", "edgekit.cli"]


def main(capsys, *argv):
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert "internal error" not in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) <= 2 or code == 2, err  # one message (argparse: usage + message)
    return code, err


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    d = tmp_path_factory.mktemp("internal")
    out = d / "out"
    edgekit.generate(tiny_quantized_fc(), out)
    edgekit.build(out)
    np.save(d / "x.npy", np.zeros((2, 4), np.int8))
    np.save(d / "y.npy", np.array([0, 1]))
    edgekit.export_tflite(tiny_quantized_fc(), d / "m.tflite", io="int8")
    return d


@pytest.mark.parametrize("where", ["/proc/edgekit-out", "FILE/sub", "FILE"])
def test_unwritable_and_non_directory_outputs(capsys, project, tmp_path, where):
    (tmp_path / "FILE").write_text("x")
    target = where.replace("FILE", str(tmp_path / "FILE"))
    code, err = main(capsys, "generate", project / "m.tflite", "-o", target)
    assert code == 1 and ("not a directory" in err or "cannot" in err or "not writable" in err), err


@pytest.mark.parametrize("command", [
    ["thresholds", "--project", "{p}/out", "--inputs", "{p}/x.npy", "--labels", "{p}/y.npy", "--int8", "--json", "{d}"],
    ["profile", "--port", "socket://127.0.0.1:9", "--inputs", "{p}/x.npy", "--json", "{d}"],
    ["run", "{p}/out", "--int8", "--inputs", "{p}/x.npy", "--output", "{d}"],
    ["export", "{p}/m.tflite", "-o", "{d}/sub/m.tflite"],
    ["compress", "{p}/m.pt2", "--recipe", "r.toml", "-o", "{p}/c.pt2", "--report", "{d}"],
])
def test_output_files_are_checked_before_the_work(capsys, project, tmp_path, command):
    argv = [a.format(p=project, d=tmp_path) for a in command]
    code, err = main(capsys, *argv)
    assert code == 1 and ("is a directory" in err or "does not exist" in err), err


@pytest.mark.parametrize("damage", ["empty", "braces", "garbage", "no graph.npz", "truncated graph.npz"])
def test_damaged_project_files(capsys, project, tmp_path, damage):
    import shutil
    out = tmp_path / "out"
    shutil.copytree(project / "out", out)
    if damage == "empty":
        (out / "edgekit_project.json").write_text("")
    elif damage == "braces":
        (out / "edgekit_project.json").write_text("{}")
    elif damage == "garbage":
        (out / "edgekit_project.json").write_bytes(b"\xff\xfe\x00")
    elif damage == "no graph.npz":
        (out / "graph.npz").unlink()
    else:
        (out / "graph.npz").write_bytes((out / "graph.npz").read_bytes()[:50])
    for argv in (["run", out, "--int8", "--inputs", project / "x.npy"],
                 ["thresholds", "--project", out, "--inputs", project / "x.npy", "--labels", project / "y.npy", "--int8"],
                 ["build", out]):
        code, err = main(capsys, *argv)  # one line, no internal error, whatever the command reads
        reads = "graph" if argv[0] == "thresholds" else "record"
        if (reads == "graph") == damage.endswith("graph.npz"):
            assert code == 1 and ("damaged" in err or "generate" in err), (argv[0], err)


def test_bad_recipes(capsys, project, tmp_path):
    import torch
    from torch import nn
    torch.export.save(torch.export.export(nn.Linear(4, 2).eval(), (torch.randn(1, 4),)), tmp_path / "m.pt2")
    (tmp_path / "latin1.toml").write_bytes("[[step]]\nkind = \"prune\" # caf\xe9\n".encode("latin-1"))
    (tmp_path / "dir.toml").mkdir()
    for recipe, needle in (("latin1.toml", "not UTF-8"), ("dir.toml", "not a file")):
        code, err = main(capsys, "compress", tmp_path / "m.pt2", "--recipe", tmp_path / recipe,
                         "-o", tmp_path / "c.pt2")
        assert code == 1 and needle in err, err


@pytest.mark.parametrize("case", ["empty", "one-hot", "object", "strings", "single array"])
def test_bad_npz_data(tmp_path, case):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(10, 4)).astype(np.float32), rng.integers(0, 3, 10)
    path = tmp_path / "d.npz"
    if case == "empty":
        np.savez(path, x_train=x[:0], y_train=y[:0], x_test=x, y_test=y)
    elif case == "one-hot":
        np.savez(path, x_train=x, y_train=np.eye(3)[y], x_test=x, y_test=y)
    elif case == "object":
        np.savez(path, x_train=np.array([x, None], dtype=object), y_train=y, x_test=x, y_test=y)
    elif case == "strings":
        np.savez(path, x_train=x, y_train=y.astype(str), x_test=x, y_test=y)
    else:
        np.save(tmp_path / "d.npy", x)
        path = tmp_path / "d.npy"
    with pytest.raises(EdgekitError):
        load_npz(path)


def test_usage_errors_exit_2(capsys):
    code, err = main(capsys, "emulate", "--port", "70000")
    assert code == 2 and "TCP port" in err


def test_a_zero_size_layer(capsys, tmp_path):
    g = tiny_quantized_fc()
    g.tensors[g.ops[0].outputs[0]].shape = (1, 0)
    with pytest.raises(EdgekitError, match="layer 'op'.*every dimension must be positive"):
        edgekit.generate(g, tmp_path / "o")


def test_a_closed_pipe_is_not_an_internal_error():
    """`edgekit boards | head -0`: the reader is gone before edgekit writes."""
    proc = subprocess.Popen(EDGEKIT + ["boards"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    assert "Traceback" not in err and "internal error" not in err and len(err.strip().splitlines()) == 1, err
