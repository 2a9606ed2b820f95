"""Finding compilers and emulators, and saying how to get what is missing."""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

from ..errors import EdgekitError

# tool -> (Debian package that provides it, what it is for)
TOOLS = {
    "cc": ("gcc", "compiling generated C for the host"),
    "make": ("make", "building generated projects"),
    "cmake": ("cmake", "building a generated library with its CMakeLists.txt (generate --library)"),
    "arm-none-eabi-gcc": ("gcc-arm-none-eabi", "building Cortex-M firmware"),
    "qemu-system-arm": ("qemu-system-arm", "the emulated Cortex-M boards"),
    "aarch64-linux-gnu-gcc": ("gcc-aarch64-linux-gnu libc6-dev-arm64-cross", "cross-building for Raspberry Pi"),
    "qemu-aarch64": ("qemu-user", "running Raspberry Pi builds here"),
    "clang": ("clang", "fuzzing the device's frame parser (libFuzzer)"),
}


@dataclass
class ToolStatus:
    tool: str
    path: str | None
    package: str
    purpose: str


def find(tool: str) -> str | None:
    return shutil.which(tool)


def require(tool: str) -> str:
    path = find(tool)
    if path is None:
        package, purpose = TOOLS.get(tool, (tool, "this step"))
        raise EdgekitError(f"`{tool}` is not installed; it is needed for {purpose}. "
                           f"Install it with: sudo apt-get install {package}   (or run `make setup`)")
    return path


def status(tools=None) -> list[ToolStatus]:
    return [ToolStatus(t, find(t), *TOOLS[t]) for t in (tools or TOOLS)]


def run_checked(cmd: list[str], cwd=None, what: str = "command", timeout: float | None = None) -> str:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise EdgekitError(f"{what} did not finish within {timeout:.0f} s: {' '.join(cmd)}") from None
    except FileNotFoundError:
        raise EdgekitError(f"{what}: `{cmd[0]}` not found") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise EdgekitError(f"{what} failed (exit {proc.returncode}):\n{tail}")
    return proc.stdout


def _newlib_ok() -> bool:
    if find("arm-none-eabi-gcc") is None:
        return False
    try:
        out = subprocess.run(["arm-none-eabi-gcc", "-print-file-name=libc_nano.a"], capture_output=True, text=True,
                             timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out not in ("", "libc_nano.a")


def doctor() -> tuple[bool, str]:
    """What edgekit can use on this machine, and how to get what is missing."""
    lines, missing = [], []
    for s in status():
        mark = "ok " if s.path else "-- "
        lines.append(f"{mark} {s.tool:24s} {s.path or 'missing'}  ({s.purpose})")
        if not s.path:
            missing.append(s.package)
    newlib = _newlib_ok()
    lines.append(f"{'ok ' if newlib else '-- '} {'newlib (arm-none-eabi)':24s} "
                 f"{'found' if newlib else 'missing'}  (the C library for Cortex-M firmware)")
    if not newlib:
        missing.append("libnewlib-arm-none-eabi")
    if missing:
        lines.append("\nInstall what is missing with:\n  sudo apt-get install " + " ".join(missing) +
                     "\nor run `make setup` in the edgekit repository.")
    else:
        lines.append("\nEverything edgekit uses is installed.")
    return not missing, "\n".join(lines)
