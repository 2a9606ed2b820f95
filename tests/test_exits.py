"""Early exits: heads in torch, the multi-exit IR, the integer exit decision bit-exact in C (exit index
included), the threshold over the protocol, per-exit profiling on the host runner and the emulated M4."""
import shutil
import socket
import subprocess
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import edgekit
from edgekit import models, train
from edgekit.compress import exits as ex
from edgekit.device import protocol as P
from edgekit.device.profile import choose_threshold, format_report, profile, sweep_reference
from edgekit.errors import EdgekitError
from edgekit.passes.exits import EXITS_OFF, run_exits, threshold_to_int

settings.register_profile("exits", deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def multi_cnn(trained_cnn, digits):
    """The demo CNN with exits after conv1 and conv2 (listed out of order on purpose)."""
    return ex.add_exits(trained_cnn, ["conv2", "conv1"], digits, epochs=10, show_progress=False)


@pytest.fixture(scope="module")
def multi_mlp(trained_mlp, digits_flat):
    return ex.add_exits(trained_mlp, ["2"], digits_flat, epochs=10, show_progress=False)


@pytest.fixture(scope="module")
def multi_rescnn(trained_rescnn, digits):
    """Residual add, concatenation: the stem's output feeds the first head, the residual block and the add,
    so tensors from before exit 0 stay alive across it."""
    return ex.add_exits(trained_rescnn, ["stem", "pool"], digits, epochs=5, show_progress=False)


@pytest.fixture(scope="module")
def host_projects(tmp_path_factory, multi_cnn, multi_mlp, multi_rescnn, digits, digits_flat):
    """Sanitizer builds: CNN and ResCNN with the softmax criterion, MLP with the margin criterion; the MLP's
    and the ResCNN's exits calibrated (temperatures folded into the integer decisions)."""
    import copy
    root = tmp_path_factory.mktemp("exits_host")
    projects = {}
    for name, model, data, criterion in (("cnn", multi_cnn, digits, "softmax"),
                                         ("mlp", multi_mlp, digits_flat, "margin"),
                                         ("rescnn", multi_rescnn, digits, "softmax")):
        if name != "cnn":
            model = copy.deepcopy(model)
            ex.calibrate(model, data)
        q = edgekit.quantize(model, data.x_train[:200], exit_criterion=criterion)
        out = root / name
        edgekit.generate(q, out, exit_threshold=0.9)
        edgekit.build(out, sanitize=True)
        projects[name] = (out, q, data)
    return projects


# ---------------------------------------------------------------------------
# torch side
# ---------------------------------------------------------------------------

def test_heads_attach_in_network_order_and_leave_the_input_model_alone(trained_cnn, multi_cnn, digits):
    before = {k: v.clone() for k, v in trained_cnn.state_dict().items()}
    assert multi_cnn.edgekit_exits == ["conv1", "conv2", "final"]
    x = torch.as_tensor(digits.x_test[:50])
    outs = multi_cnn(x)
    assert isinstance(outs, tuple) and len(outs) == 3 and all(o.shape == (50, 10) for o in outs)
    with torch.no_grad():
        original = trained_cnn(x)
    # frozen mode: the backbone (BatchNorm statistics included) is untouched, so the final exit is the model
    assert torch.equal(outs[2], original)
    assert all(torch.equal(v, trained_cnn.state_dict()[k]) for k, v in before.items())
    assert not trained_cnn.training and not hasattr(trained_cnn, "edgekit_exits")
    # conv1 gives 16 x 8 x 8: pooled to 4x4 (256 features); conv2 gives 32 x 8 x 8: pooled to 2x2 (128)
    assert multi_cnn.exit_conv1.fc.in_features == 256 and multi_cnn.exit_conv2.fc.in_features == 128
    # the heads learned something (10 classes: chance is 10 %)
    acc = [train.accuracy(o.detach().numpy(), digits.y_test[:50]) for o in outs]
    assert acc[0] > 0.7 and acc[1] > 0.7
    import copy
    assert copy.deepcopy(multi_cnn).edgekit_exits == multi_cnn.edgekit_exits


def test_joint_training_trains_the_backbone_with_weighted_losses(trained_cnn, digits):
    joint = ex.add_exits(trained_cnn, ["conv1"], digits, mode="joint", epochs=2, weights=[0.5, 1.0],
                         distill=False, show_progress=False)
    assert not torch.equal(joint.conv2.weight, trained_cnn.conv2.weight)
    report = ex.evaluate(joint, digits)
    assert report["exits"] == ["conv1", "final"] and report["accuracy"][1] > 0.8
    assert all(abs(sum(r["hit_rates"]) - 1) < 1e-9 for r in report["curve"])


def test_pool_option_and_vector_heads(trained_cnn, trained_mlp, digits, digits_flat, multi_mlp):
    m = ex.add_exits(trained_cnn, ["pool"], digits, epochs=1, pool=1, show_progress=False)
    assert m.exit_pool.fc.in_features == 32  # 32 channels, global pool
    assert isinstance(multi_mlp.exit_2.fc, torch.nn.Linear) and multi_mlp.exit_2.fc.in_features == 128
    with pytest.raises(EdgekitError, match="cannot pool its 4x4 map to 3x3"):
        ex.add_exits(trained_cnn, ["pool"], digits, epochs=1, pool=3, show_progress=False)


@pytest.mark.parametrize("after,match", [
    (["conv9"], r"unknown layer 'conv9'.*conv1, bn1, conv2"),
    (["relu"], "runs at 4 places"),
    (["fc"], "produces the model's output"),
    (["conv1", "bn1"], "put an exit at the same place"),
    ([], "name at least one layer"),
])
def test_bad_after_names_are_refused_clearly(trained_cnn, digits, after, match):
    with pytest.raises(EdgekitError, match=match):
        ex.add_exits(trained_cnn, after, digits, epochs=1, show_progress=False)


def test_bad_options_are_refused(trained_cnn, multi_cnn, digits):
    with pytest.raises(EdgekitError, match="training mode"):
        ex.add_exits(trained_cnn, ["conv1"], digits, mode="half")
    with pytest.raises(EdgekitError, match="already has early exits"):
        ex.add_exits(multi_cnn, ["conv1"], digits)
    with pytest.raises(EdgekitError, match="weights must list 2"):
        ex.add_exits(trained_cnn, ["conv1"], digits, mode="joint", weights=[1.0], epochs=1, show_progress=False)


def test_export_and_convert_a_multi_output_graph(multi_cnn, digits, tmp_path):
    path = ex.save_model(multi_cnn, (1, 8, 8), tmp_path / "multi.pt2")
    graph = edgekit.load(path)
    assert graph.meta["exits"]["names"] == ["conv1", "conv2", "final"] and len(graph.outputs) == 3
    reloaded, shape = ex.load_model(path)
    assert shape == (1, 8, 8) and reloaded.edgekit_exits == ["conv1", "conv2", "final"]
    x = digits.x_test[:20]
    for a, b in zip(ex.exit_outputs(reloaded, x), ex.exit_outputs(multi_cnn, x)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    q = edgekit.quantize(path, digits.x_train[:100])
    kinds = [op.kind for op in q.ops]
    names = [op.name for op in q.ops]
    # each exit decision right after its head, before the backbone layers the next exit needs
    assert kinds.count("exit") == 2
    first, second = [i for i, k in enumerate(kinds) if k == "exit"]
    assert names.index("exit_conv1.fc") == first - 1 < names.index("conv2") < second
    assert names.index("exit_conv2.fc") == second - 1 < names.index("dw")
    # the float model and the int8 reference agree on most answers (all exits computed)
    float_outs = ex.exit_outputs(multi_cnn, digits.x_test)
    int8_outs = edgekit.reference_run(q, digits.x_test, exit_threshold=0.0)  # exit 0 answers: others zeroed
    assert np.mean(float_outs[0].argmax(1) == int8_outs[0].argmax(1)) > 0.95
    assert not np.any(int8_outs[1]) and not np.any(int8_outs[2])


def test_tflite_export_computes_every_exit(host_projects, tmp_path):
    interpreter = pytest.importorskip("tflite_runtime.interpreter")
    from edgekit import reference
    _, q, data = host_projects["cnn"]
    path = edgekit.export_tflite(q, tmp_path / "multi.tflite", io="int8")
    it = interpreter.Interpreter(model_path=str(path),
                                 experimental_op_resolver_type=interpreter.OpResolverType.BUILTIN_REF)
    it.allocate_tensors()
    x = np.random.default_rng(3).integers(-128, 128, size=(8, 8, 8, 1)).astype(np.int8)
    expected = reference.run(q, x)  # every exit computed: no early return in TFLite
    assert len(it.get_output_details()) == 3
    for i in range(len(x)):
        it.set_tensor(it.get_input_details()[0]["index"], x[i:i + 1])
        it.invoke()
        for d, e in zip(it.get_output_details(), expected):
            assert np.array_equal(it.get_tensor(d["index"]).reshape(-1), e[i].reshape(-1))


def test_ops_are_reordered_when_the_model_computes_heads_last(digits):
    """A hand-written multi-exit model whose forward runs the early head after the backbone."""
    class Late(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(1, 8, 3, padding=1)
            self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
            self.fc = torch.nn.Linear(8 * 64, 10)
            self.head = torch.nn.Linear(8 * 64, 10)
            self.edgekit_exits = ["early", "final"]

        def forward(self, x):
            a = torch.relu(self.conv1(x))
            final = self.fc(torch.relu(self.conv2(a)).flatten(1))
            return self.head(a.flatten(1)), final

    torch.manual_seed(0)
    q = edgekit.quantize(Late().eval(), digits.x_train[:50])
    assert [op.kind for op in q.ops] == ["conv2d", "reshape", "fully_connected", "exit", "conv2d", "reshape",
                                         "fully_connected"]


def test_exit_models_are_int8_only_and_unknown_criteria_refused(multi_cnn, digits):
    with pytest.raises(EdgekitError, match="int8 only"):
        edgekit.quantize(multi_cnn, digits.x_train[:20], weight_only=True)
    with pytest.raises(EdgekitError, match="unknown exit criterion"):
        edgekit.quantize(multi_cnn, digits.x_train[:20], exit_criterion="entropy")
    for bad in ("-1", "nan", "high"):
        with pytest.raises(EdgekitError, match="exit threshold"):
            threshold_to_int(bad)
    assert threshold_to_int("off") == EXITS_OFF and threshold_to_int(0.9) == 230


# ---------------------------------------------------------------------------
# The exit decision: reference and C agree bit for bit, exit index included
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["cnn", "mlp", "rescnn"])
@given(data=st.data())
@settings(settings.get_profile("exits"), max_examples=12)
def test_c_equals_reference_with_the_exit_index(host_projects, name, data):
    out, q, _ = host_projects[name]
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    shape = q.tensors[q.inputs[0]].shape[1:]
    x = rng.integers(-128, 128, size=(16,) + tuple(shape)).astype(np.int8)
    # a softmax threshold is a probability: above 256/256 edgekit refuses it (safety: no exit could answer)
    top = 256 if q.meta["exits"].get("criterion", "softmax") == "softmax" else 2200
    one = st.one_of(st.integers(0, top), st.just(EXITS_OFF))
    k = len(q.outputs) - 1
    raw = data.draw(st.one_of(one, st.lists(one, min_size=k, max_size=k)))  # one for all, or one per exit
    if isinstance(raw, list):
        threshold = ",".join("off" if r == EXITS_OFF else str(r / 256) for r in raw)
    else:
        threshold = "off" if raw == EXITS_OFF else raw / 256
    c_outs, c_exit = edgekit.run(out, x, int8=True, sanitize=True, exit_threshold=threshold, with_exit=True)
    r_outs, r_exit = run_exits(q, x, raw)
    assert np.array_equal(c_exit, r_exit)
    for a, b in zip(c_outs, r_outs):
        assert np.array_equal(a, b)


def test_real_digits_bit_exact_at_several_thresholds(host_projects):
    out, q, data = host_projects["cnn"]
    seen = set()
    for t in (0.0, 0.5, 0.9, 0.99, 1.0, "off"):
        c_outs, c_exit = edgekit.run(out, data.x_test, sanitize=True, exit_threshold=t, with_exit=True)
        r_outs, r_exit = edgekit.reference_run(q, data.x_test, exit_threshold=t, with_exit=True)
        assert np.array_equal(c_exit, r_exit)
        assert all(np.array_equal(a, b) for a, b in zip(c_outs, r_outs))
        seen.update(np.unique(c_exit).tolist())
        if t == 0.0:
            assert (c_exit == 0).all()
        if t in (1.0, "off"):
            assert (c_exit == 2).all()
    assert {0, 2} <= seen
    # per exit: conv1's head off (skipped, its output the zero point), conv2's answering everything
    c_outs, c_exit = edgekit.run(out, data.x_test, sanitize=True, exit_threshold=["off", 0.0], with_exit=True)
    r_outs, r_exit = edgekit.reference_run(q, data.x_test, exit_threshold="off,0", with_exit=True)
    assert (c_exit == 1).all() and np.array_equal(c_exit, r_exit)
    assert all(np.array_equal(a, b) for a, b in zip(c_outs, r_outs)) and not np.any(c_outs[0]) and np.any(c_outs[1])
    # exits off: early outputs are the zero point (real 0.0); threshold 1.0: computed but never answering
    off, _ = edgekit.run(out, data.x_test[:5], sanitize=True, exit_threshold="off", with_exit=True)
    never, _ = edgekit.run(out, data.x_test[:5], sanitize=True, exit_threshold=1.0, with_exit=True)
    assert not np.any(off[0]) and np.any(never[0]) and np.array_equal(off[2], never[2])


def test_temperatures_are_fitted_saved_and_folded_into_the_decision(multi_cnn, host_projects, digits, tmp_path):
    import copy
    model = copy.deepcopy(multi_cnn)
    temps = ex.calibrate(model, digits)
    assert len(temps) == 2 and all(0.05 < t < 20 for t in temps)
    # the fitted T is no worse than T = 1 on the split it was fitted on
    outs = ex.exit_outputs(model, digits.x_train)
    y = torch.as_tensor(digits.y_train)
    for logits, t in zip(outs[:-1], temps):
        z = torch.as_tensor(logits)
        assert torch.nn.functional.cross_entropy(z / t, y) <= torch.nn.functional.cross_entropy(z, y) + 1e-6
    path = ex.save_model(model, (1, 8, 8), tmp_path / "calibrated.pt2")
    assert ex.load_model(path)[0].edgekit_exit_temperatures == pytest.approx(temps)
    q = edgekit.quantize(path, digits.x_train[:100])
    q1 = edgekit.quantize(multi_cnn, digits.x_train[:100])
    assert q.meta["exits"]["temperatures"] == pytest.approx(temps)
    decisions = [op for op in q.ops if op.kind == "exit"]
    plain = [op for op in q1.ops if op.kind == "exit"]
    # 1/T is the softmax's beta: it scales the integer input multiplier (TFLite's Prepare)
    for d, p0, t in zip(decisions, plain, temps):
        real = d.attrs["input_multiplier"] * 2.0 ** (d.attrs["input_left_shift"] - 31)
        real0 = p0.attrs["input_multiplier"] * 2.0 ** (p0.attrs["input_left_shift"] - 31)
        assert real == pytest.approx(real0 / t, rel=1e-6)
    # the calibrated MLP (margin) and ResCNN (softmax) builds are bit-exact: test_c_equals_reference_...
    assert host_projects["rescnn"][1].meta["exits"]["temperatures"] != [1.0, 1.0]


def test_sweep_and_operating_point(host_projects):
    out, q, data = host_projects["cnn"]
    sweep = sweep_reference(out, data.x_test, data.y_test)
    points = sweep["points"]
    assert sweep["full"]["work_fraction"] == 1.0 and points[0]["threshold_raw"] == 0
    assert all(abs(sum(p["hit_rates"]) - 1) < 1e-9 for p in points)
    works = [p["work"] for p in points]
    assert works == sorted(works)  # a higher threshold never does less work
    chosen = choose_threshold(sweep, 0.01)  # 360 samples support a 1 pp promise at 95 % (299 needed)
    assert chosen["promise"]["supported"] and not chosen["promise"]["exits_off"]
    assert chosen["drop_bound"] <= 0.01 and chosen["drop"] <= chosen["drop_bound"]
    assert chosen["accuracy"] >= sweep["full"]["accuracy"] - 0.01 and chosen["work_fraction"] < 0.6
    # the test order is from the highest threshold down, stopping at the first point over the bound
    order = sorted(points, key=lambda p: -p["threshold_raw"])
    first_fail = next((i for i, p in enumerate(order) if p["drop_bound"] > 0.01), len(order))
    assert all(p["passed"] for p in order[:first_fail]) and not any(p["passed"] for p in order[first_fail:])
    assert chosen is min((p for p in order[:first_fail]), key=lambda p: p["work"])
    # the curve's accuracy at one threshold is what the reference says at that threshold
    p = next(p for p in points if p["threshold_raw"] == chosen["threshold_raw"])
    outs, idx = edgekit.reference_run(q, data.x_test, exit_threshold=p["threshold"], with_exit=True)
    answers = np.stack([o.argmax(1) for o in outs], 1)[np.arange(len(idx)), idx]
    assert p["accuracy"] == pytest.approx(np.mean(answers == data.y_test))


def test_per_exit_search_and_path(host_projects):
    from edgekit.device.profile import search_per_exit, sweep_path
    out, q, data = host_projects["cnn"]
    path = search_per_exit(out, data.x_train[:400])
    assert path and all(len(raw) == 2 for raw in path)
    on_search = sweep_path(out, data.x_train[:400], data.y_train[:400], path)
    works = [p["work"] for p in on_search["points"]]
    assert works == sorted(works, reverse=True) and works[0] < on_search["full"]["work"]  # each step saves work
    sweep = sweep_path(out, data.x_test, data.y_test, path)  # the validation samples test the path in order
    assert [p["threshold_raw"] for p in sweep["points"]] == [p["threshold_raw"] for p in on_search["points"]]
    chosen = choose_threshold(sweep, 0.01)
    assert chosen["drop_bound"] <= 0.01 and chosen["work_fraction"] < 1.0
    raw = chosen["threshold_raw"]
    # the point's accuracy is what the reference gives at those per-exit thresholds
    outs, idx = edgekit.reference_run(q, data.x_test, exit_threshold=chosen["threshold"] if isinstance(raw, list)
                                      else [chosen["threshold"]] * 2, with_exit=True)
    answers = np.stack([o.argmax(1) for o in outs], 1)[np.arange(len(idx)), idx]
    assert chosen["accuracy"] == pytest.approx(np.mean(answers == data.y_test))


# ---------------------------------------------------------------------------
# The accuracy promise: an exact one-sided bound on the paired disagreements
# ---------------------------------------------------------------------------

def test_upper_bound_is_clopper_pearson():
    from edgekit.device.operating_point import samples_needed, upper_bound
    stats = pytest.importorskip("scipy.stats")
    for k, n, c in ((0, 288, 0.95), (1, 288, 0.95), (3, 720, 0.9), (10, 100, 0.99), (0, 1, 0.5)):
        assert upper_bound(k, n, c) == pytest.approx(stats.beta.ppf(c, k + 1, n - k), rel=1e-9)
    assert upper_bound(5, 5) == 1.0
    # a 1 pp promise at 95 % needs 299 samples even with no early answer wrong where the full one is right
    assert samples_needed(0.01, 0.95) == 299 and upper_bound(0, 299) <= 0.01 < upper_bound(0, 298)
    need = samples_needed(0.01, 0.95, rate=0.003)
    assert upper_bound(int(np.ceil(0.003 * need)), need) <= 0.01 and need > 299
    assert samples_needed(0.01, 0.95, rate=0.01) is None


def test_the_bound_holds_on_unseen_data():
    """Drawn validation sets from a known population: the chosen point's true drop stays within the promise
    in at least 95 % of them (the fixed-sequence test over many thresholds included)."""
    from edgekit.device.operating_point import choose
    rng = np.random.default_rng(0)
    # 40 nested thresholds: p(worse) grows from 0 to 3 %, p(better) 0.1 %; work falls
    p_worse = np.linspace(0.0, 0.03, 40)
    true_drop = p_worse - 0.001
    broken, n = 0, 400
    for _ in range(400):
        u = rng.random(n)
        better = rng.random(n) < 0.001
        points = [{"worse": int(np.sum(u < pw)), "better": int(np.sum(better & ~(u < pw))), "work": 1.0 - i / 40,
                   "i": i} for i, pw in enumerate(p_worse)]
        chosen = choose(points, {"work": 1.0, "worse": 0, "better": 0}, n, 0.01, 0.95)
        if "i" in chosen and true_drop[chosen["i"]] > 0.01:
            broken += 1
    assert broken <= 0.05 * 400


def test_choice_refuses_what_the_sample_cannot_support():
    from edgekit.device.operating_point import choose, describe_promise
    points = [{"worse": 0, "better": 0, "work": 0.5, "threshold": 0.9}]
    full = {"work": 1.0, "worse": 0, "better": 0, "threshold": None}
    chosen = choose(points, full, 100, 0.01, 0.95)
    assert chosen is full and chosen["promise"]["exits_off"] and not chosen["promise"]["supported"]
    text = "\n".join(describe_promise(chosen))
    assert "100 validation samples cannot support a drop of at most 1 pp at 95 % confidence" in text
    assert "at least 299 samples" in text and "exits off" in text
    chosen = choose(points, dict(full), 100, 0.05, 0.95)  # 5 pp: 59 samples are enough
    assert chosen is points[0] and chosen["drop_bound"] == pytest.approx(1 - 0.05 ** (1 / 100))
    with pytest.raises(EdgekitError, match="between 0 and 1"):
        choose(points, dict(full), 100, 1.5)


def _exact_prediction_count(k, n, m, confidence):
    """The prediction bound's count, enumerated with whole numbers: the largest K on the m unseen samples
    whose hypergeometric P(X <= k) (N = n + m, k + K events, n drawn) exceeds 1 - confidence."""
    from math import comb
    kept = [K for K in range(m + 1)
            if sum(comb(k + K, i) * comb(n + m - k - K, n - i) for i in range(k + 1)) > (1 - confidence) * comb(n + m, n)]
    return max(kept)


def test_prediction_bound_holds_for_every_rate_by_enumeration():
    """On small cases, enumerated exactly: for every population rate p, the chance that the test set's count
    exceeds the bound computed from the validation count is at most 1 - confidence; the bound is the
    whole-number hypergeometric one; it tends to the population bound as the test set grows."""
    from math import comb

    from edgekit.device.operating_point import drop_bound, prediction_bound, upper_bound
    for n, m, conf in ((40, 25, 0.95), (60, 30, 0.9), (30, 50, 0.99)):
        counts = [round(prediction_bound(k, n, m, conf) * m) for k in range(n)]
        assert counts == [_exact_prediction_count(k, n, m, conf) for k in range(n)]
        assert counts == sorted(counts)  # more wrong answers on validation never predict fewer on test
        worst = 0.0
        for p in np.linspace(0.0005, 0.6, 120):
            miss = sum(comb(n, k) * p ** k * (1 - p) ** (n - k) *
                       sum(comb(m, K) * p ** K * (1 - p) ** (m - K) for K in range(counts[k] + 1, m + 1))
                       for k in range(n))
            worst = max(worst, miss)
        assert worst <= 1 - conf + 1e-12
        assert worst > 0.4 * (1 - conf)  # and it is not loose beyond what whole counts force
    assert prediction_bound(3, 720, 10 ** 6, 0.9) == pytest.approx(upper_bound(3, 720, 0.9), abs=1e-5)
    assert drop_bound(2, 863, 0.95) == upper_bound(2, 863, 0.95)
    # the benchmark's case: 863 validation images, 360 test images (1 pp = 3.6 images)
    assert [round(prediction_bound(k, 863, 360, 0.95) * 360) for k in range(3)] == [2, 3, 4]
    assert round(prediction_bound(0, 863, 360, 0.99) * 360) == 3
    with pytest.raises(EdgekitError, match="test samples must be positive"):
        prediction_bound(0, 100, 0)


def test_the_choice_keeps_its_promise_on_the_test_set():
    """Drawn validation and test sets from a known population: the chosen point's drop on the test set
    stays within the promise in at least 95 % of the draws (fixed sequence over 40 thresholds, nested: a
    lower threshold's wrong early answers include a higher one's). The population bound does not: its
    choice shows more than the promised drop on the test set far more often."""
    from edgekit.device.operating_point import choose
    rng = np.random.default_rng(1)
    p_worse = np.linspace(0.0, 0.03, 40)
    n, m, draws = 500, 200, 400
    broken = {"test": 0, "population": 0}
    for _ in range(draws):
        u_val, u_test = rng.random(n), rng.random(m)
        better_test = rng.random(m) < 0.001
        for kind, test_samples in (("test", m), ("population", None)):
            points = [{"worse": int(np.sum(u_val < pw)), "better": 0, "work": 1.0 - i / 40, "i": i}
                      for i, pw in enumerate(p_worse)]
            chosen = choose(points, {"work": 1.0, "worse": 0, "better": 0}, n, 0.01, 0.95, test_samples)
            if "i" in chosen:
                test_drop = (np.sum(u_test < p_worse[chosen["i"]]) - np.sum(better_test & (u_test >= p_worse[chosen["i"]]))) / m
                broken[kind] += test_drop > 0.01
    assert broken["test"] <= 0.05 * draws
    assert broken["population"] > 2 * broken["test"] and broken["population"] > 0.05 * draws


def test_worse_so_far_keeps_the_bounds_nested():
    from edgekit.device.operating_point import choose, prediction_bound
    points = [{"worse": w, "better": 0, "work": 1.0 - i / 10, "i": i} for i, w in enumerate((0, 1, 0, 1, 3))]
    chosen = choose(points, {"work": 1.0, "worse": 0, "better": 0}, 863, 0.01, 0.95, 360)
    assert [p["worse_so_far"] for p in points] == [0, 1, 1, 1, 3]
    assert points[2]["drop_bound"] == points[1]["drop_bound"] == prediction_bound(1, 863, 360, 0.95)
    bounds = [p["drop_bound"] for p in points]
    assert bounds == sorted(bounds)
    assert [p["passed"] for p in points] == [True, True, True, True, False] and chosen is points[3]


def test_refusal_on_a_test_set_says_how_many_validation_samples_it_needs():
    from edgekit.device.operating_point import choose, describe_promise, samples_needed
    points = [{"worse": 0, "better": 0, "work": 0.5, "threshold": 0.9}]
    full = {"work": 1.0, "worse": 0, "better": 0, "threshold": None}
    # 1 pp on 360 test images: 400 validation samples at 95 %, 776 at 99 %, even with no wrong early answer
    assert samples_needed(0.01, 0.95, test_samples=360) == 400
    assert samples_needed(0.01, 0.99, test_samples=360) == 776
    chosen = choose(points, dict(full), 350, 0.01, 0.95, 360)
    assert chosen["promise"]["exits_off"] and not chosen["promise"]["supported"]
    text = "\n".join(describe_promise(chosen))
    assert ("350 validation samples cannot support a drop of at most 1 pp on 360 test samples at 95 % confidence; "
            "that needs at least 400 samples") in text and "exits off" in text
    chosen = choose(points, dict(full), 450, 0.01, 0.95, 360)
    assert chosen is points[0] and chosen["drop_bound"] == pytest.approx(3 / 360)
    assert "at most 0.83 pp on 360 test samples at 95 % confidence (exact prediction bound" in \
        "\n".join(describe_promise(chosen))
    # a rate the test set's own scatter puts over the promise: no validation size helps
    bad = [{"worse": 3, "better": 0, "work": 0.5, "threshold": 0.9}]
    chosen = choose(bad, dict(full), 500, 0.01, 0.95, 360)
    assert chosen["promise"]["exits_off"] and chosen["promise"]["needed_samples"] is None
    assert "too often for any sample size (the 360 test samples alone scatter more than 1 pp)" in \
        "\n".join(describe_promise(chosen))
    with pytest.raises(EdgekitError, match="positive whole number"):
        choose(points, dict(full), 450, 0.01, 0.95, 0)


# ---------------------------------------------------------------------------
# The protocol: SET_PARAM, the exit index in INVOKE's status, per-exit profiles
# ---------------------------------------------------------------------------

def _serve(binary):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(binary), "--listen", str(port)], stderr=subprocess.DEVNULL)
    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    return proc, f"socket://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def served_exits(tmp_path_factory, multi_cnn, digits):
    out = tmp_path_factory.mktemp("exits_serve") / "cnn"
    q = edgekit.quantize(multi_cnn, digits.x_train[:200])
    edgekit.generate(q, out, exit_threshold=0.9)
    edgekit.build(out)
    proc, url = _serve(out / "model_runner")
    yield out, url, q, digits
    proc.kill()
    proc.wait()


