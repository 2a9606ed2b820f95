"""Proofs run at generate time, before any C is written.

``check_int8_arithmetic`` bounds every int32 intermediate of every int8
kernel from the actual weights, biases and parameters, and refuses the model
(naming the layer) when one could overflow: generated code never relies on
wrapping arithmetic, which C leaves undefined.
"""
from __future__ import annotations

import numpy as np

from ..errors import EdgekitError
from ..ir import Graph, nhwc

LIMIT = (1 << 31) - 1
# The requantized value is at most |acc << left| (multiplier < 2^31), and the kernels add the output
# offset (|offset| <= 128) to it in int32 before clamping: an accumulator keeps room for it.
ACCUMULATOR_LIMIT = LIMIT - 128


def _max_abs_input(offset: int) -> int:
    """Largest |q + offset| over int8 q."""
    return max(abs(-128 + offset), abs(127 + offset))


def accumulator_bounds(graph: Graph, op) -> np.ndarray:
    """Per output channel, the largest |accumulator| (or partial sum) a weighted layer can reach, in
    either order the kernels sum in (see below): sum|w| * (128 + |input offset|) + |bias|."""
    w = graph.tensors[op.inputs[1]].data.astype(np.int64)
    bias = graph.tensors[op.inputs[2]].data.astype(np.int64) if len(op.inputs) > 2 else 0
    x = 128 + abs(int(op.attrs["input_offset"]))  # >= max|q + offset| over int8 q
    if op.kind == "depthwise_conv2d":
        per_channel = np.abs(w).reshape(-1, w.shape[3]).sum(axis=0)
    else:
        per_channel = np.abs(w).reshape(w.shape[0], -1).sum(axis=1)
    return per_channel * x + np.abs(bias)


# The reference (and the encoded-filter kernels) sum bias + sum(w * (q + offset)): every partial
# sum is within |bias| + sum|w| * max|q + offset|. The Cortex-M DSP and other dense kernels fold
# the input offset into the bias (codegen/kernel_prep.py: folded_bias = bias + offset * sum(w)) and
# sum w * q, q the int8 input
# (or, for a padded tap, the zero point, also int8), in one of two orders:
# - from zero, the bias added last (the portable ek_conv2d_s8 / ek_fully_connected_s8):
#   partial sums |sum(w * q) over some taps| <= 128 * sum|w|, then the folded bias;
# - from the folded bias (the DSP ek_conv2d_s8, ek_fully_connected_s8 and ek_depthwise_conv2d_s8):
#   partial sums |folded_bias + sum(w * q) over some taps| <= |bias| + (|offset| + 128) * sum|w|.
# max|q + offset| can be |offset| + 127 (offset > 0), one sum|w| less than the second order needs,
# so accumulator_bounds takes 128 + |offset|: this one bound proves the reference order and both
# folded ones (and the final sum, the same integer in every order). ek_conv2d_s8_4x2 and
# ek_fully_connected_s8_rows4 sum modulo 2^32 in parts that are exact on their own (their templates)
# and need only the final sum to fit; the 4x2 kernel keeps it doubled, so it takes a layer only when
# every |accumulator| < 2^30 (kernel_prep.conv_4x2_small).


