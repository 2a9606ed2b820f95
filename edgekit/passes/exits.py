"""Early exits in the IR: the ordering, the integer exit decisions, and what the device returns.

A multi-exit graph (``edgekit.add_exits``) has one output per exit, the early
exits in the order they are met and the final classifier last;
``graph.meta["exits"]["names"]`` names them in that order. After quantization,
``prepare_exits`` orders the ops so each exit's head runs right after the
backbone layers it needs, and puts an ``exit`` op right after each early
head. An ``exit`` op reads the head's int8 logits and writes its *confidence*,
an int32 in units of 1/256:

- ``softmax``: the largest probability of TFLite's int8 softmax (output scale
  1/256, zero point -128) plus 128, so 0..255 means 0/256..255/256;
- ``margin``: the top logit minus the runner-up, in int8 steps, times the
  logits' scale, in 1/256 logit units (an integer multiplier and shift fixed
  at generate time, TFLite's MultiplyByQuantizedMultiplier).

At run time the device compares each exit's confidence with that exit's int32
threshold (same units; one threshold per early exit, or one for all) and stops at
the first exit with ``confidence >= threshold``; an exit whose threshold is
``EXITS_OFF`` skips its head altogether, and all of them off is the plain network.
With ``temperatures`` (one per early exit, fitted on training data by
``compress.exits.fit_temperatures``) the softmax confidence is that of
``softmax(logits / T)``: 1/T is TFLite's softmax beta, folded into the integer
input multiplier, so the C and the reference still compute the same integers. The
numpy reference (``run_exits``) and the C agree on the exit index and on every
output: an evaluated exit's output holds its logits, an exit the device did
not reach (or skipped) holds its zero point, i.e. real 0.0.
"""
from __future__ import annotations

import numpy as np

from .. import quant_math as qm
from .. import reference
from ..errors import EdgekitError
from ..ir import Graph, Op, QuantParams, Tensor

CRITERIA = ("softmax", "margin")
CONFIDENCE_ONE = 256  # confidences and thresholds are integers in units of 1/256
EXITS_OFF = (1 << 31) - 1  # the threshold that turns early exits off: their heads are not computed


def exit_names(graph: Graph) -> list[str] | None:
    """The exits' names, early exits in order and the final one last; None for a plain model."""
    info = graph.meta.get("exits")
    return list(info["names"]) if info else None


def num_early_exits(graph: Graph) -> int:
    names = exit_names(graph)
    return len(names) - 1 if names else 0


def threshold_to_int(threshold) -> int:
    """A threshold in real units (a probability for ``softmax``, logits for ``margin``), or "off" /
    None for no early exits, as the device's integer (units of 1/256)."""
    if threshold is None or (isinstance(threshold, str) and threshold.strip().lower() in ("off", "none")):
        return EXITS_OFF
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise EdgekitError(f"the exit threshold must be a number (e.g. 0.9) or 'off', got {threshold!r}") from None
    if not np.isfinite(value) or value < 0:
        raise EdgekitError(f"the exit threshold must be a non-negative number or 'off', got {threshold!r}")
    scaled = int(np.floor(value * CONFIDENCE_ONE + 0.5))
    return min(scaled, EXITS_OFF - 1)


def threshold_to_real(raw):
    """The real threshold(s) of a device integer or a list of them (None: off)."""
    if isinstance(raw, (list, tuple)):
        return [threshold_to_real(r) for r in raw]
    return None if raw == EXITS_OFF else raw / CONFIDENCE_ONE


def thresholds_to_ints(threshold, count: int) -> list[int]:
    """One device integer per early exit from one threshold for all of them (a number, "off"), a list with
    one per exit, or a comma-separated string of either."""
    if isinstance(threshold, str) and "," in threshold:
        threshold = [t.strip() for t in threshold.split(",")]
    if isinstance(threshold, (list, tuple, np.ndarray)):
        values = [threshold_to_int(t) for t in threshold]
        if len(values) == 1:
            return values * count
        if len(values) != count:
            raise EdgekitError(f"{len(values)} exit thresholds for {count} early exits: give one for all of them "
                               f"or one per early exit")
        return values
    return [threshold_to_int(threshold)] * count


def as_raw(values: list[int]):
    """A list of per-exit integers as stored and shown: one int when they are all the same."""
    values = [int(v) for v in values]
    return values[0] if len(set(values)) == 1 else values


