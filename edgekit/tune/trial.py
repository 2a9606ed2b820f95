"""One trial of `edgekit tune`: a recipe run for real and measured where the model will run.

The trial's choices become a recipe (``space.to_recipe``) that ``run_recipe`` runs as `edgekit compress`
does. The compressed model is then quantized, generated, built and run on the held-out split as C on the
host once per weight encoding of the space (the accuracy is the C program's, checked bit for bit against
the reference executor): encodings are lossless, so one training gives several points of the front. Then the cost is measured on the
board: an emulated Cortex-M gets its own project, built with the static stack bound, flashed over serial
into an emulator of its own (its own TCP port, so trials run side by side) and profiled (emulated
instructions, deterministic); the host counts instructions with callgrind. Flash and RAM are the built
binary's sections.

A trial never raises: whatever goes wrong (a model that does not fit the board, a build error, a
training step that refuses the model) comes back as a failed trial with its reason.
"""
from __future__ import annotations

import json
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


def _measure_host(project_dir: Path, x: np.ndarray) -> dict:
    from .. import api
    from ..targets.host import count_instructions

    project = api.load_project(project_dir)
    return {"instructions": count_instructions(project_dir, _raw_inputs(project, x)),
            "unit": "host instructions (callgrind)"}


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


def _variant(model, split, board, weights: str, calib: int, work: Path, x: np.ndarray, done: list[dict]) -> dict:
    """The trial's model with one weight encoding: built and run on the host (accuracy from the C), then
    measured on the board. An encoding that makes the same C as one measured before (``auto`` choosing
    the same encoding for every layer) is not measured twice: it is recorded as ``same_as`` that one."""
    from ..compress import report as rep

    try:
        final = rep.deploy(model, split, work / "host", weights=weights, calib_samples=calib)
        if not final["c_equals_reference"]:
            raise EdgekitError("the C program's outputs differ from the int8 reference executor")
        same = next((v for v in done if v.get("layer_encodings") == final["layer_encodings"]), None)
        if same is not None:
            return {"weights": weights, "same_as": same["weights"], "layer_encodings": final["layer_encodings"]}
        if board.kind == "host":
            cost = {**_measure_host(work / "host", x), "flash": final["sizes"]["flash"], "ram": final["sizes"]["ram"]}
        else:
            cost = _measure_emulated(board, model, split, weights, calib, work / board.name, x)
        return {"weights": weights, "status": "ok", "reason": "", "accuracy": float(final["accuracy_c"]),
                "instructions": float(cost["instructions"]), "flash": int(cost["flash"]), "ram": int(cost["ram"]),
                "weight_bytes": int(final["weight_bytes"]), "arena_bytes": int(final["arena_bytes"]),
                "unit": cost["unit"], "layer_encodings": final["layer_encodings"]}
    except Exception as exc:  # this encoding failed (e.g. too big for the board); the others may not
        return {"weights": weights, "status": "failed", "reason": _reason(exc), **WORST, "weight_bytes": 0,
                "arena_bytes": 0, "unit": ""}


def _reason(exc: Exception) -> str:
    return (str(exc) if isinstance(exc, EdgekitError) else f"{type(exc).__name__}: {exc}").strip()


def summarize(variants: list[dict]) -> dict:
    """What the sampler sees of a trial: per objective the best of its encodings (accuracy is the same for
    all of them; each encoding is a separate point of the front)."""
    ok = [v for v in variants if v.get("status") == "ok"]
    if not ok:
        return dict(WORST)
    return {"accuracy": max(v["accuracy"] for v in ok), "instructions": min(v["instructions"] for v in ok),
            "flash": min(v["flash"] for v in ok), "ram": min(v["ram"] for v in ok)}


def check_board(board) -> None:
    """tune measures where it can count without a person at a board: the host, or an emulated Cortex-M."""
    if board.kind == "host" or (board.kind == "cortex-m" and board.get("qemu")):
        return
    raise EdgekitError(f"edgekit tune measures each trial on the host or an emulated Cortex-M board "
                       f"(mps2-an386, mps2-an500, mps2-an385); {board.name} is {board.kind}"
                       + ("" if board.kind == "host" else " hardware"))


def run_trial(config: dict, *, model_path: Path, sample_shape, split, board, space: dict, profile_samples: int,
              artifacts: Path) -> dict:
    """Run and measure one trial: train once, then measure every weight encoding of the space. Returns its
    metrics (the objectives: the best of the encodings; ``variants``: each encoding's own, as JSON); writes
    ``model.pt2`` and a ``recipe-<encoding>.toml`` per successful encoding into ``artifacts``."""
    import torch

    from ..compress import fxgraph
    from ..compress.recipe import run_recipe
    from .space import recipe_toml, to_recipe

    torch.set_num_threads(1)  # one core per trial: the workers share the machine
    start = time.perf_counter()
    try:
        encodings = list(dict.fromkeys(space["space"]["weights"]))
        recipe = to_recipe(config, space, weights=encodings[0])
        model, _ = fxgraph.load_model(model_path)
        calib = recipe["output"]["calib_samples"]
        x = split.x_test[:profile_samples]
        variants: list[dict] = []
        with tempfile.TemporaryDirectory(prefix="edgekit-trial-") as tmp:
            compressed, report = run_recipe(model, recipe, split, sample_shape=sample_shape, deploy=False,
                                            show_progress=False, log=lambda *a, **k: None)
            for weights in encodings:
                variants.append(_variant(compressed, split, board, weights, calib, Path(tmp) / weights, x,
                                         [v for v in variants if v.get("status") == "ok"]))
        ok = [v for v in variants if v.get("status") == "ok"]
        status = "ok" if ok else "failed"
        reason = "" if ok else "; ".join(dict.fromkeys(v["reason"] for v in variants if v.get("reason")))
        if ok:
            artifacts.mkdir(parents=True, exist_ok=True)
            fxgraph.export_model(compressed, sample_shape, artifacts / "model.pt2")
            for v in ok:
                (artifacts / f"recipe-{v['weights']}.toml").write_text(
                    recipe_toml(to_recipe(config, space, weights=v["weights"])))
        for v in variants:
            v.pop("layer_encodings", None)
        return {"status": status, "reason": reason, **summarize(variants), "variants": json.dumps(variants),
                "macs": int(report["steps"][-1]["macs"]), "seconds": round(time.perf_counter() - start, 2)}
    except Exception as exc:  # recorded, never raised: one bad trial must not stop the search
        return {"status": "failed", "reason": _reason(exc), **WORST, "variants": "[]", "macs": 0,
                "seconds": round(time.perf_counter() - start, 2)}
