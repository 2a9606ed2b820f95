"""PyTorch -> float IR, through ``torch.export``.

The exported ATen graph is walked node by node. Tensors change layout on the
way in: NCHW activations become NHWC, conv weights become OHWI (depthwise:
1HWO), as TFLite and CMSIS-NN lay them out. A Flatten of a spatial tensor
keeps NHWC order in memory; the Linear layer that reads it gets its weight
columns permuted instead, so no transpose runs on the device.
"""
from __future__ import annotations

import operator
from pathlib import Path

import numpy as np

from ..errors import EdgekitError
from ..ir import Graph, Op, Tensor, conv_output_size, nhwc

SUPPORTED_LAYERS = (
    "Conv2d (groups 1 or depthwise), Conv1d, Linear, BatchNorm1d/2d, ReLU, ReLU6, MaxPool2d, "
    "AvgPool2d, AdaptiveAvgPool2d, ZeroPad2d / F.pad, Flatten / view / reshape, residual add (+), "
    "torch.cat, Dropout, Identity, a final Softmax, LSTM and GRU (batch_first, zero initial state), "
    "int8 fake quantization (from edgekit.qat), "
    "Sigmoid, Tanh, Hardswish, Hardsigmoid, SiLU, GELU, ELU, LeakyReLU, PReLU, clamp / Hardtanh, torch.rsqrt, "
    "x + y, x - y, x * y (broadcasting (N,C,1,1) with (N,C,H,W)), x + c, x * c, x / c with constants or "
    "parameter tensors, (x - y) ** 2, LayerNorm, GroupNorm, InstanceNorm1d/2d, "
    "MultiheadAttention (batch_first, no masks), TransformerEncoderLayer, scaled_dot_product_attention"
)
SUPPORTED_LAYERS += ("; structure: grouped Conv1d/2d, MaxPool1d, AvgPool1d, AdaptiveAvg/MaxPool1d/2d, mean / sum "
                     "over any dims, amax / amin over any dims, permute / transpose, view / reshape / squeeze / unsqueeze, chunk / split, "
                     "slicing x[:, a:b], x[:, i], Linear on (N, L, C), softmax / log_softmax on any dim, "
                     "Upsample nearest / bilinear, ConvTranspose2d")


class _Poisoned(Exception):
    """A node reads the result of a node that could not be converted: reported once, at the source."""


# The extra file of a .pt2 that names a multi-exit model's outputs (early exits in order, final last).
EXITS_FILE = "edgekit_exits.json"


