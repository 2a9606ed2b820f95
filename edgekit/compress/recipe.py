"""TOML recipes: compression steps in a chain, with a report per step.

    [[step]]
    kind = "prune"            # structured: remove channels / neurons
    ratio = 0.5
    criterion = "l1"          # l1 | l2 | apoz
    steps = 3                 # iterative: prune a little, fine-tune, repeat
    epochs = 2

    [[step]]
    kind = "sparsify"         # unstructured magnitude pruning
    sparsity = 0.9

    [[step]]
    kind = "cluster"          # k-means weight sharing
    bits = 4

    [[step]]
    kind = "distill"          # fine-tune on the input model's soft outputs
    epochs = 5

    [output]
    weights = "auto"          # flash encoding of the generated C for the final model
    encodings = ["dense"]     # encodings whose weight bytes the report lists for every step

Steps: prune, sparsify, factorize, cluster, distill, finetune, qat, sensitivity
(a per-layer pruning scan that only reports). ``distill = true`` on a step
that fine-tunes makes it learn from the recipe's input model. The whole
recipe is checked before any work starts.
"""
from __future__ import annotations

import time
from pathlib import Path

from torch import nn

from ..errors import EdgekitError

ENCODINGS = ("dense", "codebook", "huffman", "sparse", "auto")


# option -> (check, description); a check returns the normalised value or raises ValueError
def _fraction(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) < 1.0:
        raise ValueError("a fraction in [0, 1)")
    return float(v)


