"""Sizes from a built ELF file (pyelftools): what really goes to flash and RAM."""
from __future__ import annotations

from pathlib import Path

from elftools.elf.constants import SH_FLAGS
from elftools.elf.elffile import ELFFile


def section_sizes(path: str | Path) -> dict:
    """text (code + read-only data), data (initialised RAM, also stored in flash), bss (zeroed RAM)."""
    text = data = bss = 0
    with open(path, "rb") as f:
        elf = ELFFile(f)
        for sec in elf.iter_sections():
            flags = sec["sh_flags"]
            if not flags & SH_FLAGS.SHF_ALLOC:
                continue
            size = sec["sh_size"]
            if sec["sh_type"] == "SHT_NOBITS":
                bss += size
            elif flags & SH_FLAGS.SHF_WRITE:
                data += size
            else:
                text += size
    return {"text": text, "data": data, "bss": bss, "flash": text + data, "ram": data + bss}


def symbol_sizes(path: str | Path, names) -> dict[str, int]:
    """Sizes of named symbols (e.g. the arena), 0 when absent."""
    wanted = set(names)
    found = {n: 0 for n in wanted}
    with open(path, "rb") as f:
        elf = ELFFile(f)
        symtab = elf.get_section_by_name(".symtab")
        if symtab is None:
            return found
        for sym in symtab.iter_symbols():
            if sym.name in wanted:
                found[sym.name] = sym["st_size"]
    return found


def symbol_values(path: str | Path, names) -> dict[str, int | None]:
    """Addresses (values) of named symbols, None when absent."""
    found: dict[str, int | None] = {n: None for n in names}
    with open(path, "rb") as f:
        symtab = ELFFile(f).get_section_by_name(".symtab")
        if symtab is not None:
            for sym in symtab.iter_symbols():
                if sym.name in found:
                    found[sym.name] = sym["st_value"]
    return found
