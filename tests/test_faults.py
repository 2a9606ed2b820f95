"""Faults on the serial link, for real: a proxy between edgekit and QEMU drops,
corrupts and delays bytes. Flashing ends verified or fails with a clear error
and the bootloader still answers; profiling never returns a wrong output or
count; a device that goes silent gives a clear timeout, not a hang."""
import shutil
import time

import numpy as np
import pytest

import edgekit
from edgekit.device.emulator import Emulator
from edgekit.device.flash import flash_project
from edgekit.device.profile import profile
from edgekit.device.protocol import DeviceError, DeviceLink
from edgekit.device.stm32boot import BootloaderError, Stm32Bootloader
from faultproxy import FaultProxy

pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(shutil.which("qemu-system-arm") is None, reason="needs qemu-system-arm")]


@pytest.fixture(scope="module")
def cnn_project(tmp_path_factory, trained_cnn, digits):
    out = tmp_path_factory.mktemp("faults") / "cnn"
    edgekit.generate(edgekit.quantize(trained_cnn, digits.x_train[:200]), out, board="mps2-an386")
    edgekit.build(out)
    return out


@pytest.mark.parametrize("seed", [1, 2])
def test_flashing_through_a_damaged_link_ends_verified_or_fails_clearly(cnn_project, digits, seed):
    with Emulator("mps2-an386") as emu:
        proxy = FaultProxy(emu.port, seed=seed, drop=3e-4, corrupt=1e-3, delay=0.01)
        try:
            try:
                result = flash_project(cnn_project, proxy.url, show_progress=False)
                flashed = True
            except BootloaderError as exc:  # acceptable outcome: a clear error
                assert "failed" in str(exc) or "timeout" in str(exc).lower() or "refused" in str(exc)
                flashed = False
            assert proxy.counts["corrupted"] + proxy.counts["dropped"] > 0  # the link really was damaged
        finally:
            proxy.close()
        if flashed:
            assert result["rounds"] >= 1
            report = profile(emu.url, digits.x_test[:10], project_dir=cnn_project, show_progress=False)
            assert report["bit_exact"]
            with DeviceLink(emu.url) as link:
                link.reset()
        # Whatever happened, the bootloader answers on a clean link and can be flashed again.
        with Stm32Bootloader(emu.url, timeout=0.5) as bl:
            bl.sync()
            assert bl.get_id() == 0x0E01
        flash_project(cnn_project, emu.url, show_progress=False)


def test_profiling_through_a_damaged_link_never_returns_a_wrong_number(cnn_project, digits):
    with Emulator("mps2-an386") as emu:
        flash_project(cnn_project, emu.url, show_progress=False)
        clean = profile(emu.url, digits.x_test[:1], project_dir=cnn_project, runs=2, show_progress=False)
        proxy = FaultProxy(emu.port, seed=7, drop=2e-3, corrupt=5e-3, delay=0.02)
        try:
            with DeviceLink(proxy.url, timeout=0.5, retries=30) as link:
                report = profile(proxy.url, digits.x_test[:25], project_dir=cnn_project, show_progress=False,
                                 link=link)
        finally:
            proxy.close()
        assert proxy.counts["corrupted"] > 0 and proxy.counts["dropped"] > 0
        assert report["link"]["retries"] > 0
        assert report["bit_exact"], report["mismatches"]
        # the counts survive too: the same deterministic numbers as on the clean link
        assert abs(report["total"]["median"] - clean["total"]["median"]) < 0.001 * clean["total"]["median"]


def test_a_silent_device_gives_a_clear_timeout(cnn_project):
    with Emulator("mps2-an386") as emu:
        flash_project(cnn_project, emu.url, show_progress=False)
        proxy = FaultProxy(emu.port, blackhole=True)
        try:
            start = time.monotonic()
            with DeviceLink(proxy.url, timeout=0.3, retries=3) as link:
                with pytest.raises(DeviceError, match="no valid answer .* after 4 tries"):
                    link.identify()
            assert time.monotonic() - start < 5
        finally:
            proxy.close()


def test_qemu_dying_mid_profile_is_a_clear_error(cnn_project, digits):
    emu = Emulator("mps2-an386").start()
    try:
        flash_project(cnn_project, emu.url, show_progress=False)
        with DeviceLink(emu.url, timeout=0.5, retries=2) as link:
            link.identify()
            emu.stop()
            with pytest.raises(DeviceError):
                link.invoke()
    finally:
        emu.stop()


def test_the_bootloader_drops_a_half_sent_command(cnn_project):
    """A command cut short by a lost byte: the host re-synchronises and carries on."""
    with Emulator("mps2-an386") as emu, Stm32Bootloader(emu.url, timeout=0.5) as bl:
        bl.sync()
        bl._write(bytes([0x31, 0xCE]))  # Write Memory ...
        assert bl._read(1) == b"\x79"
        bl._write(b"\x00\x10")  # ... and then the link loses the rest of the address
        bl.resync_filler()
        bl.sync()
        assert bl.get_id() == 0x0E01
        bl.extended_erase([512])
        bl.write_memory(0x00100000, bytes(range(32)))
        assert bl.read_memory(0x00100000, 32) == bytes(range(32))
