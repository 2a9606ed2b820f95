"""The model as a C library for the user's own firmware: `edgekit generate --library`.

``write_project(library=True)`` writes the model's C (model.c, the weights, the kernels the board
selects) into ``src/`` with no main, UART or protocol; this module adds the stable API
(``src/edgekit_model.h`` / ``.c``) and the build glue for CMake, Arduino, PlatformIO, Zephyr and Make,
all rendered from ``firmware_templates/library/``. Python decides here (flags, file lists, tensor
descriptions); the templates lay them out.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .. import __version__, layout
from ..boards import Board, resolve_board
from ..errors import EdgekitError
from ..ir import Graph
from .output_dir import staged_output
from .project import write_project
from .render import TEMPLATES, render_to

LIBRARY_NAME = "edgekit_model"  # the CMake target, the Arduino / PlatformIO / Zephyr library
EXAMPLE_NAME = "classify"  # examples/classify/classify.ino
API_VERSION = 1  # EK_MODEL_API_VERSION: raised only when edgekit_model.h changes incompatibly
# library.properties must name a URL; edgekit has no public home yet, so this placeholder is the one
# place to change when it has.
PROJECT_URL = "https://github.com/edgekit/edgekit"
EXAMPLE_MAX_VALUES = 1024  # a larger example input is left out of the sketch (it would not fit small boards)


def cpu_flags(board: Board) -> list[str]:
    """Flags code linked with the library must share (the instruction set and the float ABI)."""
    if board.kind != "cortex-m":
        return []
    flags = [f"-mcpu={board.cpu}", "-mthumb"]
    if board.get("fpu"):
        flags.append(f"-mfpu={board.fpu}")
    return flags + [f"-mfloat-abi={board.get('float_abi', 'soft')}"]


def _c_text(text: str) -> str:
    """A tensor name as plain text for C strings and comments."""
    return re.sub(r"[^0-9A-Za-z_.:/-]", "_", text)[:64]


def _tensors(records: list[dict], weight_only: bool) -> list[dict]:
    out = []
    for rec in records:
        shape = [int(d) for d in rec["shape"]]
        out.append({"name": _c_text(rec["name"]), "shape": shape + [1] * (4 - len(shape)), "rank": len(shape),
                    "size": int(np.prod(shape)), "scale": 0.0 if weight_only else float(rec["scale"]),
                    "zero_point": 0 if weight_only else int(rec["zero_point"])})
    return out


def _example_values(example_input, record: dict) -> list[float] | None:
    """The first sample of ``example_input`` (the model's own layout) as the flat NHWC floats input 0 takes."""
    if example_input is None:
        return None
    inp = record["inputs"][0]
    x = np.asarray(example_input, np.float32)
    sample_shape = inp["shape"][1:]
    if x.ndim == len(sample_shape):
        x = x[None]
    x = layout.to_ir(x[:1], inp["layout"], sample_shape)
    if x.size > EXAMPLE_MAX_VALUES:
        return None
    return [float(v) for v in x.reshape(-1)]


def library_context(board: Board, record: dict, example_input=None) -> dict:
    weight_only = record["mode"] == "weight_only"
    kernels = record["kernels"]
    return dict(
        name=LIBRARY_NAME, example=EXAMPLE_NAME, url=PROJECT_URL, version=__version__, api_version=API_VERSION,
        fingerprint=record["fingerprint"], board=board, weight_only=weight_only,
        elem_type="float" if weight_only else "int8_t",
        arena_bytes=record["arena_bytes"], scratch_bytes=record["scratch_bytes"],
        weight_bytes=record["weight_bytes"],
        inputs=_tensors(record["inputs"], weight_only), outputs=_tensors(record["outputs"], weight_only),
        num_exits=len(record["exits"]["names"]) - 1 if "exits" in record else 0,
        sources=["model.c", "model_weights.c", "edgekit_model.c"] + [f"kernels/{k}.c" for k in kernels],
        cpu_flags=cpu_flags(board), opt_flags=list(board.get("cflags", ["-O2"])),
        needs_libm="ek_softmax_f32" in kernels,
        example_values=_example_values(example_input, record),
    )


def generate_library(graph: Graph, out_dir: str | Path, board: str | Board = "host", weights="dense",
                     exit_threshold=0.9, example_input=None, force: bool = False, memory_off=()) -> dict:
    """Write ``graph`` as a C library into ``out_dir``: ``src/`` (the model, its kernels and the API
    header ``edgekit_model.h``), ``CMakeLists.txt``, ``library.properties`` + ``examples/`` (Arduino),
    ``library.json`` (PlatformIO), ``zephyr/`` (a Zephyr module) and ``edgekit_model.mk`` (Make).
    ``example_input``: samples in the model's layout; the first becomes the example sketch's input.
    Returns the project record (also in ``edgekit_project.json``)."""
    board = resolve_board(board)
    if board.kind not in ("cortex-m", "host", "linux-aarch64"):
        raise EdgekitError(f"board {board.name!r} of kind {board.kind!r} has no library output")
    with staged_output(out_dir, force=force) as stage:
        record = write_project(graph, stage, board, weights=weights, exit_threshold=exit_threshold, library=True,
                               memory_off=memory_off)
        context = library_context(board, record, example_input)
        root = TEMPLATES / "library"
        for tmpl in sorted(root.rglob("*.j2")):
            rel = tmpl.relative_to(root).with_suffix("")
            render_to(stage / rel, f"library/{tmpl.relative_to(root).as_posix()}", **context)
    return record