def test_set_param_changes_the_threshold_and_invoke_reports_the_exit(served_exits):
    out, url, q, data = served_exits
    x = edgekit.api.to_ir_inputs(q, data.x_test[:1])
    qin = q.tensors[q.inputs[0]].quant
    sample = edgekit.quant_math.quantize(x, qin.scale[0], qin.zero_point[0])[0].tobytes()
    with P.DeviceLink(url) as link:
        seen = {}
        for raw in (0, EXITS_OFF, 256):
            link.set_exit_threshold(raw)
            link.set_input(0, sample)
            status, _ = link.invoke()
            seen[raw] = status
        assert seen == {0: 0, EXITS_OFF: 2, 256: 2}
        for raw, expected in (([EXITS_OFF, 0], 1), ([0, EXITS_OFF], 0), ([256, 0], 1), ([EXITS_OFF] * 2, 2)):
            link.set_exit_threshold(raw)  # one SET_PARAM per exit (16 + k)
            link.set_input(0, sample)
            assert link.invoke()[0] == expected
        with pytest.raises(P.DeviceError, match="per-exit thresholds"):
            link.set_exit_threshold([0, 0, 5])  # three for two early exits
        with pytest.raises(P.DeviceError, match="out of bounds"):
            link.set_param(9, 1)  # no such parameter
        with pytest.raises(P.DeviceError, match="bad length"):
            link.request(P.SET_PARAM, b"\x01\x00")


