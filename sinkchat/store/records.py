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
    """A save failed (read-only dir, full disk...): shown to the user; the chat goes on in memory."""


class ChatLocked(SinkchatError):
    """Another process has this chat open for writing."""


class ReadOnly(SinkchatError):
    """The chat's lock cannot be taken because the disk or directory is read-only: it can be read, not saved."""


@dataclass
class Snapshot(ChatState):
    """Everything one save records about a chat apart from the KV tensors: the engine's
    :class:`ChatState`, the settings the chat was made with, and the save generation."""

    settings: dict = field(default_factory=dict)
    gen: int = 0

    def checksum(self) -> str:
        """sha256 over everything a reader trusts; both the database and the state file carry it."""
        head = json.dumps(
            [self.settings, self.fingerprint, self.meta, [m.row() for m in self.messages], self.gen], sort_keys=True
        )
        digest = hashlib.sha256(head.encode())
        digest.update(array("q", self.tokens).tobytes())
        return digest.hexdigest()

    def header(self) -> dict:
        return {
            "format": FORMAT,
            "settings": self.settings,
            "fingerprint": self.fingerprint,
            "meta": self.meta,
            "messages": [m.row() for m in self.messages],
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
