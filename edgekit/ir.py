"""The graph every frontend produces and every backend consumes.

One flat structure: named tensors and a topologically ordered list of ops.
Activation tensors have batch 1 and one of three ranks, channels always last:

- rank 4, (1, H, W, C): images (NHWC);
- rank 3, (1, L, C): 1-D signals and sequences (a torch (N, C, L) signal and a
  batch_first (N, L, C) sequence both become (1, L, C));
- rank 2, (1, C): feature vectors.

Spatial kernels (convolution, pooling, padding, mean) see a rank-3 tensor as
NHWC (1, 1, L, C) and a rank-2 one as (1, 1, 1, C): ``nhwc(shape)`` is that
view, shared by the reference, the quantizer and code generation, so a 1-D op
is the 2-D op with a height of 1 (weights (O, 1, K, I)) and costs no copy. Constant tensors carry their
data. Quantized tensors carry their quantization parameters; an op's
precomputed integer parameters (multipliers, shifts, clamps) live in its
``attrs`` so the numpy reference and the generated C read the same numbers.

Op kinds and their inputs:

=====================  ===================================  =========================================
kind                   inputs                               attrs
=====================  ===================================  =========================================
conv2d                 x, weight (O,KH,KW,I), bias?         stride, dilation, padding(t,b,l,r), activation
depthwise_conv2d       x, weight (1,KH,KW,O), bias?         + depth_multiplier
fully_connected        x, weight (O,I), bias?               activation
max_pool2d             x                                    kernel, stride, padding, activation
avg_pool2d             x                                    kernel, stride, padding, count_include_pad, activation
mean                   x                                    (global mean over H, W; keeps dims)
add                    a, b                                 activation
mul                    a, b (b may broadcast or be const)   activation
concat                 x0, x1, ...                          axis
reshape                x                                    (shape from the output tensor)
transpose              x                                    perm (IR axes; perm[0] == 0)
split                  x -> y0, y1, ...                     axis (piece sizes from the outputs)
slice                  x                                    begin, end, strides (IR axes, end exclusive)
transpose_conv2d       x, weight (O,KH,KW,I), bias?         stride, padding(t,b,l,r) cropped from the full output
reduce_max             x                                    axes (neighbouring IR axes; kept as size 1)
reduce_min             x                                    axes (neighbouring IR axes; kept as size 1)
reduce_mean            x                                    axes (any non-batch IR axes; kept as size 1)
resize_bilinear        x                                    align_corners, half_pixel_centers
resize_nearest         x                                    half_pixel_centers (size from the output)
log_softmax            x                                    (over the last axis)
pad                    x                                    padding(t,b,l,r), value (real number)
relu / relu6           x
batch_norm             x, scale, offset                     (float graphs only; folded away)
softmax                x                                    beta
lstm                   x (1,L,I), w_ih (4H,I), w_hh (4H,H), bias (4H)   hidden; gates i,f,g,o (torch order);
                                                                       out (1,L,H) every step's h; cell_scale (int8)
batch_matmul           a (1,..,M,K), b (1,..,K,N) (b const?) adj_x, adj_y (operands stored transposed)
=====================  ===================================  =========================================
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

ACTIVATIONS = ("none", "relu", "relu6")


@dataclass
class QuantParams:
    """Affine quantization: real = scale * (q - zero_point). Per-tensor when
    ``scale`` has one element, per-channel along ``axis`` otherwise."""

    scale: np.ndarray
    zero_point: np.ndarray
    axis: int = 0

    @classmethod
    def per_tensor(cls, scale: float, zero_point: int) -> "QuantParams":
        return cls(np.array([scale], dtype=np.float64), np.array([zero_point], dtype=np.int64))

    @property
    def is_per_tensor(self) -> bool:
        return self.scale.size == 1

    def __repr__(self) -> str:
        if self.is_per_tensor:
            return f"QuantParams(scale={float(self.scale[0]):.6g}, zp={int(self.zero_point[0])})"
        return f"QuantParams(per-channel x{self.scale.size}, axis={self.axis})"


@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"  # float32 | int8 | int32
    data: np.ndarray | None = None  # set for constants
    quant: QuantParams | None = None

    @property
    def size(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize

    @property
    def is_constant(self) -> bool:
        return self.data is not None


@dataclass
class Op:
    kind: str
    name: str  # the source layer's name: for messages and per-layer profiles
    inputs: list[str]
    outputs: list[str]
    attrs: dict = field(default_factory=dict)


@dataclass
class Graph:
    tensors: dict[str, Tensor] = field(default_factory=dict)
    ops: list[Op] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    # How the source framework lays out each graph input / output ("NCHW",
    # "NCL", "NLC", "NC" or "NHWC"), so callers can feed and read data their own way.
    source_layouts: dict[str, str] = field(default_factory=dict)
    # The float model's weight bytes, kept through quantization for reports.
    meta: dict = field(default_factory=dict)

    def add_tensor(self, tensor: Tensor) -> Tensor:
        if tensor.name in self.tensors:
            raise ValueError(f"duplicate tensor name {tensor.name!r}")
        self.tensors[tensor.name] = tensor
        return tensor

    def unique_name(self, base: str) -> str:
        name, i = base, 1
        while name in self.tensors:
            name = f"{base}_{i}"
            i += 1
        return name

    def producers(self) -> dict[str, Op]:
        return {out: op for op in self.ops for out in op.outputs}

    def consumers(self) -> dict[str, list[Op]]:
        users: dict[str, list[Op]] = {name: [] for name in self.tensors}
        for op in self.ops:
            for name in op.inputs:
                users[name].append(op)
        return users

    def activation_tensors(self) -> list[str]:
        """Non-constant tensors in first-use order: what lives in the arena."""
        seen: list[str] = []
        for name in self.inputs:
            seen.append(name)
        for op in self.ops:
            for name in op.inputs + op.outputs:
                if name not in seen and not self.tensors[name].is_constant:
                    seen.append(name)
        return seen

    def is_quantized(self) -> bool:
        return all(self.tensors[n].dtype == "int8" for n in self.inputs)

    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values() if t.is_constant)

    def fingerprint(self) -> str:
        """A stable hash of structure and constants: identifies a model on a device."""
        h = hashlib.sha256()

        def feed(value):
            if isinstance(value, np.ndarray):
                h.update(repr((value.dtype.str, value.shape)).encode())
                h.update(np.ascontiguousarray(value).tobytes())
            elif isinstance(value, dict):
                for k in sorted(value):
                    h.update(repr(k).encode())
                    feed(value[k])
            elif isinstance(value, (list, tuple)):
                h.update(b"[")
                for v in value:
                    feed(v)
                h.update(b"]")
            else:
                h.update(repr(value.item() if isinstance(value, np.generic) else value).encode())

        for op in self.ops:
            feed((op.kind, op.inputs, op.outputs, op.attrs))
        for name in sorted(self.tensors):
            t = self.tensors[name]
            h.update(repr((name, t.shape, t.dtype)).encode())
            if t.data is not None:
                h.update(np.ascontiguousarray(t.data).tobytes())
        return h.hexdigest()[:16]

    def summary(self) -> str:
        lines = []
        for op in self.ops:
            outs = ", ".join(f"{o}{list(self.tensors[o].shape)}" for o in op.outputs)
            lines.append(f"{op.kind:18s} {op.name:24s} -> {outs}")
        return "\n".join(lines)


def nhwc(shape) -> tuple[int, int, int, int]:
    """The 4-D (N, H, W, C) view spatial kernels take of an activation shape:
    (N, L, C) is (N, 1, L, C), (N, C) is (N, 1, 1, C)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 4:
        return shape
    if len(shape) == 3:
        return (shape[0], 1, shape[1], shape[2])
    if len(shape) == 2:
        return (shape[0], 1, 1, shape[1])
    raise ValueError(f"no NHWC view of a rank-{len(shape)} shape {list(shape)}")


