"""`edgekit tune`: the search space and its TOML, the Pareto front and the constraint message, and short
real searches (a tiny MLP, a training budget of one epoch, 2-3 trials): on a local Ray "cluster" of two
one-CPU nodes through --address, on this machine (a subprocess, interrupted by SIGINT and resumed), and
with a board the model cannot fit (every trial recorded as failed, the search goes on)."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgekit import cli
from edgekit.compress.recipe import load_recipe
from edgekit.errors import EdgekitError
from edgekit.tune import pareto
from edgekit.tune.space import (CONV_DEFAULTS, DEFAULT_SPACE, anchors, is_convolutional, load_space, parameters,
                                recipe_toml, to_recipe)

ROOT = Path(__file__).resolve().parent.parent

# The smallest budget that still runs every step: one pruning step, one epoch of fine-tuning each.
SMALL_SPACE = """
[space]
prune_ratio = [0.0, 0.5]
prune_scope = ["layer"]
sparsity = [0.0, 0.8]
cluster_bits = [0, 4]
distill = [false]
qat = [false]
weights = ["dense", "auto"]

[train]
prune_steps = 1
prune_epochs = 1
sparsify_steps = 1
sparsify_epochs = 1
cluster_epochs = 1
calib_samples = 64
"""


# ----------------------------------------------------------------------------------------------------
# The space and the front (no Ray)
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,message", [
    ("[space]\nprune_ratio = [0.5, 1.5]", r"\[space\] prune_ratio: each value must be a fraction in \[0, 1\), got 1.5"),
    ("[space]\ncluster_bit = [4]", r"\[space\] has unknown key 'cluster_bit'"),
    ("[space]\nsparsity = []", r"\[space\] sparsity must be a non-empty list"),
    ("[space]\ncluster_bits = [1]", r"each value must be an integer from 2 to 8, got 1"),
    ("[train]\nprune_epochs = -1", r"\[train\] prune_epochs must be an integer >= 0, got -1"),
    ("[spaces]\n", r"unknown section\(s\) spaces"),
])
def test_bad_spaces_are_refused_before_any_trial(text, message):
    with pytest.raises(EdgekitError, match=message):
        load_space(text + "\n")


def test_space_overrides_defaults_and_makes_recipes_compress_reads_back():
    space = load_space(SMALL_SPACE)
    assert space["space"]["prune_ratio"] == [0.0, 0.5]
    assert space["space"]["prune_criterion"] == DEFAULT_SPACE["prune_criterion"]  # not given: the default
    config = {"prune_ratio": 0.5, "prune_criterion": "apoz", "prune_scope": "layer", "sparsity": 0.8,
              "cluster_bits": 4, "distill": True, "qat": True, "weights": "auto", "prune_layer.0": 0.25}
    recipe = to_recipe(config, space)
    assert [s["kind"] for s in recipe["steps"]] == ["prune", "sparsify", "cluster", "qat"]
    # The encoding is measured on every trial, not drawn: not a searched parameter; a recipe per encoding.
    assert "weights" not in parameters(space) and space["space"]["weights"] == ["dense", "auto"]
    assert to_recipe(config, space, weights="codebook")["output"]["weights"] == "codebook"
    assert to_recipe({k: v for k, v in config.items() if k != "weights"}, space)["output"]["weights"] == "dense"
    assert recipe["steps"][0]["layers"] == {"0": 0.25} and recipe["steps"][0]["distill"] is True
    assert recipe["output"]["weights"] == "auto"
    assert load_recipe(recipe_toml(recipe, "a comment\non two lines")) == recipe
    plain = to_recipe({"prune_ratio": 0.0, "sparsity": 0.0, "cluster_bits": 0, "qat": False}, space)
    assert [s["kind"] for s in plain["steps"]] == ["finetune"] and plain["steps"][0]["epochs"] == 0


def test_default_space_holds_the_hand_recipes_choices():
    """A default search can land on bench/recipes/*.toml (and their neighbours)."""
    for name in ("cnn_structured.toml", "mlp_deep_compression.toml"):
        recipe = load_recipe(ROOT / "bench" / "recipes" / name)
        by_kind = {s["kind"]: s for s in recipe["steps"]}
        assert by_kind["prune"]["ratio"] in DEFAULT_SPACE["prune_ratio"]
        assert by_kind["prune"].get("criterion", "l1") in DEFAULT_SPACE["prune_criterion"]
        assert by_kind["sparsify"]["sparsity"] in DEFAULT_SPACE["sparsity"]
        assert by_kind["cluster"]["bits"] in DEFAULT_SPACE["cluster_bits"]
        assert recipe["output"]["weights"] in DEFAULT_SPACE["weights"]
    # ... and starts there: a default search's second trial is cnn_structured.toml step for step (the first
    # has the MLP recipe's choices with the default training budget).
    made = [to_recipe(a, load_space()) for a in anchors(load_space())]
    assert [s["kind"] for s in made[0]["steps"]] == ["prune", "sparsify", "cluster"]
    hand = load_recipe(ROOT / "bench" / "recipes" / "cnn_structured.toml")["steps"]
    def same_terms(steps):  # the recipe's defaults spelled out: prune's scope, the passes' own lr
        return [{"scope": "layer", **{k: v for k, v in s.items() if k != "lr"}} if s["kind"] == "prune" else
                {k: v for k, v in s.items() if k != "lr"} for s in steps]
    assert same_terms(made[1]["steps"]) == same_terms(hand)
    assert anchors(load_space(SMALL_SPACE)) == []  # a space without those values starts at random
    # A model with convolutions searches lower sparsities (CONV_DEFAULTS): it starts at cnn_structured.toml.
    conv = load_space(convolutional=True)
    assert conv["space"]["sparsity"] == CONV_DEFAULTS["sparsity"] and max(CONV_DEFAULTS["sparsity"]) < 0.8
    assert [same_terms(to_recipe(a, conv)["steps"]) for a in anchors(conv)] == [same_terms(hand)]
    assert load_space("[space]\nsparsity = [0.9]\n", convolutional=True)["space"]["sparsity"] == [0.9]
    from edgekit import models
    assert is_convolutional(models.DigitsCNN()) and not is_convolutional(models.digits_mlp())


def _row(n, acc, instr, flash, ram, weights=100):
    return {"number": n, "status": "ok", "reason": "", "config": {}, "accuracy": acc, "instructions": instr,
            "flash": flash, "ram": ram, "weight_bytes": weights}


def test_front_best_and_the_message_naming_the_violated_constraint():
    rows = [_row(1, 0.95, 1000, 9000, 500), _row(2, 0.97, 2000, 12000, 500), _row(3, 0.94, 1000, 9500, 500),
            {"number": 4, "status": "failed", "reason": "the model does not fit", "config": {}, "accuracy": 0.0,
             "instructions": 1e15, "flash": 1e15, "ram": 1e15, "weight_bytes": 0}]
    assert [r["number"] for r in pareto.front(rows)] == [1, 2]  # 3 is dominated by 1; 4 failed
    base = 0.97
    assert pareto.best(rows, {"max_drop": 1.0}, base)["number"] == 2  # only 2 loses <= 1 pp
    assert pareto.best(rows, {"max_drop": 3.0}, base)["number"] == 1  # the least flash within 3 pp
    assert pareto.best(rows, {"max_drop": 3.0}, base, prefer="accuracy")["number"] == 2
    message = pareto.no_fit_message(rows, {"max_flash": 8192, "max_drop": 5.0}, base)
    assert "no trial meets every constraint (4 trials, 1 failed)" in message
    assert "--max-flash 8,192 B: the smallest trial needs 9,000 B (trial 1), 808 B over" in message
    assert "max-drop" not in message  # met by every trial: not named
    both = pareto.no_fit_message(rows, {"max_flash": 10000, "max_drop": 1.0}, base)
    # trial 1 is 100 % over the drop, trial 2 20 % over the flash: the closest is trial 2
    assert "none meets all; the closest, trial 2, breaks --max-flash 10,000 B by 2,000 B" in both


def test_the_sampler_spends_no_trial_on_a_configuration_already_measured():
    """TPE asks again for categorical choices it has seen; the searcher answers those from what was measured
    (and asks again), so each trial it hands out is new until the space is used up; the same seed hands out
    the same sequence."""
    pytest.importorskip("ray")
    import optuna
    from ray import tune

    from edgekit.tune.sampler import FreshOptunaSearch

    def search():
        searcher = FreshOptunaSearch(space={"a": tune.choice([0, 1, 2]), "b": tune.choice([False, True])},
                                     metric=["accuracy", "flash"], mode=["max", "min"],
                                     sampler=optuna.samplers.TPESampler(seed=0, multivariate=True))
        handed = []
        for i in range(8):
            config = searcher.suggest(str(i))
            handed.append((config["a"], config["b"]))
            searcher.on_trial_complete(str(i), {"accuracy": 0.5 + 0.1 * config["a"], "flash": 100.0 + config["b"]})
        return handed, searcher.repeats_skipped

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    handed, skipped = search()
    assert len(set(handed[:6])) == 6  # the 6 configurations, none twice
    assert set(handed[6:]) <= set(handed[:6])  # then the space is used up: repeats run (after REASK asks each)
    assert skipped >= 2 * 25
    assert search() == (handed, skipped)  # seeded: the same sequence


# ----------------------------------------------------------------------------------------------------
# Real searches
# ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A digits MLP 64-32-16-10 as a .pt2, and the small space as TOML."""
    from edgekit import datasets, models, train
    from edgekit.compress import fxgraph

    d = datasets.digits(flat=True)
    train.seed_everything(0)
    model = train.train_classifier(models.digits_mlp((32, 16)), d.x_train, d.y_train, epochs=10,
                                   show_progress=False)
    root = tmp_path_factory.mktemp("tune")
    fxgraph.export_model(model, (64,), root / "mlp.pt2")
    (root / "space.toml").write_text(SMALL_SPACE)
    return root


@pytest.fixture(scope="module")
def cluster():
    """A Ray "cluster" of two one-CPU nodes on this machine, for --address; its processes ended by
    the Cluster object that started them."""
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1)
    yield c
    c.shutdown()


def _csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_tune_on_a_cluster_writes_the_front_and_a_best_model_compress_reruns(tiny, cluster, tmp_path, capsys):
    out = tmp_path / "tune"
    code = cli.main(["tune", str(tiny / "mlp.pt2"), "--space", str(tiny / "space.toml"), "--trials", "2",
                     "--address", cluster.address, "-o", str(out), "--max-drop", "60", "--max-flash", "1MB"])
    text = capsys.readouterr().out
    assert code == 0, text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["address"] == cluster.address and summary["workers"] == 2
    rows = summary["trials"]
    assert sorted({r["number"] for r in rows}) == [1, 2]
    assert all(r["status"] == "ok" for r in rows)
    for r in rows:  # measured for real: a host program's instructions, its sections, the C's accuracy
        assert r["instructions"] > 100 and r["flash"] > r["weight_bytes"] > 0 and 0.1 < r["accuracy"] <= 1.0
    # One training per trial, a row per encoding that makes different C (auto may choose dense for every
    # layer: then it is not measured twice): the same accuracy (lossless), each its own bytes and count.
    for n in (1, 2):
        mine = {r["config"]["weights"]: r for r in rows if r["number"] == n}
        assert "dense" in mine and set(mine) <= {"dense", "auto"}
        assert len({r["accuracy"] for r in mine.values()}) == 1
        if "auto" in mine:
            assert mine["auto"]["weight_bytes"] < mine["dense"]["weight_bytes"]
    assert any(len([r for r in rows if r["number"] == n]) == 2 for n in (1, 2))  # a clustered trial: auto differs
    front = _csv(out / "pareto.csv")
    assert {(int(r["trial"]), json.loads(r["config"])["weights"]) for r in front} == \
        {(r["number"], r["config"]["weights"]) for r in summary["front"]}
    assert len(_csv(out / "trials.csv")) == len(rows)
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "Pareto front" in (out / "report.html").read_text()
    best = summary["best"]
    assert "Pareto front" in text and f"best within the constraints: trial {best['number']}" in text
    # best.toml is a recipe `edgekit compress` runs again: the same model, the same accuracy from the C.
    report = tmp_path / "again.json"
    assert cli.main(["compress", str(tiny / "mlp.pt2"), "--recipe", str(out / "best.toml"), "-o",
                     str(tmp_path / "again.pt2"), "--report", str(report), "--quiet"]) == 0
    again = json.loads(report.read_text())["final"]
    assert again["accuracy_c"] == pytest.approx(best["accuracy"])
    assert again["weight_bytes"] == best["weight_bytes"] and again["weights"] == best["config"]["weights"]
    from edgekit.compress import fxgraph
    assert fxgraph.load_model(out / "best.pt2")[1] == (64,)
    # The same output directory again without --resume is refused, not overwritten.
    assert cli.main(["tune", str(tiny / "mlp.pt2"), "--trials", "2", "--address", cluster.address,
                     "-o", str(out)]) == 1
    assert "already holds a search: add --resume" in capsys.readouterr().err


def test_a_board_the_model_does_not_fit_records_failed_trials(tiny, cluster, tmp_path, capsys):
    """A board file of the user's own with 4 KiB of flash: every trial fails (recorded with the reason),
    the search runs all of them, and the message says why nothing fits."""
    board = (ROOT / "edgekit" / "boards" / "mps2-an386.toml").read_text()
    board = board.replace('name = "mps2-an386"', 'name = "tiny-an386"').replace(
        "flash_size = 0x00300000", "flash_size = 0x00001000")
    (tmp_path / "tiny-an386.toml").write_text(board)
    out = tmp_path / "tune"
    code = cli.main(["tune", str(tiny / "mlp.pt2"), "--space", str(tiny / "space.toml"), "--trials", "2",
                     "--address", cluster.address, "--board", str(tmp_path / "tiny-an386.toml"), "-o", str(out),
                     "--unbatched"])
    captured = capsys.readouterr()
    assert code == 1
    rows = _csv(out / "trials.csv")
    assert len(rows) == 2 and all(r["status"] == "failed" for r in rows)
    assert all("does not fit tiny-an386" in r["reason"] and "flash: needs" in r["reason"] for r in rows)
    assert "2 failed" in captured.out and "trial 1 failed: the model does not fit" in captured.out
    assert "no trial meets every constraint (2 trials, 2 failed): every trial failed: the model does not fit" \
        in captured.err
    assert not (out / "best.pt2").exists()
    assert json.loads((out / "summary.json").read_text())["batched"] is False


def test_a_model_with_early_exits_gets_a_row_per_threshold_measured_from_the_c(tiny, cluster, tmp_path):
    """A multi-exit model: compressed without its exits, heads trained for the compressed network, and every
    threshold of the space run on the same program: accuracy from the C's answering exits, instructions the
    mean over the held-out split (callgrind follows each input's exit)."""
    from edgekit import api, datasets, train
    from edgekit.compress import exits, fxgraph
    from edgekit.tune.search import run_search

    model, _ = fxgraph.load_model(tiny / "mlp.pt2")
    multi = exits.add_exits(model, ["0"], "digits", epochs=3, show_progress=False, sample_shape=(64,))
    exits.save_model(multi, (64,), tmp_path / "multi.pt2")
    space = SMALL_SPACE.replace('weights = ["dense", "auto"]', 'weights = ["dense"]\nexit_threshold = [0.3, "off"]')
    space = space.replace("prune_ratio = [0.0, 0.5]", "prune_ratio = [0.5]").replace("sparsity = [0.0, 0.8]", "sparsity = [0.0]")
    space = space.replace("cluster_bits = [0, 4]", "cluster_bits = [0]").replace("[train]", "[train]\nexit_epochs = 6")
    (tmp_path / "space.toml").write_text(space)
    summary = run_search(tmp_path / "multi.pt2", out_dir=tmp_path / "tune", trials=1, space=tmp_path / "space.toml",
                         address=cluster.address, quiet=True)
    assert summary["exits_after"] == ["0"] and summary["exit_thresholds"] == [0.3, "off"]
    rows = {r["config"]["exit_threshold"]: r for r in summary["trials"]}
    assert set(rows) == {0.3, "off"} and all(r["status"] == "ok" for r in rows.values())
    # The trial's model (best.pt2, with its new heads) run here as C at each threshold: the same accuracy.
    trained, _ = exits.load_model(tmp_path / "tune" / "best.pt2")
    assert trained.edgekit_exits == ["0", "final"]
    d = datasets.digits(flat=True)
    graph = api.quantize(trained, d.x_train[:64])
    api.generate(graph, tmp_path / "c", "host")
    api.build(tmp_path / "c")
    hit = {}
    for t, row in rows.items():
        outs, index = api.run(tmp_path / "c", d.x_test, exit_threshold=t, with_exit=True)
        answers = np.stack(outs)[index, np.arange(len(index))]
        assert train.accuracy(answers, d.y_test) == pytest.approx(row["accuracy"])
        hit[t] = float(np.mean(index == 0))
    assert hit["off"] == 0 and 0 < hit[0.3] < 1  # the threshold changes which exit answers
    assert rows[0.3]["instructions"] != rows["off"]["instructions"]  # ... and the mean count
    assert "early exits" in (tmp_path / "tune" / "best.toml").read_text()


def _tune_cmd(tiny: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "edgekit.cli", "tune", str(tiny / "mlp.pt2"), "--space", str(tiny / "space.toml"),
            "--trials", "2", "--workers", "1", "-o", str(out), *extra]


def test_local_search_resumes_after_an_interruption(tiny, cluster, tmp_path, capsys):
    """On this machine (no --address): Ctrl-C after the first trial stops the search with its state saved;
    --resume runs the rest (here on the cluster: a search continues wherever Ray runs) and keeps the
    finished trial as it was."""
    out = tmp_path / "tune"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "first.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(_tune_cmd(tiny, out), stdout=f, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 240
        while "1/2 done" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert "1/2 done" in log.read_text(), log.read_text()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    first = log.read_text()
    if code == 0:  # the remaining trial finished before the signal arrived: nothing to resume
        pytest.skip("the search ended before it could be interrupted")
    assert code == 130, first
    assert "this machine" in first and "continue it with the same command and --resume" in first
    done_first = json.loads((out / "summary.json").read_text())["trials"]
    assert {r["number"] for r in done_first} == {1}
    trial_dirs = {p.name: p for p in (out / "ray" / "search").iterdir() if p.is_dir()}
    one = next(p for name, p in trial_dirs.items() if "_1_" in name)
    saved = [p for p in one.glob("checkpoint_*/model.pt2")]
    assert len(saved) == 1
    stamp = saved[0].stat().st_mtime_ns
    assert cli.main(_tune_cmd(tiny, out, "--resume", "--address", cluster.address)[3:]) == 0
    assert "resuming the search" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert sorted({r["number"] for r in summary["trials"]}) == [1, 2]
    # The finished trial did not run again: its saved model untouched, its own timing kept.
    assert [p.stat().st_mtime_ns for p in one.glob("checkpoint_*/model.pt2")] == [stamp]
    assert [r for r in summary["trials"] if r["number"] == 1] == done_first
