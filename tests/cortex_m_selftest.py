"""Self-test firmware for the emulated Cortex-M boards: a generated model with the test's inputs
baked in as const arrays, run by QEMU straight from its ELF (no bootloader, no serial link), the
outputs written to QEMU's stdout by semihosting (SYS_WRITE0) and the exit code by
SYS_EXIT_EXTENDED. It runs the board's real kernels (e.g. kernels/dsp on the M4 / M7) on the
emulated core, fast enough for hypothesis."""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import numpy as np

from edgekit.boards import load_board
from edgekit.codegen.project import generate_project, load_project
from edgekit.codegen.render import render_to

WARN = ["-std=c99", "-Wall", "-Wextra", "-Werror"]

SELFTEST_C = r"""/* Self-test: run the model on baked-in inputs, print outputs as hex by semihosting. */
#include <stdint.h>
#include <string.h>
#include "model.h"

static const int8_t test_inputs[%(n)d][%(size)d] = {
%(rows)s
};

static void semihost(uint32_t op, const void *arg)
{
    register uint32_t r0 __asm__("r0") = op;
    register const void *r1 __asm__("r1") = arg;
    __asm__ volatile("bkpt 0xab" : "+r"(r0) : "r"(r1) : "memory");
}

static void ek_exit(uint32_t code)
{
    const uint32_t block[2] = {0x20026u, code}; /* ADP_Stopped_ApplicationExit */
    semihost(0x20u, block);                     /* SYS_EXIT_EXTENDED */
    for (;;) {
    }
}

int main(void)
{
    static char line[2 * %(out)d + 8];
    static const char hex[] = "0123456789abcdef";
    for (int32_t s = 0; s < %(n)d; ++s) {
        memcpy(ek_model_input(0), test_inputs[s], %(size)d);
        if (ek_model_invoke() != 0) {
            ek_exit(2);
        }
        const int8_t *y = ek_model_output(0);
        char *p = line;
        *p++ = 'Y';
        *p++ = ':';
        for (int32_t i = 0; i < %(out)d; ++i) {
            const uint8_t v = (uint8_t)y[i];
            *p++ = hex[v >> 4];
            *p++ = hex[v & 15];
        }
        *p++ = '\n';
        *p = 0;
        semihost(0x04u, line); /* SYS_WRITE0 */
    }
    ek_exit(0);
    return 0;
}
"""


def run_selftest(graph, board_name: str, inputs: np.ndarray, workdir: Path, timeout: float = 60.0,
                 memory_off=(), extra_cflags=()) -> np.ndarray:
    """Generate ``graph`` (one int8 input, one output) for ``board_name`` (``memory_off``: arena
    techniques turned off), build self-test firmware with ``inputs`` (batch of raw int8 input tensors)
    baked in, run it under QEMU; return the int8 outputs, one row per input."""
    board = load_board(board_name)
    out = workdir / "project"
    generate_project(graph, out, board, memory_off=memory_off)
    record = load_project(out)
    # Linked for the whole device (vector table at address 0, where QEMU starts the core), with
    # no profiling hooks: this firmware only computes.
    render_to(out / "linker.ld", "cortex_m/linker.ld.j2", board=board, region=board["memory"],
              region_name="self-test", stack_bytes=16384)
    (out / "ek_port.h").write_text("#include <stdint.h>\n")
    x = np.ascontiguousarray(inputs, np.int8).reshape(len(inputs), -1)
    out_size = int(np.prod(record["outputs"][0]["shape"]))
    rows = ",\n".join("    {" + ", ".join(str(int(v)) for v in row) + "}" for row in x)
    (out / "selftest.c").write_text(SELFTEST_C % dict(n=len(x), size=x.shape[1], rows=rows, out=out_size))
    stdout = build_and_run(out, board, board_name, ["model.c", "model_weights.c",
                                                   *(f"kernels/{k}.c" for k in record["kernels"])], timeout,
                           extra_cflags)
    lines = [l[2:] for l in stdout.splitlines() if l.startswith("Y:")]
    assert len(lines) == len(x), stdout[-2000:]
    return np.array([np.frombuffer(bytes.fromhex(l), np.uint8).astype(np.int8) for l in lines]).reshape(len(x), -1)


def build_and_run(out: Path, board, board_name: str, sources: list[str], timeout: float = 60.0,
                  extra_cflags=()) -> str:
    """Build out/selftest.c (with startup.c, linker.ld and the given sources of the generated
    project in out) as firmware for the board, run it under QEMU; return its semihosting output."""
    cpu = [f"-mcpu={board.cpu}", "-mthumb", f"-mfloat-abi={board.float_abi}"]
    if board.get("fpu"):
        cpu.append(f"-mfpu={board.fpu}")
    elf = out / "selftest.elf"
    sources = ["startup.c", "selftest.c", *sources]
    cmd = ["arm-none-eabi-gcc", *cpu, *board.get("cflags", ["-O2"]), *extra_cflags, *WARN, "-ffunction-sections", "-fdata-sections",
           "-Iinclude", "-I.", "-nostartfiles", "-T", "linker.ld", "-Wl,--gc-sections", "--specs=nano.specs",
           "--specs=nosys.specs", "-o", str(elf), *sources]
    proc = subprocess.run(cmd, cwd=out, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    qemu = ["qemu-system-arm", "-M", board["qemu"]["machine"], "-display", "none", "-monitor", "none", "-serial", "none",
            "-chardev", "stdio,id=semihosting", "-semihosting-config", "enable=on,target=native,chardev=semihosting",
            "-kernel", str(elf)]
    proc = subprocess.Popen(qemu, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # our own QEMU, by its process group
        proc.communicate()
        raise AssertionError(f"self-test firmware did not finish within {timeout} s on {board_name}")
    assert proc.returncode == 0, f"exit {proc.returncode}: {stdout[-2000:]} {stderr[-2000:]}"
    return stdout