def device_thresholds(threshold, count: int):
    """A threshold as the device takes it: one integer for every early exit, or a list with one per exit."""
    return as_raw(thresholds_to_ints(threshold, count))


def per_exit_thresholds(threshold, count: int) -> np.ndarray:
    if isinstance(threshold, (list, tuple, np.ndarray)):
        if len(threshold) != count:
            raise EdgekitError(f"{len(threshold)} exit thresholds for {count} early exits")
        return np.asarray(threshold, dtype=np.int64)
    return np.full(count, int(threshold), np.int64)


def set_exit_names(graph: Graph, names) -> None:
    """Mark ``graph`` as a multi-exit model whose outputs are the exits ``names`` (final last)."""
    names = [str(n) for n in names]
    if len(names) != len(graph.outputs):
        raise EdgekitError(f"the model has {len(graph.outputs)} outputs but {len(names)} exit names ({names})")
    if len(names) < 2:
        raise EdgekitError("a multi-exit model needs at least one early exit and the final classifier")
    for name, out in zip(names, graph.outputs):
        shape = graph.tensors[out].shape
        if len(shape) != 2 or shape[1] < 2:
            raise EdgekitError(f"exit '{name}' returns shape {list(shape)}; an exit must return class scores "
                               "of shape (N, classes) with at least 2 classes")
    graph.meta["exits"] = {"names": names}


# ---------------------------------------------------------------------------
# Ordering and decisions (on the quantized graph)
# ---------------------------------------------------------------------------

def _ancestors(graph: Graph, tensor: str, producers: dict[str, Op]) -> set[int]:
    """ids of the ops ``tensor`` depends on."""
    seen: set[int] = set()
    stack = [tensor]
    while stack:
        op = producers.get(stack.pop())
        if op is None or id(op) in seen:
            continue
        seen.add(id(op))
        stack.extend(op.inputs)
    return seen


def order_for_exits(graph: Graph) -> list[list[Op]]:
    """The ops grouped per exit, in run order: group k holds what exit k needs that earlier exits did not
    (each group in the original, topological order). The final group also holds any op no exit needs."""
    producers = graph.producers()
    emitted: set[int] = set()
    groups = []
    for out in graph.outputs:
        needed = _ancestors(graph, out, producers)
        group = [op for op in graph.ops if id(op) in needed and id(op) not in emitted]
        emitted.update(id(op) for op in group)
        groups.append(group)
    groups[-1].extend(op for op in graph.ops if id(op) not in emitted)
    return groups


def decision_attrs(criterion: str, logits: Tensor, temperature: float = 1.0) -> dict:
    """The integer parameters of one exit decision, from the logits' quantization (and the exit's
    temperature: softmax(logits / T) is TFLite's softmax with beta = 1 / T)."""
    if not (np.isfinite(temperature) and temperature > 0):
        raise EdgekitError(f"an exit temperature must be a positive number, got {temperature!r}")
    scale = float(np.float32(logits.quant.scale[0])) / float(temperature)
    if criterion == "softmax":
        # TFLite's softmax Prepare, as for a softmax op on these logits with beta = 1 / T.
        integer_bits = 5
        real = min(float(np.float32(scale)) * (1 << (31 - integer_bits)), float((1 << 31) - 1))
        m, left_shift = qm.quantize_multiplier_greater_than_one(real)
        max_rescaled = 1.0 * ((1 << integer_bits) - 1) * (1 << (31 - integer_bits)) / (1 << left_shift)
        return dict(criterion="softmax", input_multiplier=m, input_left_shift=left_shift,
                    diff_min=-int(np.floor(max_rescaled)))
    if criterion == "margin":
        m, s = qm.quantize_multiplier(float(np.float32(scale)) * CONFIDENCE_ONE)
        return dict(criterion="margin", multiplier=m, shift=s)
    raise EdgekitError(f"unknown exit criterion {criterion!r}: choose one of {', '.join(CRITERIA)}")


