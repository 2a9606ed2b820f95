"""Hangs in flash (issue 11, class 9): every wait has an overall deadline, so a port that keeps
sending bytes cannot hold `edgekit flash`, and a port that closes mid-flash is a clear error.
Real peers: a pty, a TCP socket, and QEMU's bootloader behind a proxy that cuts the line."""
import os
import random
import shutil
import socket
import threading
import time
import tty

import pytest

from edgekit.boards import load_board
from edgekit.device.flash import flash_serial
from edgekit.device.stm32boot import BootloaderError

BOARD = load_board("mps2-an386")
BASE = BOARD["app"]["flash_origin"]


class PtyBabbler:
    """A serial port (pty) whose other end never stops sending bytes."""

    def __init__(self, alphabet: bytes, seed: int = 0):
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        self.port = os.ttyname(self.slave)
        self.stop = False
        rng = random.Random(seed)
        self.chunk = bytes(rng.choice(alphabet) for _ in range(64))
        threading.Thread(target=self._babble, daemon=True).start()

    def _babble(self):
        while not self.stop:
            try:
                os.write(self.master, self.chunk)
                while True:  # swallow what edgekit writes, so neither side blocks
                    import select
                    if not select.select([self.master], [], [], 0)[0]:
                        break
                    os.read(self.master, 4096)
            except OSError:
                return
            time.sleep(0.002)

    def close(self):
        self.stop = True
        time.sleep(0.01)
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass


class SocketBabbler:
    """A TCP peer (as `socket://` ports are) sending any bytes, ACKs included, without end."""

    def __init__(self, seed: int = 0):
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(1)
        self.url = f"socket://127.0.0.1:{self.server.getsockname()[1]}"
        self.stop = False
        self.chunk = random.Random(seed).randbytes(256)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        conn, _ = self.server.accept()
        conn.setblocking(False)
        while not self.stop:
            try:
                conn.send(self.chunk)
            except BlockingIOError:
                pass
            except OSError:
                return
            try:
                conn.recv(4096)
            except (BlockingIOError, OSError):
                pass
            time.sleep(0.001)
        conn.close()

    def close(self):
        self.stop = True
        self.server.close()


def test_a_babbling_pty_does_not_hang_flash():
    """Noise that is never an answer: the bootloader sync gives up, saying the port keeps sending."""
    babbler = PtyBabbler(bytes(b for b in range(256) if b not in (0x79, 0x1F)))
    try:
        t0 = time.monotonic()
        with pytest.raises(BootloaderError, match="keeps sending|kept sending"):
            flash_serial(BOARD, b"\x00" * 1024, BASE, babbler.port, show_progress=False, timeout=0.3)
        assert time.monotonic() - t0 < 45
    finally:
        babbler.close()


@pytest.mark.parametrize("seed", [0, 1])
def test_a_babbling_socket_with_acks_in_it_ends_at_the_deadline(seed):
    """Noise with ACKs in it gets past sync and into commands; the overall deadline still ends it."""
    babbler = SocketBabbler(seed)
    try:
        t0 = time.monotonic()
        with pytest.raises(BootloaderError):
            flash_serial(BOARD, b"\x00" * 4096, BASE, babbler.url, show_progress=False, timeout=0.3, overall=4.0)
        assert time.monotonic() - t0 < 15
    finally:
        babbler.close()


class CuttingProxy:
    """Forwards between edgekit and QEMU's UART, then closes both sides after ``limit`` bytes to the device."""

    def __init__(self, target_port: int, limit: int):
        self.target_port, self.limit = target_port, limit
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(1)
        self.url = f"socket://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        client, _ = self.server.accept()
        device = socket.create_connection(("127.0.0.1", self.target_port))
        sent = [0]

        def pump(src, dst, count):
            try:
                while True:
                    data = src.recv(4096)
                    if not data:
                        break
                    if count:
                        data = data[:max(0, self.limit - sent[0])]
                        sent[0] += len(data)
                    if data:
                        dst.sendall(data)
                    if count and sent[0] >= self.limit:
                        break
            except OSError:
                pass
            for s in (client, device):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                    s.close()
                except OSError:
                    pass
        threading.Thread(target=pump, args=(device, client, False), daemon=True).start()
        pump(client, device, True)

    def close(self):
        self.server.close()


@pytest.mark.skipif(shutil.which("qemu-system-arm") is None, reason="needs qemu-system-arm")
def test_a_port_closing_mid_flash_is_a_clear_error():
    from edgekit.device.emulator import Emulator
    with Emulator("mps2-an386") as emu:
        proxy = CuttingProxy(emu.port, limit=3000)  # past sync and erase, inside the writes
        try:
            t0 = time.monotonic()
            with pytest.raises(BootloaderError, match="lost the connection|cannot write"):
                flash_serial(BOARD, bytes(range(256)) * 64, BASE, proxy.url, show_progress=False, timeout=0.5)
            assert time.monotonic() - t0 < 30
        finally:
            proxy.close()
