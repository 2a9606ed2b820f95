"""The firmware's worst-case stack, bounded statically from the built code.

gcc's ``-fcallgraph-info=su`` writes, per translation unit, every function's
frame size and its calls (``firmware.elf-<unit>.ci``, VCG text). Functions
compiled elsewhere (newlib's memcpy / memset, libgcc helpers) have no such
record; their frames are read from the ELF's own code (the prologue's ``push``,
``vpush`` and ``sub sp``) and their calls from its ``bl`` instructions. The
bound is the deepest path from the reset handler, plus one exception frame
(a fault report pushes one). Recursion, calls through a pointer or a frame
gcc could not size make the bound unknown, and the report says which.

The profiler's measured high-water mark must stay below this bound: the tests
check both on the emulated boards.
"""
from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

# Cortex-M exception entry: 8 words, plus 18 FP words (S0-S15, FPSCR, reserved) with an FPU context.
EXCEPTION_FRAME_BYTES = {False: 32, True: 104}

_NODE = re.compile(r'node: \{ title: "([^"]+)" label: "[^"]*?\\n[^"]*?(?:\\n(\d+) bytes \(([^)]+)\))?"')
_EDGE = re.compile(r'edge: \{ sourcename: "([^"]+)" targetname: "([^"]+)"')
_FUNC = re.compile(r"^[0-9a-f]+ <([^>]+)>:$")
_PUSH = re.compile(r"\b(?:push(?:\.w)?|stmdb(?:\.w)?\s+sp!,)\s*\{([^}]*)\}")
_VPUSH = re.compile(r"\bvpush\s*\{([^}]*)\}")
_SUB_SP = re.compile(r"\bsub(?:w|\.w)?\s+sp,\s*(?:sp,\s*)?#(\d+)")
_CALL = re.compile(r"\bbl\s+[0-9a-f]+ <([^>+]+)>")
_INDIRECT = re.compile(r"\bblx\s+r\d+|\bblx\s+(?:ip|lr)")


@dataclass
class StackBound:
    bytes: int | None  # None: unknown (see why)
    path: list[str] = field(default_factory=list)  # the deepest call chain, reset handler first
    why: str = ""

    def describe(self, reserved: int) -> str:
        if self.bytes is None:
            return f"stack: no static bound ({self.why}); {reserved:,} B reserved"
        chain = " > ".join(self.path[:6]) + (" > ..." if len(self.path) > 6 else "")
        return f"stack: at most {self.bytes:,} B of {reserved:,} B reserved (static bound, deepest: {chain})"


def _read_callgraph(build_dir: Path) -> tuple[dict[str, int | None], dict[str, set[str]], dict[str, str]]:
    frames: dict[str, int | None] = {}
    calls: dict[str, set[str]] = {}
    unsized: dict[str, str] = {}
    for ci in sorted(build_dir.glob("*.ci")):
        for line in ci.read_text(errors="replace").splitlines():
            node = _NODE.match(line)
            if node:
                name, size, kind = node.groups()
                if size is not None:
                    frames[name] = int(size)
                    if "dynamic" in kind and "bounded" not in kind:
                        unsized[name] = f"{name} has a frame sized at run time"
                continue
            edge = _EDGE.match(line)
            if edge:
                calls.setdefault(edge.group(1), set()).add(edge.group(2))
    return frames, calls, unsized


def _register_bytes(regs: str) -> int:
    """Bytes a push / vpush register list stores: r and s registers 4 each, d registers 8."""
    total = 0
    for part in regs.replace(" ", "").split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        width = 8 if lo.startswith("d") else 4
        if hi:
            count = int(hi.lstrip("rsd")) - int(lo.lstrip("rsd")) + 1 if lo[0] in "rsd" and hi[0] in "rsd" else 1
        else:
            count = 1
        total += width * count
    return total


def _disassembled_frames(elf: Path, objdump: str) -> tuple[dict[str, int], dict[str, set[str]], set[str]]:
    """Frame size and calls of every function in the ELF, from its code."""
    text = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(elf)], capture_output=True, text=True,
                          check=True, timeout=120).stdout
    frames: dict[str, int] = {}
    calls: dict[str, set[str]] = {}
    indirect: set[str] = set()
    current = None
    for line in text.splitlines():
        head = _FUNC.match(line)
        if head:
            current = head.group(1)
            frames[current] = 0
            calls[current] = set()
            continue
        if current is None:
            continue
        for pattern in (_PUSH, _VPUSH):
            m = pattern.search(line)
            if m:
                frames[current] += _register_bytes(m.group(1))
        m = _SUB_SP.search(line)
        if m:
            frames[current] += int(m.group(1))
        m = _CALL.search(line)
        if m and m.group(1) != current:
            calls[current].add(m.group(1))
        if _INDIRECT.search(line):
            indirect.add(current)
    return frames, calls, indirect


def worst_case_stack(build_dir: Path, elf: Path, *, objdump: str = "arm-none-eabi-objdump",
                     entry: str = "Reset_Handler", fpu: bool = False) -> StackBound:
    frames, calls, unsized = _read_callgraph(build_dir)
    if not frames:
        return StackBound(None, why="no call-graph records (*.ci): built without -fcallgraph-info=su, gcc < 10?")
    elf_frames, elf_calls, indirect = _disassembled_frames(elf, objdump)

    memo: dict[str, tuple[int, list[str]]] = {}
    on_path: list[str] = []

    def deepest(fn: str) -> tuple[int, list[str]]:
        if fn in memo:
            return memo[fn]
        if fn in on_path:
            raise _Unbounded(f"recursion: {' > '.join(on_path[on_path.index(fn):] + [fn])}")
        if fn in unsized:
            raise _Unbounded(unsized[fn])
        if fn == "__indirect_call":  # gcc's placeholder for a call through a pointer
            raise _Unbounded(f"{on_path[-1] if on_path else '?'} calls through a pointer")
        if fn in frames:  # compiled by us: gcc's own numbers
            own, callees = frames[fn], calls.get(fn, set())
        elif fn in elf_frames:  # libc / libgcc: read from the code
            if fn in indirect:
                raise _Unbounded(f"{fn} calls through a pointer")
            own, callees = elf_frames[fn], elf_calls.get(fn, set())
        else:  # inlined everywhere or removed by --gc-sections: costs nothing
            return 0, []
        on_path.append(fn)
        below, chain = 0, []
        for callee in sorted(callees):
            depth, sub = deepest(callee)
            if depth > below:
                below, chain = depth, sub
        on_path.pop()
        memo[fn] = (own + below, [fn] + chain)
        return memo[fn]

    try:
        total, path = deepest(entry)
    except _Unbounded as exc:
        return StackBound(None, why=str(exc))
    return StackBound(total + EXCEPTION_FRAME_BYTES[fpu], path)


class _Unbounded(Exception):
    pass
