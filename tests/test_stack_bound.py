"""The static worst-case stack (targets/stack.py) on code built by the real arm-none-eabi-gcc:
exact on a known call chain, and refused (with the reason) for recursion and calls through a
pointer. The bound against the measured high-water mark on the emulated boards is checked where
the demo models are profiled (test_cortex_m.py)."""
import shutil
import subprocess

import pytest

from edgekit.targets.stack import EXCEPTION_FRAME_BYTES, worst_case_stack

pytestmark = pytest.mark.skipif(shutil.which("arm-none-eabi-gcc") is None, reason="needs arm-none-eabi-gcc")

SOURCE = """
#include <string.h>
__attribute__((noinline)) int leaf(int x) { volatile char buf[100]; buf[0] = (char)x; return buf[0]; }
__attribute__((noinline)) int mid(int x) { volatile char b[40]; b[0] = (char)leaf(x); return b[0]; }
int (*volatile hook)(int) = leaf;
int via_pointer(int x) { return hook(x); }
int rec(int n) { volatile char b[8]; b[0] = (char)n; return n ? rec(n - 1) + b[0] : 0; }
char copy_to[64], copy_from[64];
void Reset_Handler(void) { mid(1); memcpy(copy_to, copy_from, sizeof copy_to); %s for (;;) {} }
"""


def _build(tmp_path, extra_call=""):
    (tmp_path / "a.c").write_text(SOURCE % extra_call)
    subprocess.run(["arm-none-eabi-gcc", "-mcpu=cortex-m4", "-mthumb", "-O2", "-fcallgraph-info=su",
                    "-fno-builtin", "--specs=nano.specs", "--specs=nosys.specs", "-nostartfiles",
                    "-Wl,-e,Reset_Handler", "-o", "a.elf", "a.c"], cwd=tmp_path, check=True)
    frames = {}
    for line in (tmp_path / "a.elf-a.ci").read_text().splitlines():
        if "bytes (static)" in line:
            name = line.split('title: "')[1].split('"')[0]
            frames[name] = int(line.split("\\n")[-1].split(" bytes")[0])
    return frames


def test_bound_is_the_deepest_chain(tmp_path):
    frames = _build(tmp_path)
    bound = worst_case_stack(tmp_path, tmp_path / "a.elf", fpu=False)
    # the deepest chain is Reset_Handler > mid > leaf (memcpy, from newlib, uses less than leaf)
    assert bound.path == ["Reset_Handler", "mid", "leaf"], bound
    assert bound.bytes == frames["Reset_Handler"] + frames["mid"] + frames["leaf"] + EXCEPTION_FRAME_BYTES[False]
    assert frames["leaf"] >= 100 and frames["mid"] >= 40  # gcc really sized the arrays
    assert worst_case_stack(tmp_path, tmp_path / "a.elf", fpu=True).bytes == bound.bytes - 32 + 104


@pytest.mark.parametrize("call, why", [("rec(3);", "recursion: rec > rec"),
                                       ("via_pointer(2);", "calls through a pointer")])
def test_unbounded_code_says_why(tmp_path, call, why):
    _build(tmp_path, call)
    bound = worst_case_stack(tmp_path, tmp_path / "a.elf")
    assert bound.bytes is None and why in bound.why
    assert "no static bound" in bound.describe(4096) and why in bound.describe(4096)


def test_without_callgraph_records(tmp_path):
    _build(tmp_path)
    for ci in tmp_path.glob("*.ci"):
        ci.unlink()
    bound = worst_case_stack(tmp_path, tmp_path / "a.elf")
    assert bound.bytes is None and "-fcallgraph-info" in bound.why
