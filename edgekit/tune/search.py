"""The search of `edgekit tune`, run by Ray Tune with Optuna's multi-objective TPE sampler.

Why these: Ray Tune schedules trials on the cores of this machine or, given ``address``, on a Ray
cluster, with nothing else changed; it keeps the experiment on disk, so an interrupted search resumes
where it stopped. Optuna's TPE sampler handles several objectives at once (accuracy, instructions,
flash, RAM: MOTPE), learns from a few dozen trials (NSGA-II's first generation alone would take 50),
and is seeded (``sampler.py``: a configuration it asks for again is answered from the measurements, not
re-run). Trials are handed out in batches of ``workers`` and the sampler sees a batch only when
all of it is done, so the same seed on the same machine asks for the same trials in the same order,
whichever trial of a batch finishes first.

Each trial is one CPU (single-threaded torch, one compiler, one emulator on its own port).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from ..errors import EdgekitError
from . import pareto
from .trial import OBJECTIVES, WORST, check_board, run_trial

EXPERIMENT = "search"


def require_ray():
    try:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic reporter: silent at verbose=0
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # no TensorBoard / CSV loggers
        import optuna  # noqa: F401
        import ray
        from ray import tune  # noqa: F401
    except ImportError:
        raise EdgekitError("edgekit tune runs on Ray Tune and Optuna, which are not installed: "
                           "pip install 'edgekit[tune]'") from None
    return ray


def _trainable(config, *, model_bytes: bytes, sample_shape, split, board, space, profile_samples):
    """A Ray trial: the model arrives as bytes (a cluster node may not have the driver's files); a
    successful trial's model and recipe go back as its checkpoint, into the experiment's storage."""
    from ray import tune

    with tempfile.TemporaryDirectory(prefix="edgekit-tune-") as tmp:
        model_path = Path(tmp) / "input.pt2"
        model_path.write_bytes(model_bytes)
        artifacts = Path(tmp) / "artifacts"
        metrics = run_trial(config, model_path=model_path, sample_shape=sample_shape, split=split, board=board,
                            space=space, profile_samples=profile_samples, artifacts=artifacts)
        checkpoint = tune.Checkpoint.from_directory(str(artifacts)) if metrics["status"] == "ok" else None
        tune.report(metrics, checkpoint=checkpoint)


class _Progress:
    """One line per finished trial: done / running / failed, and the best trial within the constraints so far."""

    def __init__(self, total: int, constraints: dict, baseline: float, prefer: str, unit: str, quiet: bool):
        from ray import tune

        class Callback(tune.Callback):
            def on_trial_complete(cb, iteration, trials, trial, **info):
                self.report(trials, trial)

            def on_trial_error(cb, iteration, trials, trial, **info):
                self.report(trials, trial)

        self.callback = Callback()
        self.total, self.constraints, self.baseline, self.prefer, self.unit = total, constraints, baseline, prefer, unit
        self.quiet = quiet
        self.start = time.monotonic()

    def report(self, trials, trial) -> None:
        if self.quiet:
            return
        # Called as the trial ends, before Ray marks it so.
        ended = [t for t in trials if t.status in ("TERMINATED", "ERROR") or t is trial]
        rows = [row for t in ended
                for row in _rows(_tag_number(t), t.config, t.last_result, t.error_file if t.status == "ERROR" else None)]
        rows.sort(key=lambda r: r["number"])
        done = len(ended)
        running = sum(t.status == "RUNNING" and t is not trial for t in trials)
        failed = sum(all(r["status"] != "ok" for r in rows if r["number"] == n) for n in {r["number"] for r in rows})
        b = pareto.best(rows, self.constraints, self.baseline, self.prefer)
        best = (f"best so far: trial {b['number']}, {b['accuracy'] * 100:.2f} %, flash {b['flash']:,} B, "
                f"{b['instructions']:,.0f} {self.unit}") if b else "no trial within the constraints yet"
        mine = [r for r in rows if r["number"] == _tag_number(trial)]
        this = max(mine, key=lambda r: (r["status"] == "ok", -r["flash"]), default=None)
        last = ""
        if this is not None:
            last = (f"trial {this['number']} failed: {this['reason'].splitlines()[0][:120]}" if this["status"] != "ok"
                    else f"trial {this['number']}: {this['accuracy'] * 100:.2f} %, flash {this['flash']:,} B")
        print(f"[tune {time.monotonic() - self.start:6.0f} s] {done}/{self.total} done, {running} running, "
              f"{failed} failed | {last} | {best}", flush=True)


def _rows(number: int, config: dict, metrics: dict | None, error=None) -> list[dict]:
    """A finished trial as rows of the front: one per weight encoding (and early-exit threshold) measured,
    named in its config, or one failed row."""
    metrics = metrics or {}
    base = {"number": number, "config": dict(config), "macs": metrics.get("macs", 0),
            "seconds": metrics.get("seconds", 0.0)}
    if error is not None or "status" not in metrics:
        reason = "the trial crashed"
        if error is not None:
            try:
                text = Path(error).read_text() if isinstance(error, (str, Path)) and Path(error).exists() else str(error)
            except OSError:
                text = str(error)
            reason = f"the trial crashed: {text.strip().splitlines()[-1] if text.strip() else error}"
        return [{**base, "status": "failed", "reason": reason, **WORST, "weight_bytes": 0, "arena_bytes": 0,
                 "unit": ""}]
    variants = [v for v in json.loads(metrics.get("variants") or "[]") if "same_as" not in v]
    if metrics["status"] != "ok" or not variants:
        return [{**base, "status": "failed", "reason": metrics.get("reason", ""), **WORST, "weight_bytes": 0,
                 "arena_bytes": 0, "unit": ""}]
    return [{**base, **{k: v[k] for k in ("status", "reason", *OBJECTIVES, "weight_bytes", "arena_bytes", "unit")},
             "config": {**config, "weights": v["weights"],
                        **({"exit_threshold": v["exit_threshold"]} if "exit_threshold" in v else {})}}
            for v in variants]


def _baseline(model, split) -> tuple[float, int]:
    """The input network's float accuracy and float32 weight bytes (a multi-exit model: its backbone, the
    full network without the exits)."""
    from .. import train
    from ..compress.report import float_graph

    accuracy = train.accuracy(train.predict(model, split.x_test), split.y_test)
    return float(accuracy), int(float_graph(model, split.x_train[:1]).weight_bytes())


def run_search(model_path, *, data="digits", board="host", out_dir="tune", trials: int = 48,
               workers: int | None = None, address: str | None = None, seed: int = 0, space=None,
               max_flash: int | None = None, max_ram: int | None = None, max_drop: float | None = None,
               max_instructions: float | None = None, prefer: str = "flash", resume: bool = False,
               profile_samples: int = 8, quiet: bool = False, batched: bool = True, log=print) -> dict:
    """Search compression choices for ``model_path`` (a .pt2) and write the results into ``out_dir``.

    ``max_drop`` is in percentage points of held-out accuracy against the input model (float);
    ``max_flash`` / ``max_ram`` in bytes of the built program. Returns the summary (also
    ``out_dir/summary.json``): every trial, the Pareto front, the best trial within the constraints."""
    from ..boards import resolve_board
    from ..compress import exits
    from ..compress.data import prepare
    from .space import anchors, check_layers, is_convolutional, load_space, parameters

    ray = require_ray()
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from .sampler import FreshOptunaSearch
    import optuna

    if prefer not in pareto.PREFER:
        raise EdgekitError(f"--prefer must be one of {', '.join(pareto.PREFER)}, got {prefer!r}")
    if trials < 1:
        raise EdgekitError("--trials must be at least 1")
    board = resolve_board(board)
    check_board(board)
    model_path = Path(model_path)
    model, sample_shape = exits.load_model(model_path)
    exit_after = None
    if getattr(model, "edgekit_exits", None):  # trials compress the network without its exits (trial.py)
        model, exit_after = exits.backbone(model)
    checked = load_space(space, convolutional=is_convolutional(model))
    split = prepare(data, model, sample_shape)
    if checked["prune_layers"]:
        from ..compress.prune import prunable_layers
        check_layers(checked, [layer["name"] for layer in prunable_layers(model, input_shape=sample_shape)])
    baseline, float_bytes = _baseline(model, split)
    constraints = {"max_drop": max_drop, "max_flash": max_flash, "max_ram": max_ram,
                   "max_instructions": max_instructions}
    out = Path(out_dir).absolute()
    storage = out / "ray"
    experiment = storage / EXPERIMENT
    if experiment.exists() and not resume:
        raise EdgekitError(f"{out} already holds a search: add --resume to continue it, or give another -o")
    if resume and not experiment.exists():
        raise EdgekitError(f"--resume: {out} holds no search to resume")
    out.mkdir(parents=True, exist_ok=True)

    started = False
    if address:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR",
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
        started = True
    elif not ray.is_initialized():  # "local": this machine, even when RAY_ADDRESS names a cluster
        ray.init(address="local", num_cpus=workers or os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR", runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
        started = True
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        workers = max(1, min(workers or cpus, cpus, trials))
        unit = "host instructions" if board.kind == "host" else "emulated instructions"
        trainable = tune.with_resources(
            tune.with_parameters(_trainable, model_bytes=model_path.read_bytes(), sample_shape=sample_shape,
                                 split=split, board=board, space=checked, profile_samples=profile_samples),
            {"cpu": 1})
        progress = _Progress(trials, constraints, baseline, prefer, unit, quiet)
        run_config = tune.RunConfig(storage_path=str(storage), name=EXPERIMENT, verbose=0,
                                    callbacks=[progress.callback], log_to_file=True)
        if resume:
            if not tune.Tuner.can_restore(str(experiment)):
                raise EdgekitError(f"--resume: the search in {experiment} cannot be restored (incomplete state)")
            log(f"resuming the search in {experiment}")
            tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True,
                                       resume_errored=True)
        else:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True)
            searcher = FreshOptunaSearch(metric=list(OBJECTIVES), mode=list(OBJECTIVES.values()), sampler=sampler,
                                         points_to_evaluate=anchors(checked)[:trials] or None)
            searcher = ConcurrencyLimiter(searcher, max_concurrent=workers, batch=batched)
            param_space = {k: tune.choice(v) for k, v in parameters(checked).items()}
            tuner = tune.Tuner(trainable, param_space=param_space, run_config=run_config,
                               tune_config=tune.TuneConfig(search_alg=searcher, num_samples=trials,
                                                           max_concurrent_trials=workers, reuse_actors=True))
            log(f"searching {trials} trials on {board.name}, {workers} at a time "
                f"({'Ray cluster ' + address if address else 'this machine'}); results in {out}")
        start = time.monotonic()
        grid = tuner.fit()
        seconds = time.monotonic() - start
        rows, checkpoints = [], {}
        for result in (grid[i] for i in range(len(grid))):
            metrics = result.metrics or {}
            if "status" not in metrics and result.error is None:
                continue  # not finished: the search was interrupted (a resume runs it again)
            number = _trial_number(result.path)
            rows += _rows(number, result.config, metrics, result.error)
            if result.checkpoint is not None:
                checkpoints[number] = result.checkpoint
        rows.sort(key=lambda r: r["number"])
    finally:
        if started:
            ray.shutdown()
    summary = {"model": str(model_path), "board": board.name, "data": split.name, "trials": rows,
               "requested_trials": trials, "workers": workers, "address": address, "seed": seed,
               "seconds": round(seconds, 1), "batched": batched, "baseline_accuracy": baseline, "float_weight_bytes": float_bytes,
               "constraints": constraints, "prefer": prefer, "unit": unit,
               "sampler": f"Optuna multi-objective TPE (seed {seed}) through Ray Tune",
               "space": parameters(checked), "encodings": checked["space"]["weights"], "train": checked["train"],
               "exits_after": exit_after,
               "exit_thresholds": checked["space"]["exit_threshold"] if exit_after else None}
    summary["front"] = pareto.front(rows)
    summary["best"] = pareto.best(rows, constraints, baseline, prefer)
    summary["interrupted"] = len({r["number"] for r in rows}) < trials
    if summary["best"] is not None and not summary["interrupted"]:
        ckpt = checkpoints.get(summary["best"]["number"])
        if ckpt is not None:
            with ckpt.as_directory() as d:
                (out / "best.pt2").write_bytes((Path(d) / "model.pt2").read_bytes())
                (out / "best.toml").write_text(
                    f"# edgekit tune: trial {summary['best']['number']} of {out}, "
                    f"the best within the constraints ({pareto.describe(summary['best']['config'])})\n"
                    + (f"# the model has early exits: this recipe compressed it without them, then heads were trained "
                       f"after {', '.join(exit_after)} ({checked['train']['exit_epochs']} epochs, edgekit exits); "
                       f"best.pt2 has them\n" if exit_after else "")
                    + (Path(d) / f"recipe-{summary['best']['config']['weights']}.toml").read_text())
    pareto.write_outputs(summary, out)
    return summary


def _tag_number(trial) -> int:
    head = str(getattr(trial, "experiment_tag", "")).split("_", 1)[0]
    return int(head) if head.isdigit() else 0


def _trial_number(path) -> int:
    """The order in which the searcher asked for the trial: Ray names a trial's directory
    <trainable>_<id>_<number>_<choices>_<time>."""
    import re

    found = re.search(r"_[0-9a-f]{5,}_(\d+)_", Path(str(path or "")).name)
    return int(found.group(1)) if found else 0
