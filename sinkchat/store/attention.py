"""The last ``sinkchat bench attention`` result per model, kept in the data dir so the chat's help
(F1) can say how much attention the loaded model puts on its sinks. No torch here: the TUI reads it.

One JSON file per model: ``<data dir>/attention/<model>.json``, where ``<model>`` is the ``--model``
value (an alias, a Hugging Face id, or the absolute path of a folder or file) made safe for a file
name, with a short hash of the original when that changed it. Written atomically (0600).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from .. import config
from ..files import private_dir, write_atomic


def model_key(model: str) -> str:
    """The model as one stable string: an existing folder or file by its absolute path, anything else as given."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def result_path(model: str, data_dir: str | Path | None = None) -> Path:
    """Where the last attention result of ``model`` lives under ``data_dir`` (default: the chats' data dir)."""
    key = model_key(model)
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._")[:80]
    if safe != key:
        safe = f"{safe}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    return config.data_dir(data_dir) / "attention" / f"{safe}.json"


def save_attention(report: dict, model: str, data_dir: str | Path | None = None) -> Path:
    """Keep ``report`` (the ``bench attention --json`` document) as ``model``'s last result. Raises ``OSError``."""
    path = result_path(model, data_dir)
    private_dir(path.parent.parent)
    private_dir(path.parent, links=False)
    write_atomic(path, json.dumps({**report, "model_key": model_key(model)}, indent=1).encode())
    return path


def load_attention(model: str, data_dir: str | Path | None = None) -> dict | None:
    """``model``'s last attention result, or None when there is none or it cannot be read as one."""
    try:
        doc = json.loads(result_path(model, data_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    keys = {"share", "uniform", "firsts", "layers", "sink_layers", "tokens"}
    return doc if isinstance(doc, dict) and keys <= doc.keys() else None
