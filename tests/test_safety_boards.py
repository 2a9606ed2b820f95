"""--board (issue 11, class 4): a name is one of `edgekit boards`, never joined into a path; a board file
of the user's own is given by its path, checked, said so in the output, and kept in the project."""
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import edgekit
from edgekit.boards import BOARDS_DIR, list_boards, load_board, resolve_board
from edgekit.errors import EdgekitError

from helpers import tiny_quantized_fc

EDGEKIT = [sys.executable, "-m", "edgekit.cli"]


def _evil_board(path, **changes):
    text = (BOARDS_DIR / "host.toml").read_text()
    for key, value in changes.items():
        text = "\n".join(f"{key} = {value}" if line.startswith(f"{key} =") else line for line in text.splitlines())
    path.write_text(text + "\n")
    return path


def test_board_names_are_not_paths(tmp_path):
    """`--board ../../x` once loaded any x.toml and ran its cc: now only listed names are boards."""
    evil = _evil_board(tmp_path / "x.toml", cc='"touch PWNED; cc"')
    rel = "../" * 12 + str(evil.with_suffix(""))[1:]
    for spec in (rel, "host/../host", "../boards/host", str(evil.with_suffix("")), "host.", ""):
        with pytest.raises(EdgekitError, match="unknown board"):
            load_board(spec)
    proc = subprocess.run(EDGEKIT + ["generate", "m.tflite", "--board", rel, "-o", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 1 and "unknown board" in proc.stderr and "--board ./myboard.toml" in proc.stderr
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "o").exists()


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.text(max_size=30).filter(lambda s: s not in list_boards()))
def test_any_other_name_is_refused_without_reading_a_file(name):
    with pytest.raises(EdgekitError, match="unknown board"):
        load_board(name)


@pytest.mark.parametrize("key,value,needle", [
    ("templates", '["../../../../tmp"]', "template folders"),
    ("kernel_variant", '"../../x"', "kernel_variant"),
    ("name", '"x */ int pwned; /*"', "plain name"),
    ("cc", '"cc\\nall:\\n\\ttouch PWNED"', "Makefile"),
    ("cflags", '["-O2 $(shell touch PWNED)"]', "Makefile"),
    ("kind", '"evil"', "kind"),
])
def test_board_files_are_checked(tmp_path, key, value, needle):
    bad = _evil_board(tmp_path / "mine.toml", **{key: value})
    with pytest.raises(EdgekitError, match=needle):
        resolve_board(str(bad))


def test_a_board_file_of_ones_own(tmp_path):
    """Given by path: said so, copied into the project, and used again by build and run."""
    import numpy as np
    mine = _evil_board(tmp_path / "myhost.toml", name='"myhost"', cflags='["-O1"]')
    tflite = edgekit.export_tflite(tiny_quantized_fc(), tmp_path / "m.tflite", io="int8")
    proc = subprocess.run(EDGEKIT + ["generate", str(tflite), "--board", "./myhost.toml", "-o", "out"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "board file of your own" in proc.stdout and "myhost.toml" in proc.stdout
    assert (tmp_path / "out" / "edgekit_board.toml").read_text() == mine.read_text()
    assert "OPT ?= -O1" in (tmp_path / "out" / "Makefile").read_text()
    mine.unlink()  # the project keeps its own copy
    edgekit.build(tmp_path / "out")
    x = np.zeros((2, 4), np.int8)
    assert edgekit.run(tmp_path / "out", x, int8=True).shape == (2, 4)