def test_profile_reports_per_exit_stats_and_the_full_network(served_exits):
    out, url, q, data = served_exits
    n = 60
    report = profile(url, data.x_test[:n], project_dir=out, labels=data.y_test[:n], show_progress=False)
    assert report["bit_exact"], report["mismatches"]
    e = report["exits"]
    assert e["names"] == ["conv1", "conv2", "final"] and e["threshold"] == 230
    assert sum(r["hits"] for r in e["per_exit"]) == n and e["per_exit"][0]["hits"] > 0
    # the host counts wall-clock nanoseconds: at 230/256 few inputs leave early, so the saving there is
    # within the timing noise of a loaded machine; the work fraction is only checked to be a fraction here
    assert 0 < e["work_fraction"] and e["full_mean_count"] > 0
    assert report["accuracy"] == e["accuracy"] and "full_accuracy" in e
    text = format_report(report)
    assert "early exits (softmax, threshold 0.898438 = 230/256)" in text and "of the full network's" in text
    # at another threshold, given to profile: everything answers at the first exit, with a clear saving
    saving = profile(url, data.x_test[:20], project_dir=out, show_progress=False, exit_threshold=0.0)["exits"]
    assert saving["per_exit"][0]["hits"] == 20
    assert 0 < saving["work_fraction"] < 0.9 and saving["full_mean_count"] > saving["mean_count"]
    report0 = profile(url, data.x_test[:10], project_dir=out, show_progress=False, exit_threshold=0.0,
                      full_network=False)
    assert report0["bit_exact"] and report0["exits"]["per_exit"][0]["hits"] == 10
    assert "full_mean_count" not in report0["exits"]


