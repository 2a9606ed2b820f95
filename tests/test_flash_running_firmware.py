"""`edgekit flash` to a device that runs an edgekit firmware: the flasher asks it over the framed
protocol to restart in its bootloader, then flashes, as esptool does. On the emulated M4: flash, then
flash again (another model, then the first again) without restarting QEMU."""
import shutil
import time

import numpy as np
import pytest

import edgekit
from edgekit.boards import load_board
from edgekit.device import flash
from edgekit.device.emulator import Emulator
from edgekit.device.flash import flash_project, flash_serial
from edgekit.device.protocol import DeviceLink
from edgekit.device.stm32boot import BootloaderTimeout
from faultproxy import FaultProxy

needs_qemu = pytest.mark.skipif(shutil.which("qemu-system-arm") is None or shutil.which("arm-none-eabi-gcc") is None,
                                reason="needs qemu-system-arm and arm-none-eabi-gcc (make setup)")


def _mlp_project(out, seed: int):
    import torch
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.ReLU(), torch.nn.Linear(12, 4))
    x = np.random.default_rng(seed).normal(size=(16, 16)).astype(np.float32)
    record = edgekit.generate(edgekit.quantize(model, x), out, board="mps2-an386")
    edgekit.build(out)
    return record["fingerprint"]


@pytest.mark.qemu
@needs_qemu
def test_flash_again_while_the_firmware_runs(tmp_path):
    first = _mlp_project(tmp_path / "a", 1)
    second = _mlp_project(tmp_path / "b", 2)
    assert first != second
    with Emulator("mps2-an386") as emu:
        flash_project(tmp_path / "a", emu.url, show_progress=False)
        with DeviceLink(emu.url) as link:
            assert link.identify().fingerprint == first  # the firmware runs, the bootloader is gone
        for out, fingerprint in ((tmp_path / "b", second), (tmp_path / "a", first)):
            start = time.monotonic()
            result = flash_project(out, emu.url, show_progress=False)
            assert result["started"] and result["fingerprint"] == fingerprint
            assert time.monotonic() - start < 30
            with DeviceLink(emu.url) as link:
                assert link.identify().fingerprint == fingerprint
        assert emu.alive()  # the same QEMU all along


@pytest.mark.qemu
@needs_qemu
def test_nothing_answering_keeps_the_bare_stm32_message(monkeypatch):
    """Neither a bootloader nor a firmware on the port: the bare-STM32 advice, and that no firmware answered."""
    monkeypatch.setattr(flash, "SYNC_ATTEMPTS", 2)
    with Emulator("mps2-an386") as emu:
        proxy = FaultProxy(emu.port, blackhole=True)
        try:
            with pytest.raises(BootloaderTimeout, match="BOOT0.*no edgekit firmware answered"):
                flash_serial(load_board("mps2-an386"), b"\0" * 64, 0x00100000, proxy.url, show_progress=False)
        finally:
            proxy.close()


@pytest.mark.qemu
@needs_qemu
def test_a_firmware_from_before_the_bootloader_request_is_reset_into_it(tmp_path):
    """Firmware built before BOOTLOADER existed refuses it; on a board with edgekit's bootloader the
    flasher then sends RESET, which lands there too. Such a firmware is made here by building one
    without the port's bootloader entry."""
    fingerprint = _mlp_project(tmp_path / "old", 3)
    port_h = tmp_path / "old" / "ek_port.h"
    port_h.write_text(port_h.read_text().replace("#define EK_PORT_HAS_BOOTLOADER 1\n", ""))
    edgekit.build(tmp_path / "old")
    with Emulator("mps2-an386") as emu:
        flash_project(tmp_path / "old", emu.url, show_progress=False)
        with DeviceLink(emu.url) as link:
            assert link.enter_bootloader() is False  # the old firmware does not know the request
        result = flash_project(tmp_path / "old", emu.url, show_progress=False)
        assert result["started"]
        with DeviceLink(emu.url) as link:
            assert link.identify().fingerprint == fingerprint