def load_exported(path: str | Path):
    """Load a ``torch.export.save`` file, with clear errors."""
    import torch

    import logging
    import zipfile

    path = Path(path)
    if not path.exists():
        raise EdgekitError(f"model file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise EdgekitError(f"{path} is not a torch.export file (torch.export.save writes a zip archive)")
    from .pt2_archive import read_checked
    checked = read_checked(path)  # nothing that needs unpickling; torch reads exactly these checked bytes
    export_log = logging.getLogger("torch.export")
    level = export_log.level
    export_log.setLevel(logging.ERROR)  # torch logs its own traceback before raising
    extra = {EXITS_FILE: ""}
    try:
        import io
        program = torch.export.load(io.BytesIO(checked), extra_files=extra)
    except Exception as exc:  # torch raises many kinds here
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise EdgekitError(f"{path} is not a loadable torch.export file: {first}") from None
    finally:
        export_log.setLevel(level)
    if extra[EXITS_FILE]:  # written by edgekit.compress.exits.save_model: a multi-exit model
        import json
        try:
            record = json.loads(extra[EXITS_FILE])
            program.edgekit_exits = list(record["names"])
            if record.get("temperatures"):
                program.edgekit_exit_temperatures = [float(t) for t in record["temperatures"]]
        except (ValueError, KeyError, TypeError):
            raise EdgekitError(f"{path}: its {EXITS_FILE} record is damaged") from None
    return program


def export_module(module, example_input):
    """torch.export a module in eval mode, turning export failures into one clear message."""
    import torch

    module = module.eval()
    if not isinstance(example_input, tuple):
        example_input = (example_input,)
    try:
        return torch.export.export(module, example_input)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EdgekitError(f"torch.export could not trace {type(module).__name__}: {first}") from None


def from_torch(model, example_input=None, *, input_shape=None) -> Graph:
    """Convert an ``nn.Module`` (with an example input or an input shape) or an
    ``ExportedProgram`` to a float IR graph."""
    import torch

    if isinstance(model, torch.export.ExportedProgram):
        program = model
    else:
        if example_input is None:
            if input_shape is None:
                raise EdgekitError("from_torch needs example_input or input_shape for an nn.Module")
            example_input = torch.zeros(tuple(input_shape))
        example_input = torch.as_tensor(example_input, dtype=torch.float32)
        if example_input.shape[0] != 1:
            example_input = example_input[:1]
        program = export_module(model, example_input)
    graph = _Converter(program).run()
    names = getattr(model, "edgekit_exits", None) or getattr(program, "edgekit_exits", None)
    if names:
        from ..passes.exits import set_exit_names
        set_exit_names(graph, names)
        temperatures = getattr(model, "edgekit_exit_temperatures", None) or \
            getattr(program, "edgekit_exit_temperatures", None)
        if temperatures:  # fitted by compress.exits.calibrate: the exit decisions use softmax(logits / T)
            graph.meta["exits"]["temperatures"] = [float(t) for t in temperatures]
    return graph


_POISON = object()  # the value of a node that could not be converted
_NO_HANDLER = "this operation is not supported"
# Layers refused as a whole: their first ATen op (an LSTM's zeros, an attention's linear) says nothing.
_UNSUPPORTED_MODULES = ("RNN", "LSTMCell", "GRUCell", "RNNCell", "TransformerDecoderLayer", "TransformerDecoder",
                        "Transformer")


def _layer_of(node) -> tuple[str, str]:
    """(module path, module type) of the layer a node came from."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, type_ = list(stack.values())[-1]
    type_name = type_ if isinstance(type_, str) else getattr(type_, "__qualname__", str(type_))
    return path, type_name.rsplit(".", 1)[-1]  # "torch.nn.modules.rnn.LSTM" -> "LSTM"


def _reshape_blocks(a: list[int], b: list[int]):
    """Split a reshape of shape ``a`` into ``b`` (batch dims removed) into blocks: ([a dims], [b dims]) with
    equal products, dims numbered from 1 like torch's without the batch; size-1 dims belong to no block."""
    ia = [i for i, s in enumerate(a) if s != 1]
    ib = [j for j, s in enumerate(b) if s != 1]
    blocks, i, j = [], 0, 0
    while i < len(ia) or j < len(ib):
        if i >= len(ia) or j >= len(ib):
            return None
        ins, outs = [ia[i]], [ib[j]]
        pa, pb = a[ia[i]], b[ib[j]]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                if i >= len(ia):
                    return None
                ins.append(ia[i])
                pa *= a[ia[i]]
                i += 1
            else:
                if j >= len(ib):
                    return None
                outs.append(ib[j])
                pb *= b[ib[j]]
                j += 1
        blocks.append(([d + 1 for d in ins], [d + 1 for d in outs]))
    return blocks



def _adaptive_runs(n: int, o: int) -> list[tuple[int, int, int, int]]:
    """torch's adaptive bins of an axis of ``n`` pooled to ``o`` ([floor(i * n / o), ceil((i + 1) * n / o))) as
    runs of neighbouring bins of one size at one stride: (first start, size, stride, count) each."""
    starts = [i * n // o for i in range(o)]
    sizes = [-(-(i + 1) * n // o) - start for i, start in enumerate(starts)]
    runs: list[list[int]] = []
    for start, size in zip(starts, sizes):
        if runs:
            r_start, r_size, r_step, r_count = runs[-1]
            step = start - r_start if r_count == 1 else r_step
            if size == r_size and step > 0 and start == r_start + r_count * step:
                runs[-1] = [r_start, r_size, step, r_count + 1]
                continue
        runs.append([start, size, size, 1])
    return [tuple(r) for r in runs]


def _pair(v, n=2) -> tuple[int, ...]:
    if isinstance(v, (list, tuple)):
        v = list(v)
        if len(v) == 1:
            v = v * n
        return tuple(int(x) for x in v)
    return (int(v),) * n


# A value's layout is the tuple ``dims``: IR axis i holds torch dimension dims[i]. The IR is channels
# last, so a torch NCHW image is (0, 2, 3, 1), an (N, C, L) signal (0, 2, 1), a batch_first (N, L, C)
# sequence or an (N, C) vector the identity. A permute / transpose only relabels (no op, no copy); a
# consumer that needs another order (a convolution: channels last; a Linear: the torch last dimension last)
# gets one TRANSPOSE op, made once per value and order (see docs/DESIGN-NOTES.md, "Layouts").
CHANNELS_FIRST = {4: (0, 2, 3, 1), 3: (0, 2, 1), 2: (0, 1)}
LAYOUT_NAMES = {(0, 2, 3, 1): "NCHW", (0, 2, 1): "NCL", (0, 1, 2): "NLC", (0, 1): "NC", (0, 1, 2, 3): "NHWC"}
# ATen ops that read their input channels first: a rank-3 model input they read (directly or through a
# view) is an (N, C, L) signal, else an (N, L, C) sequence.
_READS_NCL = ("conv1d", "conv2d", "convolution", "batch_norm", "_native_batch_norm_legit_no_training",
              "max_pool1d", "max_pool1d_with_indices", "avg_pool1d", "adaptive_avg_pool1d", "adaptive_max_pool1d",
              "max_pool2d", "max_pool2d_with_indices", "avg_pool2d", "adaptive_avg_pool2d", "pad",
              "constant_pad_nd", "upsample_nearest2d", "upsample_bilinear2d", "conv_transpose1d")
_VIEWS = ("unsqueeze", "squeeze", "view", "reshape", "_unsafe_view", "dropout", "clone", "contiguous")


def _read_channels_first(node, depth: int = 0) -> bool:
    for user in node.users:
        name = getattr(user.target, "__name__", "").split(".")[0]
        if name in _READS_NCL or (name in _VIEWS and depth < 4 and _read_channels_first(user, depth + 1)):
            return True
    return False


class _Value:
    """What the converter knows about one torch value."""

    def __init__(self, name: str, layout, perm: np.ndarray | None = None):
        self.name = name  # IR tensor name
        # IR axis -> torch dimension; an int is a rank in its channels-first layout (NCHW, NCL, NC)
        self.dims = CHANNELS_FIRST[layout] if isinstance(layout, int) else tuple(int(d) for d in layout)
        self.perm = perm  # set on a flattened spatial tensor: IR position -> torch position

    @property
    def torch_rank(self) -> int:
        return len(self.dims)

    @property
    def channels_first(self) -> bool:
        """Laid out as a convolution reads it: torch dim 1 (channels) last, the rest in order."""
        return self.dims == CHANNELS_FIRST.get(self.torch_rank)


_ZERO_STATE = object()  # the value of aten.zeros: only an RNN's initial state may read it


class _Named:
    """A stand-in fx argument: the converter looks values up by ``.name``."""

    def __init__(self, name: str):
        self.name = name


class _Converter:
    def __init__(self, program):
        self.program = program
        self.graph = Graph()
        self.values: dict[str, object] = {}
        self.consts: dict[str, np.ndarray] = {}
        self.node_name: dict[str, str] = {}
        self.transposes: dict[tuple, _Value] = {}  # (IR tensor, dims) -> its transposed value
        self.reshape_source: dict[str, str] = {}  # reshape output -> the tensor it views
        self.attention_done: set[str] = set()  # nn.MultiheadAttention calls converted as a whole
        if program is not None:  # the ONNX frontend reuses this converter with its own constants
            self._load_constants()

    # -- constants ---------------------------------------------------------
    def _load_constants(self):
        sig = self.program.graph_signature
        state = self.program.state_dict
        constants = getattr(self.program, "constants", {}) or {}
        for ph, target in sig.inputs_to_parameters.items():
            self.consts[ph] = state[target].detach().float().cpu().numpy()
        for ph, target in sig.inputs_to_buffers.items():
            buf = state[target] if target in state else constants[target]
            self.consts[ph] = buf.detach().cpu().numpy()
        for ph, target in getattr(sig, "inputs_to_lifted_tensor_constants", {}).items():
            self.consts[ph] = constants[target].detach().cpu().numpy()

    def const(self, arg, what: str, node) -> np.ndarray | None:
        if arg is None:
            return None
        if not hasattr(arg, "name") or arg.name not in self.consts:
            raise self.unsupported(node, f"its {what} is computed at run time, not a parameter")
        data = self.consts[arg.name].astype(np.float32)
        if not np.all(np.isfinite(data)):
            path, _ = _layer_of(node)
            bad = int(np.sum(~np.isfinite(data)))
            raise EdgekitError(f"layer '{path or node.name}' has {bad} NaN or inf values in its {what}; "
                               "retrain or fix the checkpoint before deploying")
        return data

    # -- errors ------------------------------------------------------------
    def unsupported(self, node, why: str) -> EdgekitError:
        path, type_ = _layer_of(node)
        target = getattr(node.target, "__name__", str(node.target))
        where = f"layer '{path}' ({type_})" if path else f"operation '{node.name}'"
        if type_ in _UNSUPPORTED_MODULES and why == _NO_HANDLER:  # name the layer, not an op inside it
            return EdgekitError(f"{where}: {type_} layers are not supported yet.\nedgekit supports: {SUPPORTED_LAYERS}.")
        return EdgekitError(f"{where} uses {target}: {why}.\nedgekit supports: {SUPPORTED_LAYERS}.")

    # -- IR helpers --------------------------------------------------------
    def value(self, arg) -> _Value:
        v = self.values.get(arg.name) if hasattr(arg, "name") else None
        if v is _POISON:
            raise _Poisoned()
        if not isinstance(v, _Value):
            raise EdgekitError(f"it reads {arg}, which is not a tensor edgekit can convert")
        return v

    def shape(self, v: _Value) -> tuple[int, ...]:
        return self.graph.tensors[v.name].shape

    def new_tensor(self, base: str, shape, data=None) -> str:
        name = self.graph.unique_name(base)
        self.graph.add_tensor(Tensor(name, tuple(int(s) for s in shape), "float32", data))
        return name

    def add_op(self, kind, node, inputs, out_shape, torch_rank, attrs=None, perm=None) -> _Value:
        out = self.new_tensor(node.name, out_shape)
        path, _ = _layer_of(node)
        self.graph.ops.append(Op(kind, path or node.name, list(inputs), [out], dict(attrs or {})))
        v = _Value(out, torch_rank, perm)
        self.values[node.name] = v
        return v

    def require_plain(self, v: _Value, node):
        if v.perm is not None:
            raise self.unsupported(node, "it reads the flattened output of a spatial tensor; "
                                         "edgekit keeps NHWC order and can remap it only into a Linear layer")

    def torch_axis_to_ir(self, v: _Value, dim: int, node) -> int:
        if v.torch_rank not in (2, 3, 4):
            raise self.unsupported(node, f"tensors of rank {v.torch_rank} are not supported")
        return v.dims.index(dim % v.torch_rank)

    def require_channels_first(self, v: _Value, node, what: str) -> _Value:
        """The value in the layout a convolution / pooling reads (channels last in the IR)."""
        if v.channels_first:
            return v
        return self.transposed(v, CHANNELS_FIRST[v.torch_rank], node, what)

    def transposed(self, v: _Value, dims, node, what: str) -> _Value:
        """``v`` laid out as ``dims`` in the IR: one TRANSPOSE op (made once per value and order), over the
        fewest axes (neighbours that stay neighbours are merged, free reshapes around it)."""
        self.require_plain(v, node)
        dims = tuple(dims)
        key = (v.name, dims)
        if key in self.transposes:
            return self.transposes[key]
        shape = self.shape(v)
        src = [v.dims.index(d) for d in dims]  # new IR axis i reads old IR axis src[i]
        out_shape = tuple(shape[a] for a in src)
        # Merge runs of old axes that stay consecutive, and drop size-1 axes: the smallest transpose.
        kept = [a for a in src if shape[a] != 1]
        groups: list[list[int]] = []
        for a in kept:
            if groups and groups[-1][-1] + 1 == a:
                groups[-1].append(a)
            else:
                groups.append([a])
        order = sorted(range(len(groups)), key=lambda g: groups[g][0])  # groups in old memory order
        in_merged = tuple(int(np.prod([shape[a] for a in groups[g]])) for g in order)
        perm = tuple(order.index(g) for g in range(len(groups)))
        path, _ = _layer_of(node)
        base = path or node.name
        if perm == tuple(range(len(perm))):  # only size-1 axes move: a free reshape
            nv = _Value(self._plain_reshape(v.name, out_shape, f"{base}.relaid", path or node.name), dims)
            self.transposes[key] = nv
            return nv
        x = v.name
        if tuple(in_merged) != tuple(shape[1:]):
            x = self._plain_reshape(x, (1,) + in_merged, f"{base}.transpose_in", path or node.name)
        out_merged = (1,) + tuple(in_merged[p] for p in perm)
        y = self.new_tensor(f"{base}.transpose", out_merged)
        self.graph.ops.append(Op("transpose", path or node.name, [x], [y],
                                 dict(perm=(0,) + tuple(p + 1 for p in perm))))
        if out_merged != out_shape:
            y = self._plain_reshape(y, out_shape, f"{base}.transposed", path or node.name)
        nv = _Value(y, dims)
        self.transposes[key] = nv
        return nv

    def _plain_reshape(self, x: str, shape, base: str, layer: str) -> str:
        """A free reshape of IR tensor ``x`` (a reshape of a reshape reads the first one's input)."""
        x = self.reshape_source.get(x, x)
        if tuple(self.graph.tensors[x].shape) == tuple(shape):
            return x
        y = self.new_tensor(base, shape)
        self.graph.ops.append(Op("reshape", layer, [x], [y], {}))
        self.reshape_source[y] = x
        return y

    # -- the walk ----------------------------------------------------------
    def run(self) -> Graph:
        """Convert every node; a node that cannot be converted is recorded and the walk goes on, so one
        error lists every unsupported layer (nodes that only read its result are not listed again)."""
        sig = self.program.graph_signature
        user_inputs = list(sig.user_inputs)
        problems: dict[str, str] = {}  # one line per layer (module path), or per top-level operation
        for node in self.program.graph.nodes:
            if node.op == "placeholder":
                if node.name in self.consts:
                    continue
                if node.name not in user_inputs:
                    raise EdgekitError(f"model input {node.name!r} is neither a parameter nor a user input")
                self._input(node)
            elif node.op == "call_function":
                try:
                    self._call(node)
                except _Poisoned:
                    self.values[node.name] = _POISON
                except EdgekitError as exc:
                    self.values[node.name] = self._stand_in(node)
                    path, type_ = _layer_of(node)
                    key = path or node.name
                    if key not in problems:
                        problems[key] = str(exc).split("\nedgekit supports:")[0]
            elif node.op == "output":
                try:
                    self._output(node)
                except _Poisoned:
                    pass
        if len(problems) == 1:
            raise EdgekitError(f"{next(iter(problems.values()))}\nedgekit supports: {SUPPORTED_LAYERS}.")
        if problems:
            lines = "\n  ".join(problems.values())
            raise EdgekitError(f"{len(problems)} layers of this model are not supported:\n  {lines}"
                               f"\nedgekit supports: {SUPPORTED_LAYERS}.")
        self._drop_dead_reshapes()
        return self.graph

    def _drop_dead_reshapes(self):
        """Views nothing reads any more (a reshape a later reshape looked through)."""
        while True:
            used = set(self.graph.outputs) | {n for op in self.graph.ops for n in op.inputs}
            dead = [op for op in self.graph.ops if op.kind == "reshape" and op.outputs[0] not in used]
            if not dead:
                return
            for op in dead:
                self.graph.ops.remove(op)
                del self.graph.tensors[op.outputs[0]]

    def _input(self, node):
        val = node.meta.get("val")
        if val is None:
            raise EdgekitError(f"model input {node.name!r} has no recorded shape")
        shape = tuple(int(s) for s in val.shape)
        if len(shape) not in (2, 3, 4):
            raise EdgekitError(f"model input {node.name!r} has shape {list(shape)}; "
                               "edgekit takes (N, C, H, W), (N, C, L), (N, L, C) or (N, features)")
        dims = CHANNELS_FIRST[len(shape)]
        if len(shape) == 3 and not _read_channels_first(node):
            dims = (0, 1, 2)  # a sequence (N, L, C), as LSTM(batch_first) / Linear read it
        name = self.new_tensor(node.name, (1,) + tuple(shape[d] for d in dims[1:]))
        self.graph.inputs.append(name)
        self.graph.source_layouts[name] = LAYOUT_NAMES[dims]
        self.values[node.name] = _Value(name, dims)

    def _output(self, node):
        outs = node.args[0]
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        for arg in outs:
            v = self.value(arg)
            if v.perm is not None:
                raise self.unsupported(node, "the model returns a flattened spatial tensor")
            if v.dims not in LAYOUT_NAMES:
                v = self.transposed(v, tuple(range(v.torch_rank)), node, "the model output")
            self.graph.outputs.append(v.name)
            self.graph.source_layouts[v.name] = LAYOUT_NAMES[v.dims]

    def _call(self, node):
        target = node.target
        stack = node.meta.get("nn_module_stack") or {}
        if stack:
            key, (path, type_) = list(stack.items())[-1]
            if str(type_).rsplit(".", 1)[-1] == "MultiheadAttention":
                if key not in self.attention_done:
                    self.attention_done.add(key)
                    self._multihead_attention(node, key, path)
                elif self.values.get(node.name) is _POISON:
                    raise _Poisoned()
                return
        if target is operator.getitem:
            src = self.values.get(node.args[0].name)
            if src is _POISON:
                raise _Poisoned()
            if isinstance(src, tuple):
                self.values[node.name] = src[node.args[1]]
                if self.values[node.name] is _POISON:
                    raise _Poisoned()
                return
            raise self.unsupported(node, "indexing into a tensor is not supported")
        name = getattr(target, "__name__", str(target))  # e.g. "conv2d.default"
        op_name = name.split(".")[0]
        handler = getattr(self, f"_op_{op_name}", None)
        if self._fold_constant(node):
            return
        if self._reads_poisoned(node):
            raise _Poisoned()
        if handler is None:
            raise self.unsupported(node, _NO_HANDLER)
        handler(node)

    def _stand_in(self, node):
        """After a node failed: a tensor of its output shape, so the walk can still judge the nodes
        after it (the graph is never used: the conversion fails with the list of problems)."""
        def one(val):
            shape = tuple(int(d) for d in getattr(val, "shape", ()))
            if len(shape) not in (2, 3, 4):
                return _POISON
            dims = CHANNELS_FIRST[len(shape)]
            ir = (1,) + tuple(shape[d] for d in dims[1:])
            return _Value(self.new_tensor(f"{node.name}_unconverted", ir), dims)
        val = node.meta.get("val")
        try:
            if isinstance(val, (list, tuple)):
                return tuple(one(v) for v in val)
            return one(val)
        except (TypeError, ValueError):
            return _POISON

    def _reads_poisoned(self, node) -> bool:
        from torch.fx.node import map_arg

        reads = []
        map_arg((node.args, node.kwargs), reads.append)
        return any(self.values.get(n.name) is _POISON for n in reads)

    def _fold_constant(self, node) -> bool:
        """Evaluate an op whose tensor inputs are all parameters / constants (a layer scale reshaped
        to (C, 1, 1), a parameter times 2): its result is one more constant, no device code."""
        import torch
        from torch.fx.node import map_arg

        reads = []
        map_arg((node.args, node.kwargs), reads.append)
        if any(n.name not in self.consts for n in reads):
            return False
        args, kwargs = map_arg((node.args, node.kwargs), lambda n: torch.as_tensor(self.consts[n.name]))
        try:
            with torch.no_grad():
                result = node.target(*args, **kwargs)
        except Exception:  # noqa: BLE001 - not foldable: the handler decides
            return False
        if not isinstance(result, torch.Tensor):
            return False
        self.consts[node.name] = result.detach().cpu().numpy()
        return True

    # identity-like ops
    def _identity(self, node):
        self.values[node.name] = self.value(node.args[0])

    _op_dropout = _op_dropout_ = _op_alpha_dropout = _op_feature_dropout = _identity
    _op_clone = _op_contiguous = _op_detach = _op_identity = _identity

    def _op_native_dropout(self, node):
        v = self.value(node.args[0])
        self.values[node.name] = (v, None)

    # quantization-aware training: the trained parameters of the tensor it reads
    def _op_fake_quantize_per_tensor_affine(self, node):
        x, scale, zero_point, qmin, qmax = node.args[:5]
        if (int(qmin), int(qmax)) != (-128, 127):
            raise self.unsupported(node, f"fake quantization to [{qmin}, {qmax}] is not int8 [-128, 127]")
        if hasattr(scale, "name"):  # the tensor_qparams overload: parameters held as buffers
            scale = float(self.const(scale, "scale", node).reshape(-1)[0])
            zero_point = int(self.const(zero_point, "zero point", node).reshape(-1)[0])
        v = self.value(x)
        self.graph.meta.setdefault("activation_params", {})[v.name] = (float(scale), int(zero_point))
        self.values[node.name] = v

    # convolution
    @staticmethod
    def _conv_args(node):
        """aten.conv1d/conv2d(input, weight, bias, stride, padding, dilation, groups), positional or keyword."""
        a = list(node.args) + [None] * 7
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        defaults = (None, None, None, 1, 0, 1, 1)
        return [a[i] if a[i] is not None else node.kwargs.get(n, d) for i, (n, d) in enumerate(zip(names, defaults))]

    def _op_conv2d(self, node):
        x, w, b, stride, padding, dilation, groups = self._conv_args(node)
        self._conv(node, x, w, b, _pair(stride), padding, _pair(dilation), int(groups))

    def _op_conv1d(self, node):
        x, w, b, stride, padding, dilation, groups = self._conv_args(node)
        v = self.value(x)
        if v.torch_rank != 3:
            raise self.unsupported(node, "Conv1d expects an (N, C, L) input")
        weight = self.const(w, "weight", node)[:, :, None, :]  # (O, I, 1, K)
        if not isinstance(padding, str):
            padding = (0, _pair(padding, 1)[0])
        self._conv(node, x, weight, b, (1, _pair(stride, 1)[0]), padding, (1, _pair(dilation, 1)[0]),
                   int(groups), torch_rank=3)

    def _op_convolution(self, node):
        x, w, b, stride, padding, dilation, transposed, _, groups = node.args[:9]
        if transposed:
            raise self.unsupported(node, "transposed convolution is not supported")
        weight = self.const(w, "weight", node)
        if weight.ndim == 3:
            self._conv(node, x, weight[:, :, None, :], b, (1, _pair(stride, 1)[0]), (0, _pair(padding, 1)[0]),
                       (1, _pair(dilation, 1)[0]), int(groups), torch_rank=3)
        else:
            self._conv(node, x, w, b, _pair(stride), padding, _pair(dilation), int(groups))

    def _conv(self, node, x, w, b, stride, padding, dilation, groups, torch_rank=4):
        v = self.value(x)
        self.require_plain(v, node)
        if v.torch_rank != torch_rank:
            raise self.unsupported(node, f"expected a rank-{torch_rank} input, got rank {v.torch_rank}")
        v = self.require_channels_first(v, node, "a convolution")
        weight = w if isinstance(w, np.ndarray) else self.const(w, "weight", node)
        bias = self.const(b, "bias", node)
        _, H, W, C = nhwc(self.shape(v))
        O, I, KH, KW = weight.shape
        if isinstance(padding, str):
            if padding == "valid":
                pads = (0, 0, 0, 0)
            elif padding == "same":
                th = dilation[0] * (KH - 1)
                tw = dilation[1] * (KW - 1)
                pads = (th // 2, th - th // 2, tw // 2, tw - tw // 2)
            else:
                raise self.unsupported(node, f"padding mode {padding!r} is not supported")
        elif isinstance(padding, (tuple, list)) and len(padding) == 4:  # (top, bottom, left, right): ONNX's uneven pads
            pads = tuple(int(p) for p in padding)
        else:
            ph, pw = _pair(padding)
            pads = (ph, ph, pw, pw)
        OH = conv_output_size(H, KH, stride[0], dilation[0], pads[0], pads[1])
        OW = conv_output_size(W, KW, stride[1], dilation[1], pads[2], pads[3])
        if OH < 1 or OW < 1:
            raise self.unsupported(node, f"the kernel {KH}x{KW} does not fit the {H}x{W} input")
        attrs = dict(stride=stride, dilation=dilation, padding=pads, activation="none")
        if groups == 1:
            kind = "conv2d"
            ir_weight = np.ascontiguousarray(weight.transpose(0, 2, 3, 1))  # OHWI
        elif groups == C and I == 1 and O % C == 0:
            kind = "depthwise_conv2d"
            ir_weight = np.ascontiguousarray(weight.transpose(1, 2, 3, 0))  # 1HWO
            attrs["depth_multiplier"] = O // C
        elif groups > 1 and C % groups == 0 and O % groups == 0 and I == C // groups:
            return self._grouped_conv(node, v, weight, bias, groups, (OH, OW), torch_rank, attrs)
        else:
            raise self.unsupported(node, f"convolution with groups={groups}, {C} input channels and weights "
                                         f"{list(weight.shape)}")
        path, _ = _layer_of(node)
        base = path or node.name
        inputs = [v.name, self.new_tensor(f"{base}.weight", ir_weight.shape, ir_weight)]
        if bias is not None:
            inputs.append(self.new_tensor(f"{base}.bias", bias.shape, bias))
        out_shape = (1, OH, OW, O) if torch_rank == 4 else (1, OW, O)  # Conv1d: height 1, kept rank 3
        self.add_op(kind, node, inputs, out_shape, torch_rank, attrs)

    def _grouped_conv(self, node, v: _Value, weight, bias, groups: int, out_hw, torch_rank, attrs):
        """groups not 1 and not depthwise: split the channels, one convolution per group, concatenate
        (what TensorFlow's converter did before CONV_2D took groups; every piece keeps the fast kernels)."""
        path, _ = _layer_of(node)
        base = path or node.name
        per_out = weight.shape[0] // groups
        split_node_name = f"{node.name}_groups"
        pieces = [self.new_tensor(f"{split_node_name}.{g}", self.shape(v)[:-1] + (self.shape(v)[-1] // groups,))
                  for g in range(groups)]
        self.graph.ops.append(Op("split", base, [v.name], pieces, dict(axis=len(self.shape(v)) - 1)))
        outs = []
        OH, OW = out_hw
        for g, piece in enumerate(pieces):
            w = np.ascontiguousarray(weight[g * per_out:(g + 1) * per_out].transpose(0, 2, 3, 1))  # OHWI
            inputs = [piece, self.new_tensor(f"{base}.group{g}.weight", w.shape, w)]
            if bias is not None:
                b = np.ascontiguousarray(bias[g * per_out:(g + 1) * per_out])
                inputs.append(self.new_tensor(f"{base}.group{g}.bias", b.shape, b))
            shape = (1, OH, OW, per_out) if torch_rank == 4 else (1, OW, per_out)
            outs.append(self.new_tensor(f"{node.name}.group{g}", shape))
            self.graph.ops.append(Op("conv2d", base, inputs, [outs[-1]], dict(attrs)))
        shape = (1, OH, OW, weight.shape[0]) if torch_rank == 4 else (1, OW, weight.shape[0])
        return self.add_op("concat", node, outs, shape, torch_rank, dict(axis=len(shape) - 1))

    def _op_conv_transpose2d(self, node):
        """ConvTranspose2d (groups 1, no dilation): TRANSPOSE_CONV; output_padding grows the far side."""
        a = list(node.args) + [None] * 8
        x, w, b = a[0], a[1], a[2]
        stride = _pair(a[3] if a[3] is not None else 1)
        padding = _pair(a[4] if a[4] is not None else 0)
        output_padding = _pair(a[5] if a[5] is not None else 0)
        groups = int(a[6]) if a[6] is not None else 1
        dilation = _pair(a[7] if a[7] is not None else 1)
        if groups != 1 or dilation != (1, 1):
            raise self.unsupported(node, f"ConvTranspose2d with groups={groups}, dilation={dilation} "
                                         "(edgekit takes groups 1 without dilation)")
        v = self._spatial_input(node, x)
        weight = self.const(w, "weight", node)  # (I, O, KH, KW)
        bias = self.const(b, "bias", node)
        _, H, W, C = self.shape(v)
        _, O, KH, KW = weight.shape
        OH = (H - 1) * stride[0] - 2 * padding[0] + KH + output_padding[0]
        OW = (W - 1) * stride[1] - 2 * padding[1] + KW + output_padding[1]
        ir_weight = np.ascontiguousarray(weight.transpose(1, 2, 3, 0))  # OHWI
        path, _ = _layer_of(node)
        base = path or node.name
        inputs = [v.name, self.new_tensor(f"{base}.weight", ir_weight.shape, ir_weight)]
        if bias is not None:
            inputs.append(self.new_tensor(f"{base}.bias", bias.shape, bias))
        pads = (padding[0], padding[0] - output_padding[0], padding[1], padding[1] - output_padding[1])
        self.add_op("transpose_conv2d", node, inputs, (1, OH, OW, O), 4,
                    dict(stride=stride, padding=pads, activation="none"))

    _op_conv_transpose2d_input = _op_conv_transpose2d

    def _op_linear(self, node):
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        self._linear(node, self.value(x), self.const(w, "weight", node), self.const(b, "bias", node))

    def _linear(self, node, v: _Value, weight: np.ndarray, bias: np.ndarray | None, name: str = "") -> _Value:
        """FULLY_CONNECTED over the last torch dim of an (N, features) or (N, L, features) value."""
        if v.torch_rank not in (2, 3):
            raise self.unsupported(node, f"Linear on a rank-{v.torch_rank} tensor (edgekit takes (N, features) and "
                                         "(N, L, features))")
        if v.dims != tuple(range(v.torch_rank)):  # the features (torch's last dim) last in the IR
            v = self.transposed(v, tuple(range(v.torch_rank)), node, "a Linear layer")
        if v.perm is not None:
            weight = weight[:, v.perm]
        path, _ = _layer_of(node)
        base = name or path or node.name
        inputs = [v.name, self.new_tensor(f"{base}.weight", weight.shape, np.ascontiguousarray(weight))]
        if bias is not None:
            inputs.append(self.new_tensor(f"{base}.bias", bias.shape, bias))
        out_shape = self.shape(v)[:-1] + (weight.shape[0],)  # rank 3: every row (TFLite keep_num_dims)
        return self.add_op("fully_connected", node, inputs, out_shape, v.dims, dict(activation="none"))

    # recurrent layers
    def _op_zeros(self, node):
        """A constant zero tensor: what nn.LSTM / nn.GRU start their state from (checked by the layer)."""
        self.values[node.name] = _ZERO_STATE

    def _zero_state(self, arg) -> bool:
        """Whether an RNN's initial state is zeros (aten.zeros, or a folded all-zero constant)."""
        name = getattr(arg, "name", None)
        if self.values.get(name) is _ZERO_STATE:
            return True
        return name in self.consts and not np.any(self.consts[name])

    def _op_lstm(self, node):
        """aten.lstm.input(x, (h0, c0), params, has_biases, num_layers, dropout, train, bidirectional,
        batch_first): one IR lstm op per layer, zero initial state, every step's output."""
        x, hx, params, has_biases, num_layers, _, _, bidirectional, batch_first = node.args[:9]
        if bidirectional:
            raise self.unsupported(node, "a bidirectional LSTM is not supported (TFLite's integer LSTM is one-way)")
        if not batch_first:
            raise self.unsupported(node, "a time-major LSTM is not supported; use batch_first=True")
        if not all(self._zero_state(h) for h in hx):
            raise self.unsupported(node, "an initial state other than zeros is not supported")
        for user in node.users:
            if user.target is operator.getitem and user.args[1] != 0 and user.users:
                raise self.unsupported(node, "the final states (h_n, c_n) are not supported as outputs; "
                                             "use the output sequence (output[:, -1] is the last step)")
        v = self.value(x)
        if v.torch_rank != 3:
            raise self.unsupported(node, f"an LSTM input of rank {v.torch_rank} (expected (N, L, C))")
        if v.dims != (0, 1, 2):
            v = self.transposed(v, (0, 1, 2), node, "an LSTM")
        per_layer = 4 if has_biases else 2
        path, _ = _layer_of(node)
        base = path or node.name
        steps = self.shape(v)[1]
        for layer in range(int(num_layers)):
            w_ih, w_hh = (self.const(a, "weights", node) for a in params[per_layer * layer:per_layer * layer + 2])
            hidden = w_hh.shape[1]
            bias = np.zeros(4 * hidden, np.float32)
            if has_biases:
                bias = sum(self.const(a, "bias", node) for a in params[per_layer * layer + 2:per_layer * layer + 4])
            suffix = f"_l{layer}"
            inputs = [v.name, self.new_tensor(f"{base}.weight_ih{suffix}", w_ih.shape, w_ih),
                      self.new_tensor(f"{base}.weight_hh{suffix}", w_hh.shape, w_hh),
                      self.new_tensor(f"{base}.bias{suffix}", bias.shape, bias.astype(np.float32))]
            v = self.add_op("lstm", node, inputs, (1, steps, hidden), (0, 1, 2), dict(hidden=hidden))
        self.values[node.name] = (v, None, None)

    def _op_gru(self, node):
        """aten.gru.input(x, h0, params, has_biases, num_layers, dropout, train, bidirectional,
        batch_first), lowered as TFLite's converter unrolls a GRU (TFLite has no int8 GRU kernel): per
        step r, z = LOGISTIC(FC(x_t) + FC(h)), n = TANH(FC(x_t) + r * FC(h)), h = n + z * (h - n),
        x_t a STRIDED_SLICE of the input; every step's h concatenated into the output sequence. The
        step's weights are shared constants (stored once); at t = 0 the state is zero, so the
        recurrent products are their biases."""
        x, h0, params, has_biases, num_layers, _, _, bidirectional, batch_first = node.args[:9]
        if bidirectional:
            raise self.unsupported(node, "a bidirectional GRU is not supported")
        if not batch_first:
            raise self.unsupported(node, "a time-major GRU is not supported; use batch_first=True")
        if not self._zero_state(h0):
            raise self.unsupported(node, "an initial state other than zeros is not supported")
        for user in node.users:
            if user.target is operator.getitem and user.args[1] != 0 and user.users:
                raise self.unsupported(node, "the final state h_n is not supported as an output; "
                                             "use the output sequence (output[:, -1] is the last step)")
        v = self.value(x)
        if v.torch_rank != 3:
            raise self.unsupported(node, f"a GRU input of rank {v.torch_rank} (expected (N, L, C))")
        if v.dims != (0, 1, 2):
            v = self.transposed(v, (0, 1, 2), node, "a GRU")
        path, _ = _layer_of(node)
        base = path or node.name
        per_layer = 4 if has_biases else 2
        for layer in range(int(num_layers)):
            w_ih, w_hh = (self.const(a, "weights", node) for a in params[per_layer * layer:per_layer * layer + 2])
            hidden = w_hh.shape[1]
            if has_biases:
                b_ih, b_hh = (self.const(a, "bias", node) for a in params[per_layer * layer + 2:per_layer * layer + 4])
            else:
                b_ih = b_hh = np.zeros(3 * hidden, np.float32)
            v = self._gru_layer(node, f"{base}.l{layer}", v, w_ih, w_hh, b_ih, b_hh)
        self.values[node.name] = (v, None)

    def _gru_layer(self, node, base, v, w_ih, w_hh, b_ih, b_hh) -> _Value:
        hidden = w_hh.shape[1]
        steps, depth = self.shape(v)[1], self.shape(v)[2]
        path, _ = _layer_of(node)
        name = path or node.name
        gate = {g: slice(k * hidden, (k + 1) * hidden) for k, g in enumerate("rzn")}
        consts = {f"w_i{g}": self.new_tensor(f"{base}.weight_i{g}", (hidden, depth), np.ascontiguousarray(w_ih[s]))
                  for g, s in gate.items()}
        consts.update({f"w_h{g}": self.new_tensor(f"{base}.weight_h{g}", (hidden, hidden),
                                                  np.ascontiguousarray(w_hh[s])) for g, s in gate.items()})

        alike: dict[str, list[str]] = {}  # the same tensor of every step (tag without the step)

        def op(kind, inputs, shape, attrs=None, tag=""):
            out = self.new_tensor(f"{base}.{tag}", shape)
            self.graph.ops.append(Op(kind, name, list(inputs), [out], dict(attrs or {})))
            step, _, role = tag.partition(".")
            # step 0 has no recurrent term; LOGISTIC / TANH outputs have fixed parameters anyway
            if step.startswith("t") and step[1:].isdigit() and step != "t0" and kind not in ("logistic", "tanh"):
                alike.setdefault(role, []).append(out)
            return out

        def fc(x_name, w_key, bias, tag):
            b = self.new_tensor(f"{base}.{tag}.bias", (hidden,), bias.astype(np.float32))
            return op("fully_connected", [x_name, consts[w_key], b], (1, hidden), dict(activation="none"), tag)

        h = None
        outs = []
        for t in range(steps):
            xt = op("slice", [v.name], (1, 1, depth), dict(begin=(0, t, 0), end=(1, t + 1, depth), strides=(1, 1, 1)),
                    f"t{t}.x")
            xt = op("reshape", [xt], (1, depth), {}, f"t{t}.x_row")
            pre = {}
            for g in "rz":
                if h is None:  # zero state: the recurrent product is its bias
                    pre[g] = fc(xt, f"w_i{g}", b_ih[gate[g]] + b_hh[gate[g]], f"t{t}.{g}_in")
                else:
                    gx = fc(xt, f"w_i{g}", b_ih[gate[g]] + b_hh[gate[g]], f"t{t}.{g}_in")
                    gh = fc(h, f"w_h{g}", np.zeros(hidden, np.float32), f"t{t}.{g}_rec")
                    pre[g] = op("add", [gx, gh], (1, hidden), dict(activation="none"), f"t{t}.{g}_sum")
            r = op("logistic", [pre["r"]], (1, hidden), {}, f"t{t}.r")
            z = op("logistic", [pre["z"]], (1, hidden), {}, f"t{t}.z")
            gx = fc(xt, "w_in", b_ih[gate["n"]], f"t{t}.n_in")
            if h is None:
                b_hn = self.new_tensor(f"{base}.t{t}.n_rec_bias", (1, hidden), b_hh[gate["n"]].reshape(1, hidden))
                gh = op("mul", [r, b_hn], (1, hidden), dict(activation="none"), f"t{t}.r_n_rec")
            else:
                gh = op("mul", [r, fc(h, "w_hn", b_hh[gate["n"]], f"t{t}.n_rec")], (1, hidden),
                        dict(activation="none"), f"t{t}.r_n_rec")
            n = op("tanh", [op("add", [gx, gh], (1, hidden), dict(activation="none"), f"t{t}.n_sum")], (1, hidden),
                   {}, f"t{t}.n")
            if h is None:  # h = n - z * n
                h = op("sub", [n, op("mul", [z, n], (1, hidden), dict(activation="none"), f"t{t}.z_n")], (1, hidden),
                       dict(activation="none"), f"t{t}.h")
            else:  # h = n + z * (h - n)
                d = op("sub", [h, n], (1, hidden), dict(activation="none"), f"t{t}.h_minus_n")
                h = op("add", [n, op("mul", [z, d], (1, hidden), dict(activation="none"), f"t{t}.z_d")],
                       (1, hidden), dict(activation="none"), f"t{t}.h")
            outs.append(op("reshape", [h], (1, 1, hidden), {}, f"t{t}.h_step"))
        # TFLite Micro's CONCATENATION takes at most 10 inputs: longer sequences concatenate in groups.
        lengths = [1] * len(outs)
        while len(outs) > 1:
            groups = [(outs[i:i + 10], sum(lengths[i:i + 10])) for i in range(0, len(outs), 10)]
            outs = [g[0] if len(g) == 1 else op("concat", g, (1, n, hidden), dict(axis=1), f"steps{k}_{n}")
                    for k, (g, n) in enumerate(groups)]
            lengths = [n for _, n in groups]
        seq = outs[0]
        self.graph.meta.setdefault("shared_quantization", []).extend(g for g in alike.values() if len(g) > 1)
        value = _Value(seq, (0, 1, 2))
        self.values[node.name] = value
        return value

    # matrix products and attention
    def _matmul_operand(self, arg, node) -> tuple[str, bool, tuple]:
        """(IR tensor, stored transposed?, torch shape) of a batched matmul operand. A permute that only
        swapped the last two dimensions is read through BATCH_MATMUL's adj flag: no TRANSPOSE op."""
        if hasattr(arg, "name") and arg.name in self.consts:
            data = self.const(arg, "operand", node)
            if data.ndim < 2:
                raise self.unsupported(node, "a matrix product with a vector operand is not supported")
            data = data.reshape((1,) * max(0, 3 - data.ndim) + data.shape)
            return self.new_tensor(f"{node.name}.operand", data.shape, np.ascontiguousarray(data)), False, data.shape
        v = self.value(arg)
        self.require_plain(v, node)
        rank = v.torch_rank
        if rank not in (3, 4):
            raise self.unsupported(node, f"a matrix product of rank-{rank} tensors is not supported (use (N, L, C) "
                                         "or (N, heads, L, C))")
        plain = tuple(range(rank))
        swapped = plain[:-2] + (rank - 1, rank - 2)
        if v.dims not in (plain, swapped):
            v = self.transposed(v, plain, node, "a matrix product")
        return v.name, v.dims == swapped, tuple(self._torch_shape(v))

    def _batch_matmul(self, node, a_arg, b_arg, beta=None):
        a, adj_x, sa = self._matmul_operand(a_arg, node)
        b, adj_y, sb = self._matmul_operand(b_arg, node)
        if len(sa) != len(sb):
            raise self.unsupported(node, f"a matrix product of shapes {list(sa)} and {list(sb)} (ranks differ)")
        if sa[-1] != sb[-2]:
            raise self.unsupported(node, f"shapes {list(sa)} and {list(sb)} do not multiply")
        batch = tuple(max(x, y) for x, y in zip(sa[:-2], sb[:-2]))
        return self.add_op("batch_matmul", node, [a, b], batch + (sa[-2], sb[-1]), tuple(range(len(sa))),
                           dict(adj_x=adj_x, adj_y=adj_y))

    def _op_bmm(self, node):
        self._batch_matmul(node, node.args[0], node.args[1])

    _op_matmul = _op_bmm

    def _op__scaled_dot_product_flash_attention_for_cpu(self, node):
        """F.scaled_dot_product_attention (no mask, causal flag or dropout): see _attention."""
        q, k, v = node.args[:3]
        fused = getattr(node.target, "__name__", "").startswith("_scaled_dot_product_flash")
        names = ("dropout_p", "is_causal") if fused else ("attn_mask", "dropout_p", "is_causal")
        given = dict(zip(names, node.args[3:]), **node.kwargs)
        dropout, causal, mask = given.get("dropout_p", 0.0), given.get("is_causal", False), given.get("attn_mask")
        if dropout or causal or mask is not None:
            raise self.unsupported(node, "attention with dropout, a causal flag or a mask is not supported")
        scale = node.kwargs.get("scale")
        depth = self._torch_shape(self.value(q))[-1]
        scale = float(scale) if scale is not None else 1.0 / float(np.sqrt(depth))
        out = self._attention(node, self.value(q), self.value(k), self.value(v), scale)
        # the flash variant also returns the log-sum-exp, which nothing in inference reads
        self.values[node.name] = (out, None) if fused else out

    def _attention(self, node, q: _Value, k: _Value, v: _Value, scale: float) -> _Value:
        """Every head's softmax(q k^T x scale) v, heads on a batch dim ((N, heads, L, d) or (N, L, d) values):
        BATCH_MATMUL(q, k, adj_y: k read transposed) -> SOFTMAX with the scale as its beta ->
        BATCH_MATMUL(p, v): exactly what TFLite's int8 kernels run, no extra multiply."""
        rank = k.torch_rank
        swap = tuple(range(rank - 2)) + (rank - 1, rank - 2)
        for role, value in (("query", q), ("value", v)):
            self.values[f"{node.name}_{role}"] = value
        self.values[f"{node.name}_key_transposed"] = _Value(k.name, tuple(swap[d] for d in k.dims))
        scores = self._batch_matmul(node, _Named(f"{node.name}_query"), _Named(f"{node.name}_key_transposed"))
        probs = self.add_op("softmax", node, [scores.name], self.shape(scores), scores.dims, dict(beta=scale))
        self.values[f"{node.name}_probs"] = probs
        return self._batch_matmul(node, _Named(f"{node.name}_probs"), _Named(f"{node.name}_value"))

    # nn.MultiheadAttention: converted as a whole from its parameters (its traced ops move the batch dim)
    def _module_nodes(self, key: str) -> list:
        return [n for n in self.program.graph.nodes if n.op == "call_function"
                and key in (n.meta.get("nn_module_stack") or {})]

    def _multihead_attention(self, node, key: str, path: str):
        """nn.MultiheadAttention(batch_first=True) from its parameters and the tensors it reads: per input a
        FULLY_CONNECTED projection (in_proj split in q, k, v), the head split (RESHAPE to (N, L, heads, d),
        the heads moved before L), the per-head attention (_attention), the heads merged back to (N, L, E)
        and the output projection. Its own traced ops are skipped: they move the batch dim around."""
        from torch.fx.node import map_arg

        nodes = self._module_nodes(key)
        inside = {n.name for n in nodes}
        outputs = [n for n in nodes if any(u.name not in inside for u in n.users)]
        reads: list = []
        for n in nodes:
            map_arg((n.args, n.kwargs), lambda a: reads.append(a) if a.name not in inside and a.name not in
                    self.consts and a not in reads else None)
        try:
            if len(outputs) != 1:
                raise self.unsupported(node, "its attention weights are read (call it with need_weights=False or "
                                             "ignore them)")
            params = {target[len(path) + 1:]: self.consts[ph] for ph, target in
                      self.program.graph_signature.inputs_to_parameters.items() if target.startswith(path + ".")}
            if any(name in params for name in ("bias_k", "bias_v")):
                raise self.unsupported(node, "add_bias_kv is not supported")
            if any(getattr(n.target, "__name__", "").split(".")[0] in ("cat", "zeros", "pad", "constant_pad_nd")
                   for n in nodes):  # a zero key / value row appended
                raise self.unsupported(node, "add_zero_attn is not supported")
            # batch_first: each of query, key, value (one tensor when they are the same) is first transposed
            inputs = [a for a in reads if any(getattr(n.target, "__name__", "").startswith("transpose") and
                                              n.args[0] is a and sorted(int(d) % 3 for d in n.args[1:3]) == [0, 1]
                                              for n in nodes)]
            if not inputs:
                raise self.unsupported(node, "a sequence-first MultiheadAttention is not supported; use "
                                             "batch_first=True")
            if len(inputs) != len(reads):
                raise self.unsupported(node, "an attention mask or key padding mask is not supported")
            query, key_in, value_in = {1: inputs * 3, 2: inputs + inputs[1:], 3: inputs}[len(inputs)]
            E = params["out_proj.weight"].shape[0]
            if "in_proj_weight" in params:
                w = params["in_proj_weight"]
                weights = [w[:E], w[E:2 * E], w[2 * E:]]
            else:
                weights = [params[f"{r}_proj_weight"] for r in "qkv"]
            b = params.get("in_proj_bias")
            biases = [None] * 3 if b is None else [b[:E], b[E:2 * E], b[2 * E:]]
            lq = int(self._torch_shape(self.value(query))[1])
            heads = next((int(n.meta["val"].shape[1]) for n in nodes
                          if getattr(n.target, "__name__", "").split(".")[0] in ("view", "reshape", "_unsafe_view")
                          and len(n.meta["val"].shape) == 3 and int(n.meta["val"].shape[0]) == lq
                          and int(n.meta["val"].shape[1]) * int(n.meta["val"].shape[2]) == E), None)
            if heads is None:
                raise self.unsupported(node, "edgekit could not find its number of heads")
            y = self._attention_layers(node, path, (query, key_in, value_in), weights, biases,
                                       params["out_proj.weight"], params.get("out_proj.bias"), heads)
        except (EdgekitError, _Poisoned):
            for n in outputs:
                self.values[n.name] = _POISON
            raise
        self.values[outputs[0].name] = y

    def _attention_layers(self, node, path: str, inputs, weights, biases, out_weight, out_bias, heads: int) -> _Value:
        """The layers of a multi-head attention (also the ONNX frontend's, for an exported one): per input
        (query, key, value: fx arguments, (N, L, E)) a FULLY_CONNECTED projection named "<path>.q_proj" ...,
        the head split (RESHAPE to (N, L, heads, d), the heads moved before L), the per-head attention
        (_attention), the heads merged back to (N, L, E) and the output projection "<path>.out_proj"."""
        E = out_weight.shape[0]
        depth = E // heads
        lq = int(self._torch_shape(self.value(inputs[0]))[1])
        projected = []
        for role, arg, w_, b_ in zip("qkv", inputs, weights, biases):
            x = self.value(arg)
            if x.torch_rank != 3:
                raise self.unsupported(node, f"a rank-{x.torch_rank} {role} input (expected (N, L, E))")
            y = self._linear(node, x, w_.astype(np.float32), None if b_ is None else b_.astype(np.float32),
                             f"{path}.{role}_proj")
            L = self._torch_shape(y)[1]
            split = self._reshape(node, y, (1, L, heads, depth))
            projected.append(_Value(split.name, tuple((0, 2, 1, 3).index(d) for d in split.dims)))
        out = self._attention(node, *projected, 1.0 / float(np.sqrt(depth)))
        merged = self._reshape(node, _Value(out.name, tuple((0, 2, 1, 3).index(d) for d in out.dims)), (1, lq, E))
        return self._linear(node, merged, out_weight.astype(np.float32),
                            None if out_bias is None else out_bias.astype(np.float32), f"{path}.out_proj")

    _op_scaled_dot_product_attention = _op__scaled_dot_product_flash_attention_for_cpu

    # normalisation
    def _batch_norm(self, node, x, gamma, beta, mean, var, eps):
        v = self.value(x)
        self.require_plain(v, node)
        if v.torch_rank > 2:
            v = self.require_channels_first(v, node, "a BatchNorm")
        mean = self.const(mean, "running mean", node)
        var = self.const(var, "running variance", node)
        C = mean.shape[0]
        gamma = self.const(gamma, "weight", node) if gamma is not None else np.ones(C, np.float32)
        beta = self.const(beta, "bias", node) if beta is not None else np.zeros(C, np.float32)
        scale = (gamma / np.sqrt(var.astype(np.float64) + eps)).astype(np.float32)
        offset = (beta - mean * scale).astype(np.float32)
        path, _ = _layer_of(node)
        base = path or node.name
        inputs = [v.name, self.new_tensor(f"{base}.scale", scale.shape, scale),
                  self.new_tensor(f"{base}.offset", offset.shape, offset)]
        return self.add_op("batch_norm", node, inputs, self.shape(v), v.dims)

    def _ir_op(self, node, kind: str, inputs, shape, attrs=None, tag: str = "") -> str:
        """One IR op of a lowering, its output named after the layer; returns the output tensor."""
        path, _ = _layer_of(node)
        out = self.new_tensor(f"{path or node.name}.{tag or kind}", shape)
        self.graph.ops.append(Op(kind, path or node.name, list(inputs), [out], dict(attrs or {})))
        return out

    def _ir_mean(self, node, x: str, axes, tag: str) -> str:
        """The mean over IR ``axes``, dims kept: the global-average op over the NHWC height and width,
        MEAN over any axes otherwise (both are TFLite's integer MEAN)."""
        shape = self.graph.tensors[x].shape
        kept = tuple(1 if a in axes else s for a, s in enumerate(shape))
        spatial = (1, 2) if len(shape) == 4 else (1,)
        if tuple(axes) == spatial and len(shape) in (3, 4):
            return self._ir_op(node, "mean", [x], kept, tag=tag)
        return self._ir_op(node, "reduce_mean", [x], kept, dict(axes=tuple(axes)), tag=tag)

    def _normalize(self, node, x: str, axes, eps: float, gamma=None, beta=None) -> str:
        """(x - mean) / sqrt(var + eps) * gamma + beta over IR ``axes``, lowered the way TFLite's converter
        does it, every step an int8 op TFLite runs: MEAN -> SUB and SQUARED_DIFFERENCE -> MEAN -> ADD eps
        -> RSQRT -> MUL -> MUL gamma -> ADD beta (gamma / beta: IR-shaped constants)."""
        shape = self.graph.tensors[x].shape
        path, _ = _layer_of(node)
        base = path or node.name
        scalar = (1,) * len(shape)
        mean = self._ir_mean(node, x, axes, "mean")
        centred = self._ir_op(node, "sub", [x, mean], shape, dict(activation="none"), "centred")
        square = self._ir_op(node, "squared_difference", [x, mean], shape, {}, "squared")
        var = self._ir_mean(node, square, axes, "variance")
        eps_name = self.new_tensor(f"{base}.eps", scalar, np.full(scalar, eps, np.float32))
        var = self._ir_op(node, "add", [var, eps_name], self.graph.tensors[var].shape, dict(activation="none"),
                          "variance_eps")
        inv = self._ir_op(node, "rsqrt", [var], self.graph.tensors[var].shape, {}, "inv_std")
        y = self._ir_op(node, "mul", [centred, inv], shape, dict(activation="none"), "normalized")
        if gamma is not None:
            g = self.new_tensor(f"{base}.weight", gamma.shape, np.ascontiguousarray(gamma, np.float32))
            y = self._ir_op(node, "mul", [y, g], shape, dict(activation="none"), "scaled")
        if beta is not None:
            b = self.new_tensor(f"{base}.bias", beta.shape, np.ascontiguousarray(beta, np.float32))
            y = self._ir_op(node, "add", [y, b], shape, dict(activation="none"), "shifted")
        return y

    def _op_layer_norm(self, node):
        """aten.layer_norm(x, normalized_shape, weight, bias, eps): over the last len(normalized_shape)
        torch dims, wherever they sit in the IR."""
        a = list(node.args) + [None] * 5
        v = self.value(a[0])
        self.require_plain(v, node)
        k = len(a[1])
        dims = list(range(v.torch_rank - k, v.torch_rank))
        if 0 in dims:
            raise self.unsupported(node, "a LayerNorm over the batch dimension is not supported")
        axes = sorted(v.dims.index(d) for d in dims)
        eps = float(a[4]) if a[4] is not None else 1e-5
        full = [1] + self._torch_shape(v)[1:]
        gamma = self.const(a[2], "weight", node)
        beta = self.const(a[3], "bias", node)
        gamma = None if gamma is None else self._ir_constant(gamma.reshape(full[-k:]), v, node)
        beta = None if beta is None else self._ir_constant(beta.reshape(full[-k:]), v, node)
        y = self._normalize(node, v.name, axes, eps, gamma, beta)
        self.values[node.name] = _Value(y, v.dims)

    def _op_group_norm(self, node):
        """aten.group_norm(x, groups, weight, bias, eps) on (N, C, H, W) or (N, C, L): in the IR's channels-last
        layout the channels split into (groups, C / groups) by a free reshape to (1, H * W, groups, C / groups);
        the statistics are a MEAN over axes (1, 3); back to the input shape for the per-channel weight and bias."""
        a = list(node.args) + [None] * 5
        v = self.value(a[0])
        self.require_plain(v, node)
        if v.torch_rank not in (3, 4):
            raise self.unsupported(node, f"GroupNorm on a rank-{v.torch_rank} tensor (edgekit takes (N, C, L) and "
                                         "(N, C, H, W))")
        v = self.require_channels_first(v, node, "a GroupNorm")
        groups = int(a[1])
        shape = self.shape(v)
        C = shape[-1]
        positions = int(np.prod(shape[1:-1]))
        path, _ = _layer_of(node)
        base = path or node.name
        grouped = self._plain_reshape(v.name, (1, positions, groups, C // groups), f"{base}.grouped", base)
        y = self._normalize(node, grouped, (1, 3), float(a[4]) if a[4] is not None else 1e-5)
        y = self._plain_reshape(y, shape, f"{base}.ungrouped", base)
        self._affine(node, y, v.dims, a[2], a[3])

    def _affine(self, node, y: str, dims, weight, bias):
        """x * weight + bias with one weight / bias per channel (torch dim 1), as MUL and ADD."""
        shape = self.graph.tensors[y].shape
        per_channel = tuple(s if d == 1 else 1 for s, d in zip(shape, dims))  # torch dim 1 on its IR axis
        gamma = self.const(weight, "weight", node)
        beta = self.const(bias, "bias", node)
        path, _ = _layer_of(node)
        base = path or node.name
        if gamma is not None:
            g = self.new_tensor(f"{base}.weight", per_channel, gamma.reshape(per_channel))
            y = self._ir_op(node, "mul", [y, g], shape, dict(activation="none"), "scaled")
        if beta is not None:
            b = self.new_tensor(f"{base}.bias", per_channel, beta.reshape(per_channel))
            y = self._ir_op(node, "add", [y, b], shape, dict(activation="none"), "shifted")
        self.values[node.name] = _Value(y, dims)

    def _op_instance_norm(self, node):
        """aten.instance_norm(x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, ...):
        with the input's own statistics, a GroupNorm with one group per channel: the statistics over the
        spatial axes; with running statistics (track_running_stats, eval), a BatchNorm."""
        a = list(node.args) + [None] * 9
        use_input_stats = bool(a[5]) if a[5] is not None else True
        eps = float(a[7]) if a[7] is not None else 1e-5
        if not use_input_stats:
            return self._batch_norm(node, a[0], a[1], a[2], a[3], a[4], eps)
        v = self.value(a[0])
        self.require_plain(v, node)
        if v.torch_rank not in (3, 4):
            raise self.unsupported(node, f"InstanceNorm on a rank-{v.torch_rank} tensor")
        v = self.require_channels_first(v, node, "an InstanceNorm")
        axes = tuple(range(1, len(self.shape(v)) - 1))
        y = self._normalize(node, v.name, axes, eps)
        self._affine(node, y, v.dims, a[1], a[2])

    def _op_batch_norm(self, node):
        x, gamma, beta, mean, var, training, _, eps = node.args[:8]
        if training:
            raise self.unsupported(node, "the model was exported in training mode; call model.eval() first")
        self._batch_norm(node, x, gamma, beta, mean, var, float(eps))

    def _op__native_batch_norm_legit_no_training(self, node):
        x, gamma, beta, mean, var, _, eps = node.args[:7]
        v = self._batch_norm(node, x, gamma, beta, mean, var, float(eps))
        self.values[node.name] = (v, None, None)

    # activations
    def _activation(self, node, kind):
        v = self.value(node.args[0])
        self.add_op(kind, node, [v.name], self.shape(v), v.dims, perm=v.perm)

    def _op_relu(self, node):
        self._activation(node, "relu")

    _op_relu_ = _op_relu

    def _op_relu6(self, node):
        self._activation(node, "relu6")

    def _op_hardtanh(self, node):
        lo = float(node.args[1]) if len(node.args) > 1 else float(node.kwargs.get("min_val", -1.0))
        hi = float(node.args[2]) if len(node.args) > 2 else float(node.kwargs.get("max_val", 1.0))
        self._clamp_to(node, lo, hi)

    def _clamp_to(self, node, lo, hi):
        """clamp / Hardtanh: ReLU and ReLU6 where the bounds are theirs, else a clamp to any bounds."""
        if lo is not None and hi is not None and lo > hi:
            raise self.unsupported(node, f"clamp bounds min={lo} > max={hi}")
        if lo is None and hi is None:
            self.values[node.name] = self.value(node.args[0])
            return None
        if (lo, hi) == (0.0, 6.0):
            return self._activation(node, "relu6")
        if (lo, hi) == (0.0, None):
            return self._activation(node, "relu")
        v = self.value(node.args[0])
        self.add_op("clamp", node, [v.name], self.shape(v), v.dims,
                    dict(lo=None if lo is None else float(lo), hi=None if hi is None else float(hi)), perm=v.perm)

    def _op_clamp(self, node):
        a = list(node.args) + [None, None]
        lo = a[1] if a[1] is not None else node.kwargs.get("min")
        hi = a[2] if a[2] is not None else node.kwargs.get("max")
        if hasattr(lo, "name") or hasattr(hi, "name"):
            raise self.unsupported(node, "clamp to tensor bounds is not supported (only numbers)")
        self._clamp_to(node, None if lo is None else float(lo), None if hi is None else float(hi))

    _op_clamp_ = _op_clip = _op_clamp

    def _op_clamp_min(self, node):
        self._clamp_to(node, float(node.args[1]), None)

    def _op_clamp_max(self, node):
        self._clamp_to(node, None, float(node.args[1]))

    # pointwise activations (int8: 256-entry tables, edgekit/pointwise.py)
    def _unary(self, node, kind, attrs=None):
        v = self.value(node.args[0])
        return self.add_op(kind, node, [v.name], self.shape(v), v.dims, attrs, perm=v.perm)

    def _op_sigmoid(self, node):
        self._unary(node, "logistic")

    def _op_tanh(self, node):
        self._unary(node, "tanh")

    def _op_rsqrt(self, node):
        self._unary(node, "rsqrt")

    def _op_hardswish(self, node):
        self._unary(node, "hard_swish")

    def _op_leaky_relu(self, node):
        slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
        if float(slope) < 0:
            raise self.unsupported(node, f"LeakyReLU with a negative slope ({slope}) has no int8 kernel")
        self._unary(node, "leaky_relu", dict(alpha=float(slope)))

    def _op_elu(self, node):
        a = [float(x) for x in list(node.args[1:4])] + [1.0] * (3 - len(node.args[1:4]))
        if a != [1.0, 1.0, 1.0]:
            raise self.unsupported(node, f"ELU with alpha, scale, input_scale = {a} (only the default 1, 1, 1)")
        self._unary(node, "elu")

    def _op_gelu(self, node):
        approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        self._unary(node, "gelu", dict(approximate=str(approximate)))

    def _op_silu(self, node):
        """SiLU as TFLite's converter lowers it: x * sigmoid(x)."""
        v = self.value(node.args[0])
        gate = self.add_op("logistic", node, [v.name], self.shape(v), v.dims, perm=v.perm)
        self.add_op("mul", node, [v.name, gate.name], self.shape(v), v.dims, dict(activation="none"),
                    perm=v.perm)

    def _op_hardsigmoid(self, node):
        """Hardsigmoid as relu6(x + 3) / 6: an ADD with a fused ReLU6, then a MUL by 1/6 (TFLite has no
        HARD_SIGMOID)."""
        v = self.value(node.args[0])
        scalar = (1,) * len(self.shape(v))
        three = self.new_tensor(f"{node.name}.three", scalar, np.full(scalar, 3.0, np.float32))
        shifted = self.add_op("add", node, [v.name, three], self.shape(v), v.dims, dict(activation="relu6"),
                              perm=v.perm)
        sixth = self.new_tensor(f"{node.name}.sixth", scalar, np.full(scalar, 1.0 / 6.0, np.float32))
        self.add_op("mul", node, [shifted.name, sixth], self.shape(v), v.dims, dict(activation="none"),
                    perm=v.perm)

    _op_sigmoid_ = _op_sigmoid
    _op_tanh_ = _op_tanh
    _op_hardswish_ = _op_hardswish
    _op_leaky_relu_ = _op_leaky_relu
    _op_elu_ = _op_elu
    _op_silu_ = _op_silu
    _op_hardsigmoid_ = _op_hardsigmoid

    def _op_prelu(self, node):
        v = self.value(node.args[0])
        alpha = self.const(node.args[1], "slope", node).reshape(-1)
        rank = len(self.shape(v))
        if alpha.size == 1:
            ir_alpha = alpha.reshape((1,) * rank)
        else:  # one slope per channel (torch dim 1), on the IR axis that holds it
            if v.torch_rank > 2:
                self.require_plain(v, node)
            axis = v.dims.index(1) if rank == v.torch_rank else rank - 1
            if alpha.size != self.shape(v)[axis]:
                raise self.unsupported(node, f"{alpha.size} slopes for {self.shape(v)[axis]} channels")
            ir_alpha = alpha.reshape(tuple(-1 if a == axis else 1 for a in range(rank)))
        path, _ = _layer_of(node)
        name = self.new_tensor(f"{path or node.name}.weight", ir_alpha.shape, np.ascontiguousarray(ir_alpha))
        self.add_op("prelu", node, [v.name, name], self.shape(v), v.dims, perm=v.perm)

    _op__prelu_kernel = _op_prelu

    _op_hardtanh_ = _op_hardtanh

    def _op_softmax(self, node):
        v = self.value(node.args[0])
        self.require_plain(v, node)
        dim = int(node.args[1]) % v.torch_rank
        if v.dims[-1] != dim:  # softmax runs along the IR's last axis: bring the torch dim there (a TRANSPOSE)
            v = self.transposed(v, tuple(d for d in v.dims if d != dim) + (dim,), node, "this softmax")
        self.add_op("softmax", node, [v.name], self.shape(v), v.dims, dict(beta=1.0))

    _op__softmax = _op_softmax

    def _op_log_softmax(self, node):
        v = self.value(node.args[0])
        self.require_plain(v, node)
        dim = int(node.args[1]) % v.torch_rank
        if v.dims[-1] != dim:
            v = self.transposed(v, tuple(d for d in v.dims if d != dim) + (dim,), node, "this log_softmax")
        self.add_op("log_softmax", node, [v.name], self.shape(v), v.dims)

    _op__log_softmax = _op_log_softmax

    # pooling
    def _pool_common(self, node, v, kernel, stride, padding, ceil_mode, dilation=(1, 1)):
        if dilation != (1, 1):
            raise self.unsupported(node, "dilated pooling is not supported")
        _, H, W, C = nhwc(self.shape(v))
        kh, kw = kernel
        sh, sw = stride
        # (ph, pw) on both sides as torch pads, or (top, bottom, left, right) as ONNX may
        top, bottom, left, right = padding if len(padding) == 4 else (padding[0], padding[0], padding[1], padding[1])

        def out_size(size, k, s, before, after):
            n = size + before + after - k
            o = (-(-n // s) if ceil_mode else n // s) + 1
            if ceil_mode and (o - 1) * s >= size + before:  # torch drops a window that starts in the padding
                o -= 1
            return o

        OH, OW = out_size(H, kh, sh, top, bottom), out_size(W, kw, sw, left, right)
        if OH < 1 or OW < 1:
            raise self.unsupported(node, f"the {kh}x{kw} window does not fit the {H}x{W} input")
        return (1, OH, OW, C), dict(kernel=(kh, kw), stride=(sh, sw), padding=(top, bottom, left, right),
                                    activation="none")

    def _spatial_input(self, node, arg, rank: int = 4) -> _Value:
        """The input of a pooling / padding / mean op: rank ``rank``, channels last in the IR."""
        v = self.value(arg)
        self.require_plain(v, node)
        if v.torch_rank != rank:
            layout = {4: "(N, C, H, W)", 3: "(N, C, L)"}[rank]
            raise self.unsupported(node, f"expected an {layout} input, got a rank-{v.torch_rank} tensor")
        return self.require_channels_first(v, node, "this operation")

    def _op_max_pool2d(self, node):
        a = list(node.args) + [None] * 6
        v = self._spatial_input(node, a[0])
        kernel = _pair(a[1])
        stride = _pair(a[2]) if a[2] else kernel
        padding = _pair(a[3] if a[3] is not None else 0)
        dilation = _pair(a[4] if a[4] is not None else 1)
        ceil_mode = bool(a[5]) if a[5] is not None else False
        shape, attrs = self._pool_common(node, v, kernel, stride, padding, ceil_mode, dilation)
        return self.add_op("max_pool2d", node, [v.name], shape, 4, attrs)

    def _op_max_pool2d_with_indices(self, node):
        v = self._op_max_pool2d(node)
        self.values[node.name] = (v, None)

    def _op_avg_pool2d(self, node):
        a = list(node.args) + [None] * 7
        v = self._spatial_input(node, a[0])
        kernel = _pair(a[1])
        stride = _pair(a[2]) if a[2] else kernel
        padding = _pair(a[3] if a[3] is not None else 0)
        ceil_mode = bool(a[4]) if a[4] is not None else False
        count_include_pad = bool(a[5]) if a[5] is not None else True
        if a[6] is not None:
            raise self.unsupported(node, "AvgPool2d with divisor_override is not supported")
        shape, attrs = self._pool_common(node, v, kernel, stride, padding, ceil_mode)
        attrs["count_include_pad"] = count_include_pad
        self.add_op("avg_pool2d", node, [v.name], shape, 4, attrs)

    def _op_adaptive_avg_pool2d(self, node):
        self._adaptive_pool(node, "avg_pool2d", 4)

    def _op_adaptive_max_pool2d(self, node):
        v = self._adaptive_pool(node, "max_pool2d", 4)
        self.values[node.name] = (v, None)

    def _op_adaptive_avg_pool1d(self, node):
        self._adaptive_pool(node, "avg_pool2d", 3)

    def _op_adaptive_max_pool1d(self, node):
        v = self._adaptive_pool(node, "max_pool2d", 3)
        self.values[node.name] = (v, None)

    def _adaptive_pool(self, node, kind: str, rank: int) -> _Value:
        """torch's adaptive bins [floor(i * n / o), ceil((i + 1) * n / o)): one pooling window when every bin
        of an axis has the same size and the bins start at a fixed stride (always when o divides n);
        otherwise each run of such bins is pooled from its slice of the input and the pieces are
        concatenated (STRIDED_SLICE -> pool -> CONCATENATION, all sharing the input's parameters), so every
        output is the pool of exactly torch's bin."""
        v = self._spatial_input(node, node.args[0], rank)
        _, H, W, C = nhwc(self.shape(v))
        oh, ow = (1,) + _pair(node.args[1], 1) if rank == 3 else _pair(node.args[1])
        if kind == "avg_pool2d" and (oh, ow) == (1, 1):
            return self.add_op("mean", node, [v.name], (1,) * (rank - 1) + (C,), rank)
        if min(oh, ow) < 1:
            raise self.unsupported(node, f"an adaptive pool to {(oh, ow)[rank - 3:]}: sizes must be at least 1")
        rows, cols = _adaptive_runs(H, oh), _adaptive_runs(W, ow)
        w_axis = rank - 2  # the IR axis of W (of L for a signal); H is axis 1 of a 4-d map
        row_parts = []
        for r_start, r_size, r_step, r_count in rows:
            band = v
            if len(rows) > 1:
                band = self._slice_axis(node, v, 1, r_start, r_start + (r_count - 1) * r_step + r_size, 1)
            parts = []
            for c_start, c_size, c_step, c_count in cols:
                piece = band
                if len(cols) > 1:
                    piece = self._slice_axis(node, band, w_axis, c_start, c_start + (c_count - 1) * c_step + c_size, 1)
                attrs = dict(kernel=(r_size, c_size), stride=(r_step, c_step), padding=(0, 0, 0, 0),
                             activation="none", count_include_pad=True)
                shape = (1, r_count, c_count, C) if rank == 4 else (1, c_count, C)
                parts.append(self.add_op(kind, node, [piece.name], shape, rank, attrs))
            row_parts.append(parts[0] if len(parts) == 1 else self._concat_axis(node, parts, w_axis))
        return row_parts[0] if len(row_parts) == 1 else self._concat_axis(node, row_parts, 1)

    def _concat_axis(self, node, parts: list[_Value], axis: int) -> _Value:
        shape = list(self.shape(parts[0]))
        shape[axis] = sum(self.shape(p)[axis] for p in parts)
        return self.add_op("concat", node, [p.name for p in parts], tuple(shape), parts[0].dims, dict(axis=axis))

    # 1-D pooling: the 2-D window with a height of 1 over the (1, L, C) signal
    def _op_max_pool1d(self, node):
        a = list(node.args) + [None] * 6
        v = self._spatial_input(node, a[0], 3)
        k = _pair(a[1], 1)[0]
        stride = _pair(a[2], 1)[0] if a[2] else k
        dilation = (1, _pair(a[4], 1)[0] if a[4] is not None else 1)
        shape, attrs = self._pool_common(node, v, (1, k), (1, stride), (0, _pair(a[3] or 0, 1)[0]),
                                         bool(a[5]), dilation)
        return self.add_op("max_pool2d", node, [v.name], (1,) + shape[2:], 3, attrs)

    def _op_max_pool1d_with_indices(self, node):
        self.values[node.name] = (self._op_max_pool1d(node), None)

    def _op_avg_pool1d(self, node):
        a = list(node.args) + [None] * 6
        v = self._spatial_input(node, a[0], 3)
        k = _pair(a[1], 1)[0]
        stride = _pair(a[2], 1)[0] if a[2] else k
        shape, attrs = self._pool_common(node, v, (1, k), (1, stride), (0, _pair(a[3] or 0, 1)[0]), bool(a[4]))
        attrs["count_include_pad"] = bool(a[5]) if a[5] is not None else True
        self.add_op("avg_pool2d", node, [v.name], (1,) + shape[2:], 3, attrs)

    def _op_mean(self, node):
        self._reduce(node, "mean")

    def _op_amax(self, node):
        self._reduce(node, "amax")

    def _op_amin(self, node):
        self._reduce(node, "amin")

    def _op_sum(self, node):
        self._reduce(node, "sum")

    def _reduce(self, node, what: str):
        """mean / sum / amax / amin over torch dims. Over the spatial axes of a value whose torch channels sit
        last in the IR (NCHW over (2, 3), an NCL signal over L, an NLC sequence over L): the global mean, or a
        max pool over the whole map, on the NHWC view. Over any other axes: MEAN (any axes) or REDUCE_MAX /
        REDUCE_MIN (neighbouring IR axes). A sum is that mean times the count (see docs/DESIGN-NOTES.md)."""
        v = self.value(node.args[0])
        self.require_plain(v, node)
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
        rank = v.torch_rank
        dims = sorted({int(d) % rank for d in ([dims] if isinstance(dims, int) else (dims or []))})
        if not dims or 0 in dims:
            raise self.unsupported(node, f"{what} over the batch dimension (give the dims to reduce, not 0)")
        spatial = sorted(v.dims[1:-1])
        axes = sorted(v.dims.index(d) for d in dims)
        shape = tuple(1 if a in axes else s for a, s in enumerate(self.shape(v)))
        count = int(np.prod([self.shape(v)[a] for a in axes]))
        if rank >= 3 and dims == spatial and what != "amin":
            _, H, W, C = nhwc(self.shape(v))
            if what == "amax":
                attrs = dict(kernel=(H, W), stride=(H, W), padding=(0, 0, 0, 0), activation="none")
                out = self.add_op("max_pool2d", node, [v.name], shape, v.dims, attrs)
            else:
                out = self.add_op("mean", node, [v.name], shape, v.dims)
        elif what in ("amax", "amin"):
            if axes != list(range(axes[0], axes[-1] + 1)):  # REDUCE_MAX / MIN walk neighbouring axes: one TRANSPOSE
                v = self.transposed(v, tuple(d for d in v.dims if d not in dims) + tuple(dims), node, what)
                axes = list(range(rank - len(dims), rank))
                shape = tuple(1 if a in axes else s for a, s in enumerate(self.shape(v)))
            kind = "reduce_max" if what == "amax" else "reduce_min"
            out = self.add_op(kind, node, [v.name], shape, v.dims, dict(axes=tuple(axes)))
        else:
            out = self.add_op("reduce_mean", node, [v.name], shape, v.dims, dict(axes=tuple(axes)))
        if what == "sum":
            path, _ = _layer_of(node)
            ones = (1,) * len(shape)
            factor = self.new_tensor(f"{path or node.name}.count", ones, np.full(ones, float(count), np.float32))
            self.values[f"{node.name}_mean"] = out
            out = self.add_op("mul", node, [out.name, factor], shape, v.dims, dict(activation="none"))
        if not keepdim:
            self._reshape(node, out, [s for d, s in enumerate(self._torch_shape(out)) if d not in dims])

    # shape ops
    def _reshape_to(self, node, v: _Value, ir_shape, torch_rank, perm=None):
        out = self.new_tensor(f"{node.name}_reshaped" if node.name in self.values else node.name, ir_shape)
        path, _ = _layer_of(node)
        self.graph.ops.append(Op("reshape", path or node.name, [v.name], [out], {}))
        nv = _Value(out, torch_rank, perm)
        self.values[node.name] = nv
        return nv

    def _flatten_spatial(self, node, v: _Value):
        if v.torch_rank == 2 and v.dims == (0, 1):
            self.values[node.name] = v
            return
        self.require_plain(v, node)
        torch_shape = self._torch_shape(v)
        n = int(np.prod(torch_shape))
        # IR memory order -> torch flat index: the Linear that reads it permutes its columns instead
        perm = np.arange(n).reshape(torch_shape).transpose(v.dims).reshape(-1)
        self._reshape_to(node, v, (1, n), 2, None if np.array_equal(perm, np.arange(n)) else perm)

    def _op_flatten(self, node):
        v = self.value(node.args[0])
        start = int(node.args[1]) if len(node.args) > 1 else 0
        end = int(node.args[2]) if len(node.args) > 2 else -1
        if start % v.torch_rank in (0, 1) and end % v.torch_rank == v.torch_rank - 1:
            self._flatten_spatial(node, v)
        else:  # e.g. flatten(2): (N, C, H, W) -> (N, C, H * W), a reshape
            self._reshape(node, v, tuple(int(s) for s in node.meta["val"].shape))

    def _op_view(self, node):
        v = self.value(node.args[0])
        val = node.meta.get("val")
        if val is None:
            raise self.unsupported(node, "the exported graph does not record the reshaped shape")
        out_shape = tuple(int(s) for s in val.shape)
        if len(out_shape) == 2 and v.torch_rank > 2:
            self._flatten_spatial(node, v)
        else:
            self._reshape(node, v, out_shape)

    _op_reshape = _op_view
    _op__unsafe_view = _op_view

    def _op_squeeze(self, node):
        self._op_view(node)

    _op_unsqueeze = _op_squeeze

    def _reshape(self, node, v: _Value, out_shape):
        """torch reshape / view / squeeze / unsqueeze / flatten(a, b): a relabelling when the merged or split
        torch dimensions sit next to each other in the IR in torch order, else one TRANSPOSE first."""
        in_shape = self._torch_shape(v)
        if tuple(out_shape) == tuple(in_shape):
            self.values[node.name] = v
            return v
        if out_shape[0] != in_shape[0] or not 2 <= len(out_shape) <= 6:
            raise self.unsupported(node, f"reshape of {in_shape} to {list(out_shape)} (edgekit keeps the batch "
                                         "dimension first and tensors of rank 2 to 6)")
        self.require_plain(v, node)
        blocks = _reshape_blocks(in_shape[1:], list(out_shape[1:]))
        if blocks is None:
            raise self.unsupported(node, f"reshape of {in_shape} to {list(out_shape)}")
        # Each block's torch dims must be IR neighbours in increasing order; else transpose once so they are.
        shape = self.shape(v)

        def in_ir_order(ins):  # IR positions increasing, only size-1 axes between them
            pos = [v.dims.index(d) for d in ins]
            return pos == sorted(pos) and all(shape[a] == 1 for a in range(pos[0], pos[-1] + 1) if a not in pos)

        if not all(in_ir_order(ins) for ins, _ in blocks):
            block_of = {d: ins for ins, _ in blocks for d in ins}
            order, seen = [], set()
            for d in v.dims:
                group = block_of.get(d, [d])
                if group[0] not in seen:
                    seen.add(group[0])
                    order.extend(group)
            v = self.transposed(v, order, node, "this reshape")
        # New IR axes: the batch, size-1 torch dims (kept right after it), then each block where it sat.
        shape = self.shape(v)
        new_axes: list[int] = [0] + [1 + j for j, size in enumerate(out_shape[1:]) if size == 1]
        for d in v.dims[1:]:
            block = next(((ins, outs) for ins, outs in blocks if ins and ins[0] == d), None)
            if block is not None:
                new_axes.extend(block[1])
            # size-1 torch dims (not in any block) and later members of a block vanish here
        ir_shape = tuple(1 if a == 0 else out_shape[a] for a in new_axes)
        assert int(np.prod(ir_shape)) == int(np.prod(shape))
        path, _ = _layer_of(node)
        name = self._plain_reshape(v.name, ir_shape, node.name, path or node.name)
        self.values[node.name] = _Value(name, new_axes)
        return self.values[node.name]

    # upsampling
    def _op_upsample_nearest2d(self, node, half_pixel=False):
        v = self._spatial_input(node, node.args[0])
        val = node.meta.get("val")
        _, _, OH, OW = (int(s) for s in val.shape)
        C = self.shape(v)[3]
        self.add_op("resize_nearest", node, [v.name], (1, OH, OW, C), 4, dict(half_pixel_centers=half_pixel))

    def _op__upsample_nearest_exact2d(self, node):
        self._op_upsample_nearest2d(node, half_pixel=True)

    def _op_upsample_bilinear2d(self, node):
        """Bilinear upsampling: RESIZE_BILINEAR, align_corners as torch's, half-pixel centres otherwise."""
        v = self._spatial_input(node, node.args[0])
        align = node.args[2] if len(node.args) > 2 else node.kwargs.get("align_corners", False)
        _, _, OH, OW = (int(s) for s in node.meta["val"].shape)
        self.add_op("resize_bilinear", node, [v.name], (1, OH, OW, self.shape(v)[3]), 4,
                    dict(align_corners=bool(align), half_pixel_centers=not align))

    def _op_upsample_nearest1d(self, node, half_pixel=False):
        v = self._spatial_input(node, node.args[0], 3)
        OL = int(node.meta["val"].shape[2])
        self.add_op("resize_nearest", node, [v.name], (1, OL, self.shape(v)[2]), 3,
                    dict(half_pixel_centers=half_pixel))

    def _op__upsample_nearest_exact1d(self, node):
        self._op_upsample_nearest1d(node, half_pixel=True)

    # chunk / split / slicing
    def _pieces(self, node, v: _Value, dim: int, sizes: list[int]):
        """Consecutive pieces of ``sizes`` along torch dim ``dim``: one split op, a tuple of values."""
        self.require_plain(v, node)
        axis = self.torch_axis_to_ir(v, dim, node)
        if axis == 0:
            raise self.unsupported(node, "splitting the batch dimension is not supported")
        if len(sizes) == 1:
            self.values[node.name] = (v,)
            return
        path, _ = _layer_of(node)
        outs, values = [], []
        for i, size in enumerate(sizes):
            shape = list(self.shape(v))
            shape[axis] = size
            outs.append(self.new_tensor(f"{node.name}.{i}", shape))
            values.append(_Value(outs[-1], v.dims))
        self.graph.ops.append(Op("split", path or node.name, [v.name], outs, dict(axis=axis)))
        self.values[node.name] = tuple(values)

    def _op_chunk(self, node):
        v = self.value(node.args[0])
        dim = int(node.args[2]) if len(node.args) > 2 else int(node.kwargs.get("dim", 0))
        sizes = [int(t.shape[dim]) for t in node.meta["val"]]
        self._pieces(node, v, dim, sizes)

    def _op_split(self, node):
        v = self.value(node.args[0])
        dim = int(node.args[2]) if len(node.args) > 2 else int(node.kwargs.get("dim", 0))
        sizes = [int(t.shape[dim]) for t in node.meta["val"]]
        self._pieces(node, v, dim, sizes)

    _op_split_with_sizes = _op_split

    def _op_slice(self, node):
        """x[..., start:end:step, ...] on one dim (STRIDED_SLICE); a full slice is the same value."""
        v = self.value(node.args[0])
        a = list(node.args) + [None] * 5
        dim = int(a[1] if a[1] is not None else 0) % v.torch_rank
        size = self._torch_shape(v)[dim]
        start, end, step = a[2], a[3], a[4] if a[4] is not None else 1
        start = 0 if start is None else (start + size if start < 0 else start)
        end = size if end is None else (end + size if end < 0 else end)
        start, end = min(max(int(start), 0), size), min(max(int(end), 0), size)
        if start == 0 and end == size and step == 1:
            self.values[node.name] = v
            return
        self.require_plain(v, node)
        if dim == 0:
            raise self.unsupported(node, "slicing the batch dimension is not supported")
        if end <= start:
            raise self.unsupported(node, f"the slice {start}:{end} is empty")
        self._slice_axis(node, v, self.torch_axis_to_ir(v, dim, node), start, end, int(step))

    def _slice_axis(self, node, v: _Value, axis: int, start: int, end: int, step: int) -> _Value:
        shape = list(self.shape(v))
        begin, stop, strides = [0] * len(shape), list(shape), [1] * len(shape)
        begin[axis], stop[axis], strides[axis] = start, end, step
        shape[axis] = -(-(end - start) // step)
        return self.add_op("slice", node, [v.name], shape, v.dims,
                           dict(begin=tuple(begin), end=tuple(stop), strides=tuple(strides)))

    def _op_select(self, node):
        """x[:, i] (e.g. an RNN's last step, a class token): a slice of one, then that dim dropped."""
        v = self.value(node.args[0])
        self.require_plain(v, node)
        dim = int(node.args[1]) % v.torch_rank
        size = self._torch_shape(v)[dim]
        index = int(node.args[2]) + (size if int(node.args[2]) < 0 else 0)
        if dim == 0:
            raise self.unsupported(node, "indexing the batch dimension is not supported")
        one = self._slice_axis(node, v, self.torch_axis_to_ir(v, dim, node), index, index + 1, 1)
        self._reshape(node, one, [s for d, s in enumerate(self._torch_shape(one)) if d != dim])

    # permute / transpose: a new torch order over the same IR memory
    def _op_permute(self, node):
        v = self.value(node.args[0])
        self.require_plain(v, node)
        perm = [int(p) % v.torch_rank for p in node.args[1]]
        self.values[node.name] = _Value(v.name, tuple(perm.index(d) for d in v.dims))

    def _op_transpose(self, node):
        v = self.value(node.args[0])
        self.require_plain(v, node)
        a, b = int(node.args[1]) % v.torch_rank, int(node.args[2]) % v.torch_rank
        swap = {a: b, b: a}
        self.values[node.name] = _Value(v.name, tuple(swap.get(d, d) for d in v.dims))

    def _op_t(self, node):
        v = self.value(node.args[0])
        self.require_plain(v, node)
        self.values[node.name] = _Value(v.name, tuple(1 - d for d in v.dims))

    def _torch_shape(self, v: _Value) -> list[int]:
        s = self.shape(v)
        out = [0] * v.torch_rank
        for axis, dim in enumerate(v.dims):
            out[dim] = int(s[axis])
        return out

    # elementwise
    def _operand(self, arg, node):
        """A binary op's operand: a converted tensor (_Value), or a constant (parameter, buffer, number)."""
        if hasattr(arg, "name") and arg.name in self.consts:
            data = self.consts[arg.name].astype(np.float32)
            if not np.all(np.isfinite(data)):
                raise self.unsupported(node, "a constant operand holds NaN or inf")
            return data
        if isinstance(arg, (int, float)) and not isinstance(arg, bool):
            return np.array(float(arg), np.float32)
        return self.value(arg)

    def _ir_constant(self, data: np.ndarray, v: _Value, node) -> np.ndarray:
        """A torch-layout constant that broadcasts against ``v``, in ``v``'s IR layout (NHWC)."""
        rank, ir_shape = v.torch_rank, self.shape(v)
        if data.ndim > rank:
            raise self.unsupported(node, f"a constant of shape {list(data.shape)} against a rank-{rank} tensor")
        data = data.reshape((1,) * (rank - data.ndim) + data.shape)
        if data.shape[0] != 1:
            raise self.unsupported(node, "a constant with a batch dimension is not supported")
        if data.size == 1:
            return data.reshape((1,) * len(ir_shape))
        if v.perm is not None:
            self.require_plain(v, node)
        data = np.transpose(data, v.dims)  # IR axis i holds torch dim dims[i]
        if any(c not in (1, s) for c, s in zip(data.shape, ir_shape)):
            raise self.unsupported(node, f"a constant of shape {list(data.shape)} does not broadcast to the tensor")
        return np.ascontiguousarray(data)

    def _binary(self, node, kind, a, b, alpha=1.0):
        """x op y with broadcasting, x op constant, constant op x: one IR op, the order kept."""
        oa, ob = self._operand(a, node), self._operand(b, node)
        if not isinstance(oa, _Value) and not isinstance(ob, _Value):
            raise self.unsupported(node, "both operands are constants")
        if alpha != 1.0:
            if isinstance(ob, _Value):
                raise self.unsupported(node, f"alpha={alpha} with a tensor operand is not supported")
            ob = ob * np.float32(alpha)
        v = oa if isinstance(oa, _Value) else ob
        names, perm = [], v.perm
        for o in (oa, ob):
            if isinstance(o, _Value):
                names.append(o.name)
            else:
                data = self._ir_constant(o, v, node)
                path, _ = _layer_of(node)
                names.append(self.new_tensor(f"{path or node.name}.{kind}_operand", data.shape, data))
                if data.size > 1:
                    perm = None
        if isinstance(oa, _Value) and isinstance(ob, _Value):
            if oa.torch_rank != ob.torch_rank:
                raise self.unsupported(node, f"operands of rank {oa.torch_rank} and {ob.torch_rank}")
            if oa.dims != ob.dims:  # bring the smaller (broadcast) operand into the full one's layout
                ta, tb = self._torch_shape(oa), self._torch_shape(ob)
                full = [max(x, y) for x, y in zip(ta, tb)]
                if ta == full:
                    ob = self.transposed(ob, oa.dims, node, f"this {kind}")
                else:
                    oa = self.transposed(oa, ob.dims, node, f"this {kind}")
                v = oa
                names = [oa.name, ob.name]
            if self.shape(oa) != self.shape(ob):
                self.require_plain(oa, node)
                self.require_plain(ob, node)
            elif oa.perm is not None or ob.perm is not None:
                if oa.perm is None or ob.perm is None or not np.array_equal(oa.perm, ob.perm):
                    self.require_plain(oa if oa.perm is not None else ob, node)
        shapes = [self.graph.tensors[n].shape for n in names]
        try:
            out_shape = tuple(int(d) for d in np.broadcast_shapes(*shapes))
        except ValueError:
            raise self.unsupported(node, f"shapes {self._torch_shape(v)} do not broadcast") from None
        if out_shape != self.shape(v) and not (isinstance(oa, _Value) and isinstance(ob, _Value)):
            raise self.unsupported(node, "a constant operand larger than the tensor is not supported")
        attrs = {} if kind == "squared_difference" else dict(activation="none")
        return self.add_op(kind, node, names, out_shape, v.dims, attrs, perm=perm)

    def _op_add(self, node):
        alpha = float(node.kwargs.get("alpha", 1))
        self._binary(node, "add", node.args[0], node.args[1], alpha)

    def _op_sub(self, node):
        alpha = float(node.kwargs.get("alpha", 1))
        self._binary(node, "sub", node.args[0], node.args[1], alpha)

    def _op_rsub(self, node):  # other - alpha * input
        alpha = float(node.kwargs.get("alpha", node.args[2] if len(node.args) > 2 else 1))
        if alpha != 1.0:
            raise self.unsupported(node, f"rsub with alpha={alpha} is not supported")
        self._binary(node, "sub", node.args[1], node.args[0])

    def _op_mul(self, node):
        self._binary(node, "mul", node.args[0], node.args[1])

    def _op_div(self, node):
        mode = node.kwargs.get("rounding_mode")
        divisor = self._operand(node.args[1], node)
        if mode is not None or isinstance(divisor, _Value):
            raise self.unsupported(node, "division is supported by a constant only (x / 6), as a multiply")
        if np.any(divisor == 0):
            raise self.unsupported(node, "division by zero")
        self._binary(node, "mul", node.args[0], (1.0 / divisor).astype(np.float32)
                     if divisor.size > 1 else float(1.0 / divisor.reshape(-1)[0]))

    def _op_pow(self, node):
        """(x - y) ** 2 becomes SQUARED_DIFFERENCE when nothing else reads x - y; x ** 2 is x * x."""
        exponent = node.args[1]
        if isinstance(exponent, (int, float)) and float(exponent) == 1.0:
            self.values[node.name] = self.value(node.args[0])
            return
        if not isinstance(exponent, (int, float)) or float(exponent) != 2.0:
            raise self.unsupported(node, f"power {exponent} is not supported (only ** 2)")
        self._square(node, node.args[0])

    def _square(self, node, src):
        v = self.value(src)
        producer = self.graph.ops[-1] if self.graph.ops else None
        if producer is not None and producer.kind == "sub" and producer.outputs == [v.name] \
                and len(src.users) == 1 and all(not self.graph.tensors[n].is_constant for n in producer.inputs):
            producer.kind = "squared_difference"
            producer.attrs.pop("activation", None)
            self.values[node.name] = v
            return
        self.add_op("mul", node, [v.name, v.name], self.shape(v), v.dims, dict(activation="none"), perm=v.perm)

    def _op_square(self, node):
        self._square(node, node.args[0])

    _op_add_ = _op_add
    _op_sub_ = _op_sub
    _op_mul_ = _op_mul
    _op_div_ = _op_div

    def _op_cat(self, node):
        dim = int(node.args[1]) if len(node.args) > 1 else int(node.kwargs.get("dim", 0))
        tensors = [t for t in node.args[0] if not (hasattr(t, "name") and t.name in self.consts)]
        if not tensors:
            raise self.unsupported(node, "every concatenated tensor is a constant")
        like = self.value(tensors[0])
        parts = []
        for t in node.args[0]:  # a constant part (a class token) in the layout of the tensors it joins
            if hasattr(t, "name") and t.name in self.consts:
                self.require_plain(like, node)
                data = self.const(t, "constant part", node)
                if data.ndim != like.torch_rank:
                    raise self.unsupported(node, f"a constant part of shape {list(data.shape)} against rank "
                                                 f"{like.torch_rank}")
                data = np.ascontiguousarray(np.transpose(data, like.dims))
                path, _ = _layer_of(node)
                parts.append(_Value(self.new_tensor(f"{path or node.name}.constant_part", data.shape, data),
                                    like.dims))
            else:
                parts.append(self.value(t))
        for p in parts:
            self.require_plain(p, node)
        parts = [parts[0]] + [p if p.dims == parts[0].dims else self.transposed(p, parts[0].dims, node, "torch.cat")
                              for p in parts[1:]]
        axis = self.torch_axis_to_ir(parts[0], dim, node)
        if axis == 0:
            raise self.unsupported(node, "concatenation along the batch dimension is not supported")
        shape = list(self.shape(parts[0]))
        for p in parts[1:]:
            s = self.shape(p)
            if len(s) != len(shape) or any(s[i] != shape[i] for i in range(len(s)) if i != axis):
                raise self.unsupported(node, "concatenated tensors differ in a dimension other than the joined one")
        shape[axis] = sum(self.shape(p)[axis] for p in parts)
        self.add_op("concat", node, [p.name for p in parts], tuple(shape), parts[0].dims, dict(axis=axis))

    _op_concat = _op_cat

    def _op_constant_pad_nd(self, node):
        v = self.value(node.args[0])
        self.require_plain(v, node)
        pads = [int(p) for p in node.args[1]]
        if str(node.target).startswith("aten.pad"):  # pad(input, pad, mode, value)
            mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
            if mode in ("reflect", "replicate"):
                return self._edge_pad(node, v, pads, mode)
            if mode != "constant":
                raise self.unsupported(node, f"padding mode {mode!r} is not supported (constant, reflect, "
                                             "replicate)")
            value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value")
        else:
            value = node.args[2] if len(node.args) > 2 else 0.0
        value = 0.0 if value is None else float(value)
        if v.torch_rank != 4 or len(pads) not in (2, 4) or any(p < 0 for p in pads):
            raise self.unsupported(node, "only non-negative padding of the height and width of an NCHW tensor "
                                         "is supported")
        v = self.require_channels_first(v, node, "padding")
        left, right = pads[0], pads[1]
        top, bottom = (pads[2], pads[3]) if len(pads) == 4 else (0, 0)
        _, H, W, C = self.shape(v)
        self.add_op("pad", node, [v.name], (1, H + top + bottom, W + left + right, C), 4,
                    dict(padding=(top, bottom, left, right), value=value))

    _op_pad = _op_constant_pad_nd

    def _edge_pad(self, node, v: _Value, pads: list[int], mode: str):
        """reflect / replicate padding, lowered to what every TFLite runtime has: single-row slices of the
        border (STRIDED_SLICE) concatenated around the tensor, one axis at a time."""
        if len(pads) % 2 or len(pads) // 2 > v.torch_rank - 2 or any(p < 0 for p in pads):
            raise self.unsupported(node, f"{mode} padding {pads} (non-negative, spatial dims only)")
        for k in range(len(pads) // 2):
            before, after = pads[2 * k], pads[2 * k + 1]
            if not before and not after:
                continue
            dim = v.torch_rank - 1 - k
            axis = self.torch_axis_to_ir(v, dim, node)
            n = self.shape(v)[axis]
            if mode == "reflect" and max(before, after) >= n:
                raise self.unsupported(node, f"reflect padding of {max(before, after)} on a dim of size {n}")
            if mode == "reflect":
                rows = list(range(before, 0, -1)) + [None] + list(range(n - 2, n - 2 - after, -1))
            else:
                rows = [0] * before + [None] + [n - 1] * after
            pieces: dict[int, _Value] = {}
            parts = []
            for r in rows:
                if r is None:
                    parts.append(v)
                    continue
                if r not in pieces:
                    pieces[r] = self._slice_axis(node, v, axis, r, r + 1, 1)
                parts.append(pieces[r])
            shape = list(self.shape(v))
            shape[axis] = n + before + after
            v = self.add_op("concat", node, [p.name for p in parts], tuple(shape), v.dims, dict(axis=axis))
        self.values[node.name] = v

    def _op_reflection_pad2d(self, node):
        self._edge_pad(node, self.value(node.args[0]), [int(p) for p in node.args[1]], "reflect")

    _op_reflection_pad1d = _op_reflection_pad2d

    def _op_replication_pad2d(self, node):
        self._edge_pad(node, self.value(node.args[0]), [int(p) for p in node.args[1]], "replicate")

    _op_replication_pad1d = _op_replication_pad2d
