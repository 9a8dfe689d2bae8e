"""Theme files (TOML) -> Textual themes.

A theme file holds the fields of :class:`textual.theme.Theme` (``primary``, ``background``, ``dark``,
...) and a ``[variables]`` table; the gauge's colours are the ``gauge-*`` variables, so a theme
restyles the gauge too. Shipped themes live in the package's ``themes/`` folder (the repo's top-level
``themes/`` when running from a checkout); users add or override themes in ``<config dir>/themes/``.
A broken file is reported (path and reason) and skipped, so the app still starts.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path

from textual.color import Color, ColorParseError
from textual.theme import Theme

from .. import config

DEFAULT_THEME = "sinkchat-dark"
GAUGE_DEFAULTS = {
    "gauge-sink": "#F2B134",
    "gauge-pinned": "#6CC08B",
    "gauge-window": "#5FA8D3",
    "gauge-free": "#3A3F48",
    "gauge-evicted": "#E0576B",
}
_COLOR_FIELDS = ("primary", "secondary", "warning", "error", "success", "accent", "foreground",
                 "background", "surface", "panel", "boost")
_FIELDS = {f.name for f in dataclasses.fields(Theme)}


@dataclass(frozen=True)
class ThemeProblem:
    path: Path
    reason: str

    def text(self) -> str:
        return f"theme file {self.path} skipped: {self.reason}"


def shipped_dir() -> Path:
    """``sinkchat/themes`` in an installed wheel, else the checkout's top-level ``themes/``."""
    here = Path(__file__).resolve().parent.parent
    packaged = here / "themes"
    return packaged if packaged.is_dir() else here.parent / "themes"


def user_dir() -> Path:
    return config.config_dir() / "themes"


def parse(path: Path) -> Theme:
    """One theme file as a Theme; raises ValueError with a reason a person can act on."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8-sig"))  # a BOM, as Windows editors write
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"not valid TOML ({exc})") from None
    data.setdefault("name", path.stem)
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)}")
    if "primary" not in data:
        raise ValueError("missing the required key 'primary'")
    if not isinstance(data.get("dark", True), bool):
        raise ValueError(f"dark = {config.toml_text(data['dark'])} must be true or false")
    if not isinstance(data["name"], str) or not data["name"].strip():
        raise ValueError("name must be non-empty text")
    variables = data.get("variables", {})
    if not isinstance(variables, dict):
        raise ValueError("[variables] must be a table")
    for key in (*_COLOR_FIELDS, *(f"variables.{k}" for k in variables if k.startswith("gauge-"))):
        value = variables[key[10:]] if key.startswith("variables.") else data.get(key)
        if value is None:
            continue
        try:
            Color.parse(value)
        except (ColorParseError, TypeError, ValueError):
            raise ValueError(f"{key} = {config.toml_text(value)} is not a colour") from None
    data["variables"] = {k: str(v) for k, v in variables.items()}
    try:
        theme = Theme(**data)
        theme.to_color_system().generate()
    except Exception as exc:  # a wrong type (dark = "yes") or a value Textual rejects
        raise ValueError(str(exc).splitlines()[0] or type(exc).__name__) from None
    return theme


def discover(dirs: list[Path] | None = None) -> tuple[dict[str, Theme], list[ThemeProblem]]:
    """Every theme in the shipped and user folders (later folders override), plus the broken files."""
    themes: dict[str, Theme] = {}
    problems: list[ThemeProblem] = []
    for folder in dirs if dirs is not None else [shipped_dir(), user_dir()]:
        for path in sorted(folder.glob("*.toml")) if folder.is_dir() else []:
            try:
                theme = parse(path)
            except (ValueError, OSError) as exc:
                problems.append(ThemeProblem(path, str(exc)))
                continue
            themes[theme.name] = theme
    return themes, problems
