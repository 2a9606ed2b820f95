"""A TEST DOUBLE of a real STM32's ROM bootloader (ST AN3155, USART), for what
cannot run here: a physical chip, read-protected or not, behind a real pty.
The emulated boards run edgekit's real bootloader firmware; this double exists
only for behaviours of the ST ROM we cannot otherwise reach (RDP level 1, a
different chip ID, the ROM's "already synchronised" NACK)."""
from __future__ import annotations

import os
import threading
import tty

ACK, NACK = 0x79, 0x1F


class Stm32RomBootloaderDouble:
    def __init__(self, chip_id: int = 0x0421, read_protected: bool = False, flash_origin: int = 0x08000000,
                 flash_size: int = 0x80000):
        self.chip_id, self.read_protected = chip_id, read_protected
        self.origin, self.flash = flash_origin, bytearray(b"\xFF" * flash_size)
        self.master, slave = os.openpty()
        tty.setraw(slave)
        self.port = os.ttyname(slave)
        self._slave = slave
        self.synced = False
        self.log: list[str] = []
        self.stop = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _get(self) -> int:
        return os.read(self.master, 1)[0]

    def _put(self, *bs) -> None:
        os.write(self.master, bytes(bs))

    def _address(self):
        raw = bytes(self._get() for _ in range(5))
        if raw[0] ^ raw[1] ^ raw[2] ^ raw[3] != raw[4]:
            self._put(NACK)
            return None
        return int.from_bytes(raw[:4], "big")

    def _serve(self) -> None:
        try:
            while not self.stop:
                b = self._get()
                if b == 0x7F:
                    self._put(NACK if self.synced else ACK)  # the ROM NACKs a second sync
                    self.synced = True
                    continue
                c = self._get()
                if b ^ c != 0xFF:
                    self._put(NACK)
                    continue
                self.log.append(hex(b))
                if b == 0x00:
                    cmds = [0x00, 0x01, 0x02, 0x11, 0x21, 0x31, 0x44, 0x63, 0x73, 0x82, 0x92]
                    self._put(ACK, len(cmds), 0x31, *cmds, ACK)
                elif b == 0x02:
                    self._put(ACK, 1, self.chip_id >> 8, self.chip_id & 0xFF, ACK)
                elif b in (0x11, 0x31, 0x21, 0x44) and self.read_protected:
                    self._put(NACK)  # RDP level 1: memory commands are refused outright
                elif b == 0x11:
                    self._put(ACK)
                    addr = self._address()
                    if addr is None:
                        continue
                    self._put(ACK)
                    n, nc = self._get(), self._get()
                    self._put(ACK)
                    off = addr - self.origin
                    self._put(*self.flash[off:off + n + 1])
                else:
                    self._put(NACK)
        except OSError:
            pass

    def close(self) -> None:
        self.stop = True
        for fd in (self.master, self._slave):
            try:
                os.close(fd)
            except OSError:
                pass
