"""What a model costs and whether it fits its board: multiply-accumulates per layer, and the flash / RAM
budget checked before building (and again exactly from the built ELF).

Code generation, the build targets, the profiler and the compression report all use it; it imports
only the IR and the board files, so none of them has to import another for these numbers.
"""
from __future__ import annotations

from .boards import Board
from .errors import EdgekitError
from .ir import Graph, Op, nhwc


def layer_macs(graph: Graph, op: Op) -> int:
    """Multiply-accumulates of one layer (0 for layers without weights)."""
    out = nhwc(graph.tensors[op.outputs[0]].shape)
    if op.kind == "conv2d":
        O, KH, KW, I = graph.tensors[op.inputs[1]].shape
        return out[1] * out[2] * O * KH * KW * I
    if op.kind == "depthwise_conv2d":
        _, KH, KW, O = graph.tensors[op.inputs[1]].shape
        return out[1] * out[2] * O * KH * KW
    if op.kind == "transpose_conv2d":
        O, KH, KW, I = graph.tensors[op.inputs[1]].shape
        return graph.tensors[op.inputs[0]].size * O * KH * KW
    if op.kind == "fully_connected":
        O, I = graph.tensors[op.inputs[1]].shape
        return O * I * (graph.tensors[op.inputs[0]].size // I)
    return 0


def graph_macs(graph: Graph) -> int:
    return int(sum(layer_macs(graph, op) for op in graph.ops))

# Code size of the runtime (startup, UART, protocol, main loop) and of each kernel, in bytes of .text,
# measured from arm-none-eabi-gcc -O2 builds (Cortex-M4). Used only for the check before building;
# the check after building reads the real sizes from the ELF.
RUNTIME_CODE_BYTES = 2600
KERNEL_CODE_BYTES = 900
LIBC_CODE_BYTES = 600


def estimate_code_bytes(kernels: list[str]) -> int:
    return RUNTIME_CODE_BYTES + LIBC_CODE_BYTES + KERNEL_CODE_BYTES * len(kernels)


def _fmt(n: int) -> str:
    return f"{n:,} B ({n / 1024:.1f} KiB)"


def check_before_build(board: Board, weight_bytes: int, arena_bytes: int, code_bytes: int) -> list[str]:
    """Refuse a model that cannot fit, naming the part and by how many bytes. Returns report lines."""
    region = board.get("app")
    if not region:  # a board with an OS (host, Pi): no budget, but a sane cap (safety.MAX_ARENA_BYTES_OS)
        from .safety import MAX_ARENA_BYTES_OS
        for what, n in (("arena", arena_bytes), ("weights", weight_bytes)):
            if n > MAX_ARENA_BYTES_OS:
                raise EdgekitError(f"the model's {what} would take {_fmt(n)}, more than the {_fmt(MAX_ARENA_BYTES_OS)} "
                                   f"edgekit accepts for a static C array on {board.name}; check the model's shapes")
        return []
    stack = int(board.get("stack_bytes", 8192))
    flash_need = weight_bytes + code_bytes
    ram_need = arena_bytes + stack + 2048  # + protocol buffers and runtime state
    problems = []
    if flash_need > region["flash_size"]:
        problems.append(f"flash: needs {_fmt(flash_need)} = weights {_fmt(weight_bytes)} + code ~{_fmt(code_bytes)}, "
                        f"the board has {_fmt(region['flash_size'])}: {_fmt(flash_need - region['flash_size'])} too much")
    if ram_need > region["ram_size"]:
        problems.append(f"RAM: needs {_fmt(ram_need)} = arena {_fmt(arena_bytes)} + stack {_fmt(stack)} + runtime 2 KiB, "
                        f"the board has {_fmt(region['ram_size'])}: {_fmt(ram_need - region['ram_size'])} too much")
    if problems:
        raise EdgekitError(f"the model does not fit {board.name}:\n  " + "\n  ".join(problems) +
                           "\nCompress it (edgekit compress), or pick a larger board (edgekit boards).")
    return [f"flash: ~{_fmt(flash_need)} of {_fmt(region['flash_size'])} (weights {_fmt(weight_bytes)})",
            f"RAM:   ~{_fmt(ram_need)} of {_fmt(region['ram_size'])} (arena {_fmt(arena_bytes)}, stack {_fmt(stack)})"]


def check_built(board: Board, sizes: dict) -> list[str]:
    region = board.get("app")
    if not region:
        return []
    lines = [f"flash: {_fmt(sizes['flash'])} of {_fmt(region['flash_size'])} "
             f"({100 * sizes['flash'] / region['flash_size']:.1f} %)",
             f"RAM:   {_fmt(sizes['ram'])} of {_fmt(region['ram_size'])} "
             f"({100 * sizes['ram'] / region['ram_size']:.1f} %, stack included)"]
    return lines