def nearest_source_index(in_size: int, out_size: int, half_pixel_centers: bool = False):
    """The input row / column each output row / column copies in a nearest-neighbour resize, computed in
    float32 as TFLite's RESIZE_NEAREST_NEIGHBOR does (align_corners off); torch's "nearest" is the
    plain one, "nearest-exact" the half-pixel one."""
    import numpy as np

    scale = np.float32(in_size) / np.float32(out_size)
    offset = np.float32(0.5 if half_pixel_centers else 0.0)
    index = np.floor((np.arange(out_size, dtype=np.float32) + offset) * scale).astype(np.int64)
    return np.clip(index, 0, in_size - 1)


def bilinear_taps(in_size: int, out_size: int, align_corners: bool, half_pixel_centers: bool):
    """TFLite's integer RESIZE_BILINEAR along one axis: per output index the two source indices and the
    weight of the second one in 1/1024 (the first gets 1024 - it), in its exact integer arithmetic."""
    import numpy as np

    if align_corners and out_size > 1:
        scale = ((1 << 10) * (in_size - 1) + (out_size - 1) // 2) // (out_size - 1)
    else:
        scale = ((1 << 10) * in_size + out_size // 2) // out_size
    lo, hi, weight = [], [], []
    for o in range(out_size):
        scaled = o * scale + (scale // 2 - (1 << 9) if half_pixel_centers else 0)
        low = max(int(scaled / (1 << 10)), 0)  # C division: toward zero
        high = min(int((scaled + (1 << 10) - 1) / (1 << 10)), in_size - 1)
        lo.append(low)
        hi.append(high)
        weight.append(scaled - (1 << 10) * low)
    return np.array(lo), np.array(hi), np.array(weight)


def conv_output_size(size: int, kernel: int, stride: int, dilation: int, pad_before: int, pad_after: int) -> int:
    effective = dilation * (kernel - 1) + 1
    return (size + pad_before + pad_after - effective) // stride + 1
