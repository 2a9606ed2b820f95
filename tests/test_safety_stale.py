"""Stale binaries and half-written projects (issue 11, class 6): every binary is tied to the sources it
was built from; run / flash / profile refuse a mismatch; an interrupted regeneration leaves the old
project whole."""
import shutil

import numpy as np
import pytest

import edgekit
from edgekit.device.flash import flash_project
from edgekit.errors import EdgekitError

from helpers import float_graph, quantize_with_random_data, tiny_quantized_fc


def _graph(seed):
    rng = np.random.default_rng(seed)
    g = float_graph("fully_connected", [(1, 4)], dict(activation="none"), {"w": rng.normal(0, 1, (4, 4))}, (1, 4))
    return quantize_with_random_data(g, rng)


X = np.random.default_rng(9).integers(-128, 128, (5, 4), dtype=np.int8)


def test_run_refuses_a_binary_built_from_other_sources(tmp_path):
    out = tmp_path / "out"
    a, b = _graph(1), _graph(2)
    edgekit.generate(a, out)
    edgekit.build(out)
    assert np.array_equal(edgekit.run(out, X, int8=True), edgekit.reference_run(a, X, int8=True))
    edgekit.generate(b, out)  # regenerated, not rebuilt: the old program must not run with b's parameters
    with pytest.raises(EdgekitError, match="stale.*edgekit build"):
        edgekit.run(out, X, int8=True)
    edgekit.build(out)
    assert np.array_equal(edgekit.run(out, X, int8=True), edgekit.reference_run(b, X, int8=True))
    edgekit.generate(b, out)  # the same sources again: the build still stands
    edgekit.run(out, X, int8=True)


def test_run_refuses_a_binary_changed_outside_edgekit_build(tmp_path):
    out = tmp_path / "out"
    edgekit.generate(tiny_quantized_fc(), out)
    edgekit.build(out)
    shutil.copy(shutil.which("true"), out / "model_runner")
    with pytest.raises(EdgekitError, match="not the binary `edgekit build` made"):
        edgekit.run(out, X, int8=True)
    (out / "model_weights.c").write_text((out / "model_weights.c").read_text() + "\n")  # an edit
    edgekit.build(out)
    with pytest.raises(EdgekitError, match="changed since edgekit generated"):
        edgekit.generate(tiny_quantized_fc(), out)  # and the edit is not silently overwritten either


def test_build_without_a_makefile_fails_clearly(tmp_path):
    out = tmp_path / "out"
    edgekit.generate(tiny_quantized_fc(), out)
    (out / "Makefile").unlink()
    with pytest.raises(EdgekitError, match="no Makefile"):
        edgekit.build(out)
    assert not (out / "model_runner").exists()


def test_flash_refuses_a_stale_firmware_image(tmp_path):
    out = tmp_path / "out"
    edgekit.generate(_graph(1), out, board="mps2-an386")
    edgekit.build(out)
    edgekit.generate(_graph(2), out, board="mps2-an386")
    with pytest.raises(EdgekitError, match="firmware.bin is stale"):
        flash_project(out, "socket://127.0.0.1:9", show_progress=False)  # refused before any connection


def test_an_interrupted_regeneration_leaves_the_old_project(tmp_path, monkeypatch):
    from edgekit.codegen import project
    out = tmp_path / "out"
    edgekit.generate(_graph(1), out)
    edgekit.build(out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real, calls = project.render_to, []

    def interrupted(*args, **kwargs):
        calls.append(args)
        if len(calls) == 6:
            raise KeyboardInterrupt  # Ctrl-C half way through writing the files
        return real(*args, **kwargs)
    monkeypatch.setattr(project, "render_to", interrupted)
    with pytest.raises(KeyboardInterrupt):
        edgekit.generate(_graph(2), out)
    monkeypatch.undo()
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    edgekit.run(out, X, int8=True)  # still the whole, built old project