def test_costs_come_from_the_exits_off_pass_whatever_threshold_the_profile_ran_at(served_exits):
    """Regression (issue 16): a profile at a threshold where inputs answer early only ran the layers behind
    the exits on some inputs (here: none), so its per-layer counts are not the full network's. --costs
    used to take them: the "full network" cost less than an answer at the first exit, work fractions
    above 1 and a nonsense operating point. The exits-off pass of the same profile has the right counts."""
    out, url, q, data = served_exits
    x, y = data.x_test[:40], data.y_test[:40]
    # conv1's head never answers, conv2's always: both heads run, the layers after conv2's exit never do
    report = profile(url, x, project_dir=out, labels=y, exit_threshold=[1.0, 0.0], show_progress=False)
    assert report["exits"]["per_exit"][1]["hits"] == 40 and report["bit_exact"]
    later = [l for l in report["layers"] if l["name"] in ("dw", "pw", "fc")]
    assert later and all(l["max"] == 0 for l in later)  # the exits-on pass never ran them
    sweep = sweep_reference(out, x, y, costs=report)
    assert sweep["costs"] == "measured"
    at_first = next(p for p in sweep["points"] if p["threshold_raw"] == 0)
    assert at_first["hit_rates"][0] == 1.0 and at_first["work_fraction"] < 0.9
    # the full network's cost is the exits-off pass's, layer by layer: dw, pw and fc included (the old
    # reading, each layer's largest count in the exits-on pass, had them at 0)
    costs = report["exits"]["layer_costs"]
    index = {l["name"]: l["index"] for l in report["layers"]}
    heads = set(edgekit.api.load_project(out)["exits"]["head_only_layers"])
    assert all(costs[index[name]] > 0 for name in ("dw", "pw", "fc"))
    assert sweep["full"]["work"] == pytest.approx(sum(c for i, c in enumerate(costs) if i not in heads))
    # the host's counts are nanoseconds: on a loaded machine the mean over 40 inferences carries preemptions
    # the per-layer medians do not (a CI run saw a mean 4x the medians' sum), so only the upper bound holds
    assert sweep["full"]["work"] <= 1.5 * report["exits"]["full_mean_count"]
    import json
    json_report = json.loads(json.dumps(report))  # as `edgekit profile --json` writes it
    assert sweep_reference(out, x, y, costs=json_report)["full"]["work"] == sweep["full"]["work"]
    # without an exits-off pass the report is refused, not misread
    no_full = profile(url, x, project_dir=out, exit_threshold=0.0, full_network=False, show_progress=False)
    with pytest.raises(EdgekitError, match="no exits-off pass"):
        sweep_reference(out, x, y, costs=no_full)
    # a head no input reached has no count: refused too
    never = profile(url, x, project_dir=out, exit_threshold=[0.0, "off"], show_progress=False)
    with pytest.raises(EdgekitError, match="no input of the profile reached layer"):
        sweep_reference(out, x, y, costs=never)


