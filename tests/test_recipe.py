"""Recipes, reports and `edgekit compress`: the steps chained, measured, and the final model run as C."""
import hashlib
import json

import numpy as np
import pytest
import torch
from torch import nn

import edgekit
from edgekit import cli, datasets, train
from edgekit.compress import fxgraph
from edgekit.compress.recipe import load_recipe
from edgekit.errors import EdgekitError


@pytest.mark.parametrize("text,message", [
    ('[[step]]\nkind = "prunee"\nratio = 0.5', "step 1 has unknown kind 'prunee'; known kinds: prune, sparsify"),
    ('[[step]]\nkind = "prune"\nratio = 1.5', "step 1 \\(prune\\): ratio must be a fraction in \\[0, 1\\), got 1.5"),
    ('[[step]]\nkind = "prune"\nratio = 0.5\n[[step]]\nkind = "sparsify"\nsparsity = 0.9\nratoi = 1',
     "step 2 \\(sparsify\\) has unknown option 'ratoi'"),
    ('[[step]]\nkind = "prune"', "step 1 \\(prune\\) needs ratio"),
    ('[[step]]\nkind = "cluster"\nbits = 12', "bits must be an integer from 2 to 8, got 12"),
    ('[[step]]\nkind = "factorize"\nrank = 4\nenergy = 0.9', "needs exactly one of rank or energy"),
    ('[[step]]\nkind = "qat"\nepochs = 0', "epochs must be an integer >= 1, got 0"),
    ('[[step]]\nkind = "distill"\n[output]\nweights = "zip"', "\\[output\\] weights must be one of 'dense'"),
    ('[steps]\nkind = "prune"', "unknown section\\(s\\) steps"),
    ('[[step]]\nkind = prune', "not valid TOML"),
    ('', "has no steps"),
])
def test_bad_recipes_are_refused_before_any_work(text, message):
    with pytest.raises(EdgekitError, match=message):
        load_recipe(text + "\n")


def test_recipe_report_per_step(trained_mlp, digits_flat):
    recipe = {"step": [
        {"kind": "prune", "ratio": 0.5, "epochs": 2},
        {"kind": "sensitivity", "ratios": [0.5]},
        {"kind": "sparsify", "sparsity": 0.8, "scope": "global", "epochs": 2},
        {"kind": "distill", "epochs": 2},
    ]}
    before = {k: v.clone() for k, v in trained_mlp.state_dict().items()}
    small, rep = edgekit.run_recipe(trained_mlp, recipe, digits_flat, show_progress=False, log=lambda *_: None)
    assert all(torch.equal(before[k], v) for k, v in trained_mlp.state_dict().items())
    steps = rep["steps"]
    assert [s["kind"] for s in steps] == ["input", "prune", "sensitivity", "sparsify", "distill"]
    first, pruned, scan, sparse, final_step = steps
    assert pruned["parameters"] < first["parameters"] / 2 and pruned["macs"] < first["macs"] / 2
    assert sparse["nonzero_weights"] == pytest.approx(0.2 * pruned["nonzero_weights"], rel=0.01)
    assert [r["layer"] for r in scan["sensitivity"]["layers"]] == ["1", "3"]
    for s in (first, pruned, sparse, final_step):
        assert s["weight_bytes"]["float32"] > s["weight_bytes"]["int8"]["dense"] > 0
        assert 0.0 < s["accuracy"] <= 1.0 and 0.0 < s["int8_accuracy"] <= 1.0
    # the distilled model keeps the sparsity of the step before it
    assert final_step["nonzero_weights"] == sparse["nonzero_weights"]
    final = rep["final"]
    assert final["c_equals_reference"]
    assert final["accuracy_c"] == pytest.approx(final_step["int8_accuracy"])
    assert final["accuracy_c"] > 0.9
    assert final["weight_bytes"] == final_step["weight_bytes"]["int8"]["dense"]
    assert fxgraph.count_parameters(small) == final_step["parameters"]


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_compress_cli_end_to_end(trained_cnn, tmp_path, capsys):
    model_path = tmp_path / "model.pt2"
    fxgraph.export_model(trained_cnn, (1, 8, 8), model_path)
    digest = _sha(model_path)
    (tmp_path / "recipe.toml").write_text(
        '[[step]]\nkind = "prune"\nratio = 0.5\ncriterion = "apoz"\nsteps = 2\nepochs = 3\n\n'
        '[[step]]\nkind = "qat"\nepochs = 2\ndistill = true\n')
    out, rep = tmp_path / "small.pt2", tmp_path / "report.json"
    code = cli.main(["compress", str(model_path), "--recipe", str(tmp_path / "recipe.toml"), "--data", "digits",
                     "-o", str(out), "--report", str(rep), "--quiet", "--build-dir", str(tmp_path / "c")])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert _sha(model_path) == digest, "the input model file changed"
    report = json.loads(rep.read_text())
    assert [s["kind"] for s in report["steps"]] == ["input", "prune", "qat"]
    assert report["steps"][1]["macs"] < report["steps"][0]["macs"] / 2
    assert report["final"]["c_equals_reference"] and report["final"]["accuracy_c"] > 0.9
    assert "final C program" in printed and "equal to the reference executor" in printed
    # the compressed .pt2 goes through `edgekit generate` like any model, with the QAT parameters
    calib = tmp_path / "calib.npy"
    np.save(calib, datasets.digits().x_train[:32])
    assert cli.main(["generate", str(out), "--calib", str(calib), "-o", str(tmp_path / "gen")]) == 0
    graph = edgekit.quantize(out, datasets.digits().x_train[:32])
    assert graph.meta["activation_params"]
    data = datasets.digits()
    assert train.accuracy(edgekit.reference_run(graph, data.x_test), data.y_test) == \
        pytest.approx(report["final"]["accuracy_c"])


