"""The emulated Cortex-M boards, for real: QEMU runs edgekit's serial bootloader,
the tests flash each model over the socket (AN3155), profile it, and require
every output to be bit-exact with the numpy reference."""
import shutil

import numpy as np
import pytest

import edgekit
from edgekit.device.emulator import Emulator
from edgekit.device.flash import flash_project
from edgekit.device.profile import profile
from edgekit.device.protocol import DeviceLink
from edgekit.device.stm32boot import Stm32Bootloader
from edgekit.errors import EdgekitError

pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(shutil.which("qemu-system-arm") is None or
                                 shutil.which("arm-none-eabi-gcc") is None,
                                 reason="needs qemu-system-arm and arm-none-eabi-gcc (make setup)")]


@pytest.fixture(scope="module")
def projects(tmp_path_factory, trained_cnn, trained_mlp, trained_rescnn, digits, digits_flat):
    """The three demo models, quantized once."""
    return {
        "cnn": (edgekit.quantize(trained_cnn, digits.x_train[:200]), digits),
        "mlp": (edgekit.quantize(trained_mlp, digits_flat.x_train[:200]), digits_flat),
        "rescnn": (edgekit.quantize(trained_rescnn, digits.x_train[:200]), digits),
    }


def _deploy(graph, board, out, url):
    edgekit.generate(graph, out, board=board)
    built = edgekit.build(out)
    flash_project(out, url, show_progress=False)
    return built


@pytest.mark.parametrize("board", ["mps2-an386", "mps2-an500", "mps2-an385"])
def test_demo_models_bit_exact_on_emulated_cores(board, projects, tmp_path):
    with Emulator(board) as emu:
        for name, (graph, data) in projects.items():
            out = tmp_path / name
            built = _deploy(graph, board, out, emu.url)
            n = 40
            report = profile(emu.url, data.x_test[:n], project_dir=out, labels=data.y_test[:n],
                             show_progress=False)
            assert report["bit_exact"], report["mismatches"]
            assert report["unit"] == "emulated instructions"
            assert report["runs"] == n and report["accuracy"] > 0.85
            assert report["total"]["median"] > 1000
            assert sum(l["median"] for l in report["layers"]) <= report["total"]["max"] * 1.01
            assert 0 < report["stack_high_water"] < report["stack_bytes"]
            # the static worst case (targets/stack.py) covers what the device measured, and fits the reserve
            assert report["stack_high_water"] <= report["stack_bound"] == built["stack_bound"] < report["stack_bytes"]
            assert any(line.startswith("stack: at most") for line in built["budget_lines"])
            assert report["flash_bytes"] == built["sizes"]["flash"] > graph.weight_bytes() // 2
            # Back to the bootloader for the next model: the device stays flashable.
            with DeviceLink(emu.url) as link:
                link.reset()


def test_stack_sized_to_its_static_bound(projects, tmp_path):
    """--stack auto: the reserve shrinks to the static worst case, the device runs bit-exact within it;
    a reserve below the bound is refused and leaves no image to flash."""
    graph, data = projects["rescnn"]
    out = tmp_path / "rescnn"
    edgekit.generate(graph, out, board="mps2-an386")
    default = edgekit.build(out)
    with pytest.raises(EdgekitError, match=r"can use \d+ B of stack .*more than the 64 B reserved") as exc:
        edgekit.build(out, stack=64)
    assert "Reset_Handler > main" in str(exc.value)
    assert not (out / "firmware.elf").exists() and not (out / "firmware.bin").exists()
    auto = edgekit.build(out, stack="auto")
    assert auto["stack_reserved"] == (auto["stack_bound"] + 7) // 8 * 8 < default["stack_reserved"]
    assert default["sizes"]["ram"] - auto["sizes"]["ram"] == default["stack_reserved"] - auto["stack_reserved"]
    with Emulator("mps2-an386") as emu:
        flash_project(out, emu.url, show_progress=False)
        report = profile(emu.url, data.x_test[:10], project_dir=out, show_progress=False)
    assert report["bit_exact"], report["mismatches"]
    assert report["stack_bytes"] == auto["stack_reserved"]  # what the device itself reports
    assert 0 < report["stack_high_water"] <= report["stack_bound"] <= report["stack_bytes"]
    assert edgekit.build(out)["stack_reserved"] == default["stack_reserved"]  # and back to the board's


