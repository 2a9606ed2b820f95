"""UF2 files (Microsoft's USB flashing format), as the RP2040's ROM loads them."""
from __future__ import annotations

import struct
from pathlib import Path

MAGIC_START0, MAGIC_START1, MAGIC_END = 0x0A324655, 0x9E5D5157, 0x0AB16F30
FLAG_FAMILY_ID = 0x00002000
PAYLOAD = 256


def uf2_blocks(image: bytes, address: int, family: int) -> list[bytes]:
    chunks = [image[i:i + PAYLOAD] for i in range(0, len(image), PAYLOAD)]
    blocks = []
    for n, chunk in enumerate(chunks):
        header = struct.pack("<IIIIIIII", MAGIC_START0, MAGIC_START1, FLAG_FAMILY_ID, address + n * PAYLOAD,
                             PAYLOAD, n, len(chunks), family)
        data = chunk.ljust(476, b"\x00")
        blocks.append(header + data + struct.pack("<I", MAGIC_END))
    return blocks


def write_uf2(image: bytes, address: int, family: int, path: Path) -> Path:
    Path(path).write_bytes(b"".join(uf2_blocks(image, address, family)))
    return Path(path)
