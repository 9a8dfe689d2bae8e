"""Messages that cross from a background thread to the app."""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message


@dataclass
class SaveFailed(Message):
    """A save on the store thread failed; ``text`` says why (the chat goes on in memory)."""

    text: str
