"""Sizes from a built ELF file (pyelftools): what really goes to flash and RAM."""
from __future__ import annotations

from pathlib import Path

from elftools.elf.constants import SH_FLAGS
from elftools.elf.elffile import ELFFile


def sections(path: str | Path) -> list[dict]:
    """Every allocated section: name, size, and whether it is stored in flash and / or occupies RAM
    (code and read-only data: flash; initialised data: both; zeroed data: RAM only)."""
    found = []
    with open(path, "rb") as f:
        for sec in ELFFile(f).iter_sections():
            flags = sec["sh_flags"]
            if not flags & SH_FLAGS.SHF_ALLOC or not sec["sh_size"]:
                continue
            nobits = sec["sh_type"] == "SHT_NOBITS"
            writable = bool(flags & SH_FLAGS.SHF_WRITE)
            found.append({"name": sec.name, "size": int(sec["sh_size"]), "flash": not nobits,
                          "ram": writable, "kind": "bss" if nobits else "data" if writable else "text"})
    return found


def section_sizes(path: str | Path) -> dict:
    """text (code + read-only data), data (initialised RAM, also stored in flash), bss (zeroed RAM)."""
    totals = {"text": 0, "data": 0, "bss": 0}
    for sec in sections(path):
        totals[sec["kind"]] += sec["size"]
    text, data, bss = totals["text"], totals["data"], totals["bss"]
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