class _Normed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.norm(self.conv(x)).mean((2, 3)))


def _compress(tmp_path, model_path, recipe, data="digits"):
    (tmp_path / "r.toml").write_text(recipe)
    out = tmp_path / "out.pt2"
    code = cli.main(["compress", str(model_path), "--recipe", str(tmp_path / "r.toml"), "--data", data,
                     "-o", str(out), "--quiet"])
    return code, out


def test_compress_cli_bad_input(trained_cnn, tmp_path, capsys):
    model_path = tmp_path / "model.pt2"
    fxgraph.export_model(trained_cnn, (1, 8, 8), model_path)
    digest = _sha(model_path)
    prune = '[[step]]\nkind = "prune"\nratio = 0.5\n'

    code, out = _compress(tmp_path, model_path, '[[step]]\nkind = "shrink"\n')
    assert code == 1 and "unknown kind 'shrink'" in capsys.readouterr().err and not out.exists()

    code, out = _compress(tmp_path, model_path, '[[step]]\nkind = "prune"\nratio = 1.0\n')
    assert code == 1 and "ratio must be a fraction in [0, 1), got 1.0" in capsys.readouterr().err

    bad = tmp_path / "bad.npz"
    rng = np.random.default_rng(0)
    np.savez(bad, x_train=rng.random((20, 10), dtype=np.float32), y_train=np.zeros(20, np.int64),
             x_test=rng.random((5, 10), dtype=np.float32), y_test=np.zeros(5, np.int64))
    code, out = _compress(tmp_path, model_path, prune, data=str(bad))
    err = capsys.readouterr().err
    assert code == 1 and "samples have shape [10], but the model takes samples of shape [1, 8, 8]" in err

    normed = tmp_path / "normed.pt2"
    fxgraph.export_model(_Normed().eval(), (1, 8, 8), normed)
    code, out = _compress(tmp_path, normed, prune)
    err = capsys.readouterr().err
    assert code == 1 and "structured pruning cannot analyse" in err and "group_norm" in err, err
    assert not out.exists()

    code, _ = cli.main(["compress", str(model_path), "--recipe", str(tmp_path / "r.toml"), "-o",
                        str(model_path)]), None
    assert code == 1 and "is the input model" in capsys.readouterr().err
    assert _sha(model_path) == digest


def test_data_layouts(trained_mlp, trained_cnn):
    from edgekit.compress.data import prepare
    digits = datasets.digits()
    assert prepare("digits", trained_mlp).x_train.shape[1:] == (1, 8, 8)  # its Flatten takes images
    assert prepare(digits, nn.Linear(64, 10)).x_train.shape[1:] == (64,)  # a flat model gets flat digits
    assert prepare(digits, trained_cnn).x_train.shape[1:] == (1, 8, 8)
    with pytest.raises(EdgekitError, match="does not run on the data's samples of shape \\[3\\]"):
        prepare((np.zeros((4, 3), np.float32), np.zeros(4, np.int64)), trained_cnn)


def test_sparsify_cluster_then_qat_keeps_codebooks(trained_mlp, digits_flat):
    """QAT after clustering trains with the clustered layers' single weight scale and keeps every
    layer's shared values and zeros, so the codebook and Huffman encodings still apply."""
    recipe = {"step": [{"kind": "sparsify", "sparsity": 0.8, "scope": "global", "epochs": 1},
                       {"kind": "cluster", "bits": 4, "epochs": 1},
                       {"kind": "qat", "epochs": 2}],
              "output": {"weights": "auto", "encodings": ["dense", "auto"]}}
    small, rep = edgekit.run_recipe(trained_mlp, recipe, digits_flat, show_progress=False, log=lambda *_: None)
    sparse, clustered, qat_step = rep["steps"][1:]
    assert qat_step["nonzero_weights"] == clustered["nonzero_weights"] == sparse["nonzero_weights"]
    graph = edgekit.quantize(small, digits_flat.x_train[:64])
    for op in graph.ops:
        if op.kind == "fully_connected":
            w = graph.tensors[op.inputs[1]]
            assert len(np.unique(w.data)) <= 16
            assert len(set(w.quant.scale.tolist())) == 1  # one scale: one codebook for the layer
    assert rep["final"]["c_equals_reference"]
    assert set(rep["final"]["layer_encodings"].values()) - {"dense"}
    assert qat_step["weight_bytes"]["int8"]["auto"] < sparse["weight_bytes"]["int8"]["auto"]
    assert rep["final"]["accuracy_c"] > 0.9


def test_user_npz_data(tmp_path):
    """A user's .npz (here digits, flat, only a quarter of it): a recipe trains and measures on it."""
    digits = datasets.digits(flat=True)
    path = tmp_path / "mine.npz"
    np.savez(path, x_train=digits.x_train[::4], y_train=digits.y_train[::4], x_test=digits.x_test[::4],
             y_test=digits.y_test[::4])
    torch.manual_seed(0)
    model = train.train_classifier(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)),
                                   digits.x_train[::4], digits.y_train[::4], epochs=20, show_progress=False)
    _, rep = edgekit.run_recipe(model, {"step": [{"kind": "prune", "ratio": 0.25, "epochs": 2}]}, str(path),
                                show_progress=False, log=lambda *_: None)
    assert rep["data"] == "mine" and rep["samples"] == {"train": len(digits.x_train[::4]),
                                                        "test": len(digits.x_test[::4])}
    assert rep["steps"][1]["parameters"] < rep["steps"][0]["parameters"]
    assert rep["final"]["c_equals_reference"]
