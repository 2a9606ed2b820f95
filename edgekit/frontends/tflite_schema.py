"""A small FlatBuffers reader and writer for the subset of the TFLite schema
edgekit uses (tensorflow/lite/schema/schema.fbs), with no dependency.

Reading checks every offset and length against the file before using it, so a
truncated or corrupted file raises ``FlatBufferError`` instead of crashing or
reading garbage. Writing lays each table out after its vtable and each child
object after its parent (offsets only point forward), with every scalar,
vector and table aligned as the FlatBuffers verifier expects.

The schema facts used here (field ids are positions in each table):

    Model:            version 0, operator_codes 1, subgraphs 2, description 3, buffers 4
    OperatorCode:     deprecated_builtin_code 0 (byte), custom_code 1, version 2, builtin_code 3 (int)
    SubGraph:         tensors 0, inputs 1, outputs 2, operators 3, name 4
    Tensor:           shape 0, type 1, buffer 2, name 3, quantization 4, is_variable 5, sparsity 6
    QuantizationParameters: min 0, max 1, scale 2, zero_point 3 (long), details 4/5, quantized_dimension 6
    Operator:         opcode_index 0, inputs 1, outputs 2, builtin_options_type 3, builtin_options 4
    Buffer:           data 0 (ubyte, 16-aligned), offset 1, size 2
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

FILE_IDENTIFIER = b"TFL3"

# TensorType
FLOAT32, FLOAT16, INT32, UINT8, INT64, STRING, BOOL, INT16, COMPLEX64, INT8 = range(10)
TENSOR_TYPE_NAMES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 5: "string", 6: "bool",
                     7: "int16", 8: "complex64", 9: "int8", 10: "float64", 11: "complex128", 12: "uint64",
                     13: "resource", 14: "variant", 15: "uint32", 16: "uint16", 17: "int4"}
NUMPY_TYPES = {FLOAT32: np.float32, INT32: np.int32, UINT8: np.uint8, INT64: np.int64, INT16: np.int16,
               INT8: np.int8, BOOL: np.bool_}

# Padding, ActivationFunctionType
SAME, VALID = 0, 1
ACT_NONE, ACT_RELU, ACT_RELU_N1_TO_1, ACT_RELU6, ACT_TANH, ACT_SIGN_BIT = range(6)

# BuiltinOperator codes (the ones edgekit reads or writes, and names for messages).
ADD, AVERAGE_POOL_2D, CONCATENATION, CONV_2D, DEPTHWISE_CONV_2D = 0, 1, 2, 3, 4
DEQUANTIZE, FULLY_CONNECTED, MAX_POOL_2D, MUL, RELU, RELU6, RESHAPE, SOFTMAX = 6, 9, 17, 18, 19, 21, 22, 25
PAD, MEAN, PADV2, QUANTIZE = 34, 40, 60, 114
UNIDIRECTIONAL_SEQUENCE_LSTM, BATCH_MATMUL = 44, 126
# structure ops (issue 10)
RESIZE_BILINEAR, TRANSPOSE, STRIDED_SLICE, SPLIT, LOG_SOFTMAX, TRANSPOSE_CONV = 23, 39, 45, 49, 50, 67
SUM, REDUCE_MAX, REDUCE_MIN, RESIZE_NEAREST_NEIGHBOR, MIRROR_PAD, SPLIT_V = 74, 82, 89, 97, 100, 102
LOGISTIC, TANH, SUB, PRELU, MAXIMUM, MINIMUM, RSQRT = 14, 28, 41, 54, 55, 57, 76
LEAKY_RELU, SQUARED_DIFFERENCE, ELU, HARD_SWISH, GELU = 98, 99, 111, 117, 150

_OPERATOR_NAMES = (
    "ADD AVERAGE_POOL_2D CONCATENATION CONV_2D DEPTHWISE_CONV_2D DEPTH_TO_SPACE DEQUANTIZE EMBEDDING_LOOKUP "
    "FLOOR FULLY_CONNECTED HASHTABLE_LOOKUP L2_NORMALIZATION L2_POOL_2D LOCAL_RESPONSE_NORMALIZATION LOGISTIC "
    "LSH_PROJECTION LSTM MAX_POOL_2D MUL RELU RELU_N1_TO_1 RELU6 RESHAPE RESIZE_BILINEAR RNN SOFTMAX "
    "SPACE_TO_DEPTH SVDF TANH CONCAT_EMBEDDINGS SKIP_GRAM CALL CUSTOM EMBEDDING_LOOKUP_SPARSE PAD "
    "UNIDIRECTIONAL_SEQUENCE_RNN GATHER BATCH_TO_SPACE_ND SPACE_TO_BATCH_ND TRANSPOSE MEAN SUB DIV SQUEEZE "
    "UNIDIRECTIONAL_SEQUENCE_LSTM STRIDED_SLICE BIDIRECTIONAL_SEQUENCE_RNN EXP TOPK_V2 SPLIT LOG_SOFTMAX "
    "DELEGATE BIDIRECTIONAL_SEQUENCE_LSTM CAST PRELU MAXIMUM ARG_MAX MINIMUM LESS NEG PADV2 GREATER "
    "GREATER_EQUAL LESS_EQUAL SELECT SLICE SIN TRANSPOSE_CONV SPARSE_TO_DENSE TILE EXPAND_DIMS EQUAL NOT_EQUAL "
    "LOG SUM SQRT RSQRT SHAPE POW ARG_MIN FAKE_QUANT REDUCE_PROD REDUCE_MAX PACK LOGICAL_OR ONE_HOT LOGICAL_AND "
    "LOGICAL_NOT UNPACK REDUCE_MIN FLOOR_DIV REDUCE_ANY SQUARE ZEROS_LIKE FILL FLOOR_MOD RANGE "
    "RESIZE_NEAREST_NEIGHBOR LEAKY_RELU SQUARED_DIFFERENCE MIRROR_PAD ABS SPLIT_V UNIQUE CEIL REVERSE_V2 ADD_N "
    "GATHER_ND COS WHERE RANK ELU REVERSE_SEQUENCE MATRIX_DIAG QUANTIZE MATRIX_SET_DIAG ROUND HARD_SWISH IF "
    "WHILE NON_MAX_SUPPRESSION_V4 NON_MAX_SUPPRESSION_V5 SCATTER_ND SELECT_V2 DENSIFY SEGMENT_SUM BATCH_MATMUL"
).split()


def operator_name(code: int) -> str:
    return _OPERATOR_NAMES[code] if 0 <= code < len(_OPERATOR_NAMES) else f"builtin operator {code}"


# BuiltinOptions union: the type tag of each options table edgekit writes.
OPTIONS_TYPE = {"Conv2DOptions": 1, "DepthwiseConv2DOptions": 2, "Pool2DOptions": 5, "FullyConnectedOptions": 8,
                "SoftmaxOptions": 9, "ConcatenationOptions": 10, "AddOptions": 11, "ReshapeOptions": 17,
                "MulOptions": 21, "PadOptions": 22, "ReducerOptions": 27, "PadV2Options": 43, "SubOptions": 28,
                "MaximumMinimumOptions": 39, "LeakyReluOptions": 75, "SquaredDifferenceOptions": 76,
                "HardSwishOptions": 91, "GeluOptions": 116}
OPTIONS_TYPE.update({"ResizeBilinearOptions": 15, "TransposeOptions": 26, "StridedSliceOptions": 32,
                     "SplitOptions": 35, "LogSoftmaxOptions": 36, "TransposeConvOptions": 49,
                     "ResizeNearestNeighborOptions": 74, "MirrorPadOptions": 77, "SplitVOptions": 79,
                     "UnidirectionalSequenceLSTMOptions": 71, "BatchMatMulOptions": 101})


class FlatBufferError(ValueError):
    """The bytes are not a well-formed FlatBuffer of the expected shape."""


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------

class Table:
    """A table inside ``buf`` at ``pos``; fields are read by id, bounds-checked."""

    __slots__ = ("buf", "pos", "vtable", "vsize", "what")

    def __init__(self, buf: bytes, pos: int, what: str):
        self.buf, self.pos, self.what = buf, pos, what
        _need(buf, pos, 4, what)
        self.vtable = pos - struct.unpack_from("<i", buf, pos)[0]
        _need(buf, self.vtable, 4, f"{what} vtable")
        self.vsize = struct.unpack_from("<H", buf, self.vtable)[0]
        if self.vsize < 4 or self.vsize % 2:
            raise FlatBufferError(f"{what}: bad vtable size {self.vsize}")
        _need(buf, self.vtable, self.vsize, f"{what} vtable")

    def _field(self, fid: int) -> int:
        slot = 4 + 2 * fid
        if slot + 2 > self.vsize:
            return 0
        off = struct.unpack_from("<H", self.buf, self.vtable + slot)[0]
        return self.pos + off if off else 0

    def has(self, fid: int) -> bool:
        return self._field(fid) != 0

    def scalar(self, fid: int, fmt: str, default=0):
        p = self._field(fid)
        if not p:
            return default
        _need(self.buf, p, struct.calcsize(fmt), f"{self.what} field {fid}")
        return struct.unpack_from("<" + fmt, self.buf, p)[0]

    def _indirect(self, fid: int) -> int:
        p = self._field(fid)
        if not p:
            return 0
        _need(self.buf, p, 4, f"{self.what} field {fid}")
        target = p + struct.unpack_from("<I", self.buf, p)[0]
        _need(self.buf, target, 4, f"{self.what} field {fid}")
        return target

    def table(self, fid: int, what: str) -> "Table | None":
        p = self._indirect(fid)
        return Table(self.buf, p, what) if p else None

    def vector(self, fid: int, fmt: str, what: str) -> np.ndarray | None:
        """A vector of scalars as a numpy array (a copy), or None when absent."""
        p = self._indirect(fid)
        if not p:
            return None
        n = struct.unpack_from("<I", self.buf, p)[0]
        size = struct.calcsize(fmt)
        _need(self.buf, p + 4, n * size, what)
        return np.frombuffer(self.buf, dtype=np.dtype("<" + fmt), count=n, offset=p + 4).copy()

    def tables(self, fid: int, what: str) -> list["Table"]:
        p = self._indirect(fid)
        if not p:
            return []
        n = struct.unpack_from("<I", self.buf, p)[0]
        _need(self.buf, p + 4, 4 * n, what)
        out = []
        for i in range(n):
            q = p + 4 + 4 * i
            out.append(Table(self.buf, q + struct.unpack_from("<I", self.buf, q)[0], f"{what}[{i}]"))
        return out

    def string(self, fid: int, default: str = "") -> str:
        p = self._indirect(fid)
        if not p:
            return default
        n = struct.unpack_from("<I", self.buf, p)[0]
        _need(self.buf, p + 4, n, f"{self.what} string")
        return self.buf[p + 4:p + 4 + n].decode("utf-8", errors="replace")


def _need(buf: bytes, pos: int, size: int, what: str) -> None:
    if pos < 0 or size < 0 or pos + size > len(buf):
        raise FlatBufferError(f"{what} lies outside the file (offset {pos}, {size} bytes, file {len(buf)} bytes)")


def root_table(buf: bytes) -> Table:
    if len(buf) < 8:
        raise FlatBufferError(f"the file has {len(buf)} bytes, too short for a FlatBuffer")
    if buf[4:8] != FILE_IDENTIFIER:
        raise FlatBufferError(f"the file identifier is {bytes(buf[4:8])!r}, not {FILE_IDENTIFIER!r}: not a TFLite model")
    return Table(buf, struct.unpack_from("<I", buf, 0)[0], "Model")


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------

@dataclass
class Scalar:
    fmt: str  # struct format: b B h i I f q ?
    value: object


@dataclass
class Vector:
    fmt: str  # element format, or "table"
    items: object  # numpy array / list / bytes, or a list of WTable for "table"
    align: int = 4


@dataclass
class String:
    text: str


@dataclass
class WTable:
    """A table to write: field id -> Scalar | Vector | String | WTable."""

    fields: dict = field(default_factory=dict)


class _Writer:
    def __init__(self):
        self.buf = bytearray()

    def pad_to(self, align: int, extra: int = 0) -> None:
        """Pad so that (len + extra) is a multiple of ``align``."""
        while (len(self.buf) + extra) % align:
            self.buf.append(0)

    def table(self, t: WTable) -> int:
        ids = sorted(t.fields)
        num = (ids[-1] + 1) if ids else 0
        # Inline layout: 4-byte soffset, then fields largest first (natural alignment).
        def size(v):
            return struct.calcsize(v.fmt) if isinstance(v, Scalar) else 4
        layout, pos = {}, 4
        for fid in sorted(ids, key=lambda i: -size(t.fields[i])):
            s = size(t.fields[fid])
            pos = (pos + s - 1) // s * s
            layout[fid] = pos
            pos += s
        inline = (pos + 3) // 4 * 4
        self.pad_to(2)
        vt = len(self.buf)
        self.buf += struct.pack("<HH", 4 + 2 * num, inline)
        for fid in range(num):
            self.buf += struct.pack("<H", layout.get(fid, 0))
        self.pad_to(8)
        start = len(self.buf)
        self.buf += bytes(inline)
        struct.pack_into("<i", self.buf, start, start - vt)
        children = []
        for fid, off in layout.items():
            v = t.fields[fid]
            if isinstance(v, Scalar):
                struct.pack_into("<" + v.fmt, self.buf, start + off, v.value)
            else:
                children.append((start + off, v))
        for slot, v in children:
            self._patch(slot, self.child(v))
        return start

    def _patch(self, slot: int, target: int) -> None:
        struct.pack_into("<I", self.buf, slot, target - slot)

    def child(self, v) -> int:
        if isinstance(v, WTable):
            return self.table(v)
        if isinstance(v, String):
            data = v.text.encode("utf-8")
            self.pad_to(4)
            pos = len(self.buf)
            self.buf += struct.pack("<I", len(data)) + data + b"\0"
            return pos
        if isinstance(v, Vector):
            if v.fmt == "table":
                self.pad_to(4)
                pos = len(self.buf)
                self.buf += struct.pack("<I", len(v.items)) + bytes(4 * len(v.items))
                for i, item in enumerate(v.items):
                    self._patch(pos + 4 + 4 * i, self.table(item))
                return pos
            if v.fmt == "string":
                self.pad_to(4)
                pos = len(self.buf)
                self.buf += struct.pack("<I", len(v.items)) + bytes(4 * len(v.items))
                for i, item in enumerate(v.items):
                    self._patch(pos + 4 + 4 * i, self.child(String(item)))
                return pos
            data = np.ascontiguousarray(v.items, dtype=np.dtype("<" + v.fmt)) if not isinstance(v.items, bytes) \
                else np.frombuffer(v.items, np.uint8)
            elem = struct.calcsize(v.fmt)
            self.pad_to(max(4, elem, v.align), extra=4)
            pos = len(self.buf)
            self.buf += struct.pack("<I", data.size) + data.tobytes()
            return pos
        raise TypeError(f"cannot write {type(v).__name__}")


def write(root: WTable) -> bytes:
    w = _Writer()
    w.buf += bytes(4) + FILE_IDENTIFIER
    w._patch(0, w.table(root))
    w.pad_to(16)
    return bytes(w.buf)
