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
