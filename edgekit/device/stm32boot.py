"""Host side of the STM32 system-memory bootloader's UART protocol (ST AN3155).

The same code drives a real STM32's ROM bootloader (8 data bits, even parity,
BOOT0 high) and edgekit's own bootloader on the emulated boards. Every command
is `code, ~code`, answered ACK (0x79) or NACK (0x1F); addresses and data carry
XOR checksums. A lost or damaged byte leaves the device waiting for the rest of
a command: `resync()` feeds it filler until it answers, then synchronises again.
"""
from __future__ import annotations

import time

from ..errors import EdgekitError
from .port import PortUser, open_port

ACK, NACK, SYNC = 0x79, 0x1F, 0x7F
GET, GET_VERSION, GET_ID, READ_MEMORY, GO, WRITE_MEMORY, ERASE, EXTENDED_ERASE = (
    0x00, 0x01, 0x02, 0x11, 0x21, 0x31, 0x43, 0x44)
READOUT_UNPROTECT = 0x92
COMMAND_NAMES = {GET: "Get", GET_VERSION: "Get Version", GET_ID: "Get ID", READ_MEMORY: "Read Memory", GO: "Go",
                 WRITE_MEMORY: "Write Memory", ERASE: "Erase", EXTENDED_ERASE: "Extended Erase"}


class BootloaderError(EdgekitError):
    pass


class BootloaderTimeout(BootloaderError):
    pass


class BootloaderNack(BootloaderError):
    pass


def _xor(data: bytes) -> int:
    x = 0
    for b in data:
        x ^= b
    return x


def _address(addr: int) -> bytes:
    raw = addr.to_bytes(4, "big")
    return raw + bytes([_xor(raw)])


