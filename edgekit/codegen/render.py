"""The Jinja2 environment over ``firmware_templates/``."""
from __future__ import annotations

from pathlib import Path

import jinja2

TEMPLATES = Path(__file__).resolve().parent.parent / "firmware_templates"

_env: jinja2.Environment | None = None


def c_float(value: float) -> str:
    """A float as a C single-precision literal (a number, no other C)."""
    text = repr(float(value))
    if "e" not in text and "." not in text and "inf" not in text:
        text += ".0"
    return text + "f"


# Names from a model file (tflite tensor / op names, PyTorch module paths) are untrusted text: in C they
# are only ever printed through these two filters; the original stays in edgekit_project.json (JSON-escaped).
NAME_CHARS = 96  # longer names are cut (with "...") in C; the full name is in edgekit_project.json


def _shorten(text: str) -> str:
    text = str(text)
    return text if len(text) <= NAME_CHARS else text[:NAME_CHARS] + "..."


def c_comment(text) -> str:
    """Text safe inside a C block comment: printable ASCII only (others as <U+XXXX>), no backslash, and no
    comment delimiter, trigraph or line splice can form."""
    out = []
    for ch in _shorten(text):
        if " " <= ch <= "~" and ch != "\\":
            out.append(ch)
        else:
            out.append(f"<U+{ord(ch):04X}>")
    safe = "".join(out)
    while True:  # replacing can create a new pair ("*//" -> "* //"), so repeat until none is left
        fixed = safe.replace("*/", "* /").replace("/*", "/ *").replace("//", "/ /").replace("??", "? ?")
        if fixed == safe:
            return safe
        safe = fixed


def c_string(text) -> str:
    """The contents of a C string literal (without the quotes) that reads back as the UTF-8 bytes of
    ``text``: backslash, quote, '?' (trigraphs) and every byte outside printable ASCII escaped as octal."""
    out = []
    for byte in _shorten(text).encode("utf-8", "surrogatepass"):
        ch = chr(byte)
        if ch in '\\"?':
            out.append("\\" + ch)
        elif 0x20 <= byte <= 0x7E:
            out.append(ch)
        else:
            out.append(f"\\{byte:03o}")  # octal: at most 3 digits, so a following digit is not swallowed
    return "".join(out)


def environment() -> jinja2.Environment:
    global _env
    if _env is None:
        _env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(TEMPLATES)),
            undefined=jinja2.StrictUndefined,
            keep_trailing_newline=True,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        _env.filters["cfloat"] = c_float
        _env.filters["c_comment"] = c_comment
        _env.filters["c_string"] = c_string
    return _env


def render(template: str, **context) -> str:
    return environment().get_template(template).render(**context)


def render_to(path: Path, template: str, **context) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = render(template, **context)
    if not path.exists() or path.read_text() != text:  # keep mtimes: make rebuilds only what changed
        path.write_text(text)
    return path