def test_counts_are_deterministic(projects, tmp_path):
    graph, data = projects["cnn"]
    with Emulator("mps2-an386") as emu:
        _deploy(graph, "mps2-an386", tmp_path / "cnn", emu.url)
        a = profile(emu.url, data.x_test[:1], project_dir=tmp_path / "cnn", runs=3, show_progress=False)
        b = profile(emu.url, data.x_test[:1], project_dir=tmp_path / "cnn", runs=3, show_progress=False)
    spread = a["total"]["max"] - a["total"]["min"]
    assert spread < 0.001 * a["total"]["median"]
    assert abs(a["total"]["median"] - b["total"]["median"]) < 0.001 * a["total"]["median"]


def test_profile_finds_the_project_from_the_device(projects, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path / "cache"))
    graph, data = projects["cnn"]
    with Emulator("mps2-an386") as emu:
        _deploy(graph, "mps2-an386", tmp_path / "cnn", emu.url)
        report = profile(emu.url, data.x_test[:3], show_progress=False)  # no project_dir
        assert report["bit_exact"] and report["fingerprint"] == graph.fingerprint()


def test_profile_refuses_a_device_running_another_model(projects, tmp_path):
    with Emulator("mps2-an386") as emu:
        _deploy(projects["cnn"][0], "mps2-an386", tmp_path / "cnn", emu.url)
        edgekit.generate(projects["rescnn"][0], tmp_path / "other", board="mps2-an386")
        with pytest.raises(EdgekitError, match="flash it first"):
            profile(emu.url, projects["cnn"][1].x_test[:2], project_dir=tmp_path / "other", show_progress=False)


def test_bootloader_refuses_to_overwrite_itself_and_bad_jumps():
    with Emulator("mps2-an386") as emu, Stm32Bootloader(emu.url, timeout=0.5) as bl:
        bl.sync()
        assert bl.get_id() == 0x0E01
        version, commands = bl.get()
        assert version == 0x31 and {0x00, 0x02, 0x11, 0x21, 0x31, 0x44} <= set(commands)
        before = bl.read_memory(0x0, 64)
        with pytest.raises(EdgekitError, match="refused"):
            bl.write_memory(0x0, b"\x00" * 16)
        assert bl.read_memory(0x0, 64) == before
        with pytest.raises(EdgekitError, match="refused"):
            bl.extended_erase([0])  # page 0 holds the bootloader
        with pytest.raises(EdgekitError):
            bl.go(0x00100000)  # erased: no application there
        bl.sync()
        assert bl.get_id() == 0x0E01  # still answering


def test_flash_needs_erase_first_like_real_flash(tmp_path, projects):
    """Writes only clear bits: writing over old data without erasing corrupts it, and verification says so."""
    with Emulator("mps2-an386") as emu, Stm32Bootloader(emu.url, timeout=0.5) as bl:
        bl.sync()
        bl.extended_erase([512])  # 0x00100000 / 2 KiB pages
        bl.write_memory(0x00100000, b"\x0F" * 16)
        bl.write_memory(0x00100000, b"\xF0" * 16)
        assert bl.read_memory(0x00100000, 16) == b"\x00" * 16


def test_model_too_big_for_the_board_is_refused_before_building(tmp_path):
    import torch
    model = torch.nn.Sequential(torch.nn.Linear(64, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 600))
    x = np.random.default_rng(0).uniform(size=(8, 64)).astype(np.float32)
    q = edgekit.quantize(model, x)
    with pytest.raises(EdgekitError) as err:
        edgekit.generate(q, tmp_path / "out", board="rpi-pico")
    msg = str(err.value)
    assert "does not fit rpi-pico" in msg and "flash" in msg and "weights" in msg and "too much" in msg
    assert not (tmp_path / "out").exists()


def test_arena_too_big_for_the_board_is_refused(tmp_path):
    import torch
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(64, 8, 3, padding=1))
    x = np.random.default_rng(0).uniform(size=(2, 3, 48, 48)).astype(np.float32)
    q = edgekit.quantize(model, x)
    with pytest.raises(EdgekitError, match=r"RAM: needs .* arena .* too much"):
        edgekit.generate(q, tmp_path / "out", board="nucleo-f446re")


@pytest.mark.parametrize("board", ["nucleo-f446re", "nucleo-h743zi", "nrf52840-dk", "rpi-pico"])
def test_real_boards_build(board, projects, tmp_path):
    graph, _ = projects["cnn"]
    edgekit.generate(graph, tmp_path / board, board=board)
    built = edgekit.build(tmp_path / board)
    assert (tmp_path / board / "firmware.bin").stat().st_size == built["sizes"]["flash"]
    assert built["budget_lines"]
