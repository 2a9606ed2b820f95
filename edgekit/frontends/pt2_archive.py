"""Checking a ``.pt2`` archive before PyTorch deserializes anything in it.

``torch.export.load`` unpickles archive members in several places, and unpickling runs code:
weights and constants flagged ``use_pickle`` (``torch.load(weights_only=False)``), torchbind and
"opaque" constants (``pickle.loads``), sample inputs and legacy weight files (``weights_only=True``
first, then silently ``weights_only=False``), and an AOTInductor folder is loaded as a shared library.
A plain ``torch.export.save`` of a model edgekit supports needs none of that: its weights and constants
are raw bytes described by JSON, its graph is JSON, and its sample inputs are plain tensors that
load with ``weights_only=True``.

So edgekit reads the archive once into memory, accepts only that plain layout (an allow-list of
members, every CRC checked, every weight raw), checks the sample inputs with the restricted unpickler,
and hands exactly the checked bytes to ``torch.export.load``. Anything else is refused, saying why.
"""
from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path

from ..errors import EdgekitError

MAX_ARCHIVE_BYTES = 2 << 30  # a model for a microcontroller or a Pi; anything larger is not one
MAX_MEMBERS = 100_000

# Members of a plain torch.export.save archive (torch 2.13), below its one root folder.
_PLAIN = [
    re.compile(r"archive_format|archive_version|byteorder|\.data/[A-Za-z0-9_.]+"),  # short text records
    re.compile(r"models/[A-Za-z0-9_]+\.json"),  # the graph, JSON
    re.compile(r"data/(weights|constants)/[A-Za-z0-9_]+_config\.json"),  # what each raw payload is, JSON
    re.compile(r"data/weights/weight_[0-9]+"),  # raw little-endian tensor bytes
    re.compile(r"data/constants/tensor_[0-9]+"),
    re.compile(r"extra/[^/]+"),  # extra files, read as text (edgekit_exits.json)
]
_SAMPLE_INPUTS = re.compile(r"data/sample_inputs/[A-Za-z0-9_]+\.pt")  # a torch.save pickle: checked below

_WHY = ("loading it would unpickle data (which can run any code) or load native code; edgekit accepts only "
        "plain torch.export.save archives, whose weights are raw bytes")


def _refuse(path, detail: str) -> EdgekitError:
    return EdgekitError(f"{path} is refused before loading: {detail}")


def read_checked(path: str | Path) -> bytes:
    """The bytes of a ``.pt2`` that is safe to give to ``torch.export.load``; an EdgekitError otherwise."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_ARCHIVE_BYTES:
        raise _refuse(path, f"{size:,} B is more than the {MAX_ARCHIVE_BYTES:,} B edgekit accepts for a model")
    data = path.read_bytes()
    check_archive(data, path)
    return data


def check_archive(data: bytes, path="the model") -> None:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise EdgekitError(f"{path} is not a torch.export file (torch.export.save writes a zip archive): {exc}") \
            from None
    with archive:
        infos = archive.infolist()
        if not infos:
            raise _refuse(path, "the archive is empty")
        if len(infos) > MAX_MEMBERS:
            raise _refuse(path, f"{len(infos):,} archive members")
        total = sum(i.file_size for i in infos)
        if total > MAX_ARCHIVE_BYTES:
            raise _refuse(path, f"it unpacks to {total:,} B, more than the {MAX_ARCHIVE_BYTES:,} B edgekit accepts")
        roots = {i.filename.split("/", 1)[0] for i in infos}
        if len(roots) != 1 or any("/" not in i.filename for i in infos):
            raise _refuse(path, f"a torch.export archive keeps every member in one folder, this one has "
                          f"{sorted(roots)[:5]} ({_WHY})")
        members = {}
        for info in infos:
            rest = info.filename.split("/", 1)[1]
            if rest == "" or info.is_dir():
                continue
            if ".." in rest.split("/") or "\\" in rest:
                raise _refuse(path, f"member {info.filename!r} has a path that leaves the archive")
            if not (any(p.fullmatch(rest) for p in _PLAIN) or _SAMPLE_INPUTS.fullmatch(rest)):
                raise _refuse(path, f"member {info.filename!r} is not part of a plain torch.export.save archive; "
                              f"{_WHY}")
            try:
                members[rest] = archive.read(info)  # checks the CRC
            except zipfile.BadZipFile as exc:
                raise EdgekitError(f"{path} is damaged: archive member {info.filename!r} fails its check ({exc}); "
                                   "the file was truncated or corrupted, export the model again") from None
            except (OSError, EOFError, ValueError, NotImplementedError, RuntimeError) as exc:
                raise EdgekitError(f"{path} is damaged: archive member {info.filename!r} cannot be read ({exc})") \
                    from None
    for rest, payload in members.items():
        if rest.endswith("_config.json") and rest.startswith("data/"):
            _check_payload_config(path, rest, payload, members)
        elif _SAMPLE_INPUTS.fullmatch(rest):
            _check_tensors_only(path, rest, payload)


def _check_payload_config(path, name: str, payload: bytes, members: dict) -> None:
    """Weights and constants: every entry a raw tensor in a member of this archive, none pickled."""
    try:
        config = json.loads(payload.decode("utf-8")).get("config", {})
        entries = list(config.items())
    except (ValueError, UnicodeDecodeError, AttributeError):
        raise EdgekitError(f"{path} is damaged: {name} is not the JSON torch.export.save writes") from None
    folder = name.rsplit("/", 1)[0]
    for fqn, meta in entries:
        if not isinstance(meta, dict):
            raise EdgekitError(f"{path} is damaged: {name} entry {fqn!r} is not a record")
        if meta.get("use_pickle"):
            raise _refuse(path, f"{name} marks {fqn!r} as pickled; {_WHY}")
        file = meta.get("path_name")
        if not isinstance(file, str) or f"{folder}/{file}" not in members or \
                not re.fullmatch(r"(weight|tensor)_[0-9]+", file):
            raise _refuse(path, f"{name} entry {fqn!r} points at {file!r}, which is not a raw tensor in the "
                          f"archive; {_WHY}")


def _check_tensors_only(path, name: str, payload: bytes) -> None:
    """Sample inputs are a torch.save pickle. torch.export.load tries the restricted unpickler first and
    falls back to full unpickling: edgekit refuses the file unless the restricted one reads it."""
    import torch

    try:
        torch.load(io.BytesIO(payload), weights_only=True)
    except Exception as exc:  # the restricted unpickler raises UnpicklingError, RuntimeError, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise _refuse(path, f"{name} holds more than plain tensors (the restricted unpickler says: {first}); "
                      f"{_WHY}") from None
