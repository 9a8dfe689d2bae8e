"""The user's own ``bench memory`` tasks: a JSONL file, one object a line (no torch, so a bad file is
refused before the model loads).

``{"context": "...", "question": "...", "answer": "..."}``, optionally ``"candidates": [...]`` (the
answer is scored by log-likelihood among them, and must be one of them) and ``"chat": true`` (context
and question are sent as chat turns). Blank lines are skipped. Anything else is one
:class:`SinkchatError` naming the file and the line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import SinkchatError
from ..files import reason

KEYS = {"context", "question", "answer", "candidates", "chat"}


@dataclass(frozen=True)
class UserTask:
    """One line of a task file: ``source`` is ``FILE:LINE``."""

    source: str
    context: str
    question: str
    answer: str
    candidates: tuple[str, ...] | None = None
    chat: bool = False


def read_tasks(path: str) -> list[UserTask]:
    """Every task of the JSONL file at ``path``; raises :class:`SinkchatError` for a file that is not
    there, not a regular file, not UTF-8 text, empty, or for the first bad line (``FILE:LINE: why``)."""
    p = Path(path)
    if p.exists() and not p.is_file():
        raise SinkchatError(f"--tasks {path}: not a regular file")
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise SinkchatError(f"--tasks {path}: no such file") from None
    except OSError as exc:
        raise SinkchatError(f"--tasks {path}: cannot read it ({reason(exc)})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SinkchatError(f"--tasks {path}: not UTF-8 text (a binary file?)") from None
    if "\x00" in text:
        raise SinkchatError(f"--tasks {path}: not UTF-8 text (a binary file?)")
    # Lines end at "\n" alone (JSONL): str.splitlines() would also cut at U+2028, U+0085 or a form feed,
    # which JSON keeps as they are inside a string.
    lines = text.split("\n")
    tasks = [_task(f"{path}:{n}", line) for n, line in enumerate(lines, 1) if line.strip()]
    if not tasks:
        raise SinkchatError(f"--tasks {path}: no tasks (one JSON object a line: context, question, answer)")
    return tasks


def _task(where: str, line: str) -> UserTask:
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise SinkchatError(f"{where}: not JSON ({str(exc).split(':')[0]})") from None
    if not isinstance(obj, dict):
        raise SinkchatError(f"{where}: not a JSON object with context, question and answer")
    missing = [k for k in ("context", "question", "answer") if k not in obj]
    if missing:
        raise SinkchatError(f"{where}: missing {', '.join(missing)}")
    unknown = sorted(set(obj) - KEYS)
    if unknown:
        raise SinkchatError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(KEYS))})")
    for key in ("context", "question", "answer"):
        if not isinstance(obj[key], str):
            raise SinkchatError(f"{where}: {key} must be a string (got {type(obj[key]).__name__})")
    listed = obj.get("candidates") if isinstance(obj.get("candidates"), list) else []
    for key, value in [(k, obj[k]) for k in ("context", "question", "answer")] + [("candidates", c) for c in listed]:
        if isinstance(value, str) and not _is_text(value):
            raise SinkchatError(f"{where}: {key} holds a lone surrogate (\\ud800-\\udfff), not text")
    if not obj["context"].strip():  # nothing to remember (and, without a BOS, nothing to read before the question)
        raise SinkchatError(f"{where}: context is empty")
    if not obj["answer"].strip():
        raise SinkchatError(f"{where}: answer is empty")
    if not obj["question"].strip():
        raise SinkchatError(f"{where}: question is empty")
    candidates = obj.get("candidates")
    if candidates is not None:
        if not isinstance(candidates, list) or not all(isinstance(c, str) and c.strip() for c in candidates):
            raise SinkchatError(f"{where}: candidates must be a list of non-empty strings")
        if obj["answer"] not in candidates:
            raise SinkchatError(f"{where}: the answer is not among the candidates")
        if len(set(candidates)) < 2:
            raise SinkchatError(f"{where}: candidates need at least two different answers")
        candidates = tuple(dict.fromkeys(candidates))
    chat = obj.get("chat", False)
    if not isinstance(chat, bool):
        raise SinkchatError(f"{where}: chat must be true or false (got {json.dumps(chat)})")
    return UserTask(where, obj["context"], obj["question"], obj["answer"], candidates, chat)


def _is_text(value: str) -> bool:
    """False for a string holding a lone surrogate (JSON's ``"\\ud800"``), which no tokenizer can encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