def _energy(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < float(v) <= 1.0:
        raise ValueError("a fraction in (0, 1]")
    return float(v)


def _positive_int(v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError("an integer >= 1")
    return v


def _count(v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError("an integer >= 0")
    return v


def _positive(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not float(v) > 0:
        raise ValueError("a positive number")
    return float(v)


def _unit(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
        raise ValueError("a number in [0, 1]")
    return float(v)


def _bool(v):
    if not isinstance(v, bool):
        raise ValueError("true or false")
    return v


def _bits(v):
    if isinstance(v, bool) or not isinstance(v, int) or not 2 <= v <= 8:
        raise ValueError("an integer from 2 to 8")
    return v


def _one_of(*choices):
    def check(v):
        if v not in choices:
            raise ValueError("one of " + ", ".join(repr(c) for c in choices))
        return v
    return check


def _names(v):
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ValueError("a list of layer names")
    return list(v)


def _ratios_by_name(v):
    if not isinstance(v, dict):
        raise ValueError("a table of layer name = fraction")
    return {str(k): _fraction(x) for k, x in v.items()}


def _fractions(v):
    if not isinstance(v, list) or not v:
        raise ValueError("a non-empty list of fractions in [0, 1)")
    return [_fraction(x) for x in v]


def _path(v):
    if not isinstance(v, str):
        raise ValueError("a path to a .pt2 file")
    return v


_TRAIN = {"epochs": _count, "lr": _positive, "distill": _bool}
STEPS = {
    "prune": {"ratio": _fraction, "criterion": _one_of("l1", "l2", "apoz"), "scope": _one_of("layer", "global"),
              "layers": _ratios_by_name, "steps": _positive_int, **_TRAIN},
    "sparsify": {"sparsity": _fraction, "scope": _one_of("layer", "global"), "layers": _ratios_by_name,
                 "exclude": _names, "steps": _positive_int, **_TRAIN},
    "factorize": {"rank": _positive_int, "energy": _energy, "layers": _names, "exclude": _names, **_TRAIN},
    "cluster": {"bits": _bits, "per_channel": _bool, "epochs": _count, "lr": _positive},
    "distill": {"epochs": _positive_int, "temperature": _positive, "alpha": _unit, "lr": _positive,
                "teacher": _path},
    "finetune": dict(_TRAIN),
    "qat": {"epochs": _positive_int, "lr": _positive, "calib_samples": _positive_int, "freeze_epochs": _count,
            "distill": _bool},
    "sensitivity": {"ratios": _fractions, "criterion": _one_of("l1", "l2", "apoz"), "tolerance": _unit},
}
REQUIRED = {"prune": ("ratio",), "sparsify": ("sparsity",), "cluster": ("bits",)}
OUTPUT = {"weights": _one_of(*ENCODINGS), "encodings": lambda v: [_one_of(*ENCODINGS)(x) for x in _names(v)],
          "calib_samples": _positive_int}


def read_toml(source, what: str, shape: str) -> tuple[dict, str]:
    """A TOML table from a file path, or from text (text has a newline); also says where it came from, for
    messages. `what` names the kind of file ("recipe"), `shape` says what such a file holds."""
    import tomllib

    path = Path(source) if not (isinstance(source, str) and "\n" in source) else None
    if path is None:
        text, where = source, f"the {what}"
    else:
        if not path.exists():
            raise EdgekitError(f"{what} file not found: {path}")
        if not path.is_file():
            raise EdgekitError(f"{what} {path} is not a file ({shape})")
        try:
            text, where = path.read_text(encoding="utf-8"), str(path)
        except UnicodeDecodeError:
            raise EdgekitError(f"{what} {path} is not UTF-8 text (TOML files are UTF-8)") from None
    try:
        return tomllib.loads(text), where
    except tomllib.TOMLDecodeError as exc:
        raise EdgekitError(f"{where} is not valid TOML: {exc}") from None


def load_recipe(source) -> dict:
    """Parse and check a recipe: a .toml path, TOML text, or an already parsed dict."""
    if isinstance(source, dict):
        raw, where = source, "the recipe"
        if "steps" in raw and "step" not in raw:  # an already checked recipe: check it again
            raw = {"step": raw["steps"], **({"output": raw["output"]} if "output" in raw else {})}
    else:
        raw, where = read_toml(source, "recipe", "a .toml with [[step]] entries")
    unknown = set(raw) - {"step", "output"}
    if unknown:
        raise EdgekitError(f"{where}: unknown section(s) {', '.join(sorted(unknown))}; a recipe has [[step]] "
                           "entries and an optional [output] table")
    steps = raw.get("step", [])
    if not isinstance(steps, list) or not steps:
        raise EdgekitError(f"{where} has no steps: add [[step]] entries with kind = one of {', '.join(STEPS)}")
    checked = []
    for i, step in enumerate(steps, 1):
        if not isinstance(step, dict):
            raise EdgekitError(f"{where}: step {i} must be a table ([[step]])")
        kind = step.get("kind")
        if kind not in STEPS:
            raise EdgekitError(f"{where}: step {i} has unknown kind {kind!r}; known kinds: {', '.join(STEPS)}")
        options = {}
        for key, value in step.items():
            if key == "kind":
                continue
            if key not in STEPS[kind]:
                raise EdgekitError(f"{where}: step {i} ({kind}) has unknown option {key!r}; "
                                   f"{kind} takes: {', '.join(STEPS[kind])}")
            try:
                options[key] = STEPS[kind][key](value)
            except ValueError as exc:
                raise EdgekitError(f"{where}: step {i} ({kind}): {key} must be {exc}, got {value!r}") from None
        for key in REQUIRED.get(kind, ()):
            if key not in options:
                raise EdgekitError(f"{where}: step {i} ({kind}) needs {key}")
        if kind == "factorize" and ("rank" in options) == ("energy" in options):
            raise EdgekitError(f"{where}: step {i} (factorize) needs exactly one of rank or energy")
        checked.append({"kind": kind, **options})
    output = raw.get("output", {})
    if not isinstance(output, dict):
        raise EdgekitError(f"{where}: [output] must be a table")
    out = {"weights": "dense", "encodings": ["dense"], "calib_samples": 256}
    for key, value in output.items():
        if key not in OUTPUT:
            raise EdgekitError(f"{where}: [output] has unknown option {key!r}; it takes: {', '.join(OUTPUT)}")
        try:
            out[key] = OUTPUT[key](value)
        except ValueError as exc:
            raise EdgekitError(f"{where}: [output] {key} must be {exc}, got {value!r}") from None
    return {"steps": checked, "output": out}


def _label(i: int, step: dict) -> str:
    main = {"prune": "ratio", "sparsify": "sparsity", "cluster": "bits", "factorize": "rank"}.get(step["kind"])
    if step["kind"] == "factorize" and "energy" in step:
        main = "energy"
    return f"{i}. {step['kind']}" + (f" {step[main]:g}" if main and main in step else "")


def _run_step(step: dict, model: nn.Module, split, teacher: nn.Module, show_progress: bool):
    from .distill import distill
    from .finetune import finetune
    from .fxgraph import clone, load_model
    from .lowrank import factorize
    from .prune import prune, sensitivity
    from .qat import qat
    from .sparsify import sparsify

    opts = {k: v for k, v in step.items() if k != "kind"}
    kind = step["kind"]
    use_teacher = teacher if opts.pop("distill", False) else None
    common = dict(show_progress=show_progress)
    if kind == "prune":
        return prune(model, opts.pop("ratio"), data=split, teacher=use_teacher, **opts, **common), None
    if kind == "sparsify":
        return sparsify(model, opts.pop("sparsity"), data=split, teacher=use_teacher, **opts, **common), None
    if kind == "factorize":
        return factorize(model, data=split, teacher=use_teacher, **opts, **common), None
    if kind == "cluster":
        from .cluster import cluster  # k-means weight sharing with codebooks
        return cluster(model, opts.pop("bits"), data=split, **opts, **common), None
    if kind == "distill":
        path = opts.pop("teacher", None)
        t = load_model(path)[0] if path else teacher
        return distill(model, t, split, **opts, **common), None
    if kind == "finetune":
        return finetune(clone(model), split, epochs=opts.get("epochs", 3), lr=opts.get("lr", 3e-3),
                        teacher=use_teacher, **common), None
    if kind == "qat":
        return qat(model, split, teacher=use_teacher, **opts, **common), None
    if kind == "sensitivity":
        return model, sensitivity(model, split, **opts, **common)
    raise EdgekitError(f"internal: unhandled recipe step {kind!r}")


def _check_model(model: nn.Module, recipe: dict, split) -> None:
    """Fail before any training: the pruner must follow the model's channels (when the recipe prunes),
    and edgekit must be able to convert the model."""
    import torch

    from .report import float_graph

    if any(s["kind"] in ("prune", "sensitivity") for s in recipe["steps"]):
        from .prune import analyse
        analyse(model, torch.as_tensor(split.x_train[:1]))
    float_graph(model, split.x_train[:1])


def run_recipe(model: nn.Module, recipe, data, *, sample_shape=None, build_dir=None, deploy: bool = True,
               show_progress: bool = True, log=print, on_step=None) -> tuple[nn.Module, dict]:
    """Run a recipe on ``model`` with ``data``. Returns (compressed model, report).

    The report has one entry per step (parameters, MACs, weight bytes by encoding, held-out accuracy
    in float and int8) and, with ``deploy``, the final model's C program built and run on the host
    (its accuracy measured from the C outputs, compared with the reference executor).
    ``on_step(index, step, model)`` sees the model after each step."""
    import tempfile

    from . import report as rep
    from .data import prepare
    from .fxgraph import clone

    recipe = load_recipe(recipe)
    split = prepare(data, model, sample_shape)
    _check_model(model, recipe, split)
    out = recipe["output"]
    teacher = clone(model).eval()
    measure = dict(calib_samples=out["calib_samples"], encodings=out["encodings"])
    result = {"data": split.name, "samples": {"train": len(split.x_train), "test": len(split.x_test)},
              "recipe": recipe, "steps": []}
    log("measuring the input model")
    result["steps"].append({"label": "0. input", "kind": "input", **rep.measure(model, split, **measure)})
    current = model
    for i, step in enumerate(recipe["steps"], 1):
        label = _label(i, step)
        log(f"==> {label}")
        start = time.perf_counter()
        current, scan = _run_step(step, current, split, teacher, show_progress)
        entry = {"label": label, "kind": step["kind"], "options": {k: v for k, v in step.items() if k != "kind"},
                 "seconds": round(time.perf_counter() - start, 2)}
        if scan is not None:
            entry["sensitivity"] = scan
        else:
            entry.update(rep.measure(current, split, **measure))
        result["steps"].append(entry)
        if on_step is not None:
            on_step(i, step, current)
    if deploy:
        log(f"==> generate, build and run the final model as C ({out['weights']} weights)")
        if build_dir is None:
            with tempfile.TemporaryDirectory() as tmp:
                result["final"] = rep.deploy(current, split, Path(tmp) / "c", weights=out["weights"],
                                             calib_samples=out["calib_samples"])
                result["final"]["project"] = None
        else:
            result["final"] = rep.deploy(current, split, build_dir, weights=out["weights"],
                                         calib_samples=out["calib_samples"])
    return current.eval(), result