def prepare_exits(graph: Graph, criterion: str = "softmax", temperatures=None) -> Graph:
    """Order a quantized multi-exit graph for early exits and insert its ``exit`` ops (in place).
    ``temperatures``: one per early exit (default: the model's own, ``graph.meta["exits"]["temperatures"]``,
    else 1)."""
    names = exit_names(graph)
    if not names or graph.meta["exits"].get("criterion"):
        return graph
    if criterion not in CRITERIA:
        raise EdgekitError(f"unknown exit criterion {criterion!r}: choose one of {', '.join(CRITERIA)}")
    if temperatures is None:
        temperatures = graph.meta["exits"].get("temperatures") or [1.0] * (len(names) - 1)
    temperatures = [float(t) for t in temperatures]
    if len(temperatures) != len(names) - 1:
        raise EdgekitError(f"{len(temperatures)} exit temperatures for {len(names) - 1} early exits")
    groups = order_for_exits(graph)
    ops: list[Op] = []
    confidences = []
    for k, (name, out, group) in enumerate(zip(names, graph.outputs, groups)):
        ops.extend(group)
        if k == len(names) - 1:
            break
        conf = graph.unique_name(f"exit{k}_confidence")
        graph.add_tensor(Tensor(conf, (1, 1), "int32", None, QuantParams.per_tensor(1.0 / CONFIDENCE_ONE, 0)))
        attrs = decision_attrs(criterion, graph.tensors[out], temperatures[k])
        attrs.update(exit=k, temperature=temperatures[k])
        ops.append(Op("exit", f"exit {k} ({name})", [out], [conf], attrs))
        confidences.append(conf)
    graph.ops = ops
    graph.meta["exits"] = {**graph.meta["exits"], "criterion": criterion, "confidences": confidences,
                           "temperatures": temperatures}
    return graph


def head_only_ops(graph: Graph) -> set[int]:
    """ids of the ops the final exit does not need: the early heads and the exit decisions, skipped
    when early exits are off."""
    if not exit_names(graph):
        return set()
    needed = _ancestors(graph, graph.outputs[-1], graph.producers())
    return {id(op) for op in graph.ops if id(op) not in needed}


def head_exits(graph: Graph) -> dict[int, tuple[int, ...]]:
    """Per head-only op (by id): the early exits that need it, which is the exit it belongs to (an op two
    heads share runs while either is on). The device skips it when all of them are off."""
    producers = graph.producers()
    heads = head_only_ops(graph)
    users: dict[int, list[int]] = {i: [] for i in heads}
    for k, out in enumerate(graph.outputs[:-1]):
        for i in _ancestors(graph, out, producers) & heads:
            users[i].append(k)
    for op in graph.ops:
        if op.kind == "exit":
            users[id(op)] = [op.attrs["exit"]]
    return {i: tuple(sorted(set(ks))) for i, ks in users.items()}


# ---------------------------------------------------------------------------
# What the device computes, in numpy
# ---------------------------------------------------------------------------

def confidences(graph: Graph, values: dict) -> np.ndarray:
    """(N, early exits) int64 confidences from a ``reference.run(..., keep=True)``."""
    names = graph.meta["exits"]["confidences"]
    return np.stack([values[n].reshape(-1).astype(np.int64) for n in names], axis=1)


def exit_index(conf: np.ndarray, threshold) -> np.ndarray:
    """Per sample, the first early exit whose confidence reaches its threshold (one for all exits or one per
    exit; an exit at ``EXITS_OFF`` never answers), else the final one."""
    n, k = conf.shape
    t = per_exit_thresholds(threshold, k)
    fired = (conf >= t[None, :]) & (t != EXITS_OFF)[None, :]
    return np.where(fired.any(axis=1), fired.argmax(axis=1), k)


def device_outputs(graph: Graph, values: dict, index: np.ndarray, threshold) -> list[np.ndarray]:
    """The outputs as the device leaves them: logits up to the answering exit, zero points after it
    (and for the early exits that are off: their heads were not computed)."""
    t = per_exit_thresholds(threshold, len(graph.outputs) - 1)
    outs = []
    for j, name in enumerate(graph.outputs):
        y = values[name].copy()
        unreached = index < j
        if j < len(graph.outputs) - 1 and t[j] == EXITS_OFF:
            unreached[:] = True
        y[unreached] = np.int8(graph.tensors[name].quant.zero_point[0])
        outs.append(y)
    return outs


def run_exits(graph: Graph, x: np.ndarray, threshold) -> tuple[list[np.ndarray], np.ndarray]:
    """The numpy reference of a multi-exit int8 graph at integer threshold(s) (one for all early exits, or a
    list with one per exit): (outputs, exit index)."""
    if not graph.meta.get("exits", {}).get("criterion"):
        raise EdgekitError("this graph has no exit decisions: quantize the multi-exit model first")
    values = reference.run(graph, x, keep=True)
    index = exit_index(confidences(graph, values), threshold)
    return device_outputs(graph, values, index, threshold), index
