"""Boards are data: one TOML file each in this folder."""
from __future__ import annotations

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


def load_board(name: str) -> Board:
    path = BOARDS_DIR / f"{name}.toml"
    if not path.exists():
        raise EdgekitError(f"unknown board {name!r}; known boards: {', '.join(list_boards())}")
    with open(path, "rb") as f:
        data = tomllib.load(f)
    templates = data["templates"]
    return Board(data["name"], data.get("description", ""), data["kind"],
                 [templates] if isinstance(templates, str) else list(templates), data)
