"""`edgekit flash`: put a built project on its device.

Serial bootloader boards (real STM32 ROMs, edgekit's bootloader on the emulated
boards): sync, check the chip ID against the board file, erase the pages the
image covers, write it in 256-byte blocks, read everything back and compare,
and only then jump to it. A write that did not land is erased and rewritten; a
flash that cannot be verified fails with an error and never starts.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from ..boards import Board, project_board
from ..codegen.project import load_project
from ..errors import EdgekitError
from ..progress import Progress
from .stm32boot import (EXTENDED_ERASE, GO, READ_MEMORY, WRITE_MEMORY, BootloaderError, BootloaderTimeout,
                        Stm32Bootloader)

BLOCK = 256
SYNC_ATTEMPTS = 20  # 0x7F tries (each up to ~1 s with the filler) before a bootloader counts as absent
PROBE_ATTEMPTS = 2  # the short first probe, before asking a running firmware


def _registry_path() -> Path:
    from ..targets.cortex_m import cache_dir
    return cache_dir() / "devices.json"


def remember(fingerprint: str, project: Path, port: str | None) -> None:
    """Note which project a fingerprint belongs to, so `edgekit profile` finds it from the device."""
    path = _registry_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        data = {}
    data.setdefault("projects", {})[fingerprint] = str(Path(project).resolve())
    if port:
        data.setdefault("ports", {})[port] = fingerprint
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def project_for(fingerprint: str) -> Path | None:
    path = _registry_path()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    p = data.get("projects", {}).get(fingerprint)
    return Path(p) if p and (Path(p) / "edgekit_project.json").exists() else None


def pages_for(board: Board, start: int, length: int) -> list[int]:
    """Page (or sector) numbers covering [start, start + length), numbered from the flash origin."""
    boot = board.get("bootloader") or {}
    origin = board["memory"]["flash_origin"]
    sectors = boot.get("sectors")
    if sectors:
        pages, base = [], origin
        for i, size in enumerate(sectors):
            if base < start + length and start < base + size:
                pages.append(i)
            base += size
        return pages
    size = int(boot.get("page_size", 2048))
    first = (start - origin) // size
    last = (start + length - 1 - origin) // size
    return list(range(first, last + 1))


def _ask_firmware_for_the_bootloader(serial, board: Board) -> str:
    """An edgekit firmware running on the open port ``serial``: ask it over the framed protocol to
    restart in its bootloader (as esptool and the Arduino tools do). Returns what happened, for the
    error message when the bootloader still does not answer."""
    from .protocol import DeviceError, DeviceLink

    parity = getattr(serial, "parity", None)
    if parity is not None:
        try:
            serial.parity = "N"  # the firmware's UART is 8N1, the STM32 bootloader's 8E1
        except Exception:  # a port that cannot change its framing (some ptys): termios.error, ValueError
            return "the port could not switch to 8N1 to ask an edgekit firmware"
    try:
        link = DeviceLink(serial, timeout=0.5, retries=2)  # the same port object: not closed here
        if link.enter_bootloader():
            return "an edgekit firmware answered and restarted in its bootloader"
        if (board.get("bootloader") or {}).get("kind") == "edgekit":
            # A firmware from before the BOOTLOADER request: on these boards its RESET lands in the bootloader.
            link.reset()
            return "an edgekit firmware without the BOOTLOADER request was reset into the bootloader"
        return ("an edgekit firmware answers, but this board cannot return to a bootloader by itself: "
                "put it in its bootloader by hand")
    except DeviceError:
        return "no edgekit firmware answered over the protocol either"
    finally:
        if parity is not None:
            try:
                serial.parity = parity
            except Exception:
                pass  # the sync that follows reports a port that no longer works


def _synced_bootloader(port, timeout: float, board: Board, overall: float | None = None) -> Stm32Bootloader:
    """The bootloader on ``port``, synchronised. A device running an edgekit firmware is first asked
    to restart in its bootloader: a short probe of the bootloader (0x7F first: a real STM32's ROM
    detects the baud rate from it), then the protocol, then the full synchronisation. All on one
    open port: reconnecting to a socket between the steps races with the emulator's listener."""
    bl = Stm32Bootloader(port, timeout=timeout, overall=overall)
    try:
        bl.sync(attempts=PROBE_ATTEMPTS, filler=False)
        return bl
    except BootloaderTimeout:
        pass
    firmware = _ask_firmware_for_the_bootloader(bl.serial, board)
    try:
        bl.sync(attempts=SYNC_ATTEMPTS)
    except BootloaderTimeout as exc:
        bl.close()
        raise BootloaderTimeout(f"{exc} ({firmware})") from None
    except BaseException:
        bl.close()
        raise
    return bl


