"""How a constant tensor is stored in flash.

Every constant goes through ``encode``: one place decides the encoding and
reports its bytes. Biases and requantization arrays are dense; a weighted
layer's filter is dense int8, or one of the encodings below (``encode_filter``):
an int8 codebook + bit-packed indices, a canonical Huffman code, or a sparsity
bitmask + the nonzero values. Each has kernels that decode it on the fly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

C_TYPES = {"int8": "int8_t", "int32": "int32_t", "float32": "float", "uint8": "uint8_t", "uint16": "uint16_t",
           "uint32": "uint32_t", "int16": "int16_t"}


@dataclass
class CArray:
    """One ``const`` array in model_weights.c."""

    name: str
    ctype: str
    values: np.ndarray  # flat
    comment: str = ""
    align: int = 4

    @property
    def nbytes(self) -> int:
        return int(self.values.size * self.values.dtype.itemsize)

    def rows(self, per_row: int = 16) -> list[str]:
        """The values as text, ``per_row`` a line: numbers only, no C syntax."""
        if self.values.dtype.kind == "f":
            text = [repr(float(v)) + "f" if np.isfinite(v) else "0.0f" for v in self.values.astype(np.float32)]
        else:
            text = [str(int(v)) for v in self.values]
        return [", ".join(text[i:i + per_row]) for i in range(0, len(text), per_row)]


def dense(name: str, data: np.ndarray, comment: str = "") -> CArray:
    flat = np.ascontiguousarray(data).reshape(-1)
    return CArray(name, C_TYPES[str(flat.dtype)], flat, comment)


ENCODINGS = {"dense": dense}


def encode(name: str, data: np.ndarray, encoding: str = "dense", comment: str = "") -> list[CArray]:
    """The arrays that store ``data`` in the given encoding."""
    if encoding != "dense" and encoding in FILTER_ENCODERS:
        return list(encode_filter(name, data, encoding, comment).arrays.values())
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown weight encoding {encoding!r}; known: {', '.join(WEIGHT_CHOICES)}")
    out = ENCODINGS[encoding](name, data, comment)
    return out if isinstance(out, list) else [out]


# ---------------------------------------------------------------------------
# Filter encodings: a weighted layer's int8 weights as rows (one per output
# channel, each the filter in the order its kernel reads it), stored so that
# flash shrinks and the kernel decodes a row at a time with no RAM copy.
# Every encoding is lossless: ``decode_filter(encode_filter(n, rows, e)) == rows``.
# ---------------------------------------------------------------------------

FILTER_ENCODINGS = ("dense", "codebook", "huffman", "sparse")
WEIGHT_CHOICES = FILTER_ENCODINGS + ("auto",)
MAX_CODE_LENGTH = 16  # Huffman codes are at most this long (the C decoder's loop bound)
RUN_BASE = 127  # a Huffman symbol s > 127 stands for a run of s - 127 zeros
MAX_RUN = 255


@dataclass
class EncodedFilter:
    """One layer's filter in one encoding: the arrays that go to flash and the
    scalar fields of its C descriptor (bits, max code length...)."""

    encoding: str
    arrays: dict[str, CArray]  # role -> array, in the order the C descriptor lists them
    fields: dict[str, int]
    shape: tuple[int, int]  # (rows, row length)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


def _bytes_array(name: str, data, comment: str = "") -> CArray:
    return CArray(name, "uint8_t", np.asarray(data, dtype=np.uint8).reshape(-1), comment, align=1)


def _nonempty(values: np.ndarray) -> np.ndarray:
    """C has no zero-length arrays: an empty table gets one unused element."""
    return values if values.size else np.zeros(1, values.dtype)


def pack_bits_lsb(values: np.ndarray, bits: int) -> np.ndarray:
    """``bits``-bit unsigned fields, LSB first, plus one pad byte (the C reader
    reads two bytes at a time, so the last field never reads past the array)."""
    values = np.asarray(values, dtype=np.uint32).reshape(-1)
    shifts = np.arange(bits, dtype=np.uint32)
    stream = ((values[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1)
    return np.append(np.packbits(stream, bitorder="little"), np.uint8(0))


def unpack_bits_lsb(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    stream = np.unpackbits(np.asarray(packed, dtype=np.uint8), bitorder="little")[:count * bits]
    fields = stream.reshape(count, bits).astype(np.uint32)
    return (fields << np.arange(bits, dtype=np.uint32)).sum(axis=1).astype(np.int64)


def _bits_for(count: int) -> int:
    return max(1, int(np.ceil(np.log2(max(count, 1)))))


def encode_dense(name: str, rows: np.ndarray, comment: str = "") -> EncodedFilter:
    return EncodedFilter("dense", {"data": dense(name, rows.astype(np.int8), comment)}, {}, rows.shape)


def encode_codebook(name: str, rows: np.ndarray, comment: str = "") -> EncodedFilter:
    """An int8 codebook (one per layer, or one per output channel when that is
    smaller) and the indices bit-packed at 1..8 bits."""
    out_c, length = rows.shape
    layer_values = np.unique(rows)
    layer_bits = _bits_for(layer_values.size)
    per_channel = [np.unique(r) for r in rows]
    channel_k = max(v.size for v in per_channel)
    channel_bits = _bits_for(channel_k)
    layer_bytes = layer_values.size + (out_c * length * layer_bits + 7) // 8
    channel_bytes = out_c * channel_k + (out_c * length * channel_bits + 7) // 8
    if layer_bytes <= channel_bytes:
        codebook, bits, stride = layer_values.astype(np.int8), layer_bits, 0
        indices = np.searchsorted(layer_values, rows)
    else:
        codebook = np.zeros((out_c, channel_k), np.int8)
        indices = np.zeros_like(rows, dtype=np.int64)
        for c, values in enumerate(per_channel):
            codebook[c, :values.size] = values
            indices[c] = np.searchsorted(values, rows[c])
        bits, stride = channel_bits, channel_k
    arrays = {"codebook": dense(f"{name}_codebook", codebook, comment),
              "indices": _bytes_array(f"{name}_indices", pack_bits_lsb(indices, bits))}
    return EncodedFilter("codebook", arrays, {"bits": bits, "codebook_stride": stride}, rows.shape)


def _row_symbols(rows: np.ndarray, runs: str) -> list[int]:
    """The symbol stream: int8 literals, and (unless ``runs == "none"``) zero
    runs as RUN_BASE + length, never crossing a row."""
    symbols: list[int] = []
    for row in rows:
        if runs == "none":
            symbols.extend(int(v) for v in row)
            continue
        i, n = 0, row.size
        nonzero = np.flatnonzero(row)
        for j in list(nonzero) + [n]:
            run = int(j) - i
            while run > 0:
                if runs == "pow2":
                    step = min(1 << (run.bit_length() - 1), 1 << (MAX_RUN.bit_length() - 1))
                else:
                    step = min(run, MAX_RUN)
                symbols.append(RUN_BASE + step)
                run -= step
            if j < n:
                symbols.append(int(row[j]))
            i = int(j) + 1
    return symbols


def huffman_lengths(freqs: dict[int, int], limit: int = MAX_CODE_LENGTH) -> dict[int, int]:
    """Code lengths of a Huffman code over ``freqs`` (deterministic), at most
    ``limit`` bits: when a code is too long, the rarest frequencies are
    flattened and the code rebuilt."""
    import heapq

    if len(freqs) == 1:
        return {next(iter(freqs)): 1}
    freqs = dict(freqs)
    while True:
        heap = [(f, i, (s,)) for i, (s, f) in enumerate(sorted(freqs.items()))]
        heapq.heapify(heap)
        depth = {s: 0 for s in freqs}
        tie = len(heap)
        while len(heap) > 1:
            f1, _, a = heapq.heappop(heap)
            f2, _, b = heapq.heappop(heap)
            for s in a + b:
                depth[s] += 1
            heapq.heappush(heap, (f1 + f2, tie, a + b))
            tie += 1
        if max(depth.values()) <= limit:
            return depth
        freqs = {s: (f + 1) // 2 for s, f in freqs.items()}


def canonical_code(lengths: dict[int, int]) -> tuple[list[int], list[int], dict[int, tuple[int, int]]]:
    """(counts per length 0..max, symbols in canonical order, symbol -> (code, length))."""
    max_len = max(lengths.values())
    counts = [0] * (max_len + 1)
    for n in lengths.values():
        counts[n] += 1
    order = sorted(lengths, key=lambda s: (lengths[s], s))
    codes, code, prev = {}, 0, 0
    for s in order:
        code <<= lengths[s] - prev
        prev = lengths[s]
        codes[s] = (code, prev)
        code += 1
    return counts, order, codes


def _huffman_stream(symbols: list[int], codes: dict[int, tuple[int, int]]) -> np.ndarray:
    """The codes back to back, MSB first."""
    if not symbols:
        return np.zeros(0, np.uint8)
    table = {s: i for i, s in enumerate(codes)}
    code = np.array([codes[s][0] for s in codes], np.int64)
    length = np.array([codes[s][1] for s in codes], np.int64)
    idx = np.array([table[s] for s in symbols], np.int64)
    c, n = code[idx], length[idx]
    width = int(length.max())
    k = np.arange(width)
    bits = (c[:, None] >> np.maximum(n[:, None] - 1 - k, 0)) & 1
    keep = k < n[:, None]
    return np.packbits(bits[keep].astype(np.uint8), bitorder="big")


def _huffman_stream_padded(symbols, codes) -> np.ndarray:
    """The stream + two pad bytes: the C decoder peeks three bytes at a time."""
    return np.append(_huffman_stream(symbols, codes), np.zeros(2, np.uint8))


def encode_huffman(name: str, rows: np.ndarray, comment: str = "") -> EncodedFilter:
    """A canonical Huffman code per layer over the int8 weight values and runs
    of zeros (Deep Compression's Huffman stage, with the sparsity folded in).
    The decoding table is the code length counts and the symbols in canonical
    order: the symbols are the layer's codebook. Of the ways to cut zero runs
    (none, any length up to 255, powers of two) the smallest is kept."""
    best = None
    for runs in ("none", "any", "pow2"):
        symbols = _row_symbols(rows, runs)
        freqs: dict[int, int] = {}
        for s in symbols:
            freqs[s] = freqs.get(s, 0) + 1
        counts, order, codes = canonical_code(huffman_lengths(freqs))
        arrays = {"counts": dense(f"{name}_counts", np.array(counts, np.int16)),
                  "symbols": dense(f"{name}_symbols", np.array(order, np.int16), comment),
                  "stream": _bytes_array(f"{name}_stream", _huffman_stream_padded(symbols, codes))}
        candidate = EncodedFilter("huffman", arrays, {"max_len": len(counts) - 1}, rows.shape)
        if best is None or candidate.nbytes < best.nbytes:
            best = candidate
    return best


def encode_sparse(name: str, rows: np.ndarray, comment: str = "") -> EncodedFilter:
    """A bitmask (one bit per weight, 1 = nonzero, LSB first, rows back to back)
    and the nonzero int8 weights in order."""
    mask = rows.reshape(-1) != 0
    packed = np.append(np.packbits(mask.astype(np.uint8), bitorder="little"), np.uint8(0))
    values = rows.reshape(-1)[mask].astype(np.int8)
    arrays = {"mask": _bytes_array(f"{name}_mask", packed),
              "values": dense(f"{name}_values", _nonempty(values), comment)}
    return EncodedFilter("sparse", arrays, {}, rows.shape)


FILTER_ENCODERS = {"dense": encode_dense, "codebook": encode_codebook, "huffman": encode_huffman,
                   "sparse": encode_sparse}


def encode_filter(name: str, rows: np.ndarray, encoding: str, comment: str = "") -> EncodedFilter:
    """``rows``: int8 (output channels, filter length). ``encoding`` one of
    FILTER_ENCODINGS; "auto" is decided by the caller, which also counts the
    requantization arrays each kernel needs (see codegen.project)."""
    if encoding not in FILTER_ENCODERS:
        raise ValueError(f"unknown weight encoding {encoding!r}; known: {', '.join(WEIGHT_CHOICES)}")
    rows = np.asarray(rows)
    if rows.ndim != 2 or rows.dtype != np.int8:
        raise ValueError(f"encode_filter takes a 2-D int8 array, got {rows.dtype} {rows.shape}")
    return FILTER_ENCODERS[encoding](name, rows, comment)


def decode_filter(enc: EncodedFilter) -> np.ndarray:
    """The int8 rows back, read from the arrays exactly as the C kernels read them."""
    out_c, length = enc.shape
    a = {role: arr.values for role, arr in enc.arrays.items()}
    if enc.encoding == "dense":
        return a["data"].reshape(out_c, length).astype(np.int8)
    if enc.encoding == "codebook":
        idx = unpack_bits_lsb(a["indices"], enc.fields["bits"], out_c * length).reshape(out_c, length)
        stride = enc.fields["codebook_stride"]
        base = (np.arange(out_c) * stride)[:, None]
        return a["codebook"].astype(np.int64)[base + idx].astype(np.int8)
    if enc.encoding == "sparse":
        mask = np.unpackbits(a["mask"], bitorder="little")[:out_c * length].astype(bool)
        flat = np.zeros(out_c * length, np.int8)
        flat[mask] = a["values"][:int(mask.sum())]
        return flat.reshape(out_c, length)
    if enc.encoding == "huffman":
        counts, symbols = [int(c) for c in a["counts"]], [int(s) for s in a["symbols"]]
        bits = np.unpackbits(a["stream"], bitorder="big")
        pos, out = 0, np.zeros((out_c, length), np.int8)
        for r in range(out_c):
            i = 0
            while i < length:
                code = first = index = 0
                for n in range(1, len(counts)):
                    code |= int(bits[pos])
                    pos += 1
                    if code - first < counts[n]:
                        s = symbols[index + code - first]
                        break
                    index += counts[n]
                    first = (first + counts[n]) << 1
                    code <<= 1
                else:
                    raise ValueError("corrupt Huffman stream")
                if s > RUN_BASE:
                    i += s - RUN_BASE
                else:
                    out[r, i] = s
                    i += 1
            if i != length:
                raise ValueError("a zero run crosses a row")
        return out
    raise ValueError(f"unknown encoding {enc.encoding!r}")