class Stm32Bootloader(PortUser):
    def __init__(self, port, timeout: float = 1.0, baudrate: int = 115200, overall: float | None = None):
        self.timeout = timeout
        self.retries_used = 0
        self.babbling = False  # the port kept sending while edgekit waited for quiet
        # Every wait also ends at this overall deadline (None: none beyond the per-read timeouts).
        self.overall = overall
        self.deadline = None if overall is None else time.monotonic() + overall
        self.serial, self.port_name = open_port(port, BootloaderError, baudrate, parity="E")  # 8E1, as the ROM

    def _check_deadline(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            noise = " (the port kept sending bytes that are not the bootloader's answers)" if self.babbling else ""
            raise BootloaderTimeout(f"timeout: gave up on {self.port_name} after {self.overall:.0f} s{noise}; "
                                    "the device was not started")

    # -- bytes -------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        try:
            self.serial.write(data)
            self.serial.flush()
        except Exception as exc:
            raise BootloaderError(f"cannot write to {self.port_name}: {exc}") from None

    def _read(self, n: int, timeout: float | None = None) -> bytes:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        out = bytearray()
        while len(out) < n:
            try:
                out += self.serial.read(n - len(out))
            except Exception as exc:
                raise BootloaderError(f"lost the connection to {self.port_name}: {exc}") from None
            if len(out) < n and time.monotonic() > deadline:
                raise BootloaderTimeout(f"timeout: the bootloader sent {len(out)} of {n} bytes")
            self._check_deadline()
        return bytes(out)

    def _ack(self, what: str, timeout: float | None = None) -> None:
        b = self._read(1, timeout)[0]
        if b == NACK:
            raise BootloaderNack(f"the bootloader refused {what} (NACK)")
        if b != ACK:
            raise BootloaderError(f"unexpected byte 0x{b:02X} from the bootloader after {what}")

    def _command(self, code: int) -> None:
        self._write(bytes([code, code ^ 0xFF]))
        self._ack(COMMAND_NAMES.get(code, f"command 0x{code:02X}"))

    def _drain(self, quiet: float = 0.05, limit: float = 0.25) -> bytes:
        """Read until the port is quiet for ``quiet`` seconds, but never longer than ``limit`` seconds: a
        port that keeps sending (noise, another program's output) must not hold edgekit forever."""
        got = bytearray()
        start = time.monotonic()
        end = start + quiet
        while time.monotonic() < end:
            try:
                chunk = self.serial.read(256)
            except Exception as exc:
                raise BootloaderError(f"lost the connection to {self.port_name}: {exc}") from None
            if chunk:
                got += chunk
                end = min(time.monotonic() + quiet, start + limit)
                if time.monotonic() >= start + limit:
                    # More than a bootloader sends in one answer (it NACKs each filler byte at most).
                    self.babbling = self.babbling or len(got) > 1024
                    break
            self._check_deadline()
        try:
            self.serial.reset_input_buffer()
        except Exception:
            pass
        return bytes(got)

    # -- synchronisation -----------------------------------------------------
    def sync(self, attempts: int = 20, filler: bool = True) -> None:
        """0x7F: the bootloader answers ACK (or NACK when already synchronised, on a real ROM).
        ``filler=False``: a bare probe, no filler after a silent 0x7F (kind to a running firmware)."""
        last = None
        for _ in range(attempts):
            self._drain(0.02)
            self._write(bytes([SYNC]))
            try:
                b = self._read(1, 0.3)[0]
            except BootloaderTimeout as exc:
                last = exc
                if filler:
                    self.resync_filler()
                continue
            if b in (ACK, NACK):
                self._drain(0.02)
                return
            last = BootloaderError(f"unexpected byte 0x{b:02X} during synchronisation")
        noise = " The port keeps sending bytes: is something else talking on it?" if self.babbling else ""
        raise BootloaderTimeout(
            f"no bootloader answers on {self.port_name}: {last}.{noise} On a real STM32, hold BOOT0 high and reset "
            "the board; for the emulated board, start it with `edgekit emulate`.")

    def resync_filler(self, max_bytes: int = 300) -> None:
        """A lost byte leaves the device waiting inside a command: complete it with filler
        bytes until it answers (its checksum then fails and it NACKs), then drain."""
        sent = 0
        while sent < max_bytes:
            self._write(b"\xFF" * 16)
            sent += 16
            if self._drain(0.03):
                return

    def _retry(self, what: str, fn, attempts: int = 4):
        """Run one bootloader transaction; on a timeout or a garbled answer resynchronise and retry.
        A NACK is retried too (a damaged checksum looks like one); if it persists, it is final."""
        last: Exception | None = None
        for i in range(attempts):
            try:
                return fn()
            except BootloaderError as exc:
                last = exc
                if i + 1 < attempts:
                    self.retries_used += 1
                    self.resync_filler()
                    self.sync()
        raise type(last)(f"{what} failed after {attempts} attempts: {last}")

    # -- commands ------------------------------------------------------------
    def get(self) -> tuple[int, list[int]]:
        def run():
            self._command(GET)
            n = self._read(1)[0]
            data = self._read(n + 1)
            self._ack("Get")
            return data[0], list(data[1:])
        return self._retry("Get", run)

    def get_id(self) -> int:
        def run():
            self._command(GET_ID)
            n = self._read(1)[0]
            pid = self._read(n + 1)
            self._ack("Get ID")
            return int.from_bytes(pid, "big")
        return self._retry("Get ID", run)

    def read_protected(self) -> bool:
        """True when Read Memory itself is refused: RDP level 1 on an STM32's ROM."""
        for _ in range(2):  # a NACK can also be line damage: ask twice
            self._write(bytes([READ_MEMORY, READ_MEMORY ^ 0xFF]))
            try:
                self._ack("Read Memory")
            except BootloaderNack:
                self.sync()
                continue
            except BootloaderError:
                self.resync_filler()
                self.sync()
                continue
            self.resync_filler()  # abandon the read: complete it with filler, then resynchronise
            self.sync()
            return False
        return True

    def read_memory(self, address: int, length: int) -> bytes:
        if not 1 <= length <= 256:
            raise ValueError("read 1..256 bytes")

        def run():
            try:
                self._command(READ_MEMORY)
            except BootloaderNack:
                raise BootloaderNack("Read Memory is refused: the device is read-protected (RDP level 1). "
                                     "Readout Unprotect (0x92) removes the protection and erases the flash") from None
            self._write(_address(address))
            self._ack(f"the read address 0x{address:08X}")
            n = length - 1
            self._write(bytes([n, n ^ 0xFF]))
            self._ack("the read length")
            return self._read(length)
        return self._retry(f"reading 0x{address:08X}", run)

    def write_memory(self, address: int, data: bytes) -> None:
        if not 1 <= len(data) <= 256:
            raise ValueError("write 1..256 bytes")

        def run():
            self._command(WRITE_MEMORY)
            self._write(_address(address))
            self._ack(f"the write address 0x{address:08X}")
            frame = bytes([len(data) - 1]) + data
            self._write(frame + bytes([_xor(frame)]))
            self._ack(f"the {len(data)} bytes for 0x{address:08X}", timeout=max(self.timeout, 2.0))
        return self._retry(f"writing 0x{address:08X}", run)

    def extended_erase(self, pages: list[int] | None) -> None:
        """Erase the given pages (sector numbers on the F4 / H7), or everything with ``None``."""
        def run():
            self._command(EXTENDED_ERASE)
            if pages is None:
                self._write(b"\xFF\xFF\x00")
            else:
                body = (len(pages) - 1).to_bytes(2, "big") + b"".join(p.to_bytes(2, "big") for p in pages)
                self._write(body + bytes([_xor(body)]))
            self._ack("Extended Erase", timeout=60.0)  # a real mass erase takes many seconds
        return self._retry("erasing", run)

    def go(self, address: int) -> None:
        def run():
            self._command(GO)
            self._write(_address(address))
            self._ack(f"Go 0x{address:08X} (no valid application there?)")
        return self._retry(f"starting the application at 0x{address:08X}", run, attempts=2)
