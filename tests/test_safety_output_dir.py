"""Output directories (issue 11, class 5): generate writes only into a new, empty or edgekit-made
directory, replaces a project in one step, keeps files it did not generate, and refuses the rest."""
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import edgekit
from edgekit.codegen.output_dir import MARKER, check_output_dir
from edgekit.errors import EdgekitError

from helpers import float_graph, quantize_with_random_data, tiny_quantized_fc

EDGEKIT = [sys.executable, "-m", "edgekit.cli"]


def _other_graph():
    rng = np.random.default_rng(5)
    g = float_graph("fully_connected", [(1, 6)], dict(activation="relu"), {"w": rng.normal(0, 1, (3, 6))}, (1, 3))
    return quantize_with_random_data(g, rng)


def test_a_foreign_directory_is_refused_and_left_alone(tmp_path):
    d = tmp_path / "mine"
    (d / "kernels").mkdir(parents=True)
    files = {"Makefile": "all:\n", "main.c": "int main(void){return 0;}\n", "kernels/ek_conv2d_s8.c": "/* mine */\n"}
    for rel, text in files.items():
        (d / rel).write_text(text)
    with pytest.raises(EdgekitError, match="not empty.*not an edgekit project"):
        edgekit.generate(tiny_quantized_fc(), d)
    assert {rel: (d / rel).read_text() for rel in files} == files and not (d / MARKER).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary directory left behind


@pytest.mark.parametrize("where", ["/", "~", "~/..", "file"])
def test_protected_and_impossible_outputs(tmp_path, where):
    if where == "file":
        target = tmp_path / "f"
        target.write_text("x")
    else:
        target = os.path.expanduser(where)
    with pytest.raises(EdgekitError, match="refusing|not a directory"):
        check_output_dir(target, force=True)  # --force does not lift these


def test_the_command_line_checks_the_output_before_any_work(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    proc = subprocess.run(EDGEKIT + ["generate", "does-not-matter.pt2", "--calib", "nope.npy", "-o", "busy"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 1 and "not an edgekit project" in proc.stderr, proc.stderr
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_regenerating_keeps_the_users_files_and_refuses_to_drop_edits(tmp_path):
    out = tmp_path / "out"
    edgekit.generate(tiny_quantized_fc(), out)
    (out / "kernels" / "my_kernel.c").write_text("/* mine */\n")
    (out / "notes.md").write_text("mine")
    mtime = (out / "model.c").stat().st_mtime_ns
    edgekit.generate(tiny_quantized_fc(), out)  # same model: unchanged files keep their times (make)
    assert (out / "model.c").stat().st_mtime_ns == mtime
    edgekit.generate(_other_graph(), out)
    assert (out / "kernels" / "my_kernel.c").read_text() == "/* mine */\n" and (out / "notes.md").read_text() == "mine"
    (out / "main.c").write_text("/* edited */\n")
    with pytest.raises(EdgekitError, match="main.c changed.*--force"):
        edgekit.generate(tiny_quantized_fc(), out)
    assert (out / "main.c").read_text() == "/* edited */\n"
    edgekit.generate(tiny_quantized_fc(), out, force=True)
    assert "edited" not in (out / "main.c").read_text()


def test_a_failed_generation_leaves_the_old_project(tmp_path):
    out = tmp_path / "out"
    edgekit.generate(tiny_quantized_fc(), out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(EdgekitError):
        edgekit.generate(_other_graph(), out, board="rpi-pico", weights="nonsense")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_concurrent_generations_leave_one_whole_project(tmp_path):
    """Two models generated into one directory at once, several times: the result is always exactly one
    of them (its record, graph and C agree), never a mix."""
    out = tmp_path / "out"
    graphs = [tiny_quantized_fc(), _other_graph()]
    for _ in range(3):
        errors = []

        def gen(g):
            try:
                edgekit.generate(g, out)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
        threads = [threading.Thread(target=gen, args=(g,)) for g in graphs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        record = edgekit.api.load_project(out)
        fingerprint = record["fingerprint"]
        assert fingerprint in {g.fingerprint() for g in graphs}
        assert fingerprint in (out / "model.h").read_text() and fingerprint in (out / "model.c").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_generating_into_the_working_directory(tmp_path):
    work = tmp_path / "proj"
    work.mkdir()
    proc = subprocess.run(EDGEKIT + ["generate", str(edgekit.export_tflite(tiny_quantized_fc(), tmp_path / "m.tflite",
                                                                           io="int8")), "-o", "."],
                          capture_output=True, text=True, cwd=work, timeout=300)
    assert proc.returncode == 0, proc.stderr
    again = subprocess.run(EDGEKIT + ["generate", str(tmp_path / "m.tflite"), "-o", "."],
                           capture_output=True, text=True, cwd=work, timeout=300)
    assert again.returncode == 0, again.stderr
    assert (work / "model.c").exists() and (work / MARKER).exists()


def test_a_symlinked_project_directory_is_regenerated_where_it_points(tmp_path):
    real = tmp_path / "real"
    edgekit.generate(tiny_quantized_fc(), real)
    link = tmp_path / "link"
    link.symlink_to(real)
    edgekit.generate(_other_graph(), link)
    assert link.is_symlink() and edgekit.api.load_project(real)["fingerprint"] == _other_graph().fingerprint()