def test_plain_models_keep_the_old_protocol(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    x = np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32)
    out = tmp_path / "plain"
    edgekit.generate(edgekit.quantize(model, x), out)
    edgekit.build(out)
    assert "EK_MODEL_NUM_EXITS 0" in (out / "model.h").read_text()
    proc, url = _serve(out / "model_runner")
    try:
        with P.DeviceLink(url) as link:
            with pytest.raises(P.DeviceError, match="no early exits"):
                link.set_exit_threshold(100)
            link.set_input(0, bytes(8))
            assert link.invoke()[0] == 0
        report = profile(url, x, project_dir=out, show_progress=False)
        assert report["bit_exact"] and "exits" not in report
    finally:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------
# The emulated Cortex-M4: flashed over its serial bootloader, profiled through the protocol
# ---------------------------------------------------------------------------

@pytest.mark.qemu
@pytest.mark.skipif(shutil.which("qemu-system-arm") is None or shutil.which("arm-none-eabi-gcc") is None,
                    reason="needs qemu-system-arm and arm-none-eabi-gcc (make setup)")
def test_emulated_m4_runs_early_exits_bit_exact(multi_cnn, digits, tmp_path):
    from edgekit.device.emulator import Emulator
    from edgekit.device.flash import flash_project
    from edgekit.device.profile import sweep_device

    out = tmp_path / "m4"
    q = edgekit.quantize(multi_cnn, digits.x_train[:200], exit_criterion="margin")
    edgekit.generate(q, out, board="mps2-an386", exit_threshold=2.0)
    edgekit.build(out)
    n = 40
    with Emulator("mps2-an386") as emu:
        flash_project(out, emu.url, show_progress=False)
        report = profile(emu.url, digits.x_test[:n], project_dir=out, labels=digits.y_test[:n],
                         show_progress=False)
        assert report["bit_exact"], report["mismatches"]
        assert report["unit"] == "emulated instructions"
        e = report["exits"]
        assert e["criterion"] == "margin" and e["threshold"] == 512
        assert sum(r["hits"] for r in e["per_exit"]) == n
        answered_early = [r for r in e["per_exit"][:-1] if r["hits"]]
        assert answered_early and all(r["mean_count"] < e["full_mean_count"] for r in answered_early)
        assert e["work_fraction"] < 1
        sweep = sweep_device(emu.url, digits.x_test[:10], digits.y_test[:10], [0.0, 1000.0], project_dir=out,
                             show_progress=False)
        assert sweep["bit_exact"] and sweep["points"][0]["hit_rates"][0] == 1.0
        assert sweep["points"][1]["hit_rates"][-1] == 1.0
        assert sweep["points"][0]["work"] < sweep["full"]["work"] <= sweep["points"][1]["work"]


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None or shutil.which("qemu-aarch64") is None,
                    reason="needs aarch64-linux-gnu-gcc and qemu-aarch64 (make setup)")
