"""The search space of `edgekit tune`: which compression choices a trial draws, and the recipe they make.

    [space]                        # each key: the list of values the search may pick from
    prune_ratio = [0.0, 0.5, 0.6]  # structured pruning (0 = no pruning step)
    prune_criterion = ["l1", "apoz"]
    prune_scope = ["layer", "global"]
    sparsity = [0.0, 0.8, 0.9]     # unstructured magnitude pruning (0 = none)
    cluster_bits = [0, 4]          # k-means weight sharing (0 = none)
    distill = [true, false]        # fine-tune on the input model's outputs
    qat = [false, true]            # quantization-aware training at the end
    weights = ["dense", "auto"]    # flash encodings of the generated C: each one measured on every trial
    exit_threshold = [0.9, 0.99]   # a model with early exits: each one measured on every trial

    [space.prune_layers]           # per-layer pruning ratios, replacing prune_ratio for these layers
    conv1 = [0.25, 0.5]

    [train]                        # the training budget of every trial (not searched)
    prune_steps = 3
    prune_epochs = 8

``weights`` and ``exit_threshold`` are not drawn: a weight encoding is lossless (the same outputs bit for bit), so every trial's
model is trained once and then generated, built and measured with each encoding of the list; each is a
point of its own on the Pareto front (Huffman: the least flash, codebook: a few times fewer instructions).
An early-exit threshold is a run-time setting of the same program: a model with early exits (``edgekit
exits``) is compressed without them, gets heads trained for the compressed network (``exit_epochs``),
and every encoding is run at every threshold (accuracy from the C's answering exits, instructions the
mean over the held-out split, each input counted at its exit); a model without exits ignores the list.

The defaults depend on the model where a measurement said so (``CONV_DEFAULTS``: lower sparsities for
a model with convolutions). A TOML file overrides the defaults key by key (a key left out keeps its default list); a list of
one value fixes that choice. Every value is checked with the recipe's own checks before any trial
runs, so a typo fails at once, not in the middle of a search.
"""
from __future__ import annotations

from ..errors import EdgekitError
from ..compress import recipe as rc

# The default space holds the hand recipes' choices (bench/recipes/*.toml: pruning 0.5-0.6 by APoZ or L1,
# sparsity 0.5-0.9, 4-bit clusters, distillation) and their neighbours on both sides, so a default search
# can find them and what beats them; "global" scope lets the pruner spend the ratio unevenly across layers.
DEFAULT_SPACE = {
    "prune_ratio": [0.0, 0.25, 0.4, 0.5, 0.6, 0.7, 0.8],
    "prune_criterion": ["l1", "apoz"],
    "prune_scope": ["layer", "global"],
    "sparsity": [0.0, 0.5, 0.7, 0.8, 0.9, 0.95],
    "cluster_bits": [0, 3, 4, 5, 6],
    "distill": [True, False],
    "qat": [False, True],
    "weights": ["dense", "codebook", "sparse", "huffman", "auto"],
    "exit_threshold": [0.8, 0.9, 0.95, 0.99],
}
# A model with convolutions searches lower sparsities: a conv layer has few weights, each used at every
# position, and one global magnitude threshold takes the small-valued layers first. Measured on the demo
# CNN (99.17 %, seed 0): global sparsity 0.95 leaves conv2 without a single weight (10.3 % after 3 x 8
# distilled epochs, chance level: nothing to fine-tune), 0.9 keeps 0.8 % of conv2 and 91.7 %; the hand
# recipe cnn_structured.toml uses 0.5. (QAT was suspected too; measured alone and after clustering,
# sparsity 0.5, pruning 0.5 / 0.7 on that CNN it keeps the int8 accuracy: not narrowed.)
CONV_DEFAULTS = {"sparsity": [0.0, 0.3, 0.5, 0.7]}
# Measured on every trial, not drawn by the sampler (see the module's docstring).
MEASURED = ("weights", "exit_threshold")

