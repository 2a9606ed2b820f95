"""Where a generated project may be written, and writing it without losing anyone's files.

edgekit writes only into a new or empty directory, or one it made itself (it holds the marker file
``.edgekit_project``, which lists every file edgekit generated there with its hash). It never writes
into ``/``, the home directory or one of its ancestors, or a non-empty directory it did not make.

A project is generated into a temporary directory beside the target and then swapped in with one
rename (``renameat2(RENAME_EXCHANGE)`` where Linux has it), so a reader, a concurrent generation or a
Ctrl-C never sees a half-written or mixed project; generations into one parent directory also take a
lock on it. Files edgekit did not generate (build outputs, a user's own files) are carried over into
the new project; a generated file the user edited is only overwritten with ``force``.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import EdgekitError

MARKER = ".edgekit_project"
LEGACY_RECORD = "edgekit_project.json"  # projects of an edgekit older than the marker


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path) -> list[str]:
    """Every regular file under root, relative, '/'-separated (symlinks are not followed)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            p = Path(dirpath) / name
            if p.is_file() and not p.is_symlink():
                out.append(p.relative_to(root).as_posix())
    return sorted(out)


def read_manifest(out: Path) -> dict | None:
    """The generated files recorded in ``out``'s marker ({relative path: sha256}); None if there is no
    marker; {} for a project of an older edgekit (no list)."""
    marker = out / MARKER
    if marker.is_file():
        try:
            data = json.loads(marker.read_text())
            return dict(data["generated"])
        except (ValueError, KeyError, TypeError, OSError, UnicodeDecodeError):
            raise EdgekitError(f"{marker} is damaged; if {out} is an edgekit project, delete it and generate "
                               "again") from None
    if (out / LEGACY_RECORD).is_file():
        return {}
    return None


def _protected(out: Path) -> str | None:
    resolved = out.resolve()
    if resolved == Path(resolved.anchor):
        return "the root directory"
    home = Path(os.path.expanduser("~")).resolve()
    if resolved == home:
        return "your home directory"
    if resolved in home.parents:
        return f"a parent of your home directory ({home})"
    return None


def check_output_dir(out, force: bool = False) -> dict | None:
    """Refuse an output directory edgekit must not write into, before any work is done. Returns the
    manifest of an existing edgekit project there (None when the directory is new or empty)."""
    out = Path(out)
    why = _protected(out)
    if why:
        raise EdgekitError(f"refusing to write a project into {out}: it is {why}; give a new directory")
    if out.exists() and not out.is_dir():
        raise EdgekitError(f"{out} exists and is not a directory; give a new or empty directory")
    parent = out.resolve().parent
    if not out.exists():
        existing = next((p for p in [parent, *parent.parents] if p.exists()), None)
        if existing is not None and not existing.is_dir():
            raise EdgekitError(f"cannot create {out}: {existing} is not a directory")
        if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
            raise EdgekitError(f"cannot create {out}: {existing} is not writable")
        return None
    if not os.access(parent, os.W_OK | os.X_OK) or not os.access(out, os.W_OK | os.X_OK):
        raise EdgekitError(f"cannot write the project {out}: it (or {parent}) is not writable")
    try:
        entries = list(out.iterdir())
    except OSError as exc:
        raise EdgekitError(f"cannot read {out}: {exc.strerror}") from None
    if not entries:
        return None
    manifest = read_manifest(out)
    if manifest is None:
        shown = ", ".join(sorted(p.name for p in entries)[:5]) + (", ..." if len(entries) > 5 else "")
        raise EdgekitError(f"{out} is not empty ({shown}) and is not an edgekit project (no {MARKER}); "
                           "edgekit writes only into a new or empty directory, or one it made")
    edited = [rel for rel, digest in manifest.items() if (out / rel).is_file() and _digest(out / rel) != digest]
    if edited and not force:
        shown = ", ".join(edited[:5]) + (", ..." if len(edited) > 5 else "")
        raise EdgekitError(f"{out}: {shown} changed since edgekit generated {'it' if len(edited) == 1 else 'them'}; "
                           "regenerating would overwrite your edits (--force overwrites them)")
    return manifest


@contextlib.contextmanager
def _parent_lock(parent: Path):
    """An exclusive lock on the parent directory: generations into it run one at a time."""
    try:
        import fcntl
        fd = os.open(parent, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE); False where unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    if ctypes.get_errno() in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(b))


def _carry_over(old: Path, new: Path, manifest: dict) -> None:
    """Into the new project: the old one's files edgekit did not generate (build outputs, the user's), and
    the modification times of generated files that did not change (so make rebuilds only what changed)."""
    generated_now = set(_files(new))
    for rel in _files(old):
        src, dst = old / rel, new / rel
        if rel in generated_now:
            if _digest(src) == _digest(dst):
                st = src.stat()
                os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
            continue
        if rel in manifest or rel == MARKER:
            continue  # generated by the previous run and not by this one: stale
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


def _write_marker(stage: Path, generated_files: list[str]) -> None:
    generated = {rel: _digest(stage / rel) for rel in generated_files if rel != MARKER}
    (stage / MARKER).write_text(json.dumps({"edgekit": 1, "generated": generated}, indent=1) + "\n")


@contextlib.contextmanager
def staged_output(out, force: bool = False):
    """Yield a fresh directory to generate into; on success it replaces ``out`` in one step."""
    out = Path(out)
    if out.is_symlink():
        out = out.resolve()  # replace the directory it points to, not the link
    check_output_dir(out, force)
    parent = out.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    with _parent_lock(parent):
        manifest = check_output_dir(out, force)  # again, under the lock: another run may have written it
        try:
            stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.edgekit-", dir=parent))
        except OSError as exc:
            raise EdgekitError(f"cannot write into {parent}: {exc.strerror}") from None
        try:
            yield stage
            generated_files = _files(stage)
            if out.exists() and manifest is not None:
                _carry_over(out, stage, manifest)
            _write_marker(stage, generated_files)
            _install(stage, out)
        finally:
            shutil.rmtree(stage, ignore_errors=True)


def _install(stage: Path, out: Path) -> None:
    stage.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700; a project directory is an ordinary one
    if not out.exists():
        os.rename(stage, out)
        return
    cwd = Path.cwd().resolve()
    if out.resolve() == cwd or out.resolve() in cwd.parents:
        _replace_in_place(stage, out)  # renaming the working directory away would strand the shell in it
        return
    if _exchange(stage, out):
        shutil.rmtree(stage, ignore_errors=True)  # now the old project
        return
    old = stage.with_name(stage.name + "-old")
    os.rename(out, old)
    os.rename(stage, out)
    shutil.rmtree(old, ignore_errors=True)


def _replace_in_place(stage: Path, out: Path) -> None:
    """File by file (each an atomic rename), then drop what the new project no longer has."""
    new = set(_files(stage))
    for rel in sorted(new):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(stage / rel, out / rel)
    for rel in _files(out):
        if rel not in new:
            (out / rel).unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
