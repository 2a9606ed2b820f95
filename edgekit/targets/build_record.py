"""Which sources a built binary came from, so a stale one is never run, flashed or profiled.

``edgekit build`` records, in ``edgekit_build.json``, a hash of the project's sources (every file edgekit
generated, plus the build's own inputs such as ``stack.mk``) and a hash of each binary it produced.
``run``, ``flash`` and ``profile`` recompute both and refuse a binary whose sources changed since
(a regeneration without a rebuild), or which was changed or rebuilt outside ``edgekit build``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..codegen.output_dir import MARKER, _digest, _files, read_manifest
from ..errors import EdgekitError

RECORD = "edgekit_build.json"
BUILD_INPUTS = ("stack.mk",)  # written by `edgekit build` itself, read by the Makefile
_LEGACY_SOURCES = (".c", ".h", ".ld", ".S", ".s")


def sources_hash(out: Path) -> str:
    """A hash of what the build reads: the generated files as they are now, and the build's inputs."""
    out = Path(out)
    manifest = read_manifest(out) or {}
    names = set(manifest) or {rel for rel in _files(out) if rel.endswith(_LEGACY_SOURCES) or rel == "Makefile"}
    names |= {rel for rel in BUILD_INPUTS if (out / rel).is_file()}
    h = hashlib.sha256()
    for rel in sorted(names - {MARKER}):
        p = out / rel
        h.update(rel.encode() + b"\0" + (_digest(p).encode() if p.is_file() else b"missing") + b"\n")
    return h.hexdigest()


def require_makefile(out: Path) -> None:
    if not (Path(out) / "Makefile").is_file():
        raise EdgekitError(f"{out} has no Makefile, so there is nothing to build; the project is incomplete: "
                           f"generate it again")


def record_build(out: Path, binaries) -> None:
    """After a successful build: note the sources and the binaries just built from them."""
    out = Path(out)
    path = out / RECORD
    now = sources_hash(out)
    try:
        old = json.loads(path.read_text())
        kept = old["binaries"] if old.get("sources") == now else {}
    except (OSError, ValueError, KeyError, TypeError):
        kept = {}
    kept.update({Path(b).name: _digest(Path(b)) for b in binaries if b is not None and Path(b).is_file()})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"sources": now, "binaries": kept}, indent=1) + "\n")
    tmp.replace(path)


def require_fresh(out: Path, binary: Path, action: str = "run") -> None:
    """Refuse ``binary`` unless `edgekit build` made it from the project's current sources."""
    out, binary = Path(out), Path(binary)
    build = f"`edgekit build {out}`"
    if not binary.is_file():
        raise EdgekitError(f"{binary} does not exist: run {build} first")
    try:
        record = json.loads((out / RECORD).read_text())
        built = record["binaries"][binary.name]
        sources = record["sources"]
    except (OSError, ValueError, KeyError, TypeError):
        raise EdgekitError(f"edgekit has no record of building {binary.name} from this project's sources; "
                           f"run {build} before you {action} it") from None
    if sources != sources_hash(out):
        raise EdgekitError(f"{binary.name} is stale: the project's sources changed since it was built "
                           f"(regenerated or edited); run {build} before you {action} it")
    if built != _digest(binary):
        raise EdgekitError(f"{binary.name} is not the binary `edgekit build` made (it changed since); "
                           f"run {build} before you {action} it")
