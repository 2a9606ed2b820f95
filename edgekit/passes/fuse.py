"""Float-graph clean-ups before quantization: fold BatchNorm, fuse ReLU/ReLU6.

Both passes return a new graph and leave their input untouched.
"""
from __future__ import annotations

import copy

import numpy as np

from ..errors import EdgekitError
from ..ir import Graph, Op, Tensor

_FOLDS_BN = ("conv2d", "depthwise_conv2d", "fully_connected")
_FUSES_ACTIVATION = ("conv2d", "depthwise_conv2d", "fully_connected", "add", "max_pool2d", "avg_pool2d")


def _rewire(graph: Graph, old: str, new: str) -> None:
    for op in graph.ops:
        op.inputs = [new if n == old else n for n in op.inputs]
    graph.outputs = [new if n == old else n for n in graph.outputs]
    if old in graph.source_layouts and new not in graph.source_layouts:
        graph.source_layouts[new] = graph.source_layouts.pop(old)
    params = graph.meta.get("activation_params")
    if params and old in params:  # QAT parameters recorded after a fused op belong to the op's output now
        params[new] = params.pop(old)


def _drop_unused_tensors(graph: Graph) -> None:
    used = set(graph.inputs) | set(graph.outputs)
    for op in graph.ops:
        used.update(op.inputs)
        used.update(op.outputs)
    for name in list(graph.tensors):
        if name not in used:
            del graph.tensors[name]


def fold_batch_norm(graph: Graph) -> Graph:
    """Fold each BatchNorm into the conv / linear layer before it; a BatchNorm
    with no such layer becomes a 1x1 depthwise convolution."""
    g = copy.deepcopy(graph)
    producers = g.producers()
    consumers = g.consumers()
    new_ops: list[Op] = []
    for op in g.ops:
        if op.kind != "batch_norm":
            new_ops.append(op)
            continue
        x, scale_name, offset_name = op.inputs
        scale = g.tensors[scale_name].data.astype(np.float64)
        offset = g.tensors[offset_name].data.astype(np.float64)
        prev = producers.get(x)
        if prev is not None and prev.kind in _FOLDS_BN and len(consumers[x]) == 1 and x not in g.outputs \
                and prev.attrs.get("activation", "none") == "none":
            w = g.tensors[prev.inputs[1]]
            if prev.kind == "depthwise_conv2d":
                w.data = (w.data * scale[None, None, None, :]).astype(np.float32)
            else:
                w.data = (w.data * scale.reshape((-1,) + (1,) * (w.data.ndim - 1))).astype(np.float32)
            if len(prev.inputs) > 2:
                b = g.tensors[prev.inputs[2]]
                b.data = (b.data * scale + offset).astype(np.float32)
            else:
                bias_name = g.unique_name(f"{prev.name}.bias")
                g.add_tensor(Tensor(bias_name, (len(scale),), "float32", offset.astype(np.float32)))
                prev.inputs.append(bias_name)
            _rewire(g, op.outputs[0], x)
            continue
        shape = g.tensors[x].shape
        if len(shape) not in (3, 4):
            raise EdgekitError(f"layer '{op.name}': a BatchNorm on a vector that does not follow a Linear layer "
                               "cannot be folded; put it right after a Linear layer")
        C = shape[-1]  # channels last at rank 4 and 3: a 1x1 depthwise conv on the NHWC view
        w_name = g.unique_name(f"{op.name}.weight")
        g.add_tensor(Tensor(w_name, (1, 1, 1, C), "float32", scale.reshape(1, 1, 1, C).astype(np.float32)))
        new_ops.append(Op("depthwise_conv2d", op.name, [x, w_name, offset_name], op.outputs,
                          dict(stride=(1, 1), dilation=(1, 1), padding=(0, 0, 0, 0), activation="none",
                               depth_multiplier=1)))
    g.ops = new_ops
    _drop_unused_tensors(g)
    return g


def fuse_activations(graph: Graph) -> Graph:
    """Fold a ReLU / ReLU6 into the op that produces its input when nothing else reads it."""
    g = copy.deepcopy(graph)
    producers = g.producers()
    consumers = g.consumers()
    kept: list[Op] = []
    for op in g.ops:
        if op.kind in ("relu", "relu6"):
            x = op.inputs[0]
            prev = producers.get(x)
            if prev is not None and prev.kind in _FUSES_ACTIVATION and len(consumers[x]) == 1 \
                    and x not in g.outputs and prev.attrs.get("activation", "none") == "none":
                prev.attrs["activation"] = op.kind
                _rewire(g, op.outputs[0], x)
                continue
        kept.append(op)
    g.ops = kept
    _drop_unused_tensors(g)
    return g


def fold_padding(graph: Graph) -> Graph:
    """Fold a zero pad into the convolution that reads it (convolutions pad with zeros anyway)."""
    g = copy.deepcopy(graph)
    producers = g.producers()
    consumers = g.consumers()
    dropped = set()
    for op in g.ops:
        if op.kind not in ("conv2d", "depthwise_conv2d"):
            continue
        pad = producers.get(op.inputs[0])
        if pad is None or pad.kind != "pad" or pad.attrs.get("value", 0.0) != 0.0 \
                or len(consumers[pad.outputs[0]]) != 1 or pad.outputs[0] in g.outputs:
            continue
        op.attrs["padding"] = tuple(a + b for a, b in zip(op.attrs["padding"], pad.attrs["padding"]))
        op.inputs[0] = pad.inputs[0]
        dropped.add(id(pad))
    g.ops = [op for op in g.ops if id(op) not in dropped]
    _drop_unused_tensors(g)
    return g


def prepare_float(graph: Graph) -> Graph:
    """The float graph the quantizer and the weight-only backend start from."""
    return fuse_activations(fold_batch_norm(fold_padding(graph)))