def test_raspberry_pi_file_runner_reports_the_exit(multi_cnn, digits, tmp_path):
    q = edgekit.quantize(multi_cnn, digits.x_train[:200])
    out = tmp_path / "rpi5"
    edgekit.generate(q, out, board="rpi5")
    edgekit.build(out)
    for t in (0.7, "off"):
        outs, index = edgekit.run(out, digits.x_test[:30], exit_threshold=t, with_exit=True)
        r_outs, r_index = edgekit.reference_run(q, digits.x_test[:30], exit_threshold=t, with_exit=True)
        assert np.array_equal(index, r_index) and all(np.array_equal(a, b) for a, b in zip(outs, r_outs))


# ---------------------------------------------------------------------------
# The commands
# ---------------------------------------------------------------------------

def _edgekit(*args, cwd=None):
    import sys
    return subprocess.run([sys.executable, "-m", "edgekit.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def test_cli_exits_generate_run_thresholds_profile(trained_cnn, digits, tmp_path):
    from edgekit.compress import fxgraph
    fxgraph.export_model(trained_cnn, (1, 8, 8), tmp_path / "model.pt2")
    np.save(tmp_path / "c.npy", digits.x_train[:100])
    np.save(tmp_path / "x.npy", digits.x_test[:60])
    np.save(tmp_path / "y.npy", digits.y_test[:60])
    before = (tmp_path / "model.pt2").read_bytes()

    bad = _edgekit("exits", "model.pt2", "--after", "conv1,nope", "-o", "multi.pt2", cwd=tmp_path)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert "unknown layer 'nope'" in bad.stderr and "conv1, bn1" in bad.stderr
    assert not (tmp_path / "multi.pt2").exists()

    made = _edgekit("exits", "model.pt2", "--after", "conv1,conv2", "-o", "multi.pt2", "--epochs", "5", "--quiet",
                    cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert "conv1" in made.stdout and "final" in made.stdout and "wrote multi.pt2" in made.stdout
    assert (tmp_path / "model.pt2").read_bytes() == before

    gen = _edgekit("generate", "multi.pt2", "--calib", "c.npy", "--exit-threshold", "0.8", "-o", "out", cwd=tmp_path)
    assert gen.returncode == 0, gen.stderr
    assert "early exits: conv1, conv2, then the final classifier; softmax confidence, threshold 0.800781 (205/256)" in gen.stdout
    assert "int32_t ek_exit_thresholds[EK_MODEL_NUM_EXITS] = { 205, 205 };" in (tmp_path / "out" / "model.c").read_text()
    assert _edgekit("build", "out", cwd=tmp_path).returncode == 0
    run = _edgekit("run", "out", "--inputs", "x.npy", "--output", "y_out.npz", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    saved = np.load(tmp_path / "y_out.npz")
    graph = edgekit.ir_io.load_graph(tmp_path / "out")
    outs, index = edgekit.reference_run(graph, digits.x_test[:60], exit_threshold=0.8, with_exit=True)
    assert np.array_equal(saved["exit"], index)
    assert all(np.array_equal(saved[f"arr_{k}"], outs[k]) for k in range(3))

    th = _edgekit("thresholds", "--project", "out", "--inputs", "x.npy", "--labels", "y.npy", "--json", "t.json",
                  cwd=tmp_path)
    assert th.returncode == 0, th.stderr
    assert "early-exit curve (softmax, 60 samples, work in macs" in th.stdout and "operating point" in th.stdout
    assert "<-" in th.stdout and (tmp_path / "t.json").exists()
    # 60 samples cannot support a 1 pp promise at 95 %: refused, with the sample size it needs
    assert "no promise: 60 validation samples cannot support a drop of at most 1 pp at 95 % confidence" in th.stdout
    assert "at least 299 samples" in th.stdout and "operating point: exits off" in th.stdout
    loose = _edgekit("thresholds", "--project", "out", "--inputs", "x.npy", "--labels", "y.npy", "--max-drop", "0.1",
                     "--confidence", "0.9", cwd=tmp_path)
    assert loose.returncode == 0, loose.stderr
    assert "at 90 % confidence (exact one-sided bound), within the 10 pp asked" in loose.stdout
    assert "accuracy drop: estimate" in loose.stdout and "--exit-threshold" in loose.stdout
    bad = _edgekit("thresholds", "--project", "out", "--inputs", "x.npy", "--labels", "y.npy", "--confidence", "95",
                   cwd=tmp_path)
    assert bad.returncode == 1 and "--confidence must be between 0 and 1" in bad.stderr
    on_test = _edgekit("thresholds", "--project", "out", "--inputs", "x.npy", "--labels", "y.npy", "--max-drop", "0.1",
                       "--confidence", "0.9", "--test-samples", "200", cwd=tmp_path)
    assert on_test.returncode == 0, on_test.stderr
    assert ("on 200 test samples at 90 % confidence (exact prediction bound for a test set of that size)" in on_test.stdout
            or "of at most 10 pp on 200 test samples at 90 % confidence" in on_test.stdout)
    bad = _edgekit("thresholds", "--project", "out", "--inputs", "x.npy", "--labels", "y.npy", "--test-samples", "0",
                   cwd=tmp_path)
    assert bad.returncode == 1 and "--test-samples must be a positive number" in bad.stderr
    np.save(tmp_path / "search.npy", digits.x_train[:200])
    per_exit = _edgekit("thresholds", "--project", "out", "--inputs", "x.npy", "--labels", "y.npy", "--per-exit",
                        "search.npy", "--max-drop", "0.1", cwd=tmp_path)
    assert per_exit.returncode == 0, per_exit.stderr
    assert "operating point: thresholds" in per_exit.stdout or "operating point: threshold" in per_exit.stdout
    no_labels = _edgekit("thresholds", "--project", "out", "--inputs", "x.npy", "--labels", "missing.npy",
                         cwd=tmp_path)
    assert no_labels.returncode == 1 and "labels file not found" in no_labels.stderr

    proc, url = _serve(tmp_path / "out" / "model_runner")
    try:
        pr = _edgekit("profile", "--port", url, "--project", "out", "--inputs", "x.npy", "--labels", "y.npy",
                      cwd=tmp_path)
        assert pr.returncode == 0, pr.stderr
        assert "early exits (softmax, threshold 0.800781 = 205/256)" in pr.stdout
        assert "0: conv1" in pr.stdout and "2: final" in pr.stdout and "full network (exits off" in pr.stdout
        off = _edgekit("profile", "--port", url, "--project", "out", "--inputs", "x.npy", "--exit-threshold",
                       "off", "--no-full", cwd=tmp_path)
        assert off.returncode == 0 and "threshold off" in off.stdout
    finally:
        proc.kill()
        proc.wait()
