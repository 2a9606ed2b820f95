"""Boards are data: one TOML file each in this folder."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from ..errors import EdgekitError

BOARDS_DIR = Path(__file__).resolve().parent
DEFAULT_BOARD = "host"


@dataclass
class Board:
    name: str
    description: str
    kind: str  # host | cortex-m | linux-aarch64
    templates: list[str]  # folders of firmware_templates/ rendered into the project
    data: dict = field(default_factory=dict)
    source: Path | None = None  # a board file of the user's own (given by path); None: one of edgekit's

    def __getattr__(self, key):  # board.cpu, board.clock_hz, ...: the data file's keys
        try:
            return self.__dict__["data"][key]
        except KeyError:
            raise AttributeError(f"board has no {key!r}") from None

    def get(self, key, default=None):
        return self.data.get(key, default)

    def __getitem__(self, key):
        return self.data[key]


def list_boards() -> list[str]:
    return sorted(p.stem for p in BOARDS_DIR.glob("*.toml"))


PROJECT_BOARD_FILE = "edgekit_board.toml"  # a project's copy of a user's own board file


def load_board(name: str) -> Board:
    """One of edgekit's boards, by the name `edgekit boards` lists (never a path: see ``load_board_file``)."""
    if not isinstance(name, str) or name not in list_boards():
        raise EdgekitError(f"unknown board {name!r}; known boards: {', '.join(list_boards())} "
                           "(a board file of your own: give its path, e.g. --board ./myboard.toml)")
    return _board_from(BOARDS_DIR / f"{name}.toml", None)


def is_board_path(spec: str) -> bool:
    """``--board`` names a board file of the user's own when it is a path ending in .toml."""
    return spec.endswith(".toml")


def resolve_board(spec) -> Board:
    """``--board``: an edgekit board name, or a path to a board file of the user's own."""
    if isinstance(spec, Board):
        return spec
    if isinstance(spec, (str, Path)) and (isinstance(spec, Path) or is_board_path(spec)):
        return load_board_file(spec)
    return load_board(spec)


def load_board_file(path) -> Board:
    """A board file of the user's own, given explicitly by its path; checked like edgekit's own."""
    p = Path(path)
    if p.suffix != ".toml":
        raise EdgekitError(f"a board file must be a .toml file, not {p}")
    if not p.is_file():
        raise EdgekitError(f"board file not found: {p}")
    return _board_from(p, p.resolve())


def project_board(out_dir, project: dict) -> Board:
    """The board a generated project was made for: its copy of a user's board file, or edgekit's own."""
    if project.get("board_file"):
        return load_board_file(Path(out_dir) / PROJECT_BOARD_FILE)
    return load_board(project.get("board"))


# What a board file may say. Its values reach generated Makefiles, linker scripts and C comments, and its
# folders are paths inside edgekit: so names are plain words and folders are edgekit's own.
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
_KINDS = ("host", "cortex-m", "linux-aarch64")
_TEMPLATE_DIRS = ("host", "runtime", "cortex_m", "linux_aarch64")
_VARIANTS = ("dsp", "neon", "x86")


def _board_from(path: Path, source: Path | None) -> Board:
    what = f"board file {path}"
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgekitError(f"{what} cannot be read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise EdgekitError(f"{what} is not valid TOML: {exc}") from None
    for key in ("name", "kind", "templates"):
        if key not in data:
            raise EdgekitError(f"{what} has no {key!r}")
    for key in ("name", "cpu", "fpu", "float_abi", "serial_device"):
        value = data.get(key)
        if value not in (None, "") and (not isinstance(value, str) or not (_WORD.fullmatch(value) or
                                                                     (key == "serial_device" and
                                                                      re.fullmatch(r"/[A-Za-z0-9_./-]{1,64}", value)))):
            raise EdgekitError(f"{what}: {key} = {value!r} is not a plain name (letters, digits, . _ + -)")
    if data["kind"] not in _KINDS:
        raise EdgekitError(f"{what}: kind {data['kind']!r} is not one of {', '.join(_KINDS)}")
    templates = data["templates"]
    templates = [templates] if isinstance(templates, str) else list(templates)
    bad = [t for t in templates if t not in _TEMPLATE_DIRS]
    if bad:
        raise EdgekitError(f"{what}: templates {bad} are not edgekit template folders ({', '.join(_TEMPLATE_DIRS)})")
    if data.get("kernel_variant") not in (None, *_VARIANTS):
        raise EdgekitError(f"{what}: kernel_variant {data['kernel_variant']!r} is not one of {', '.join(_VARIANTS)}")
    cores = data.get("cores", 1)
    if isinstance(cores, bool) or not isinstance(cores, int) or not 1 <= cores <= 64:
        raise EdgekitError(f"{what}: cores = {cores!r} is not a whole number from 1 to 64")
    if cores > 1 and data["kind"] != "linux-aarch64":
        raise EdgekitError(f"{what}: cores = {cores}: only linux-aarch64 boards run layers on several threads")
    flags = data.get("cflags", [])
    for value in [data.get("cc", "cc"), data.get("description", ""), *(flags if isinstance(flags, list) else [flags])]:
        if not isinstance(value, str) or any(ord(c) < 0x20 or c in "#$`\\" for c in value):
            raise EdgekitError(f"{what}: {value!r} contains a control character or one of # $ ` \\ "
                               "(it is written into a Makefile)")
    return Board(data["name"], data.get("description", ""), data["kind"], templates, data, source)
