"""Where sinkchat keeps things (XDG dirs) and the user's config file of defaults.

The config file is ``<config dir>/config.toml`` with flat keys named like the CLI flags
(``model``, ``sinks``, ``window``, ``theme``, ...). Flags given on the command line win.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import platformdirs

from .errors import SinkchatError

APP = "sinkchat"


def config_dir() -> Path:
    return Path(os.environ.get("SINKCHAT_CONFIG_DIR") or platformdirs.user_config_dir(APP))


def data_dir(override: str | Path | None = None) -> Path:
    """Chats live here; created 0700 because transcripts are private."""
    path = Path(override or os.environ.get("SINKCHAT_DATA_DIR") or platformdirs.user_data_dir(APP))
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def config_file() -> Path:
    return config_dir() / "config.toml"


def load_config() -> dict:
    """The user's saved defaults; a broken file is an error that names it."""
    path = config_file()
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as exc:
        raise SinkchatError(f"cannot read config file {path}: {exc}") from None


def save_config_value(key: str, value: str | int | float | bool) -> None:
    """Remember one setting (the TUI's theme choice) without disturbing the others."""
    values = {**load_config(), key: value}
    path = config_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{k} = {_toml(v)}" for k, v in values.items() if isinstance(v, (str, int, float, bool))]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
