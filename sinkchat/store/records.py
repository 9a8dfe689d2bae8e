"""What the store reads and writes: a chat's snapshot (with its checksum), list rows, transcripts, errors."""

from __future__ import annotations

import hashlib
import json
from array import array
from dataclasses import dataclass, field

from ..errors import SinkchatError
from ..ledger import ChatState, Message, merge_spans

FORMAT = 1  # state-file format


class SaveError(SinkchatError):
    """A save failed (read-only dir, full disk...): shown to the user; the chat goes on in memory.
    ``chat_id``: the chat a first save made before it failed (its K/V was not written), else None."""

    def __init__(self, message: str, chat_id: int | None = None):
        super().__init__(message)
        self.chat_id = chat_id


@dataclass(frozen=True)
class Unanswered:
    """A message sent to the model whose turn was never saved (sinkchat was killed mid-reply): what the
    message box held (a slash command as typed), the index of the message it replaced (an edit), and
    whether it was marked to be sent pinned (Ctrl+L)."""

    typed: str
    replace: int | None = None
    pin: bool = False


class ChatLocked(SinkchatError):
    """Another process has this chat open for writing."""


class Refused(SinkchatError):
    """The data dir holds what sinkchat will not use: another program's database, one from a newer
    sinkchat, or a symbolic link where its own file or folder belongs. Nothing there is written;
    a new chat is not started unsaved in its place (the user named the wrong place)."""


class NoChats(SinkchatError):
    """A command that only reads found no data dir or no ``chats.db`` (it creates neither)."""


class ReadOnly(SinkchatError):
    """The chat's lock cannot be taken because the disk or directory is read-only: it can be read, not saved."""


@dataclass
class Snapshot(ChatState):
    """Everything one save records about a chat apart from the KV tensors: the engine's
    :class:`ChatState`, the settings the chat was made with, and the save generation."""

    settings: dict = field(default_factory=dict)
    gen: int = 0
    # what the checksum hashes, kept so the next save's snapshot reuses the part it shares (see follow)
    _rows: list[str] | None = field(default=None, init=False, repr=False, compare=False)
    _ledger: array | None = field(default=None, init=False, repr=False, compare=False)
    _sum: str | None = field(default=None, init=False, repr=False, compare=False)

    def checksum(self) -> str:
        """sha256 over everything a reader trusts; both the database and the state file carry it:
        the JSON of ``[settings, fingerprint, meta, message rows, gen]`` (keys sorted), then the
        ledger as int64. Computed once; after :meth:`follow` it costs what changed since the save
        followed, not the length of the chat."""
        if self._sum is None:
            if self._rows is None:
                self._rows = [json.dumps(m.row()) for m in self.messages]
            if self._ledger is None:
                self._ledger = array("q", self.tokens)
            parts = [json.dumps(x, sort_keys=True) for x in (self.settings, self.fingerprint, self.meta)]
            head = "[" + ", ".join(parts + ["[" + ", ".join(self._rows) + "]", json.dumps(self.gen)]) + "]"
            digest = hashlib.sha256(head.encode())
            digest.update(self._ledger.tobytes())
            self._sum = digest.hexdigest()
        return self._sum

    def follow(self, old: "Snapshot", keep: int) -> None:
        """Reuse what :meth:`checksum` hashed of ``old`` (the save before this one): the rows of the
        ``keep`` leading messages both share, and the ledger if this one extends it."""
        if old._rows is not None:
            self._rows = old._rows[:keep] + [json.dumps(m.row()) for m in self.messages[keep:]]
        n = len(old.tokens)
        if old._ledger is not None and len(self.tokens) >= n and self.tokens[:n] == old.tokens:
            self._ledger = old._ledger + array("q", self.tokens[n:])

    def header(self, keep: int = 0) -> dict:
        """The state file's header; a segment's holds the messages from ``keep`` on (the files
        before it hold the others)."""
        return {
            "format": FORMAT,
            "settings": self.settings,
            "fingerprint": self.fingerprint,
            "meta": self.meta,
            "messages": [m.row() for m in self.messages[keep:]],
            "gen": self.gen,
        }

    @classmethod
    def of(cls, state: ChatState, settings: dict, gen: int) -> "Snapshot":
        return cls(state.tokens, state.messages, state.meta, state.fingerprint, settings, gen, cuts=state.cuts)


@dataclass(frozen=True)
class ChatInfo:
    """One row of the chat list."""

    id: int
    title: str
    created: float
    updated: float
    model: str
    n_tokens: int
    n_messages: int


@dataclass
class Transcript:
    """A saved chat as text and spans, for ``chats show`` and ``chats export`` (no model needed)."""

    id: int
    title: str
    created: float
    updated: float
    settings: dict
    meta: dict
    messages: list[Message]
    tokens: list[int]
    notices: list[str] = field(default_factory=list)

    @property
    def evicted(self) -> list[tuple[int, int]]:
        return merge_spans(sorted(tuple(s) for s in self.meta.get("evictions", [])))
