"""Cortex-M targets: arm-none-eabi-gcc + newlib build firmware.elf / firmware.bin."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

from .. import cost
from ..boards import Board
from ..errors import EdgekitError
from .elf import section_sizes, symbol_values
from .stack import worst_case_stack
from .toolchain import require

_OVERFLOW = re.compile(r"region `(\w+)' overflowed by (\d+) bytes")


def _make(board: Board, out: Path, project: dict) -> None:
    proc = subprocess.run(["make", "-s"], cwd=out, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        text = proc.stdout + proc.stderr
        overflows = _OVERFLOW.findall(text)
        if overflows:
            parts = ", ".join(f"{region} by {int(n):,} bytes" for region, n in sorted(set(overflows)))
            raise EdgekitError(f"the firmware does not fit {board.name}: {parts} "
                               f"(weights {project['weight_bytes']:,} B, arena {project['arena_bytes']:,} B). "
                               "Compress the model or pick a larger board.")
        if "cannot find -lc" in text or "nano.specs" in text:
            raise EdgekitError("newlib for arm-none-eabi is missing: sudo apt-get install libnewlib-arm-none-eabi")
        tail = "\n".join(text.strip().splitlines()[-25:])
        raise EdgekitError(f"building the firmware failed:\n{tail}")


def _linked_stack_bytes(elf: Path) -> int:
    v = symbol_values(elf, ["_ek_stack_bottom", "_ek_stack_top"])
    return int(v["_ek_stack_top"]) - int(v["_ek_stack_bottom"])


def build(board: Board, out: Path, project: dict, stack: int | str | None = None) -> dict:
    """make the firmware. ``stack``: None keeps the board's reserve, an int reserves that many
    bytes, "auto" reserves the static worst case (targets/stack.py), rounded up to 8 bytes."""
    require("make")
    require("arm-none-eabi-gcc")
    stack_mk = out / "stack.mk"
    if isinstance(stack, int):
        if stack <= 0 or stack % 8:
            raise EdgekitError(f"--stack {stack}: give a positive multiple of 8 bytes, or auto")
        _write_if_changed(stack_mk, f"STACK_BYTES = {stack}\n")
    elif stack is None:  # written, not deleted: a change of content is what makes make relink
        _write_if_changed(stack_mk, f"STACK_BYTES = {int(board.get('stack_bytes', 8192))}\n")
    elif stack != "auto":
        raise EdgekitError(f"--stack {stack!r}: give a number of bytes, or auto")
    _make(board, out, project)
    elf = out / "firmware.elf"
    bound = worst_case_stack(out, elf, fpu=bool(board.get("fpu")))
    if stack == "auto":
        if bound.bytes is None:
            raise EdgekitError(f"--stack auto needs a static bound of the stack, and there is none: {bound.why}. "
                               "Give a size (--stack BYTES) instead")
        if _write_if_changed(stack_mk, f"STACK_BYTES = {(bound.bytes + 7) // 8 * 8}\n"):
            _make(board, out, project)  # relink with the new reserve
    reserved = _linked_stack_bytes(elf)
    if bound.bytes is not None and bound.bytes > reserved:
        for name in ("firmware.elf", "firmware.bin"):  # never leave an image behind that could overflow
            (out / name).unlink(missing_ok=True)
        raise EdgekitError(f"the firmware can use {bound.bytes:,} B of stack ({' > '.join(bound.path)}), "
                           f"{bound.bytes - reserved:,} B more than the {reserved:,} B reserved; "
                           "build with --stack auto, or raise stack_bytes in the board file")
    sizes = section_sizes(elf)
    project["binary"] = str(elf)
    project["image"] = str(out / "firmware.bin")
    project["sizes"] = sizes
    project["budget_lines"] = cost.check_built(board, sizes)
    project["stack_bound"] = bound.bytes
    project["stack_reserved"] = reserved
    project["budget_lines"].append(bound.describe(reserved))
    return project


def _write_if_changed(path: Path, text: str) -> bool:
    if path.exists() and path.read_text() == text:
        return False
    path.write_text(text)
    return True


def cache_dir() -> Path:
    import os

    base = os.environ.get("EDGEKIT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                           os.path.expanduser("~/.cache"), "edgekit")
    return Path(base)


def build_bootloader(board: Board, dest: Path | None = None) -> Path:
    """Render and build edgekit's serial bootloader for ``board``; cached by content."""
    import hashlib

    from ..codegen.render import render

    boot = board.get("bootloader") or {}
    if boot.get("kind") != "edgekit":
        raise EdgekitError(f"{board.name} is flashed through {boot.get('kind', 'its own tools')}, "
                           "not edgekit's bootloader")
    require("make")
    require("arm-none-eabi-gcc")
    context = dict(board=board, boot=boot, region=boot, region_name="bootloader",
                   stack_bytes=int(boot.get("stack_bytes", 4096)))
    files = {
        "startup.c": render("cortex_m/startup.c.j2", **context),
        "linker.ld": render("cortex_m/linker.ld.j2", **context),
        "ek_uart.h": render("cortex_m/ek_uart.h.j2", **context),
        "ek_uart.c": render("cortex_m/ek_uart.c.j2", **context),
        "bootloader.c": render("bootloader/bootloader.c.j2", **context),
        "Makefile": render("bootloader/Makefile.j2", **context),
    }
    digest = hashlib.sha256("".join(k + v for k, v in sorted(files.items())).encode()).hexdigest()[:12]
    dest = dest or cache_dir() / "bootloader" / f"{board.name}-{digest}"
    elf = dest / "bootloader.elf"
    if elf.exists():
        return elf
    dest.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (dest / name).write_text(text)
    proc = subprocess.run(["make", "-s"], cwd=dest, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise EdgekitError(f"building the bootloader for {board.name} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return elf
