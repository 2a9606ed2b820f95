"""The emulator's serial port belongs to the QEMU edgekit started: when another program takes the port
first (free_port() to QEMU's bind is a race on a busy machine), edgekit must not talk to that program."""
import shutil
import socket

import pytest

from edgekit.device import emulator
from edgekit.device.emulator import Emulator, _listener_owned_by
from edgekit.errors import EdgekitError

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-arm") is None, reason="needs qemu-system-arm")


@pytest.fixture
def squatter():
    """Another program listening on a port (it accepts connections, as another QEMU's UART would)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(4)
        yield s.getsockname()[1]


def test_listener_owner_is_read_from_proc(squatter):
    import os
    owned = _listener_owned_by(os.getpid(), squatter)
    if owned is None:
        pytest.skip("no /proc/net/tcp here")
    assert owned is True
    with Emulator("mps2-an386") as emu:
        assert _listener_owned_by(emu.process.pid, emu.port) is True
        assert _listener_owned_by(emu.process.pid, squatter) is False


def test_port_taken_before_qemu_binds_moves_to_another(squatter, monkeypatch):
    ports = iter([squatter])
    real = emulator.free_port
    monkeypatch.setattr(emulator, "free_port", lambda: next(ports, None) or real())
    with Emulator("mps2-an386") as emu:
        assert emu.port != squatter and emu.alive()
        assert _listener_owned_by(emu.process.pid, emu.port) in (True, None)


def test_port_the_user_chose_taken_is_an_error_naming_it(squatter):
    with pytest.raises(EdgekitError, match=f"port {squatter} in use"):
        Emulator("mps2-an386", port=squatter).start(timeout=10)
