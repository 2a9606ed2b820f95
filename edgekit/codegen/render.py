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
    return _env


def render(template: str, **context) -> str:
    return environment().get_template(template).render(**context)


def render_to(path: Path, template: str, **context) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = render(template, **context)
    if not path.exists() or path.read_text() != text:  # keep mtimes: make rebuilds only what changed
        path.write_text(text)
    return path
