"""Quantized graph -> a C project: weights, a straight-line model, kernels, board files.

Python decides everything here (kernel per layer, parameters, arena offsets,
which files a board needs); the templates only lay the decisions out as C.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import cost
from ..boards import PROJECT_BOARD_FILE, Board, resolve_board
from ..errors import EdgekitError
from ..ir import Graph, Op, nhwc
from ..ir_io import save_graph
from ..passes.exits import as_raw, exit_names, head_exits, head_only_ops, thresholds_to_ints, threshold_to_real
from ..passes.verify import check_int8_arithmetic
from .kernel_prep import (add_tables, conv_4x2_chosen, conv_4x2_layout, conv_4x2_pairs, conv_4x2_scratch,
                          conv_4x2_scratch_cap, conv_blocks_outer, conv_tile_group, depthwise_dsp_records,
                          depthwise_dsp_shapes, depthwise_dsp_takes_records, depthwise_dsp_unrolled,
                          dsp_fallbacks_unused, fc_rows4_layers, fc_rows4_records, folded_bias, int16_pairs_exact,
                          pack_conv_pairs, pack_conv_tile, pack_fc_pairs, pack_fc_rows4, scratch_bytes, sdot_narrow,
                          sdot_widened_c, x86_conv_filter, x86_u8_bias)
from .memory_plan import MemoryPlan, describe, plan_with_report
from .render import TEMPLATES, render_to
from .weights import FILTER_ENCODINGS, WEIGHT_CHOICES, CArray, EncodedFilter, encode, encode_filter

PROJECT_FILE = "edgekit_project.json"
_WEIGHTED = ("conv2d", "depthwise_conv2d", "fully_connected")
FLT_MAX = 3.402823466e38
# Cortex-M flash: a kernel whose layers do less than this share of the model's work is "cold": it is
# built for size (-Os) and from its portable source rather than the board's faster, larger variant.
COLD_SHARE = 0.01
# Work of a layer for that share: its MACs plus this many per element it reads or writes (an elementwise
# layer's requantization costs about as much per element as a dozen or more MACs).
ELEMENT_WORK = 16


@dataclass
class Buffer:
    """A tensor in the arena, as the template addresses it."""

    tensor: str
    offset: int  # in elements of the arena's element type
    size: int  # elements


@dataclass
class Layer:
    index: int
    id: str  # C identifier prefix
    name: str  # source layer name
    kind: str
    kernel: str | None  # e.g. "ek_conv2d_s8"; None when the op needs no code (reshape)
    inputs: list[Buffer]
    outputs: list[Buffer]
    dims: dict = field(default_factory=dict)  # name -> (n, h, w, c)
    params: dict = field(default_factory=dict)
    arrays: dict = field(default_factory=dict)  # role -> C array name
    macs: int = 0
    encoding: str = "dense"  # how a weighted layer's filter is stored (codegen.weights)
    weights: dict = field(default_factory=dict)  # an encoded filter's C descriptor: field -> array name or number
    head_only: bool = False  # only an early exit needs it: skipped when early exits are off
    head_exits: tuple = ()  # a head-only layer runs when one of these early exits is on
    head_begin: bool = False  # the first / last of a run of head-only layers (one `if` around the run)
    head_end: bool = False
    split: str | None = None  # with threads: how the output is shared, "rows" / "flat" / "channels" (thread_split)
    band: dict | None = None  # a residual block run in row bands (memory_plan.BandGroup): its first layer holds
    #                           the loop ("first"), the other two only their constants


def c_identifier(text: str) -> str:
    ident = re.sub(r"[^0-9A-Za-z_]", "_", text).strip("_") or "layer"
    return ident[:40]


def _dims(shape) -> tuple[int, int, int, int]:
    """What a kernel sees: every activation as NHWC; (1, L, C) is (1, 1, L, C) (ir.nhwc)."""
    return nhwc(shape)


def filter_rows(graph: Graph, op: Op) -> np.ndarray:
    """A weighted layer's int8 weights as rows, one per output channel, each in the
    order its kernel reads them (a depthwise row: the output channel's taps)."""
    w = graph.tensors[op.inputs[1]].data
    if op.kind == "depthwise_conv2d":
        return np.ascontiguousarray(w.reshape(-1, w.shape[3]).T)
    return w.reshape(w.shape[0], -1)


def _check_weights_choice(graph: Graph, weights) -> None:
    weighted = {op.name for op in graph.ops if op.kind in ("conv2d", "depthwise_conv2d", "fully_connected")}
    choices = weights.values() if isinstance(weights, dict) else [weights]
    for choice in choices:
        if choice not in WEIGHT_CHOICES:
            raise EdgekitError(f"unknown weight encoding {choice!r}; choose one of {', '.join(WEIGHT_CHOICES)}")
    if isinstance(weights, dict):
        unknown = sorted(set(weights) - weighted)
        if unknown:
            raise EdgekitError(f"weight encodings given for {', '.join(map(repr, unknown))}, which are not weighted "
                               f"layers of this model (those are: {', '.join(sorted(weighted)) or 'none'})")
    if graph.meta.get("weight_only") and any(c != "dense" for c in choices):
        raise EdgekitError("weight-only models store dense int8 weights; encoded weights (codebook, huffman, sparse, "
                           "auto) need an int8 model: quantize without weight_only")


class _Builder:
    def __init__(self, graph: Graph, plan: MemoryPlan, weight_only: bool, weights="dense", conv_tile_group: int = 0,
                 dsp_conv: bool = False, int16_pairs: bool = False, x86: bool = False, depthwise_pairs: bool = False):
        self.graph = graph
        # rpi4: dense layers without a -128 weight take the int16-pair kernels (kernel_prep.int16_pairs_exact)
        self.int16_pairs = int16_pairs
        # both Pis (NEON): depthwise layers without a -128 weight take ek_depthwise_conv2d_s8_pairs
        self.depthwise_pairs = depthwise_pairs
        self.notes: list[str] = []  # generate-time notes on kernel choices (edgekit_project.json "notes")
        # x86-64: dense convolutions' and fully connected layers' biases carry the VNNI path's u8 correction
        self.x86 = x86
        # dense convolutions' filters packed for the NEON register tile, this many taps a group (0: not packed)
        self.conv_tile_group = conv_tile_group
        # Cortex-M DSP: convolutions may take the 4x2-block kernel, within this scratch (kernel_prep)
        self.conv_4x2_cap = conv_4x2_scratch_cap(graph) if dsp_conv else 0
        self.dsp = dsp_conv  # Cortex-M DSP kernels (depthwise records)
        self.fc_rows4 = fc_rows4_layers(graph) if dsp_conv else set()  # ek_fully_connected_s8_rows4's layers
        self.plan = plan
        self.weight_only = weight_only
        self.elem = 4 if weight_only else 1
        self.arrays: list[CArray] = []
        self.weights = weights  # an encoding for every layer, or {layer name: encoding}
        self.shared_filters: dict[str, str] = {}  # weight tensor -> its C array (dense int8 layers)
        self.by_content: dict[tuple, str] = {}  # (dtype, shape, bytes) -> the C array holding them
        self.dw_pending: list[tuple[Layer, Op]] = []  # DSP depthwise layers whose bias array waits for depthwise_biases

    def depthwise_biases(self, dw_dsp: list[dict], dsp_kernel: bool) -> None:
        """The bias arrays of the DSP depthwise layers: the folded biases, then (when the DSP kernel is
        built, not its portable source, which reads the biases only) the output-stage records, with the
        taps' weights and column sums only for a layer whose geometry has unrolled code (``dw_dsp``):
        the tap-table path reads its weights from the filter."""
        for layer, op in self.dw_pending:
            bias = folded_bias(self.graph, op)
            if not dsp_kernel:
                layer.arrays["bias"] = self.array(f"{layer.id}_bias", bias,
                                                  "bias + input_offset * sum(weights of the channel)")
                continue
            unrolled = depthwise_dsp_unrolled(layer, dw_dsp)
            layer.arrays["bias"] = self.array(
                f"{layer.id}_bias", np.concatenate([bias, depthwise_dsp_records(self.graph, op, unrolled)]),
                "bias + input_offset * sum(weights of the channel), then per four channels {right shifts - 1, "
                "biases, multiplier and constant of each" + (", the taps' weights, column sums}" if unrolled else "}"))
        self.dw_pending = []

    def buffer(self, name: str) -> Buffer:
        return Buffer(name, self.plan.offsets[name] // self.elem, self.graph.tensors[name].size)

    def array(self, name: str, data: np.ndarray, comment: str = "") -> str:
        """A const C array for ``data``; an array with the same type, shape and bytes as one already
        emitted is that one (an unrolled GRU's steps share tables, biases and multipliers)."""
        data = np.ascontiguousarray(data)
        key = (data.dtype.str, data.shape, data.tobytes())
        if key in self.by_content:
            return self.by_content[key]
        for arr in encode(name, data, "dense", comment):
            self.arrays.append(arr)
        self.by_content[key] = name
        return name

    def layer(self, index: int, op: Op) -> Layer:
        g = self.graph
        ident = f"l{index}_{c_identifier(op.name)}"
        act_inputs = [n for n in op.inputs if not g.tensors[n].is_constant]
        layer = Layer(index, ident, op.name, op.kind, None, [self.buffer(n) for n in act_inputs],
                      [self.buffer(n) for n in op.outputs], macs=cost.layer_macs(g, op))
        for role, name in (("input", op.inputs[0]), ("output", op.outputs[0])):
            if len(g.tensors[name].shape) <= 4:  # layout ops may pass higher-rank views through
                layer.dims[role] = _dims(g.tensors[name].shape)
        getattr(self, f"_{op.kind}")(layer, op)
        return layer

    # weighted layers ------------------------------------------------------
    def _weighted(self, layer: Layer, op: Op, conv: bool):
        g, a = self.graph, op.attrs
        w = g.tensors[op.inputs[1]]
        b = g.tensors[op.inputs[2]] if len(op.inputs) > 2 else None
        if op.kind == "fully_connected":
            layer.dims["filter"] = (w.shape[0], 1, 1, w.shape[1])
        else:
            layer.dims["filter"] = tuple(w.shape)
        choice = self.weights.get(op.name, "dense") if isinstance(self.weights, dict) else self.weights
        if choice != "dense" and not self.weight_only:
            self._encoded(layer, op, choice)  # "auto" may keep the layer dense
        if layer.encoding != "dense":
            pass  # kernel, filter and requantization arrays set by _encoded
        elif self.weight_only:
            layer.arrays["filter"] = self.array(f"{layer.id}_filter", w.data, f"{op.name}: weights {list(w.shape)}")
            layer.kernel = f"ek_{op.kind}_f32"
            layer.arrays["scale"] = self.array(f"{layer.id}_scale", w.quant.scale.astype(np.float32))
            if b is not None:
                layer.arrays["bias"] = self.array(f"{layer.id}_bias", b.data.astype(np.float32))
            lo, hi = {"relu": (0.0, FLT_MAX), "relu6": (0.0, 6.0)}.get(a.get("activation", "none"),
                                                                      (-FLT_MAX, FLT_MAX))
            layer.params.update(act_min=lo, act_max=hi)
        else:
            # A weight tensor several ops read (an unrolled GRU's steps) is stored once.
            block_4x2 = self.conv_4x2_cap > 0 and op.kind == "conv2d" and conv_4x2_chosen(g, op, self.conv_4x2_cap)
            rows4 = op.name in self.fc_rows4
            # rpi4: the int16-pair kernels when no weight is -128 (else the one-product ones, with a note)
            pairs_kind = (self.int16_pairs and op.kind in ("conv2d", "fully_connected")) or \
                (self.depthwise_pairs and op.kind == "depthwise_conv2d")
            pairs = pairs_kind and int16_pairs_exact(w.data)
            if self.conv_tile_group and (op.kind == "conv2d" or (op.kind == "fully_connected" and
                                                                  self.conv_tile_group == 4)):
                # rpi5's fully connected kernel reads the SDOT tile's layout too (a 1x1 convolution of one pixel)
                group = self.conv_tile_group
                if pairs:
                    layer.arrays["filter"] = self.array(f"{layer.id}_filter", pack_conv_pairs(w.data),
                                                        f"{op.name}: weights {list(w.shape)}, packed for the int16-pair "
                                                        "tile (16-channel blocks x 4 taps, channel pairs of taps)")
                else:
                    data, note = w.data, ""
                    c4 = sdot_widened_c(g, op) if group == 4 else 0
                    if op.kind == "conv2d" and c4 > w.shape[3]:
                        # rpi5: in_c widened with zero weights; the kernel reads the input from a padded copy
                        # with as many channels (filter dims' c != input's tells it)
                        data = np.zeros((*w.shape[:3], c4), np.int8)
                        data[..., :w.shape[3]] = w.data
                        layer.dims["filter"] = data.shape
                        note = f", in_c widened to {c4} (zero weights)"
                    # rpi5's narrow tile (out_c <= 8) reads one 8-channel block
                    block = 8 if group == 4 and op.kind == "conv2d" and sdot_narrow(w.shape[0]) else 16
                    layer.arrays["filter"] = self.array(f"{layer.id}_filter", pack_conv_tile(data, group, block),
                                                        f"{op.name}: weights {list(w.shape)}, packed for the NEON "
                                                        f"tile ({block}-channel blocks x {group} tap"
                                                        f"{'s' if group > 1 else ''}){note}")
            elif pairs and op.kind == "fully_connected":
                layer.arrays["filter"] = self.array(f"{layer.id}_filter", pack_fc_pairs(w.data),
                                                    f"{op.name}: weights {list(w.shape)}, packed for the int16-pair "
                                                    "kernel (16-row blocks x 16 inputs, rows padded in front)")
            elif block_4x2:
                packed, table = conv_4x2_layout(g, op)
                layer.arrays["filter"] = self.array(f"{layer.id}_filter", packed,
                                                    f"{op.name}: weights {list(w.shape)}, packed for the 4x2 "
                                                    "SMLAD blocks (channel pairs x 4 taps; all-zero channels left out)")
            elif rows4:
                layer.arrays["filter"] = self.array(f"{layer.id}_filter", pack_fc_rows4(w.data),
                                                    f"{op.name}: weights {list(w.shape)}, in groups of 4 rows x 4 "
                                                    "inputs, even bytes ^ 0x80 (kernel_prep.pack_fc_rows4)")
            elif self.x86 and op.kind == "conv2d":
                layer.arrays["filter"] = self.array(f"{layer.id}_filter", x86_conv_filter(w.data),
                                                    f"{op.name}: weights {list(w.shape)}, then the same packed for "
                                                    "the x86 VNNI tile (16-channel blocks x 4 taps)")
            elif op.inputs[1] not in self.shared_filters:
                self.shared_filters[op.inputs[1]] = self.array(f"{layer.id}_filter", w.data,
                                                               f"{op.name}: weights {list(w.shape)}")
            if "filter" not in layer.arrays:
                layer.arrays["filter"] = self.shared_filters[op.inputs[1]]
            layer.kernel = "ek_conv2d_s8_4x2" if block_4x2 else f"ek_{op.kind}_s8"
            if rows4:
                layer.kernel = "ek_fully_connected_s8_rows4"
            if pairs:
                layer.kernel += "_pairs"
            elif pairs_kind:
                self.notes.append(f"layer '{op.name}': a weight is -128, so it keeps the one-product "
                                  f"{layer.kernel} (two products in int16 could overflow)")
            # Dense kernels take the input offset folded into the bias (codegen/kernel_prep.py).
            if block_4x2:  # what scratch_bytes plans for it (whole windows or chunks) and its pairs
                _, kh, kw, k_in = nhwc(w.shape)
                layer.params["pairs_4x2"] = conv_4x2_pairs(g, op)
                layer.params["scratch_4x2"] = conv_4x2_scratch(kh * kw * k_in, layer.params["pairs_4x2"],
                                                               self.conv_4x2_cap)
                layer.arrays["bias"] = self.array(f"{layer.id}_bias", table,
                                                  "ek_conv2d_s8_4x2's table: pairs, constants, per packed channel "
                                                  "{bias + input_offset * sum(weights), multiplier, c, channel << 8 "
                                                  "| right shift - 1}, per all-zero channel channel << 8 | value")
            elif self.dsp and depthwise_dsp_takes_records(op):
                # the DSP depthwise kernel's records after the biases: made by depthwise_biases once the
                # unrolled geometries are chosen (their length depends on it)
                self.dw_pending.append((layer, op))
            elif rows4:
                layer.arrays["bias"] = self.array(f"{layer.id}_bias", fc_rows4_records(g, op),
                                                  "ek_fully_connected_s8_rows4's records per group of 4 rows: {right "
                                                  "shifts - 1, biases (+ 128 * sum of odd-position weights), "
                                                  "multiplier and constant of each} (kernel_prep.fc_rows4_records)")
            elif self.x86 and op.kind in ("conv2d", "fully_connected"):
                layer.arrays["bias"] = self.array(f"{layer.id}_bias", x86_u8_bias(self.graph, op),
                                                  "bias + input_offset * sum(weights of the channel), then "
                                                  "-128 * sum(weights) per channel (x86 VNNI: u8 inputs)")
            else:
                layer.arrays["bias"] = self.array(f"{layer.id}_bias", folded_bias(self.graph, op),
                                                  "bias + input_offset * sum(weights of the channel)")
            if not block_4x2 and not rows4:  # their tables hold the requantization: no quant arrays
                layer.arrays["multiplier"] = self.array(f"{layer.id}_multiplier", a["multiplier"].astype(np.int32))
                layer.arrays["shift"] = self.array(f"{layer.id}_shift", a["shift"].astype(np.int32))
            layer.params.update(input_offset=a["input_offset"], output_offset=a["output_offset"],
                                act_min=a["act_min"], act_max=a["act_max"])
        if conv:
            layer.params.update(stride_h=a["stride"][0], stride_w=a["stride"][1],
                                dilation_h=a["dilation"][0], dilation_w=a["dilation"][1],
                                pad_top=a["padding"][0], pad_left=a["padding"][2],
                                depth_multiplier=a.get("depth_multiplier", 1))

    def _encoded(self, layer: Layer, op: Op, choice: str):
        """An int8 layer whose filter is stored encoded. With "auto", the encoding
        (dense included) with the fewest bytes of filter + requantization arrays."""
        a = op.attrs
        name = f"{layer.id}_filter"
        comment = f"{op.name}: weights {list(self.graph.tensors[op.inputs[1]].shape)}"
        rows = filter_rows(self.graph, op)
        one_scale = bool(np.all(a["multiplier"] == a["multiplier"][0]) and np.all(a["shift"] == a["shift"][0]))
        requant = 8 if one_scale else 8 * rows.shape[0]
        candidates = FILTER_ENCODINGS if choice == "auto" else (choice,)
        best: EncodedFilter | None = None
        best_cost = 0
        for encoding in candidates:
            enc = encode_filter(name, rows, encoding, comment)
            cost = enc.nbytes + (8 * rows.shape[0] if encoding == "dense" else requant)
            if best is None or cost < best_cost:
                best, best_cost = enc, cost
        if best.encoding == "dense":
            return
        layer.encoding = best.encoding
        layer.kernel = f"ek_{op.kind}_s8_{best.encoding}"
        self.arrays.extend(best.arrays.values())
        layer.weights = {**{role: arr.name for role, arr in best.arrays.items()}, **best.fields}
        b = self.graph.tensors[op.inputs[2]]
        layer.arrays["bias"] = self.array(f"{layer.id}_bias", b.data.astype(np.int32))
        count = 1 if one_scale else rows.shape[0]
        layer.arrays["multiplier"] = self.array(f"{layer.id}_multiplier", a["multiplier"][:count].astype(np.int32))
        layer.arrays["shift"] = self.array(f"{layer.id}_shift", a["shift"][:count].astype(np.int32))
        layer.params.update(input_offset=a["input_offset"], output_offset=a["output_offset"],
                            act_min=a["act_min"], act_max=a["act_max"], quant_per_channel=int(not one_scale))

    def _conv2d(self, layer, op):
        self._weighted(layer, op, conv=True)

    def _depthwise_conv2d(self, layer, op):
        self._weighted(layer, op, conv=True)

    def _fully_connected(self, layer, op):
        self._weighted(layer, op, conv=False)
        # A rank-3 input (1, L, I): the kernel runs once per row (TFLite's keep_num_dims).
        g = self.graph
        layer.params["rows"] = g.tensors[op.inputs[0]].size // g.tensors[op.inputs[1]].shape[1]

    # data movement and the rest ------------------------------------------
    def _activation_params(self, layer, op, kind=None):
        a = op.attrs
        if self.weight_only:
            kind = kind or a.get("activation", "none")
            lo, hi = {"relu": (0.0, FLT_MAX), "relu6": (0.0, 6.0)}.get(kind, (-FLT_MAX, FLT_MAX))
            layer.params.update(act_min=lo, act_max=hi)
        else:
            layer.params.update(act_min=a["act_min"], act_max=a["act_max"])

    def _pool(self, layer, op):
        a = op.attrs
        layer.kernel = f"ek_{op.kind}_{'f32' if self.weight_only else 's8'}"
        layer.params.update(kernel_h=a["kernel"][0], kernel_w=a["kernel"][1], stride_h=a["stride"][0],
                            stride_w=a["stride"][1], pad_top=a["padding"][0], pad_bottom=a["padding"][1],
                            pad_left=a["padding"][2], pad_right=a["padding"][3],
                            count_include_pad=int(bool(a.get("count_include_pad", False))),
                            zero_point=a.get("zero_point", 0))
        self._activation_params(layer, op)

    _max_pool2d = _pool
    _avg_pool2d = _pool

    def _mean(self, layer, op):
        layer.kernel = "ek_mean_f32" if self.weight_only else "ek_mean_s8"
        if not self.weight_only:
            a = op.attrs
            layer.params.update(input_offset=a["input_offset"], output_offset=a["output_offset"],
                                multiplier=a["multiplier"], shift=a["shift"], act_min=a["act_min"],
                                act_max=a["act_max"])

    def _add(self, layer, op):
        g = self.graph
        if self.weight_only:
            if any(g.tensors[n].is_constant or g.tensors[n].shape != g.tensors[op.outputs[0]].shape
                   for n in op.inputs):
                raise EdgekitError(f"layer '{op.name}': a broadcasting or constant add has no weight-only kernel; "
                                   "generate an int8 model")
            layer.kernel = "ek_add_f32"
            layer.params["size"] = g.tensors[op.outputs[0]].size
            self._activation_params(layer, op)
            return
        self._binary(layer, op, "ek_add_s8")

    def _binary(self, layer, op, kernel):
        """ADD, SUB, SQUARED_DIFFERENCE: two int8 operands (one may be a constant) that may broadcast."""
        layer.kernel = kernel
        self._operands(layer, op)
        keys = ("input1_offset", "input2_offset", "output_offset", "left_shift", "input1_multiplier",
                "input1_shift", "input2_multiplier", "input2_shift", "output_multiplier", "output_shift",
                "act_min", "act_max")
        layer.params.update({k: op.attrs[k] for k in keys})

    def _operands(self, layer, op):
        g = self.graph
        for role, name in (("input1", op.inputs[0]), ("input2", op.inputs[1])):
            layer.dims[role] = _dims(g.tensors[name].shape)
            if g.tensors[name].is_constant:
                layer.arrays[role] = self.array(f"{layer.id}_{role}", g.tensors[name].data.astype(np.int8))

    def _refuse_weight_only(self, op):
        if self.weight_only:
            raise EdgekitError(f"layer '{op.name}': {op.kind} has no weight-only (float) kernel yet; "
                               "generate an int8 model")

    def _sub(self, layer, op):
        self._refuse_weight_only(op)
        self._binary(layer, op, "ek_sub_s8")

    def _squared_difference(self, layer, op):
        self._refuse_weight_only(op)
        self._binary(layer, op, "ek_squared_difference_s8")

    def _prelu(self, layer, op):
        self._refuse_weight_only(op)
        layer.kernel = "ek_prelu_s8"
        self._operands(layer, op)
        keys = ("input_offset", "alpha_offset", "output_offset", "identity_multiplier", "identity_shift",
                "alpha_multiplier", "alpha_shift")
        layer.params.update({k: op.attrs[k] for k in keys})

    def _lut(self, layer, op):
        self._refuse_weight_only(op)
        layer.kernel = "ek_lut_s8"
        layer.params["size"] = self.graph.tensors[op.outputs[0]].size
        layer.arrays["table"] = self.array(f"{layer.id}_table", op.attrs["table"].astype(np.int8),
                                           f"{op.name}: {op.kind} of every int8 input")

    _logistic = _tanh = _hard_swish = _leaky_relu = _elu = _gelu = _rsqrt = _lut

    def _mul(self, layer, op):
        if self.weight_only:
            raise EdgekitError(f"layer '{op.name}': mul has no weight-only kernel")
        layer.kernel = "ek_mul_s8"
        g = self.graph
        for role, name in (("input1", op.inputs[0]), ("input2", op.inputs[1])):
            layer.dims[role] = _dims(g.tensors[name].shape)
            if g.tensors[name].is_constant:
                layer.arrays[role] = self.array(f"{layer.id}_{role}", g.tensors[name].data.astype(np.int8))
        keys = ("input1_offset", "input2_offset", "output_offset", "output_multiplier", "output_shift",
                "act_min", "act_max")
        layer.params.update({k: op.attrs[k] for k in keys})

    def _concat(self, layer, op):
        layer.kernel = "ek_concat_f32" if self.weight_only else "ek_concat_s8"
        axis = op.attrs["axis"]
        out_shape = self.graph.tensors[op.outputs[0]].shape
        layer.params["outer"] = int(np.prod(out_shape[:axis]))
        layer.params["chunks"] = [int(np.prod(self.graph.tensors[n].shape[axis:])) for n in op.inputs]
        # each part: ("buffer", index among the activation inputs) or ("array", a constant part's C array)
        parts, k = [], 0
        for n in op.inputs:
            t = self.graph.tensors[n]
            if t.is_constant:
                if self.weight_only:
                    raise EdgekitError(f"layer '{op.name}': a concatenation with a constant part has no weight-only "
                                       "kernel; generate an int8 model")
                parts.append(("array", self.array(f"{layer.id}_part{len(parts)}", t.data.astype(np.int8))))
            else:
                parts.append(("buffer", k))
                k += 1
        layer.params["parts"] = parts

    def _clamp(self, layer, op):
        """ReLU, ReLU6, and clamp / Hardtanh with any bounds (int8 keeps the parameters: a clamp of raw values)."""
        layer.kernel = "ek_clamp_f32" if self.weight_only else "ek_clamp_s8"
        layer.params["size"] = self.graph.tensors[op.outputs[0]].size
        self._activation_params(layer, op, kind=op.kind)
        if self.weight_only and op.kind == "clamp":
            lo, hi = op.attrs.get("lo"), op.attrs.get("hi")
            layer.params.update(act_min=-FLT_MAX if lo is None else float(lo),
                                act_max=FLT_MAX if hi is None else float(hi))

    _relu = _clamp
    _relu6 = _clamp

    def _softmax(self, layer, op):
        layer.kernel = "ek_softmax_f32" if self.weight_only else "ek_softmax_s8"
        shape = self.graph.tensors[op.inputs[0]].shape
        layer.params.update(depth=shape[-1], rows=int(np.prod(shape[:-1])), beta=float(op.attrs.get("beta", 1.0)))
        if not self.weight_only:
            layer.params.update({k: op.attrs[k] for k in ("input_multiplier", "input_left_shift", "diff_min")})

    def _log_softmax(self, layer, op):
        if self.weight_only:
            raise EdgekitError(f"layer '{op.name}': log_softmax has no weight-only kernel yet; quantize to int8")
        layer.kernel = "ek_log_softmax_s8"
        shape = self.graph.tensors[op.inputs[0]].shape
        layer.params.update(depth=shape[-1], rows=int(np.prod(shape[:-1])))
        layer.params.update({k: op.attrs[k] for k in ("input_multiplier", "input_left_shift", "reverse_multiplier",
                                                      "reverse_shift", "diff_min")})

    def _pad(self, layer, op):
        layer.kernel = "ek_pad_f32" if self.weight_only else "ek_pad_s8"
        t, _, l, _ = op.attrs["padding"]
        value = float(op.attrs.get("value", 0.0)) if self.weight_only else op.attrs["pad_value"]
        layer.params.update(pad_top=t, pad_left=l, value=value)

    def _batch_matmul(self, layer, op):
        """Python works out the walk: per operand a batch stride (0 when it broadcasts), a stride
        along the output's rows or columns and one along the reduction (adj_x / adj_y swap them)."""
        if self.weight_only:
            raise EdgekitError(f"layer '{op.name}': batch_matmul has no weight-only kernel")
        g, a = self.graph, op.attrs
        sa, sb, so = (tuple(g.tensors[n].shape) for n in (*op.inputs, op.outputs[0]))
        batch = so[:-2]
        rows, cols = so[-2], so[-1]
        depth = sa[-2] if a.get("adj_x", False) else sa[-1]

        def batch_stride(shape):
            dims = (1,) * (len(batch) - len(shape[:-2])) + tuple(shape[:-2])
            if dims == batch:
                return shape[-1] * shape[-2]
            if int(np.prod(dims)) == 1:
                return 0
            raise EdgekitError(f"layer '{op.name}' (batch_matmul): operand batch dimensions {list(dims)} broadcast "
                               f"only in part against {list(batch)}; give both the same batch dimensions")

        layer.kernel = "ek_batch_matmul_s8"
        layer.params.update(
            batches=int(np.prod(batch)), rows=rows, cols=cols, depth=depth,
            a_batch_stride=batch_stride(sa), b_batch_stride=batch_stride(sb),
            a_row_stride=1 if a.get("adj_x", False) else depth, a_depth_stride=rows if a.get("adj_x", False) else 1,
            b_col_stride=depth if a.get("adj_y", False) else 1, b_depth_stride=1 if a.get("adj_y", False) else cols,
            **{k: a[k] for k in ("input1_offset", "input2_offset", "output_offset", "output_multiplier",
                                 "output_shift", "act_min", "act_max")})
        for role, name in (("input1", op.inputs[0]), ("input2", op.inputs[1])):
            if g.tensors[name].is_constant:
                layer.arrays[role] = self.array(f"{layer.id}_{role}", g.tensors[name].data.astype(np.int8))
        layer.macs = int(np.prod(batch)) * rows * cols * depth

    def _lstm(self, layer, op):
        if self.weight_only:
            raise EdgekitError(f"layer '{op.name}': lstm has no weight-only kernel; quantize it to int8")
        g, a = self.graph, op.attrs
        _, steps, depth = g.tensors[op.inputs[0]].shape
        hidden = g.tensors[op.inputs[2]].shape[1]
        layer.kernel = "ek_lstm_s8"
        layer.params.update(steps=steps, input_size=depth, hidden=hidden, cell_scale=a["cell_scale"],
                            hidden_multiplier=a["hidden_multiplier"], hidden_shift=a["hidden_shift"],
                            output_offset=a["output_offset"],
                            **{k: [int(v) for v in a[k]] for k in ("input_multiplier", "input_shift",
                                                                   "recurrent_multiplier", "recurrent_shift")})
        for role, data in (("input_weights", g.tensors[op.inputs[1]].data),
                           ("recurrent_weights", g.tensors[op.inputs[2]].data),
                           ("input_bias", a["input_effective_bias"]), ("recurrent_bias", a["recurrent_effective_bias"])):
            layer.arrays[role] = self.array(f"{layer.id}_{role}", data)
        layer.macs = steps * 4 * hidden * (depth + hidden)

    def _reshape(self, layer, op):
        layer.kernel = None  # the planner aliases it: no code, no copy

    # transpose / split / slice: strided copies ---------------------------------
    def _copies(self, layer, op, pieces):
        """``pieces``: (output name, offset, output shape, input strides) -> one ek_strided_copy call each."""
        layer.kernel = "ek_strided_copy_f32" if self.weight_only else "ek_strided_copy_s8"
        layer.params["copies"] = []
        for name, offset, shape, strides in pieces:
            dims, steps = _merge_copy_axes(shape, strides)
            if len(dims) > 6:
                raise EdgekitError(f"layer '{op.name}': {op.kind} over more than 6 non-mergeable axes")
            pad = 6 - len(dims)
            layer.params["copies"].append({"output": self.buffer(name), "offset": int(offset),
                                           "dims": [1] * pad + dims, "strides": [0] * pad + steps})

    def _transpose(self, layer, op):
        shape = self.graph.tensors[op.inputs[0]].shape
        strides = _c_strides(shape)
        perm = op.attrs["perm"]
        self._copies(layer, op, [(op.outputs[0], 0, [shape[p] for p in perm], [strides[p] for p in perm])])

    def _split(self, layer, op):
        shape = self.graph.tensors[op.inputs[0]].shape
        strides = _c_strides(shape)
        axis, start, pieces = op.attrs["axis"], 0, []
        for name in op.outputs:
            out_shape = self.graph.tensors[name].shape
            pieces.append((name, start * strides[axis], list(out_shape), strides))
            start += out_shape[axis]
        self._copies(layer, op, pieces)

    def _slice(self, layer, op):
        strides = _c_strides(self.graph.tensors[op.inputs[0]].shape)
        a = op.attrs
        offset = sum(b * s for b, s in zip(a["begin"], strides))
        steps = [st * s for st, s in zip(a["strides"], strides)]
        self._copies(layer, op, [(op.outputs[0], offset, list(self.graph.tensors[op.outputs[0]].shape), steps)])

    def _transpose_conv2d(self, layer, op):
        """TRANSPOSE_CONV as a gather: each output pixel sums the taps that land on it (the same integer
        sum as TFLite's scatter). The raw bias: how many taps reach a pixel varies, so no folded offset."""
        if self.weight_only:
            raise EdgekitError(f"layer '{op.name}': ConvTranspose2d has no weight-only kernel yet; quantize to int8")
        g, a = self.graph, op.attrs
        w = g.tensors[op.inputs[1]]
        layer.kernel = "ek_transpose_conv2d_s8"
        layer.dims["filter"] = tuple(w.shape)
        layer.arrays["filter"] = self.array(f"{layer.id}_filter", w.data, f"{op.name}: weights {list(w.shape)}")
        layer.arrays["bias"] = self.array(f"{layer.id}_bias", g.tensors[op.inputs[2]].data.astype(np.int32))
        layer.arrays["multiplier"] = self.array(f"{layer.id}_multiplier", a["multiplier"].astype(np.int32))
        layer.arrays["shift"] = self.array(f"{layer.id}_shift", a["shift"].astype(np.int32))
        layer.params.update(input_offset=a["input_offset"], output_offset=a["output_offset"], act_min=a["act_min"],
                            act_max=a["act_max"], stride_h=a["stride"][0], stride_w=a["stride"][1],
                            dilation_h=1, dilation_w=1, pad_top=a["padding"][0], pad_left=a["padding"][2],
                            depth_multiplier=1)

    def _reduce_max(self, layer, op):
        """The input as (outer, reduced, inner): the reduced axes are neighbours."""
        layer.kernel = "ek_reduce_max_f32" if self.weight_only else "ek_reduce_max_s8"
        shape, axes = self.graph.tensors[op.inputs[0]].shape, op.attrs["axes"]
        layer.params.update(outer=int(np.prod(shape[:axes[0]])), reduce=int(np.prod(shape[axes[0]:axes[-1] + 1])),
                            inner=int(np.prod(shape[axes[-1] + 1:])))

    def _reduce_min(self, layer, op):
        self._refuse_weight_only(op)
        self._reduce_max(layer, op)
        layer.kernel = "ek_reduce_min_s8"

    def _reduce_mean(self, layer, op):
        """Python groups the axes: runs of kept and of reduced axes (size-1 axes dropped) become up to
        three (size, input stride) loops each; the kernel walks them."""
        self._refuse_weight_only(op)
        shape, axes = self.graph.tensors[op.inputs[0]].shape, set(op.attrs["axes"])
        strides = [int(np.prod(shape[a + 1:])) for a in range(len(shape))]
        groups: list[list] = []  # [reduced?, size, stride of the group's last axis]
        for a in range(len(shape)):
            if shape[a] == 1:
                continue
            if groups and groups[-1][0] == (a in axes):  # neighbours (only size-1 axes between): one loop
                groups[-1][1] *= shape[a]
                groups[-1][2] = strides[a]
            else:
                groups.append([a in axes, shape[a], strides[a]])
        kept = [(n, st) for red, n, st in groups if not red]
        reduced = [(n, st) for red, n, st in groups if red]
        if len(kept) > 3 or len(reduced) > 3:
            raise EdgekitError(f"layer '{op.name}' (mean): axes {sorted(axes)} of a {list(shape)} tensor split into "
                               "more than three runs; reduce neighbouring axes")
        kept = [(1, 0)] * (3 - len(kept)) + kept
        reduced = [(1, 0)] * (3 - len(reduced)) + reduced
        a = op.attrs
        layer.kernel = "ek_reduce_mean_s8"
        layer.params.update(out_size=[n for n, _ in kept], out_stride=[st for _, st in kept],
                            red_size=[n for n, _ in reduced], red_stride=[st for _, st in reduced],
                            input_offset=a["input_offset"], output_offset=a["output_offset"],
                            multiplier=a["multiplier"], shift=a["shift"])

    def _resize_bilinear(self, layer, op):
        """Source rows / columns and their 1/1024 weights are tables (ir.bilinear_taps, TFLite's integers)."""
        from ..ir import bilinear_taps
        if self.weight_only:
            raise EdgekitError(f"layer '{op.name}': bilinear resize has no weight-only kernel yet; quantize to int8")
        layer.kernel = "ek_resize_bilinear_s8"
        (_, H, W, _), (_, OH, OW, _) = layer.dims["input"], layer.dims["output"]
        ac, hp = bool(op.attrs.get("align_corners")), bool(op.attrs.get("half_pixel_centers"))
        for axis, (n, o) in (("y", (H, OH)), ("x", (W, OW))):
            lo, hi, weight = bilinear_taps(n, o, ac, hp)
            table = np.stack([lo, hi, weight], axis=1).reshape(-1).astype(np.int32)
            layer.arrays[axis] = self.array(f"{layer.id}_{axis}_taps", table, "low, high, weight of high (1/1024)")

    def _resize_nearest(self, layer, op):
        """The source row and column of every output row and column are tables Python computes
        (ir.nearest_source_index, TFLite's float32 arithmetic); the kernel only copies pixels."""
        from ..ir import nearest_source_index
        layer.kernel = "ek_resize_nearest_f32" if self.weight_only else "ek_resize_nearest_s8"
        (_, H, W, _), (_, OH, OW, _) = layer.dims["input"], layer.dims["output"]
        hp = bool(op.attrs.get("half_pixel_centers", False))
        layer.arrays["rows"] = self.array(f"{layer.id}_rows", nearest_source_index(H, OH, hp).astype(np.int32))
        layer.arrays["cols"] = self.array(f"{layer.id}_cols", nearest_source_index(W, OW, hp).astype(np.int32))

    def _exit(self, layer, op):
        """An early exit's decision: the kernel returns the confidence, model.c compares it with the
        threshold and, when it is reached, fills the outputs of the exits not reached and returns."""
        a = op.attrs
        g = self.graph
        layer.kernel = f"ek_exit_{a['criterion']}_s8"
        layer.params["exit"] = a["exit"]
        layer.params["depth"] = g.tensors[op.inputs[0]].shape[-1]
        if a["criterion"] == "softmax":
            layer.params.update({k: a[k] for k in ("input_multiplier", "input_left_shift", "diff_min")})
        else:
            layer.params.update(multiplier=a["multiplier"], shift=a["shift"])
        layer.params["fills"] = [_fill(g, self.buffer(n), n) for n in g.outputs[a["exit"] + 1:]]


def _c_strides(shape) -> list[int]:
    """Row-major element strides of ``shape``."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= int(size)
    return strides[::-1]


def _merge_copy_axes(shape, strides) -> tuple[list[int], list[int]]:
    """Drop size-1 axes and merge neighbours that are contiguous in the input: fewer, longer loops."""
    dims, steps = [], []
    for size, stride in zip(shape, strides):
        if size == 1:
            continue
        if dims and steps[-1] == stride * size:
            dims[-1] *= size
            steps[-1] = stride
        else:
            dims.append(int(size))
            steps.append(int(stride))
    return dims or [1], steps or [0]


def _fill(graph: Graph, buffer: Buffer, name: str) -> dict:
    """An output the device did not compute: set to its zero point (real 0.0)."""
    return {"offset": buffer.offset, "size": buffer.size, "value": int(graph.tensors[name].quant.zero_point[0])}


def _exits_context(graph: Graph, builder: "_Builder", exit_threshold) -> dict | None:
    names = exit_names(graph)
    if not names:
        return None
    if not graph.meta["exits"].get("criterion"):
        raise EdgekitError("this multi-exit graph has no exit decisions: quantize it with edgekit.quantize")
    depth = max(graph.tensors[n].shape[-1] for n in graph.outputs[:-1])
    thresholds = thresholds_to_ints(exit_threshold, len(names) - 1)
    return {"count": len(names) - 1, "names": names, "criterion": graph.meta["exits"]["criterion"],
            "thresholds": thresholds, "scratch": depth,
            "off_fills": [_fill(graph, builder.buffer(n), n) for n in graph.outputs[:-1]]}


def _io_record(graph: Graph, name: str, weight_only: bool) -> dict:
    t = graph.tensors[name]
    rec = {"name": name, "shape": list(t.shape), "dtype": "float32" if weight_only else t.dtype,
           "layout": graph.source_layouts.get(name, "NHWC")}
    if t.quant is not None and not weight_only:
        rec.update(scale=float(t.quant.scale[0]), zero_point=int(t.quant.zero_point[0]))
    return rec


# A layer is shared among the threads only when it has this much work (MACs, or elements of an
# elementwise op): waking the pool costs a few microseconds on a Pi, which small layers do not repay.
SPLIT_MIN_MACS = 16_384
SPLIT_MIN_ELEMENTS = 2_048
_SPLIT_BINARY = ("add", "sub", "mul", "squared_difference")


CHANNEL_BLOCK = 16  # a dense convolution's channel share: whole blocks of 16 channels (the rpi5 SDOT tile)


def _longest_share(units: int, threads: int) -> float:
    """The largest fraction of ``units`` equal pieces any one of ``threads`` shares gets (ek_pool_share)."""
    return max(units * (p + 1) // threads - units * p // threads for p in range(threads)) / units


def thread_split(layer: Layer, weight_only: bool, threads: int = 4, conv_channels: bool = True) -> str | None:
    """How the threads share a layer's output (None: the calling thread runs it alone).
    "rows": output rows of a dense convolution or depthwise layer (each thread's rows read their own
    window of input rows, with the padding above the first one), or of a broadcasting elementwise op;
    "flat": a same-shape elementwise op, in runs of 16 elements (the NEON vectors); "channels": the
    output neurons of a dense fully connected layer, in groups of 4 (its NEON row group; blocks of 16
    for rpi5's SDOT and rpi4's int16-pair kernels, which read a packed filter), or a dense
    convolution's output channels in blocks of 16 (the last share also takes the channels past the
    last whole block, so it ends where the SDOT-packed filter's last tile does) when there are more
    blocks than rows and they share out more evenly (a 3-row layer on 4 threads leaves one thread
    idle, its longest share 1/3 of the layer; 64 channels, 4 blocks, give 1/4). The kernels then write a slice of each pixel
    (ek_conv_params.output_stride). ``conv_channels``: the board's conv kernels take that
    stride (the portable and NEON ones; the Pi boards)."""
    if weight_only or not layer.kernel:
        return None
    out = layer.dims.get("output")
    if layer.kind in ("conv2d", "depthwise_conv2d") and layer.encoding == "dense":
        if layer.macs < SPLIT_MIN_MACS:
            return None
        rows = _longest_share(out[1], threads) if out[1] >= 2 else 1.0
        blocks = out[3] // CHANNEL_BLOCK
        # Channels only when there are more blocks than rows: every channel share walks every pixel's
        # window, so with rows to spare a channel split repeats that per-pixel work on each thread
        # (DS-CNN's 25-row 1x1 layers: 1.29x the one-thread work on rpi4, 1.48x on rpi5, measured).
        if (layer.kind == "conv2d" and conv_channels and blocks >= 2 and blocks > out[1]
                and _longest_share(blocks, threads) < rows):
            return "channels"
        return "rows" if out[1] >= 2 else None
    if layer.kind == "fully_connected" and layer.encoding == "dense" and layer.params.get("rows", 1) == 1:
        return "channels" if layer.dims["filter"][0] >= 8 and layer.macs >= SPLIT_MIN_MACS else None
    if layer.kind in _SPLIT_BINARY and out is not None and int(np.prod(out)) >= SPLIT_MIN_ELEMENTS:
        same = all(int(np.prod(layer.dims[r])) == int(np.prod(out)) for r in ("input1", "input2"))
        return "flat" if same else ("rows" if out[1] >= 2 else None)
    return None


def _band_layers(graph: Graph, g, in_order: list[Layer]) -> None:
    """Mark the three layers of a residual block that runs in row bands (memory_plan.BandGroup; ``in_order``:
    the layers in the plan's schedule): the first layer's entry in model.c runs the block's loop, calling the
    three kernels on row ranges."""
    a, b, add = (in_order[i] for i in g.ops)
    first_b = graph.ops[add.index].inputs[0] == g.w  # the add's operand order: w first, or x first
    info = dict(a=a, b=b, add=add, rows=g.rows, height=g.height, y_height=g.y_height, y_rows=g.y_rows,
                row=g.row_bytes, y_row=g.y_row_bytes, kernel_b=g.kernel_b, pad_b=g.pad_b, w_first=first_b,
                x=a.inputs[0].offset, y=a.outputs[0].offset, w=b.outputs[0].offset)
    a.band = dict(info, first=True)
    b.band = add.band = dict(info, first=False)


def resolve_threads(board: Board, threads, library: bool, weight_only: bool) -> int:
    """The threads a project runs its layers on: ``threads``, or the board's cores (board file
    ``cores``; boards without it run one). Only the aarch64 Linux boards have the thread pool."""
    cores = int(board.get("cores", 1))
    if threads is None:
        return 1 if library or weight_only else cores
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= 64:
        raise EdgekitError(f"threads must be a whole number from 1 to 64, not {threads!r}")
    if threads > 1 and board.kind != "linux-aarch64":
        raise EdgekitError(f"board {board.name!r} runs one thread: threads > 1 needs a Raspberry Pi board "
                           "(kind linux-aarch64)")
    if threads > 1 and library:
        raise EdgekitError("a library runs on the caller's thread: threads > 1 is for the Pi's own runners")
    if threads > 1 and weight_only:
        raise EdgekitError("the weight-only (float) kernels run one thread: generate an int8 model for threads > 1")
    return threads


def _inplace_ops(graph: Graph, weights) -> set[int]:
    """The ops whose kernels may write over their input: int8, dense weights (the encoded kernels'
    read order is not part of the in-place contract), no early exits."""
    if graph.meta.get("weight_only") or exit_names(graph):
        return set()
    choice = (lambda op: weights.get(op.name, "dense")) if isinstance(weights, dict) else (lambda op: weights)
    return {i for i, op in enumerate(graph.ops) if op.kind not in _WEIGHTED or choice(op) == "dense"}


def generate_project(graph: Graph, out_dir: str | Path, board: str | Board = "host", weights="dense",
                     exit_threshold=0.9, force: bool = False, memory_off=(), threads=None) -> dict:
    """Write the C project for ``graph`` into ``out_dir``: a new or empty directory, or an edgekit project
    (replaced in one step; ``force`` also overwrites generated files the user edited), see output_dir.py."""
    from ..safety import check_exit_threshold, check_graph_shapes
    from .output_dir import staged_output

    check_graph_shapes(graph)
    if graph.meta.get("exits"):
        check_exit_threshold(exit_threshold, graph.meta["exits"].get("criterion", "softmax"))
    with staged_output(out_dir, force=force) as stage:
        return write_project(graph, stage, board, weights, exit_threshold, memory_off=memory_off, threads=threads)


def write_project(graph: Graph, out_dir: str | Path, board: str | Board = "host", weights="dense",
                  exit_threshold=0.9, library: bool = False, memory_off=(), threads=None) -> dict:
    """Write the C project for ``graph`` (int8, or weight-only) into ``out_dir``.

    ``weights``: how weighted layers store their filters in flash, "dense",
    "codebook", "huffman", "sparse" or "auto" (per layer the fewest bytes), or a
    dict {layer name: encoding} (unnamed layers stay dense).
    ``exit_threshold``: for a multi-exit graph, the confidence an early exit needs to answer
    (a probability, or logits for the margin criterion; "off" runs the plain network), the
    initial value of the device's ``ek_exit_thresholds`` (changeable at run time); one for every early
    exit, or a list (or comma-separated string) with one per early exit.
    ``library``: only the model's C, in ``src/`` with its headers beside it and no board files (no main,
    UART or protocol); ``codegen/library.py`` adds the API and the build glue.
    ``memory_off``: arena techniques to turn off ("all", or names from memory_plan.TECHNIQUES).
    ``threads``: the threads of the Pi boards' pool (default: the board's cores; see thread_split).
    Returns the project record also saved as ``edgekit_project.json``.
    """
    board = resolve_board(board)
    weight_only = bool(graph.meta.get("weight_only"))
    _check_weights_choice(graph, weights)
    if not weight_only:
        if not graph.is_quantized():
            raise EdgekitError("generate needs a quantized graph (int8, or weight-only); quantize the model first")
        check_int8_arithmetic(graph)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise EdgekitError(f"{out} exists and is not a directory")

    threads = resolve_threads(board, threads, library, weight_only)
    inplace_ops = _inplace_ops(graph, weights)
    if threads > 1:
        # A convolution over its own input is safe only in one thread's raster order; elementwise ops
        # (element i read, then written, by the one thread that owns it) keep their in-place plan.
        inplace_ops = {i for i in inplace_ops if graph.ops[i].kind not in ("conv2d", "depthwise_conv2d")}
    # rpi5's convolutions over in_c a multiple of 4 walk the pixels once per channel block: not in place
    inplace_ops = {i for i in inplace_ops if not conv_blocks_outer(graph, graph.ops[i], board)}
    plan, memory = plan_with_report(graph, align=8, elem_bytes={"int8": 4, "float32": 4} if weight_only else None,
                                    kernel_variant=board.get("kernel_variant"), off=memory_off,
                                    inplace_ops=inplace_ops,
                                    bands_off_reason="the Pi's threads share these layers' rows" if threads > 1 else None)
    builder = _Builder(graph, plan, weight_only, weights,
                       conv_tile_group=conv_tile_group(board) if board.get("kernel_variant") == "neon" else 0,
                       dsp_conv=board.get("kernel_variant") == "dsp",
                       int16_pairs=board.get("kernel_variant") == "neon" and not board.get("dotprod"),
                       x86=board.get("kernel_variant") == "x86",
                       depthwise_pairs=board.get("kernel_variant") == "neon")
    layers = [builder.layer(i, op) for i, op in enumerate(graph.ops)]
    kernels = sorted({l.kernel for l in layers if l.kernel} |
                     ({"ek_softmax_s8"} if "ek_exit_softmax_s8" in {l.kernel for l in layers} else set()))
    cold = cold_kernels(layers, kernels) if board.kind == "cortex-m" else []
    dw_dsp = depthwise_dsp_shapes(layers, board)
    builder.depthwise_biases(dw_dsp, dsp_kernel="ek_depthwise_conv2d_s8" not in cold)
    for g in plan.bands:
        _band_layers(graph, g, [layers[i] for i in plan.schedule])
    for layer in layers if threads > 1 else ():
        layer.split = thread_split(layer, weight_only, threads, board.get("kernel_variant") in (None, "neon"))
    head_only = head_only_ops(graph)
    needed_by = head_exits(graph)
    every_exit = tuple(range(len(graph.outputs) - 1))
    for layer, op in zip(layers, graph.ops):
        layer.head_only = id(op) in head_only
        layer.head_exits = (needed_by.get(id(op)) or every_exit) if layer.head_only else ()
    coded = [l for l in layers if l.kernel]
    for prev, layer, nxt in zip([None] + coded[:-1], coded, coded[1:] + [None]):
        # one `if` around each run of head layers that the same early exits need
        layer.head_begin = layer.head_only and not (prev and prev.head_exits == layer.head_exits)
        layer.head_end = layer.head_only and not (nxt and nxt.head_exits == layer.head_exits)
    exits = _exits_context(graph, builder, exit_threshold)
    encodings_used = sorted({l.encoding for l in layers} - {"dense"})
    budget_lines = cost.check_before_build(board, sum(a.nbytes for a in builder.arrays), plan.arena_bytes,
                                           cost.estimate_code_bytes(kernels))
    out.mkdir(parents=True, exist_ok=True)
    elem_type = "float" if weight_only else "int8_t"
    inputs = [builder.buffer(n) for n in graph.inputs]
    outputs = [builder.buffer(n) for n in graph.outputs]
    fingerprint = graph.fingerprint()
    # schedule: the order ek_model_invoke calls the layers in (memory_plan's op-order), each under its own index
    context = dict(layers=layers, schedule=[layers[i] for i in plan.schedule], kernels=kernels,
                   arrays=builder.arrays, arena_bytes=plan.arena_bytes,
                   elem_type=elem_type, weight_only=weight_only, inputs=inputs, outputs=outputs,
                   fingerprint=fingerprint, board=board, num_layers=len(layers), encodings_used=encodings_used,
                   region=board.get("app", {}), region_name="application",
                   stack_bytes=int(board.get("stack_bytes", 8192)), exits=exits,
                   scratch_bytes=scratch_bytes(layers, board, portable=cold), library=library, threads=threads,
                   cold_kernels=cold, dw_dsp=dw_dsp)
    context["no_fallback"] = dsp_fallbacks_unused(graph, layers, board, context["scratch_bytes"], portable=cold)
    context["add_tables"] = add_tables(layers, board, context["scratch_bytes"], portable=cold)

    # A library keeps its sources in src/ with the headers beside them: Arduino's library layout, whose
    # build puts only src/ on the include path.
    src = out / "src" if library else out
    inc = src if library else out / "include"
    # Remove kernels a previous generation left behind, so the build compiles only what this model uses.
    if (src / "kernels").exists():
        for stale in (src / "kernels").glob("*.c"):
            if stale.stem not in kernels:
                stale.unlink()
    render_to(inc / "ek_nn.h", "include/ek_nn.h.j2", **context)
    render_to(inc / "ek_quant.h", "include/ek_quant.h.j2", **context)
    if encodings_used:
        render_to(inc / "ek_decode.h", "include/ek_decode.h.j2", **context)
    elif (inc / "ek_decode.h").exists():
        (inc / "ek_decode.h").unlink()
    # A board may name a kernel variant (e.g. "neon"): its folder replaces the portable kernels it has.
    variant = board.get("kernel_variant")
    if variant:
        render_to(inc / f"ek_{variant}.h", f"include/ek_{variant}.h.j2", **context)
    for k in kernels:
        source = f"kernels/{variant}/{k}.c.j2" if variant and k not in cold and \
            (TEMPLATES / "kernels" / variant / f"{k}.c.j2").exists() else f"kernels/{k}.c.j2"
        render_to(src / "kernels" / f"{k}.c", source, **context)
    for name in ("model.h", "model.c", "model_weights.h", "model_weights.c"):
        render_to(src / name, f"model/{name}.j2", **context)
    for folder in [] if library else board.templates:
        board_dir = TEMPLATES / folder
        for tmpl in sorted(board_dir.rglob("*.j2")):
            rel = tmpl.relative_to(board_dir).with_suffix("")
            render_to(out / rel, f"{folder}/{tmpl.relative_to(board_dir).as_posix()}", **context)

    weight_bytes = sum(a.nbytes for a in builder.arrays)
    record = {
        "edgekit_project": 1,
        "board": board.name,
        "mode": "weight_only" if weight_only else "int8",
        "fingerprint": fingerprint,
        "arena_bytes": plan.arena_bytes,
        "arena_lower_bound": memory["lower_bound"],
        "memory": {**memory, **describe(plan)},  # codegen/memory_plan.py: today's greedy arena, what each technique saved
        "scratch_bytes": context["scratch_bytes"],  # static, outside the arena (kernels/dsp: im2col, widened inputs)
        "threads": threads,  # > 1: the Pi's thread pool (ek_pool.c) shares the "split" layers' outputs
        "weight_bytes": weight_bytes,
        "float_weight_bytes": int(graph.meta.get("float_weight_bytes", 0)),
        "inputs": [_io_record(graph, n, weight_only) for n in graph.inputs],
        "outputs": [_io_record(graph, n, weight_only) for n in graph.outputs],
        "layers": [{"index": l.index, "name": l.name, "kind": l.kind, "kernel": l.kernel, "macs": l.macs,
                    **({"encoding": l.encoding} if l.kind in _WEIGHTED else {}),
                    **({"split": l.split} if l.split else {})}
                   for l in layers],
        "kernels": kernels,
        "cold_kernels": cold,  # built for size, portable (cold_kernels)
        "kernels_without_fallback": context["no_fallback"],  # DSP kernels built without their portable loop
        "budget_before_build": budget_lines,
        "notes": builder.notes,  # kernel choices worth knowing (a rpi4 layer kept off the int16-pair kernel)
        "library": library,
    }
    if exits:
        raw = as_raw(exits["thresholds"])  # one number when every exit has the same threshold
        record["exits"] = {"names": exits["names"], "criterion": exits["criterion"], "threshold": raw,
                           "threshold_real": threshold_to_real(raw),
                           "temperatures": graph.meta["exits"].get("temperatures"),
                           "head_only_layers": [l.index for l in layers if l.head_only],
                           "head_exits": {str(l.index): list(l.head_exits) for l in layers if l.head_only}}
    if board.source is not None:  # a board file of the user's own: the project keeps its copy for build / flash
        record["board_file"] = PROJECT_BOARD_FILE
        (out / PROJECT_BOARD_FILE).write_bytes(board.source.read_bytes())
    save_graph(graph, out)
    (out / PROJECT_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def cold_kernels(layers: list[Layer], kernels: list[str]) -> list[str]:
    """The kernels whose layers together do less than COLD_SHARE of the model's work (MACs plus
    ELEMENT_WORK per element read or written): on Cortex-M they are built for size and from their
    portable source, since their speed hardly counts and their code does (e.g. ResNet-8's softmax,
    average pool and 64 x 10 dense layer: 0.04 % of its work, 3 KB of DSP code and -O2 unrolling).
    A kernel no layer names (the softmax an early exit calls) counts as cold."""
    work: dict[str, int] = {k: 0 for k in kernels}
    for l in layers:
        if l.kernel:
            elements = sum(b.size for b in l.inputs) + sum(b.size for b in l.outputs)
            work[l.kernel] = work.get(l.kernel, 0) + l.macs + ELEMENT_WORK * elements
    total = sum(work.values())
    # only kernels with a portable source: a variant-only kernel (its own filter order) stays as it is
    return sorted(k for k in kernels
                  if work[k] < COLD_SHARE * total and (TEMPLATES / "kernels" / f"{k}.c.j2").exists())


def load_project(out_dir: str | Path) -> dict:
    path = Path(out_dir) / PROJECT_FILE
    if not path.exists():
        raise EdgekitError(f"{out_dir} is not an edgekit project (no {PROJECT_FILE}); run `edgekit generate` first")
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise EdgekitError(f"{path} is damaged ({exc}); generate the project again") from None
    missing = [k for k in ("board", "mode", "fingerprint", "inputs", "outputs", "layers", "kernels")
               if not isinstance(record, dict) or k not in record]
    if missing:
        raise EdgekitError(f"{path} is damaged: it lacks {', '.join(missing)}; generate the project again")
    return record


def clean_project(out_dir: str | Path) -> None:
    shutil.rmtree(out_dir, ignore_errors=True)
