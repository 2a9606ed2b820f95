"""How a constant tensor is stored in flash.

Every constant goes through ``encode``: one place decides the encoding and
reports its bytes. Dense arrays are what the kernels read today; clustered
(codebook + packed indices), Huffman-coded and sparse encodings plug in here
with the kernels that decode them.
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
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown weight encoding {encoding!r}; known: {', '.join(ENCODINGS)}")
    out = ENCODINGS[encoding](name, data, comment)
    return out if isinstance(out, list) else [out]
