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


def _threshold_arg(graph, threshold) -> list[str]:
    """The host runner's extra argument for an early-exit threshold (none for a single-exit model)."""
    if threshold is None:
        return []
    from ..passes.exits import device_thresholds, num_early_exits

    raw = device_thresholds(threshold, num_early_exits(graph))
    return [",".join(str(r) for r in raw) if isinstance(raw, list) else str(raw)]


def _c_accuracy(project_dir: Path, graph, split, threshold) -> tuple[float, np.ndarray]:
    """Held-out accuracy from the C program's outputs (a multi-exit model: the output of the exit that
    answered each input, at ``threshold``); the trial fails unless the C equals the reference executor."""
    from .. import api, train

    at = {} if threshold is None else {"exit_threshold": threshold}
    y_c, exit_c = api.run(project_dir, split.x_test, with_exit=True, **at)
    y_ref, exit_ref = api.reference_run(graph, split.x_test, with_exit=True, **at)
    outs_c = y_c if isinstance(y_c, list) else [y_c]
    outs_ref = y_ref if isinstance(y_ref, list) else [y_ref]
    if not (np.array_equal(exit_c, exit_ref) and all(np.array_equal(a, b) for a, b in zip(outs_c, outs_ref))):
        raise EdgekitError("the C program's outputs differ from the int8 reference executor"
                           + ("" if threshold is None else f" at exit threshold {threshold}"))
    answers = np.stack([o.reshape(len(o), -1) for o in outs_c])[np.asarray(exit_c), np.arange(len(split.x_test))] \
        if threshold is not None else outs_c[-1]
    return train.accuracy(answers, split.y_test), np.asarray(exit_c)


def _measure_emulated(board, graph, weights: str, out: Path, x: np.ndarray, thresholds: list,
                      answered: list) -> list[dict]:
    """Emulated instructions, flash and RAM. A single-exit model (``answered == [None]``): the median over
    ``x``. With early exits: per exit the median count of ``x`` forced to answer there (that exit at 0, the
    ones before it run but never answer), weighted by how often it answers at each threshold (``answered``: the exit index of
    every held-out input, from the host's C, which the device equals bit for bit): the mean over the
    held-out split without running all of it through the emulator's serial line. "off" (no head runs) is
    counted as it is."""
    from .. import api
    from ..device.emulator import Emulator
    from ..device.flash import flash_project
    from ..device.profile import profile
    from ..passes.exits import num_early_exits

    api.generate(graph, out, board, weights=weights)
    built = api.build(out, stack="auto")  # the static worst-case stack: RAM is what the board must have
    early = num_early_exits(graph) if thresholds != [None] else 0
    # An exit at 0 always answers; at "never" its head runs and declines, as for an input it does not answer
    # ("off" would skip the head and undercount). A softmax confidence is at most 255/256.
    never = 1.0 if graph.meta.get("exits", {}).get("criterion", "softmax") == "softmax" else 1e6
    counts = []
    with Emulator(board) as emu:  # a free port of its own: trials on one machine do not share a UART
        flash_project(out, emu.url, show_progress=False)
        settings = [[never] * k + [0.0] + [never] * (early - k - 1) for k in range(early)] + [[never] * early]
        if not early:
            settings = [None]
        elif "off" in thresholds:
            settings.append("off")
        for setting in settings:
            at = {} if setting is None else {"full_network": False, "exit_threshold": setting}
            report = profile(emu.url, x, project_dir=out, show_progress=False, **at)
            if not report["bit_exact"]:
                raise EdgekitError(f"the device's outputs differ from the reference executor on {board.name}")
            counts.append(report["total"]["median"])
    sizes = {"flash": built["sizes"]["flash"], "ram": built["sizes"]["ram"], "unit": report["unit"]}
    if not early:
        return [{"instructions": counts[0], **sizes}]
    return [{"instructions": counts[-1] if t == "off" else
             float(sum(np.mean(index == k) * c for k, c in enumerate(counts[:early + 1]))), **sizes}
            for t, index in zip(thresholds, answered)]


