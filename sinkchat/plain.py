"""``sinkchat --plain``: a line-oriented chat on stdin/stdout over the same engine.

One line in is one user message. In a pipe it prints only each reply and one ``[cache] ...``
status line after it, so scripts can tell them apart; on a terminal it adds a prompt, and
Ctrl+C stops a reply in progress (the partial reply is kept) or, at the prompt, quits.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

from .engine import Chat, Done, TokenText


def run(
    chat: Chat,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    after_turn: Callable[[Chat], None] = lambda chat: None,
) -> None:
    """Chat until end of input; ``after_turn`` runs after every reply (the store saves there)."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    interactive = stdin.isatty()
    while True:
        if interactive:
            try:
                line = input("you> ")
            except (EOFError, KeyboardInterrupt):
                stdout.write("\n")
                return
        else:
            line = stdin.readline()
            if not line:
                return
        text = line.rstrip("\r\n")
        if not text.strip():
            continue
        _reply(chat, text, stdout, interactive)
        after_turn(chat)


def _reply(chat: Chat, text: str, stdout: TextIO, interactive: bool) -> None:
    if interactive:
        stdout.write("bot> ")
    events = chat.submit(text)
    while True:
        try:
            event = next(events)
        except StopIteration:
            break
        except KeyboardInterrupt:  # first Ctrl+C: stop after the token in flight, keep the reply
            chat.stop()
            continue
        if isinstance(event, TokenText):
            stdout.write(event.text)
            stdout.flush()
        elif isinstance(event, Done):
            stdout.write("\n")
            if interactive and event.reason == "stopped":
                stdout.write("[stopped]\n")
    stdout.write(f"[cache] {chat.occupancy().text()}\n")
    stdout.flush()
    for notice in chat.loaded.take_notices():
        print(f"sinkchat: {notice}", file=sys.stderr)