# The first trials of a search: the hand recipes' choices, where the space holds them (a user's space may
# not). The sampler then learns around points known to work instead of starting from random ones.
ANCHORS = [
    {"prune_ratio": 0.6, "prune_criterion": "l1", "prune_scope": "layer", "sparsity": 0.9, "cluster_bits": 4,
     "distill": True, "qat": False},         # bench/recipes/mlp_deep_compression.toml
    {"prune_ratio": 0.5, "prune_criterion": "apoz", "prune_scope": "layer", "sparsity": 0.5, "cluster_bits": 4,
     "distill": True, "qat": False},         # bench/recipes/cnn_structured.toml
]

DEFAULT_TRAIN = {
    "prune_steps": 3, "prune_epochs": 8,
    "sparsify_steps": 3, "sparsify_epochs": 8,
    "cluster_epochs": 5,
    "qat_epochs": 3,
    "exit_epochs": 10,
    "lr": 3e-3,
    "calib_samples": 300,
}


def _exit_threshold(v):
    if isinstance(v, str) and v.strip().lower() == "off":
        return "off"
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < float(v) <= 1.0:
        raise ValueError('a probability in (0, 1] or "off"')
    return float(v)


def _zero_or(check):
    def checked(v):
        if v == 0 and not isinstance(v, bool):
            return 0
        return check(v)
    return checked


# key -> (check of one value, what it must be)
_VALUE = {
    "prune_ratio": rc._fraction,
    "prune_criterion": rc._one_of("l1", "l2", "apoz"),
    "prune_scope": rc._one_of("layer", "global"),
    "sparsity": rc._fraction,
    "cluster_bits": _zero_or(rc._bits),
    "distill": rc._bool,
    "qat": rc._bool,
    "weights": rc._one_of(*rc.ENCODINGS),
    "exit_threshold": lambda v: _exit_threshold(v),
}
_TRAIN = {
    "prune_steps": rc._positive_int, "prune_epochs": rc._count,
    "sparsify_steps": rc._positive_int, "sparsify_epochs": rc._count,
    "cluster_epochs": rc._count, "qat_epochs": rc._positive_int, "exit_epochs": rc._positive_int,
    "lr": rc._positive, "calib_samples": rc._positive_int,
}


def load_space(source=None, convolutional: bool = False) -> dict:
    """The checked space: the defaults (CONV_DEFAULTS in place of theirs for a ``convolutional`` model),
    overridden by a TOML file / text / dict when given.
    Returns {"space": {key: [values]}, "prune_layers": {layer: [ratios]}, "train": {...}}."""
    where = "the search space"
    raw: dict = {}
    if isinstance(source, dict):
        raw = source
    elif source is not None:
        raw, where = rc.read_toml(source, "search space", "a .toml with a [space] table")
    unknown = set(raw) - {"space", "train"}
    if unknown:
        raise EdgekitError(f"{where}: unknown section(s) {', '.join(sorted(unknown))}; a search space has a "
                           "[space] table (lists of values to search) and an optional [train] table")
    given = dict(raw.get("space", {}))
    layers_raw = given.pop("prune_layers", {})
    space = {k: list(v) for k, v in {**DEFAULT_SPACE, **(CONV_DEFAULTS if convolutional else {})}.items()}
    for key, values in given.items():
        if key not in _VALUE:
            raise EdgekitError(f"{where}: [space] has unknown key {key!r}; it takes: {', '.join(_VALUE)}, "
                               "prune_layers")
        space[key] = _check_list(where, f"[space] {key}", values, _VALUE[key])
    if not isinstance(layers_raw, dict):
        raise EdgekitError(f"{where}: [space.prune_layers] must be a table of layer name = [ratios]")
    prune_layers = {str(name): _check_list(where, f"[space.prune_layers] {name}", values, rc._fraction)
                    for name, values in layers_raw.items()}
    train = dict(DEFAULT_TRAIN)
    for key, value in raw.get("train", {}).items():
        if key not in _TRAIN:
            raise EdgekitError(f"{where}: [train] has unknown key {key!r}; it takes: {', '.join(_TRAIN)}")
        try:
            train[key] = _TRAIN[key](value)
        except ValueError as exc:
            raise EdgekitError(f"{where}: [train] {key} must be {exc}, got {value!r}") from None
    return {"space": space, "prune_layers": prune_layers, "train": train}


