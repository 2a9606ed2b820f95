"""Emulated boards: QEMU running edgekit's serial bootloader, its UART on a TCP port.

    with Emulator("mps2-an386") as emu:       # builds the bootloader, starts QEMU
        flash_project(out, emu.url)          # socket://127.0.0.1:PORT, like /dev/ttyACM0
        ...

QEMU counts instructions deterministically (-icount), so the profiler's numbers
repeat exactly. QEMU is always ended by its PID.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from ..boards import Board, load_board
from ..errors import EdgekitError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listener_owned_by(pid: int, port: int) -> bool | None:
    """Whether process pid holds the socket listening on 127.0.0.1:port (Linux: /proc/net/tcp's inode
    among the process's open files); None where /proc cannot tell. A free port can be taken by another
    program between free_port() and QEMU's bind: a QEMU that lost that race exits, and a bare connect
    would then reach the other program's serial port (two emulators flashing each other's board)."""
    try:
        table = Path("/proc/net/tcp").read_text().splitlines()[1:]
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    local = f"0100007F:{port:04X}"
    inodes = {f"socket:[{f[9]}]" for f in (line.split() for line in table) if f[1] == local and f[3] == "0A"}
    if not inodes:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                return True
        except OSError:
            continue
    return False


def _die_with_parent() -> None:
    """In the QEMU child, before exec: ask Linux to kill it when edgekit dies, even by SIGKILL,
    so an emulator never outlives its owner holding a port."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: stop() still ends QEMU on every normal exit


def qemu_command(board: Board, kernel: Path, port: int) -> list[str]:
    qemu = board.get("qemu")
    if not qemu:
        raise EdgekitError(f"board {board.name} has no emulator; emulated boards: mps2-an386, mps2-an500, mps2-an385")
    cmd = ["qemu-system-arm", "-M", qemu["machine"], "-display", "none", "-monitor", "none",
           "-serial", f"tcp:127.0.0.1:{port},server=on,wait=off,nodelay=on",
           "-semihosting-config", "enable=on,target=native", "-kernel", str(kernel)]
    if board.get("counter") == "icount":
        cmd[1:1] = ["-icount", f"shift={int(board.get('icount_shift', 6))},sleep=off"]
    return cmd


class Emulator:
    def __init__(self, board: str | Board = "mps2-an386", port: int | None = None, log: Path | None = None):
        self.board = load_board(board) if isinstance(board, str) else board
        self.port = port or free_port()
        self._port_chosen = port is None  # ours to change if another program takes it first
        self.log = log
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"socket://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> "Emulator":
        from ..targets.cortex_m import build_bootloader

        if shutil.which("qemu-system-arm") is None:
            raise EdgekitError("qemu-system-arm is not installed: sudo apt-get install qemu-system-arm "
                               "(or run `make setup`)")
        kernel = build_bootloader(self.board)
        deadline = time.monotonic() + timeout
        for attempt in range(3):
            cmd = qemu_command(self.board, kernel, self.port)
            out = open(self.log, "ab") if self.log else subprocess.DEVNULL
            self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                            start_new_session=True, preexec_fn=_die_with_parent)
            if self.log:
                out.close()  # the child has its own copy
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    break
                owned = _listener_owned_by(self.process.pid, self.port)
                if owned is None:  # no /proc: the port answering is the best sign there is
                    with socket.socket() as s:
                        s.settimeout(0.2)
                        owned = s.connect_ex(("127.0.0.1", self.port)) == 0
                if owned:
                    return self
                time.sleep(0.05)
            else:
                break  # timed out
            code = self.process.returncode
            if not self._port_chosen or attempt == 2:
                raise EdgekitError(f"QEMU exited at once (code {code}): {' '.join(cmd)}"
                                   + ("" if self._port_chosen else f" (is port {self.port} in use?)"))
            self.port = free_port()  # most likely another program took the port first: try another
        self.stop()
        raise EdgekitError(f"QEMU did not open its serial port {self.port} within {timeout:.0f} s")

    def stop(self) -> None:
        p, self.process = self.process, None
        if p is None or p.poll() is not None:
            return
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=3)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=3)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> "Emulator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
