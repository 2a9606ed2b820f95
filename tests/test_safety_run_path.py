"""`edgekit run` executes the project's own binary by its full path, never a program found in $PATH
(issue 11, class 3)."""
import os
import stat
import subprocess
import sys

import numpy as np

import edgekit

from helpers import tiny_quantized_fc

EDGEKIT = [sys.executable, "-m", "edgekit.cli"]


def test_run_dot_does_not_look_the_runner_up_in_path(tmp_path):
    out = tmp_path / "proj"
    g = tiny_quantized_fc()
    edgekit.generate(g, out)
    edgekit.build(out)
    trap = tmp_path / "bin"
    trap.mkdir()
    for name in ("model_runner", "model_runner_sanitize", "edgekit_runner"):
        fake = trap / name
        fake.write_text(f"#!/bin/sh\ntouch {tmp_path}/PWNED\nexit 0\n")
        fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    x = np.random.default_rng(0).integers(-128, 128, (3, 4), dtype=np.int8)
    np.save(out / "x.npy", x)
    env = dict(os.environ, PATH=f"{trap}:{os.environ['PATH']}")
    proc = subprocess.run(EDGEKIT + ["run", ".", "--int8", "--inputs", "x.npy", "--output", "y.npy"], cwd=out,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "PWNED").exists()
    assert np.array_equal(np.load(out / "y.npy"), edgekit.reference_run(g, x, int8=True))