def flash_serial(board: Board, image: bytes, base: int, port: str, *, show_progress: bool = True,
                 start: bool = True, timeout: float = 1.0, overall: float | None = None) -> dict:
    boot = board.get("bootloader") or {}
    # An overall deadline on top of each read's: two minutes, plus 10 ms per image byte (50 times what
    # writing and reading it back takes at 115200 baud: room for retries over a bad link and a busy host).
    overall = 120.0 + len(image) * 0.010 if overall is None else overall
    with _synced_bootloader(port, timeout, board, overall) as bl:
        version, commands = bl.get()
        missing = [name for code, name in ((READ_MEMORY, "Read Memory"), (WRITE_MEMORY, "Write Memory"),
                                           (EXTENDED_ERASE, "Extended Erase"), (GO, "Go")) if code not in commands]
        if missing:
            raise BootloaderError(f"the bootloader (protocol 0x{version:02X}) lacks {', '.join(missing)}")
        chip = bl.get_id()
        expected = boot.get("chip_id")
        if expected is not None and chip != expected:
            raise BootloaderError(f"the device is chip 0x{chip:04X}, but board {board.name} is chip "
                                  f"0x{expected:04X}: wrong board or wrong port")
        pages = pages_for(board, base, len(image))
        if bl.read_protected():
            raise BootloaderError("the device is read-protected (RDP level 1): the bootloader refuses to read, "
                                  "write or erase its flash. Readout Unprotect (AN3155 command 0x92) lifts the "
                                  "protection and erases the whole flash; edgekit does not do that for you.")
        padded = image + b"\xFF" * (-len(image) % 4)
        rounds = 0
        todo = list(range(0, len(padded), BLOCK))
        erase = pages
        while True:
            rounds += 1
            for i in range(0, len(erase), 256):
                bl.extended_erase(erase[i:i + 256])
            bar = Progress(len(todo), "writing", enabled=show_progress, unit=" blocks")
            for off in todo:
                bl.write_memory(base + off, padded[off:off + BLOCK])
                bar.update()
            bar.close()
            bad = []
            bar = Progress(-(-len(padded) // BLOCK), "verifying", enabled=show_progress, unit=" blocks")
            for off in range(0, len(padded), BLOCK):
                want = padded[off:off + BLOCK]
                got = bl.read_memory(base + off, len(want))
                if got != want:
                    got = bl.read_memory(base + off, len(want))  # a byte damaged on the way back?
                if got != want:
                    bad.append(off)
                bar.update()
            bar.close()
            if not bad:
                break
            if rounds >= 3:
                raise BootloaderError(f"verification failed: {len(bad)} blocks still differ after {rounds} "
                                      "rounds of erase and write; the device was not started")
            # Flash bits only clear: erase the pages around the bad blocks, then rewrite all their blocks.
            erase = sorted({p for off in bad for p in pages_for(board, base + off, BLOCK)})
            todo = [off for off in range(0, len(padded), BLOCK)
                    if set(pages_for(board, base + off, min(BLOCK, len(padded) - off))) & set(erase)]
        if start:
            bl.go(base)
        return {"bytes": len(image), "blocks": -(-len(padded) // BLOCK), "chip_id": chip, "rounds": rounds,
                "retries": bl.retries_used, "started": start}


def _flash_uf2(board: Board, out: Path, project: dict, mount: str | None) -> dict:
    from .uf2 import write_uf2
    image = Path(project["image"]).read_bytes()
    uf2 = out / "firmware.uf2"
    write_uf2(image, board["app"]["flash_origin"], int(board.get("uf2_family", 0)), uf2)
    target = Path(mount) if mount else Path(f"/media/{os.environ.get('USER', 'root')}/RPI-RP2")
    if target.is_dir():
        shutil.copy(uf2, target / uf2.name)
        return {"uf2": str(uf2), "copied_to": str(target)}
    raise EdgekitError(f"wrote {uf2}; no RPI-RP2 drive at {target}. Hold BOOTSEL while plugging the Pico in, "
                       "then copy the file onto the drive (or pass --mount PATH).")


def _flash_tool(board: Board, out: Path, project: dict, method: str) -> dict:
    elf = str(Path(project["binary"]).absolute())  # absolute: never read as an option or looked up in $PATH
    if method == "openocd":
        if any(c in elf for c in '{}[]$"\\;\n'):  # openocd reads the path inside a Tcl command
            raise EdgekitError(f"openocd cannot be given the path {elf!r} safely (it contains Tcl syntax); "
                               "move the project to a plain path")
        target = board.get("openocd_target")
        if not target:
            raise EdgekitError(f"board {board.name} names no openocd target")
        cmd = ["openocd", "-f", "interface/stlink.cfg" if "stm32" in target else "interface/jlink.cfg",
               "-f", target, "-c", f"program {{{elf}}} verify reset exit"]
    elif method == "nrfjprog":
        hexfile = (out / "firmware.hex").absolute()
        subprocess.run(["arm-none-eabi-objcopy", "-O", "ihex", elf, str(hexfile)], check=True)
        cmd = ["nrfjprog", "--program", str(hexfile), "--sectorerase", "--verify", "--reset"]
    else:
        raise EdgekitError(f"unknown flash method {method!r}")
    if shutil.which(cmd[0]) is None:
        raise EdgekitError(f"flashing {board.name} with {method} needs `{cmd[0]}`, which is not installed")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise EdgekitError(f"{cmd[0]} failed:\n{(proc.stdout + proc.stderr)[-2000:]}")
    return {"tool": cmd[0]}


def flash_project(out_dir, port: str | None = None, *, method: str | None = None, start: bool = True,
                  show_progress: bool = True, mount: str | None = None) -> dict:
    out = Path(out_dir)
    project = load_project(out)
    from ..api import refuse_library
    refuse_library(project, out, "flashed as part")
    board = project_board(out, project)
    if board.kind != "cortex-m":
        raise EdgekitError(f"board {board.name} is not flashed: {board.kind} builds run directly")
    image_path = out / "firmware.bin"
    from ..targets.build_record import require_fresh
    require_fresh(out, image_path, "flash")  # never the old image under the new model's fingerprint
    project["image"], project["binary"] = str(image_path), str(out / "firmware.elf")
    method = method or board.get("flash_method", "serial-bootloader")
    if method == "serial-bootloader":
        if not port:
            raise EdgekitError("flashing over the serial bootloader needs --port (e.g. /dev/ttyUSB0, or "
                               "socket://127.0.0.1:4321 for `edgekit emulate`)")
        result = flash_serial(board, image_path.read_bytes(), board["app"]["flash_origin"], port,
                              show_progress=show_progress, start=start)
    elif method == "uf2":
        result = _flash_uf2(board, out, project, mount)
    else:
        result = _flash_tool(board, out, project, method)
    remember(project["fingerprint"], out, port)
    result["fingerprint"] = project["fingerprint"]
    return result
