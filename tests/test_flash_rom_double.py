"""Flasher behaviour against a real STM32 ROM that we cannot run here, through
a clearly named test double on a real pty (tests/stm32_rom_double.py)."""
import pytest

from edgekit.boards import load_board
from edgekit.device.flash import flash_serial
from edgekit.device.stm32boot import BootloaderError, Stm32Bootloader
from stm32_rom_double import Stm32RomBootloaderDouble


def test_read_protected_device_is_reported_as_such():
    rom = Stm32RomBootloaderDouble(read_protected=True)
    try:
        with pytest.raises(BootloaderError, match="read-protected"):
            flash_serial(load_board("nucleo-f446re"), b"\x00" * 64, 0x08000000, rom.port, show_progress=False,
                         timeout=0.3)
        assert "0x31" not in rom.log and "0x44" not in rom.log  # it asked, and neither erased nor wrote
    finally:
        rom.close()


def test_wrong_chip_is_refused_before_erasing():
    rom = Stm32RomBootloaderDouble(chip_id=0x0413)  # an STM32F405, not the board's F446
    try:
        with pytest.raises(BootloaderError, match=r"chip 0x0413.*0x0421"):
            flash_serial(load_board("nucleo-f446re"), b"\x00" * 64, 0x08000000, rom.port, show_progress=False,
                         timeout=0.3)
        assert "0x44" not in rom.log  # nothing was erased
    finally:
        rom.close()


def test_second_sync_nack_of_a_real_rom_is_accepted():
    rom = Stm32RomBootloaderDouble()
    try:
        with Stm32Bootloader(rom.port, timeout=0.3) as bl:
            bl.sync()
            bl.sync()  # the ROM answers NACK: already synchronised
            assert bl.get_id() == 0x0421
    finally:
        rom.close()


def test_no_bootloader_answering_is_a_clear_timeout():
    import os
    import tty
    master, slave = os.openpty()
    tty.setraw(slave)
    try:
        with Stm32Bootloader(os.ttyname(slave), timeout=0.1) as bl:
            with pytest.raises(BootloaderError, match="no bootloader answers.*BOOT0"):
                bl.sync(attempts=2)
    finally:
        os.close(master)
        os.close(slave)