def _variants(graph, split, board, weights: str, thresholds: list, work: Path, x: np.ndarray, profile_samples: int,
              done: list[dict]) -> list[dict]:
    """The trial's quantized model with one weight encoding, at each early-exit threshold (``[None]``: a
    single-exit model): built and run on the host (accuracy from the C), then measured on the board. An
    encoding that makes the same C as one measured before (``auto`` choosing the same encoding for every
    layer) is not measured twice: it is recorded as ``same_as`` that one."""
    from .. import api
    from ..targets.host import count_instructions

    try:
        record = api.generate(graph, work / "host", "host", weights=weights)
        layers = {layer["name"]: layer["encoding"] for layer in record["layers"] if "encoding" in layer}
        same = next((v for v in done if v.get("layer_encodings") == layers), None)
        if same is not None:
            return [{"weights": weights, "same_as": same["weights"], "layer_encodings": layers}]
        built = api.build(work / "host")
        measured = [_c_accuracy(work / "host", graph, split, t) for t in thresholds]
        accuracy = [acc for acc, _ in measured]
        if board.kind == "host":
            raw = _raw_inputs(api.load_project(work / "host"), x)
            costs = [{"instructions": count_instructions(work / "host", raw, args=_threshold_arg(graph, t)),
                      "flash": built["sizes"]["flash"], "ram": built["sizes"]["ram"],
                      "unit": "host instructions (callgrind)"} for t in thresholds]
        else:
            costs = _measure_emulated(board, graph, weights, work / board.name, x[:profile_samples], thresholds,
                                      [index for _, index in measured])
        return [{"weights": weights, **({} if t is None else {"exit_threshold": t}), "status": "ok", "reason": "",
                 "accuracy": float(acc), "instructions": float(cost["instructions"]), "flash": int(cost["flash"]),
                 "ram": int(cost["ram"]), "weight_bytes": int(record["weight_bytes"]),
                 "arena_bytes": int(record["arena_bytes"]), "unit": cost["unit"], "layer_encodings": layers}
                for t, acc, cost in zip(thresholds, accuracy, costs)]
    except Exception as exc:  # this encoding failed (e.g. too big for the board); the others may not
        return [{"weights": weights, "status": "failed", "reason": _reason(exc), **WORST, "weight_bytes": 0,
                 "arena_bytes": 0, "unit": ""}]


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

    from .. import api
    from ..compress import exits, fxgraph
    from ..compress.recipe import run_recipe
    from .space import recipe_toml, to_recipe

    torch.set_num_threads(1)  # one core per trial: the workers share the machine
    start = time.perf_counter()
    try:
        encodings = list(dict.fromkeys(space["space"]["weights"]))
        recipe = to_recipe(config, space, weights=encodings[0])
        model, _ = exits.load_model(model_path)
        after = None
        if getattr(model, "edgekit_exits", None):  # compress the network, then train heads that fit it
            calibrated = bool(getattr(model, "edgekit_exit_temperatures", None))
            model, after = exits.backbone(model)
        calib = recipe["output"]["calib_samples"]
        thresholds = list(dict.fromkeys(space["space"]["exit_threshold"])) if after else [None]
        # With early exits the cost differs per input: the host counts the whole held-out split (an emulated
        # board: per exit, weighted by the held-out split's exits, _measure_emulated).
        x = split.x_test if after else split.x_test[:profile_samples]
        variants: list[dict] = []
        with tempfile.TemporaryDirectory(prefix="edgekit-trial-") as tmp:
            compressed, report = run_recipe(model, recipe, split, sample_shape=sample_shape, deploy=False,
                                            show_progress=False, log=lambda *a, **k: None)
            if after:
                compressed = exits.add_exits(compressed, after, split, epochs=space["train"]["exit_epochs"],
                                             sample_shape=sample_shape, show_progress=False)
                if calibrated:
                    exits.calibrate(compressed, split)
            graph = api.quantize(compressed.eval(), split.x_train[:calib])
            for weights in encodings:
                variants += _variants(graph, split, board, weights, thresholds, Path(tmp) / weights, x,
                                      profile_samples, [v for v in variants if v.get("status") == "ok"])
        ok = [v for v in variants if v.get("status") == "ok"]
        status = "ok" if ok else "failed"
        reason = "" if ok else "; ".join(dict.fromkeys(v["reason"] for v in variants if v.get("reason")))
        if ok:
            artifacts.mkdir(parents=True, exist_ok=True)
            if after:
                exits.save_model(compressed, sample_shape, artifacts / "model.pt2")
            else:
                fxgraph.export_model(compressed, sample_shape, artifacts / "model.pt2")
            for name in dict.fromkeys(v["weights"] for v in ok):
                (artifacts / f"recipe-{name}.toml").write_text(recipe_toml(to_recipe(config, space, weights=name)))
        for v in variants:
            v.pop("layer_encodings", None)
        return {"status": status, "reason": reason, **summarize(variants), "variants": json.dumps(variants),
                "macs": int(report["steps"][-1]["macs"]), "seconds": round(time.perf_counter() - start, 2)}
    except Exception as exc:  # recorded, never raised: one bad trial must not stop the search
        return {"status": "failed", "reason": _reason(exc), **WORST, "variants": "[]", "macs": 0,
                "seconds": round(time.perf_counter() - start, 2)}
