"""One trial of `edgekit tune`: a recipe run for real and measured where the model will run.

The trial's choices become a recipe (``space.to_recipe``) that ``run_recipe`` runs as `edgekit compress`
does: compress, quantize, generate, build and run the held-out split as C on the host (the accuracy is
the C program's, checked bit for bit against the reference executor). Then the cost is measured on the
board: an emulated Cortex-M gets its own project, built with the static stack bound, flashed over serial
into an emulator of its own (its own TCP port, so trials run side by side) and profiled (emulated
instructions, deterministic); the host counts instructions with callgrind. Flash and RAM are the built
binary's sections.

A trial never raises: whatever goes wrong (a model that does not fit the board, a build error, a
training step that refuses the model) comes back as a failed trial with its reason.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from ..errors import EdgekitError

# What a failed trial reports for the objectives, so the sampler learns to avoid its region. Finite:
# the samplers refuse inf and NaN.
WORST = {"accuracy": 0.0, "instructions": 1e15, "flash": 1e15, "ram": 1e15}
OBJECTIVES = {"accuracy": "max", "instructions": "min", "flash": "min", "ram": "min"}


def _raw_inputs(project: dict, x: np.ndarray) -> np.ndarray:
    from .. import layout
    from .. import quant_math as qm

    rec = project["inputs"][0]
    return qm.quantize(layout.to_ir(x, rec["layout"], rec["shape"][1:]), rec["scale"], rec["zero_point"])


def _measure_host(project_dir: Path, final: dict, x: np.ndarray) -> dict:
    from .. import api
    from ..targets.host import count_instructions

    project = api.load_project(project_dir)
    sizes = final["sizes"]
    return {"instructions": count_instructions(project_dir, _raw_inputs(project, x)),
            "flash": sizes["flash"], "ram": sizes["ram"], "unit": "host instructions (callgrind)"}


def _measure_emulated(board, model, split, weights: str, calib: int, out: Path, x: np.ndarray) -> dict:
    from .. import api
    from ..device.emulator import Emulator
    from ..device.flash import flash_project
    from ..device.profile import profile

    graph = api.quantize(model, split.x_train[:calib])
    api.generate(graph, out, board, weights=weights)
    built = api.build(out, stack="auto")  # the static worst-case stack: RAM is what the board must have
    with Emulator(board) as emu:  # a free port of its own: trials on one machine do not share a UART
        flash_project(out, emu.url, show_progress=False)
        report = profile(emu.url, x, project_dir=out, show_progress=False)
    if not report["bit_exact"]:
        raise EdgekitError(f"the device's outputs differ from the reference executor on {board.name}")
    return {"instructions": report["total"]["median"], "flash": built["sizes"]["flash"],
            "ram": built["sizes"]["ram"], "unit": report["unit"]}


def check_board(board) -> None:
    """tune measures where it can count without a person at a board: the host, or an emulated Cortex-M."""
    if board.kind == "host" or (board.kind == "cortex-m" and board.get("qemu")):
        return
    raise EdgekitError(f"edgekit tune measures each trial on the host or an emulated Cortex-M board "
                       f"(mps2-an386, mps2-an500, mps2-an385); {board.name} is {board.kind}"
                       + ("" if board.kind == "host" else " hardware"))


def run_trial(config: dict, *, model_path: Path, sample_shape, split, board, space: dict, profile_samples: int,
              artifacts: Path) -> dict:
    """Run and measure one trial. Returns its metrics; writes ``model.pt2`` and ``recipe.toml`` of a
    successful trial into ``artifacts``."""
    import torch

    from ..compress import fxgraph
    from ..compress.recipe import run_recipe
    from .space import recipe_toml, to_recipe

    torch.set_num_threads(1)  # one core per trial: the workers share the machine
    start = time.perf_counter()
    recipe = None
    try:
        recipe = to_recipe(config, space)
        model, _ = fxgraph.load_model(model_path)
        calib = recipe["output"]["calib_samples"]
        weights = recipe["output"]["weights"]
        with tempfile.TemporaryDirectory(prefix="edgekit-trial-") as tmp:
            host_dir = Path(tmp) / "host"
            compressed, report = run_recipe(model, recipe, split, sample_shape=sample_shape, build_dir=host_dir,
                                            show_progress=False, log=lambda *a, **k: None)
            final = report["final"]
            if not final["c_equals_reference"]:
                raise EdgekitError("the C program's outputs differ from the int8 reference executor")
            x = split.x_test[:profile_samples]
            if board.kind == "host":
                cost = _measure_host(host_dir, final, x)
            else:
                cost = _measure_emulated(board, compressed, split, weights, calib, Path(tmp) / board.name, x)
        artifacts.mkdir(parents=True, exist_ok=True)
        fxgraph.export_model(compressed, sample_shape, artifacts / "model.pt2")
        (artifacts / "recipe.toml").write_text(recipe_toml(recipe))
        return {"status": "ok", "reason": "", "accuracy": float(final["accuracy_c"]),
                "instructions": float(cost["instructions"]), "flash": int(cost["flash"]), "ram": int(cost["ram"]),
                "weight_bytes": int(final["weight_bytes"]), "arena_bytes": int(final["arena_bytes"]),
                "macs": int(report["steps"][-1]["macs"]), "unit": cost["unit"],
                "seconds": round(time.perf_counter() - start, 2)}
    except Exception as exc:  # recorded, never raised: one bad trial must not stop the search
        reason = str(exc) if isinstance(exc, EdgekitError) else f"{type(exc).__name__}: {exc}"
        return {"status": "failed", "reason": reason.strip(), **WORST, "weight_bytes": 0, "arena_bytes": 0,
                "macs": 0, "unit": "", "seconds": round(time.perf_counter() - start, 2)}