def _check_list(where: str, what: str, values, check) -> list:
    if not isinstance(values, list) or not values:
        raise EdgekitError(f"{where}: {what} must be a non-empty list of values to search")
    out = []
    for v in values:
        try:
            out.append(check(v))
        except ValueError as exc:
            raise EdgekitError(f"{where}: {what}: each value must be {exc}, got {v!r}") from None
    return out


def is_convolutional(model) -> bool:
    """Whether the model has a convolution (a weight of 3 or more dimensions): it gets CONV_DEFAULTS."""
    return any(p.dim() >= 3 for p in model.parameters())


def check_layers(space: dict, prunable: list[str]) -> None:
    """Per-layer ratios must name layers the pruner can shrink (before any trial runs)."""
    unknown = [name for name in space["prune_layers"] if name not in prunable]
    if unknown:
        raise EdgekitError(f"the search space's [space.prune_layers] names {', '.join(unknown)}, which the model "
                           f"has no prunable layer of; prunable layers: {', '.join(prunable) or 'none'}")


def parameters(space: dict) -> dict:
    """Every searched parameter name -> its list of values (per-layer ratios as prune_layer.<name>); the
    MEASURED choices (weight encodings) are not searched."""
    params = {k: v for k, v in space["space"].items() if k not in MEASURED}
    for name, values in space["prune_layers"].items():
        params[f"prune_layer.{name}"] = values
    return params


def anchors(space: dict) -> list[dict]:
    """The ANCHORS the space can express (every value among its choices; per-layer ratios: their first)."""
    params = parameters(space)
    out = []
    for anchor in ANCHORS:
        point = {k: v for k, v in anchor.items() if k in params}
        if all(v in params[k] for k, v in point.items()):
            point.update({k: v[0] for k, v in params.items() if k not in point})
            if point not in out:
                out.append(point)
    return out


def to_recipe(config: dict, space: dict, weights: str | None = None) -> dict:
    """The recipe (``compress.recipe`` format, checked) one trial's choices make, with ``weights`` (default:
    the config's, else the space's first encoding) as its output encoding."""
    t = space["train"]
    steps = []
    layers = {k.split(".", 1)[1]: v for k, v in config.items() if k.startswith("prune_layer.")}
    distill = bool(config.get("distill", False))
    if config.get("prune_ratio", 0) > 0 or any(v > 0 for v in layers.values()):
        step = {"kind": "prune", "ratio": config.get("prune_ratio", 0.0),
                "criterion": config.get("prune_criterion", "l1"), "scope": config.get("prune_scope", "layer"),
                "steps": t["prune_steps"], "epochs": t["prune_epochs"], "lr": t["lr"], "distill": distill}
        if layers:
            step["layers"] = layers
        steps.append(step)
    if config.get("sparsity", 0) > 0:
        steps.append({"kind": "sparsify", "sparsity": config["sparsity"], "scope": "global",
                      "steps": t["sparsify_steps"], "epochs": t["sparsify_epochs"], "lr": t["lr"],
                      "distill": distill})
    if config.get("cluster_bits", 0):
        steps.append({"kind": "cluster", "bits": config["cluster_bits"], "epochs": t["cluster_epochs"]})
    if config.get("qat", False):
        steps.append({"kind": "qat", "epochs": t["qat_epochs"], "calib_samples": t["calib_samples"],
                      "distill": distill})
    if not steps:  # nothing chosen: the input model, quantized as it is (a finetune of 0 epochs changes nothing)
        steps.append({"kind": "finetune", "epochs": 0})
    weights = weights or config.get("weights") or space["space"]["weights"][0]
    return rc.load_recipe({"step": steps, "output": {"weights": weights, "encodings": [weights],
                                                      "calib_samples": t["calib_samples"]}})


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_value(str(k))} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"no TOML form for {v!r}")


def recipe_toml(recipe: dict, comment: str = "") -> str:
    """A checked recipe as TOML text that `edgekit compress --recipe` reads back to the same recipe."""
    lines = [f"# {line}" for line in comment.splitlines()] + ([""] if comment else [])
    for step in recipe["steps"]:
        lines.append("[[step]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in step.items()]
        lines.append("")
    lines.append("[output]")
    lines += [f"{k} = {_toml_value(v)}" for k, v in recipe["output"].items()]
    return "\n".join(lines) + "\n"
