"""Where sinkchat keeps things (XDG dirs) and the user's ``config.toml`` of default settings.

``config.toml`` holds flat keys named like the settings (``window = 4000``, ``model = "mistral-7b"``);
:meth:`sinkchat.settings.Settings.resolve` checks them. Writing one value back (the TUI remembers
the theme) goes through tomlkit, so the user's comments and layout survive.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import platformdirs

from .errors import SinkchatError
from .files import private_dir, reason, write_atomic

APP = "sinkchat"


def config_dir() -> Path:
    return Path(os.environ.get("SINKCHAT_CONFIG_DIR") or platformdirs.user_config_dir(APP))


def data_dir(override: str | Path | None = None) -> Path:
    """Where chats live: ``--data-dir``, else ``SINKCHAT_DATA_DIR``, else the XDG data dir.

    Raises :class:`SinkchatError` when it names something that is not a directory (a setting of
    the wrong kind, refused like one) or that sinkchat may not look into; a missing one is
    created by the store."""
    source = "--data-dir" if override else "SINKCHAT_DATA_DIR" if os.environ.get("SINKCHAT_DATA_DIR") else None
    path = Path(override or os.environ.get("SINKCHAT_DATA_DIR") or platformdirs.user_data_dir(APP)).expanduser()
    named = f"the data directory {path}{f' (from {source})' if source else ''}"
    try:
        if path.exists() and not path.is_dir():
            raise SinkchatError(f"{named} is not a directory")
    except OSError as exc:  # a parent sinkchat may not search: say which directory, not "the output"
        raise SinkchatError(f"cannot use {named}: {reason(exc)}") from None
    return path


def program() -> list[str]:
    """How a shell starts this very sinkchat: ``sinkchat`` when that name on ``PATH`` is this
    program, else its path (the ``.venv/bin/sinkchat`` of a venv that is not activated), else this
    Python with ``-m sinkchat``; so a command printed for the user works as typed."""
    import shutil
    import sys

    argv0 = Path(sys.argv[0])
    if argv0.name == "sinkchat":
        found = shutil.which("sinkchat")
        if found and Path(found).resolve() == argv0.resolve():
            return ["sinkchat"]
        return [os.path.abspath(argv0)]
    return [sys.executable, "-m", "sinkchat"]


def resume_command(root: Path, chat_id: int, plain: bool = False) -> str:
    """``sinkchat --resume 3`` (the program as :func:`program` names it), with ``--data-dir`` when
    chat ``chat_id`` lives in ``root`` rather than where a plain ``sinkchat`` looks (so the line
    reopens the same chat when pasted back)."""
    import shlex

    words = program() + (["--plain"] if plain else []) + ["--resume", str(chat_id)]
    if root.resolve() != data_dir().resolve():
        words += ["--data-dir", str(root.resolve())]
    return shlex.join(words)


def cache_dir() -> Path:
    """Where converted models live: ``SINKCHAT_CACHE_DIR`` or the XDG cache dir."""
    return Path(os.environ.get("SINKCHAT_CACHE_DIR") or platformdirs.user_cache_dir(APP))


def config_file() -> Path:
    return config_dir() / "config.toml"


def load_config() -> dict:
    """The user's saved defaults (unchecked: the settings layer checks them); a broken file names itself."""
    path = config_file()
    try:
        if not path.exists():
            return {}
        if not path.is_file():
            raise SinkchatError(f"config file {path} is not a regular file")
        return tomllib.loads(path.read_text(encoding="utf-8-sig"))  # a BOM, as Windows editors write, is not TOML
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as exc:
        raise SinkchatError(f"cannot read config file {path}: {reason(exc)}") from None


def toml_text(value) -> str:
    """``value`` as it would be written in a TOML file (``true``, ``"64"``, ``[1, 2]``, ``{x = 1}``,
    ``1979-05-27``), for messages about what a file holds: a Python repr (``True``) is not what the user wrote."""
    import datetime
    import json
    import math

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a TOML basic string: quotes, escapes for controls
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else "inf" if value > 0 else "-inf"
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, dict):
        parts = (f"{k if k.replace('_', '').replace('-', '').isalnum() and k.isascii() else toml_text(k)} = "
                 f"{toml_text(v)}" for k, v in value.items())
        return "{" + ", ".join(parts) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_text(v) for v in value) + "]"
    return repr(value)  # int, float: the same in TOML


def save_config_value(key: str, value: str | int | float | bool) -> None:
    """Remember one setting without disturbing the others or the file's comments (atomic replace);
    ``SinkchatError`` naming the file if it cannot be read or written."""
    import tomlkit

    path = config_file()
    try:
        text = path.read_text(encoding="utf-8-sig") if path.is_file() else ""
        doc = tomlkit.parse(text)
        doc[key] = value
        private_dir(path.parent)
        write_atomic(path, tomlkit.dumps(doc).encode("utf-8"))
    except (OSError, UnicodeDecodeError, tomlkit.exceptions.TOMLKitError) as exc:
        raise SinkchatError(f"cannot write config file {path}: {reason(exc)}") from None
