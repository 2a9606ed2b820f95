"""The README's device commands, run as a user runs them: edgekit emulate in the
background, then edgekit flash and edgekit profile against its port."""
import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from test_cli import assert_clean_failure, edgekit

pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(shutil.which("qemu-system-arm") is None, reason="needs qemu-system-arm")]


def test_emulate_flash_profile(tmp_path, trained_cnn, digits):
    ep = torch.export.export(trained_cnn.eval(), (torch.as_tensor(digits.x_train[:1]),))
    torch.export.save(ep, tmp_path / "model.pt2")
    np.save(tmp_path / "c.npy", digits.x_train[:100])
    np.save(tmp_path / "x.npy", digits.x_test[:20])
    np.save(tmp_path / "y.npy", digits.y_test[:20])
    out = tmp_path / "out"
    p = edgekit("generate", tmp_path / "model.pt2", "--calib", tmp_path / "c.npy", "--board", "mps2-an386", "-o", out)
    assert p.returncode == 0, p.stderr
    p = edgekit("build", out)
    assert p.returncode == 0, p.stderr
    assert "flash:" in p.stdout and "RAM:" in p.stdout

    from edgekit.device.emulator import free_port
    port = free_port()
    emu = subprocess.Popen([sys.executable, "-m", "edgekit.cli", "emulate", "--board", "mps2-an386", "--port",
                            str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        deadline = time.monotonic() + 60
        while "socket://" not in line and time.monotonic() < deadline:
            line = emu.stdout.readline()
        url = f"socket://127.0.0.1:{port}"
        assert url in line
        # profiling before flashing: a clear error, not a hang
        p = edgekit("profile", "--port", url, "--inputs", tmp_path / "x.npy", "--timeout", "0.3")
        assert_clean_failure(p, "no valid answer")
        p = edgekit("flash", out, "--port", url)
        assert p.returncode == 0, p.stderr
        assert "verified" in p.stdout and "started" in p.stdout
        p = edgekit("profile", "--port", url, "--inputs", tmp_path / "x.npy", "--labels", tmp_path / "y.npy",
                    "--json", tmp_path / "r.json")
        assert p.returncode == 0, p.stderr
        assert "emulated instructions" in p.stdout and "bit-exact with the reference: yes" in p.stdout
        assert "ms" not in p.stdout.split("per inference")[1].splitlines()[0]  # never milliseconds on QEMU
        report = json.loads((tmp_path / "r.json").read_text())
        assert report["bit_exact"] and report["runs"] == 20 and report["accuracy"] > 0.85
        assert report["layers"] and report["flash_bytes"] > 0 and report["stack_high_water"] > 0
    finally:
        emu.send_signal(signal.SIGINT)
        assert emu.wait(timeout=20) == 0


def test_flash_without_a_build_and_without_a_port(tmp_path, trained_cnn, digits):
    import edgekit as ek
    ek.generate(ek.quantize(trained_cnn, digits.x_train[:50]), tmp_path / "out", board="mps2-an386")
    assert_clean_failure(edgekit("flash", tmp_path / "out", "--port", "socket://127.0.0.1:9"), "edgekit build")
    ek.build(tmp_path / "out")
    assert_clean_failure(edgekit("flash", tmp_path / "out"), "--port")
    assert_clean_failure(edgekit("flash", tmp_path / "out", "--port", "socket://127.0.0.1:9"), "cannot open")


def test_doctor():
    p = edgekit("doctor")
    assert p.returncode == 0, p.stdout
    assert "arm-none-eabi-gcc" in p.stdout and "qemu-system-arm" in p.stdout and "newlib" in p.stdout


def _start_emulate(port, ignore_sigint):
    def child_setup():
        if ignore_sigint:  # what a shell's background job inherits
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    emu = subprocess.Popen([sys.executable, "-m", "edgekit.cli", "emulate", "--port", str(port)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=child_setup)
    text = ""
    deadline = time.monotonic() + 60
    while "socket://" not in text and time.monotonic() < deadline:
        text += emu.stdout.readline()
    qemu_pid = int(text.split("(pid ")[1].split(")")[0])
    return emu, qemu_pid


def _gone(pid, within=10.0):
    import os
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # reap it if it is our own zombie (it is not: QEMU is edgekit's child)
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ")[1].startswith("Z"):
                    return True
        except (FileNotFoundError, IndexError):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("how", ["SIGINT while inherited ignored", "SIGTERM", "SIGKILL"])
def test_emulate_never_leaves_qemu_behind(how):
    from edgekit.device.emulator import free_port
    emu, qemu_pid = _start_emulate(free_port(), ignore_sigint=how.startswith("SIGINT"))
    try:
        assert not _gone(qemu_pid, within=0.2), "QEMU should be running"
        emu.send_signal({"SIGINT while inherited ignored": signal.SIGINT, "SIGTERM": signal.SIGTERM,
                         "SIGKILL": signal.SIGKILL}[how])
        code = emu.wait(timeout=30)
        assert code == (-signal.SIGKILL if how == "SIGKILL" else 0)
        assert _gone(qemu_pid), f"QEMU (pid {qemu_pid}) outlived edgekit emulate after {how}"
    finally:
        if emu.poll() is None:
            emu.kill()


def test_demo_on_the_emulated_m4(tmp_path):
    """The README's first command (edgekit demo), shortened to 3 epochs: train, quantize, generate,
    build with the stack sized to its static bound, flash over serial, profile, all bit-exact."""
    p = subprocess.run([sys.executable, "-m", "edgekit.cli", "demo", "--epochs", "3", "-o", str(tmp_path / "demo")],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "device outputs equal the numpy reference" in p.stdout and "yes, bit for bit" in p.stdout
    assert "emulated instructions" in p.stdout and "flashed and verified" in p.stdout
    used, reserved = (int(v.split()[0].replace(",", "")) for v in
                      p.stdout.split("stack used / reserved (the static bound)")[1].splitlines()[0].split("/"))
    assert 0 < used <= reserved < 4096
