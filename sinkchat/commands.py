"""Slash commands: what the user steers of the model's memory, in ``--plain`` (run here) and in the
TUI's message box (which maps them onto its own actions); both read a line with :func:`parse` and
:func:`check`.

``/pin N``, ``/unpin N`` (``N`` as the transcript numbers messages, ``#N`` works too), ``/pins``,
``/keep TEXT`` (send a message pinned), ``/retry`` (regenerate the last reply), ``/edit TEXT``
(replace the last message and send it again), ``/help``, and ``/quit`` or ``/exit``. A line is a
command only when it is a slash and a word, alone or followed by a space; anything else
(``/usr/bin is...``, ``/3``) is a message. A message that must begin with a command-like word
starts with ``//``: one slash is dropped and the rest is sent as it is. An unknown ``/word`` is
refused in one line, so a typo is never sent to the model.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from .errors import SinkchatError
from .ledger import name
from .text import clean

HELP = ("commands: /pin N, /unpin N, /pins, /keep TEXT (send it pinned), /retry, /edit TEXT, /help; "
        "/quit, /exit or Ctrl+D to leave (start a message with // to send a line that begins with /)")
_COMMAND = re.compile(r"/([A-Za-z]+)(?:\s+(.*))?", re.S)


@dataclass(frozen=True)
class Command:
    name: str
    arg: str


@dataclass(frozen=True)
class Outcome:
    """What a line does: a line for the user, text to send as the turn (a message, ``/keep``,
    ``/retry``, ``/edit``) and whether to send it pinned, whether that line is a refusal, whether
    the chat changed (it is saved then), and whether the session ends (``/quit``)."""

    message: str | None = None
    send: str | None = None
    refused: bool = False
    changed: bool = False
    pin: bool = False
    quit: bool = False


def parse(line: str) -> Command | str:
    """A :class:`Command`, or the message text to send (``//`` drops one slash)."""
    if line.startswith("//"):
        return line[1:]
    match = _COMMAND.fullmatch(line)
    if match is None:
        return line
    return Command(match.group(1).lower(), (match.group(2) or "").strip())


VERBS = ("pin", "unpin", "pins", "keep", "retry", "edit", "help", "quit", "exit")
_BARE = ("pins", "retry", "help", "quit", "exit")  # take nothing after them


def check(command: Command, help: str = HELP) -> Command:
    """``command`` if it is known and its argument fits; :class:`SinkchatError` (one line) otherwise.
    ``help``: what an unknown command's refusal lists."""
    verb, arg = command.name, command.arg
    if verb not in VERBS:
        raise SinkchatError(f"unknown command /{verb}; {help}")
    if arg and verb in _BARE:
        raise SinkchatError(f"/{verb} takes nothing after it (got {arg!r})")
    if verb in ("pin", "unpin"):
        message_number(arg, f"/{verb}")
    if verb == "keep" and not arg:
        raise SinkchatError("/keep needs the message to send pinned: /keep TEXT")
    if verb == "edit" and not arg:
        raise SinkchatError("/edit needs the new text: /edit TEXT")
    return command


def run_line(chat, line: str, write: Callable[[str], None], notify: Callable[[str], None],
             saved: Callable = lambda chat: None) -> Outcome:
    """A line of ``--plain`` input: a command is run, its line written (``[sinkchat] ...``, or a
    refusal through ``notify``) and ``saved(chat)`` called if the chat changed. Returns what to do
    next (the text to send, if any; whether the session ends)."""
    parsed = parse(line)
    if not isinstance(parsed, Command):
        return Outcome(send=parsed)
    outcome = execute(chat, parsed)
    if outcome.refused:
        notify(clean(outcome.message, one_line=True))
    elif outcome.message:
        write(f"[sinkchat] {clean(outcome.message, one_line=True)}\n")
    if outcome.changed and outcome.send is None:
        saved(chat)
    return outcome


def execute(chat, command: Command) -> Outcome:
    """Run ``command`` on ``chat``; refusals come back as one line, never as an exception."""
    try:
        return _execute(chat, command)
    except SinkchatError as exc:
        return Outcome(str(exc), refused=True)


def _execute(chat, command: Command) -> Outcome:
    verb, arg = check(command).name, command.arg
    if verb in ("pin", "unpin"):
        index = message_number(arg, f"/{verb}") - 1
        return Outcome(chat.pin(index) if verb == "pin" else chat.unpin(index), changed=True)
    if verb == "pins":
        return Outcome(pins_line(chat))
    if verb == "keep":
        chat.check_pin(arg)
        return Outcome(send=arg, pin=True)
    if verb == "retry":
        text = chat.messages[chat.last_user()].content
        return Outcome(chat.rollback(), send=text, changed=True)
    if verb == "edit":
        chat.last_user()
        return Outcome(chat.rollback(), send=arg, changed=True)
    if verb == "help":
        return Outcome(HELP)
    return Outcome(quit=True)  # /quit, /exit


def message_number(text: str, what: str) -> int:
    """``3`` or ``#3`` as a positive number; :class:`SinkchatError` otherwise."""
    digits = text.removeprefix("#")
    if not (digits.isascii() and digits.isdigit() and int(digits) > 0):
        raise SinkchatError(f"{what} takes a message number as the transcript shows it, e.g. {what} 3 (got {text!r})")
    return int(digits)


def pins_line(chat) -> str:
    """``pinned: #1 system (15 tokens), #5 you (12 tokens); 27 of 500 tokens`` in one line."""
    pinned = chat.pinned_messages()
    cache = chat.cache
    if not pinned:
        return f"nothing is pinned (room for {cache.pin_max} tokens; /pin N pins message #N)"
    parts = [f"{name(chat.messages, i)} ({chat.messages[i].end - max(chat.messages[i].start, cache.sinks)} tokens)"
             for i in pinned]
    return f"pinned: {', '.join(parts)}; {cache.pinned_count()} of {cache.pin_max} tokens"