def check_int8_arithmetic(graph: Graph) -> None:
    for op in graph.ops:
        where = f"layer '{op.name}' ({op.kind})"
        if op.kind in ("conv2d", "depthwise_conv2d", "fully_connected", "transpose_conv2d"):
            bound = accumulator_bounds(graph, op)
            left = np.maximum(op.attrs["shift"].astype(np.int64), 0)
            worst = bound << left
            if np.any(worst > ACCUMULATOR_LIMIT):
                c = int(np.argmax(worst))
                raise EdgekitError(
                    f"{where}: output channel {c} can reach an int32 accumulator of {int(worst[c]):,} "
                    f"(limit {ACCUMULATOR_LIMIT:,}); its reduction is too long or its weights/bias too large for int8 "
                    "inference. Split the layer, or retrain with weight decay.")
        elif op.kind == "mean":
            shape = nhwc(graph.tensors[op.inputs[0]].shape)
            bound = shape[1] * shape[2] * _max_abs_input(op.attrs["input_offset"])
            if bound << max(op.attrs["shift"], 0) > ACCUMULATOR_LIMIT:  # then requantized, offset added
                raise EdgekitError(f"{where}: the sum over {shape[1]}x{shape[2]} positions can overflow int32")
        elif op.kind == "reduce_mean":
            bound = op.attrs["count"] * _max_abs_input(op.attrs["input_offset"])
            if bound << max(op.attrs["shift"], 0) > ACCUMULATOR_LIMIT:
                raise EdgekitError(f"{where}: the sum over {op.attrs['count']} values can overflow int32")
        elif op.kind == "avg_pool2d":
            kh, kw = op.attrs["kernel"]
            if kh * kw * 256 > LIMIT:
                raise EdgekitError(f"{where}: the {kh}x{kw} window is too large for an int32 sum")
        elif op.kind == "mul":
            worst = 255 * 255 << max(op.attrs["output_shift"], 0)
            if worst > ACCUMULATOR_LIMIT:
                raise EdgekitError(f"{where}: the product can overflow int32 after the requantization shift "
                                   f"({op.attrs['output_shift']}); the output scale is too small for its inputs")
        elif op.kind == "batch_matmul":
            a, b = (graph.tensors[n] for n in op.inputs)
            depth = a.shape[-2] if op.attrs.get("adj_x", False) else a.shape[-1]
            worst = (depth * _max_abs_input(op.attrs["input1_offset"]) * _max_abs_input(op.attrs["input2_offset"])
                     << max(op.attrs["output_shift"], 0))
            if worst > ACCUMULATOR_LIMIT:
                raise EdgekitError(f"{where}: a dot product over {depth} terms can reach an int32 accumulator of "
                                   f"{worst:,} (limit {ACCUMULATOR_LIMIT:,}); the output scale is too small for "
                                   "its inputs or the reduction too long")
        elif op.kind == "lstm":
            # TFLite's integer LSTM sums raw int8 values (|q| <= 128) times the weights onto the
            # zero-point-folded bias, in int32, then requantizes with a possible left shift.
            for prefix, w in (("input", op.inputs[1]), ("recurrent", op.inputs[2])):
                rows = np.abs(graph.tensors[w].data.astype(np.int64)).sum(axis=1) * 128 + \
                    np.abs(op.attrs[f"{prefix}_effective_bias"].astype(np.int64))
                hidden = graph.tensors[op.inputs[2]].shape[1]
                left = np.repeat(np.maximum(op.attrs[f"{prefix}_shift"].astype(np.int64), 0), hidden)
                worst = rows << left
                if np.any(worst > LIMIT):
                    r = int(np.argmax(worst))
                    raise EdgekitError(f"{where}: the {prefix} product of gate row {r} can reach an int32 "
                                       f"accumulator of {int(worst[r]):,} (limit {LIMIT:,}); its weights or bias "
                                       "are too large for int8 inference")
            if (1 << 30) << max(op.attrs["hidden_shift"], 0) > LIMIT:
                raise EdgekitError(f"{where}: the output scale is too small for the hidden state's requantization")
        elif op.kind == "squared_difference":
            # Each input is rescaled to at most 255 * 2^7 / 2 (multiplier <= 1/2): the squared difference
            # is below 32641^2 < 2^31 before the output shift.
            worst = 32641 * 32641 << max(op.attrs["output_shift"], 0)
            if worst > ACCUMULATOR_LIMIT:
                raise EdgekitError(f"{where}: the squared difference can overflow int32 after the requantization "
                                   f"shift ({op.attrs['output_shift']}); the output scale is too small for its inputs")
        elif op.kind == "prelu":
            worst = max(255 * 255 << max(op.attrs["alpha_shift"], 0), 255 << max(op.attrs["identity_shift"], 0))
            if worst > ACCUMULATOR_LIMIT:
                raise EdgekitError(f"{where}: the negative slope times the input can overflow int32 after the "
                                   "requantization shift; the output scale is too small for its inputs")
        elif op.kind == "exit" and op.attrs["criterion"] == "margin":
            if 255 << max(op.attrs["shift"], 0) > LIMIT:
                raise EdgekitError(f"{where}: the logit margin times 256 x the logits' scale can overflow int32; "
                                   "the logits' range is too wide for the margin criterion (use softmax)")
        elif op.kind in ("softmax", "exit"):
            depth = graph.tensors[op.inputs[0]].shape[-1]
            if depth > 256:
                raise EdgekitError(f"{where}: int8 softmax over {depth} classes is not supported (at most 256: "
                                   "the fixed-point sum of exponentials needs the headroom)")
