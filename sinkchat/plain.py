"""``sinkchat --plain``: a line-oriented chat on stdin/stdout over the same engine.

One line in is one user message. In a pipe it prints only each reply and one ``[cache] ...``
status line after it, so scripts can tell them apart; on a terminal it adds a prompt. Slash
commands (:mod:`.commands`: ``/pin N``, ``/retry``, ``/edit TEXT``, ...) print one line
``[sinkchat] ...`` on stdout; a refused one prints ``sinkchat: ...`` on stderr.

Signals never cut a model step: while a reply streams, Ctrl+C (SIGINT) only asks the engine to
stop after the token in flight (the partial reply is kept, marked stopped, and saved), and
SIGTERM or a closed terminal (SIGHUP) do the same and then end the session, which saves (in a
pipe, Ctrl+C ends it too). While waiting for input, Ctrl+C, SIGTERM and SIGHUP end the session at
once. Input that is not valid UTF-8 is replaced with U+FFFD (said once); control characters in
replies are shown as symbols.

Every call that touches the model (a turn, a command that takes a turn back, a save's copy of the
K/V) runs on the :class:`~sinkchat.decoder.Decoder` thread, as in the TUI; this thread reads
input, prints and takes the signals.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
from collections.abc import Callable
from contextlib import suppress
from typing import TextIO

from . import commands
from .decoder import Decoder
from .engine import Chat, Done, Notice, TokenText
from .errors import WriteFailed
from .files import reason
from .ledger import name, note_label, partial_of, streaming_through
from .text import clean, valid

ENDING = (signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM))


class _End(Exception):
    """A signal ended the session while it waited for input."""


class Session:
    """Signal handling for one plain-mode session (installed only on the main thread)."""

    def __init__(self, chat: Chat, interactive: bool):
        self.chat, self.interactive = chat, interactive
        self.ended_by: int | None = None  # the signal that ends the session after this turn
        self.waiting = False  # blocked on input: a signal may interrupt the read
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "Session":
        if threading.current_thread() is threading.main_thread():
            for sig in {signal.SIGINT, *ENDING}:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        if signum != signal.SIGINT or not self.interactive:  # in a pipe, Ctrl+C ends the session too
            self.ended_by = signum
        if not self.waiting:  # a turn or a save is running: let it finish, keep what it made
            self.chat.stop()
            return
        raise KeyboardInterrupt if signum == signal.SIGINT else _End()


def run(
    chat: Chat,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    after_turn: Callable[[Chat], None] = lambda chat: None,
    notify: Callable[[str], None] = lambda message: print(f"sinkchat: {message}", file=sys.stderr),
    decoder: Decoder | None = None,
    on_send: Callable[[str], None] = lambda text: None,
) -> int | None:
    """Chat until end of input; ``after_turn`` runs after every reply (the store saves there), on the
    decode thread like every model call (``decoder``: the one the model was loaded on; else one is
    started for this session); ``on_send(text)`` before each message goes to the model.

    Returns the signal that ended the session (SIGTERM, SIGHUP), or None.
    """
    if decoder is None:
        decoder = Decoder()
        try:
            return run(chat, stdin, stdout, after_turn, notify, decoder, on_send)
        finally:
            decoder.close()
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    interactive = stdin.isatty()
    if interactive and stdin is sys.stdin:
        with suppress(ImportError):  # line editing and history at the prompt (input() uses it once imported)
            import readline  # noqa: F401
    out = _Output(stdout, chat)
    replaced = False

    def tell_notices() -> None:  # e.g. that the first reply compiles the decode step, or that it fell back
        for notice in chat.loaded.take_notices():
            notify(notice)

    tell_notices()
    if interactive:
        notify("/help lists the commands; Ctrl+D or /quit leaves")
    with Session(chat, interactive) as session:
        while session.ended_by is None and not out.closed:
            line = _read(stdin, interactive, session, out)
            if line is None:
                break
            line, bad = valid(line)
            if bad and not replaced:
                replaced = True
                notify("input that is not valid UTF-8 was replaced with \ufffd")
            text = line.rstrip("\r\n")
            if not text.strip():
                continue
            todo = decoder.call(commands.run_line, chat, text, out.write, notify, after_turn)
            if todo.quit:
                break
            if todo.send is not None and todo.send.strip():  # None: a command that sends nothing
                on_send(text)  # as typed (a slash command too)
                _reply(chat, todo.send, out, interactive, notify, todo.pin, decoder)
                tell_notices()
                decoder.call(after_turn, chat)
    if out.failed:
        raise WriteFailed(f"cannot write the reply to standard output: {out.failed}")
    return session.ended_by


def _read(stdin: TextIO, interactive: bool, session: Session, out: "_Output") -> str | None:
    """The next line, or None at end of input, Ctrl+C at the prompt, a closed terminal or a signal."""
    session.waiting = True
    try:
        if interactive:
            return input("you> ")
        return stdin.readline() or None
    except (EOFError, KeyboardInterrupt):
        if interactive:
            out.write("\n")
        return None
    except (_End, OSError):
        return None
    finally:
        session.waiting = False


class _Output:
    """stdout that never fails the chat: chat text goes out clean; a closed terminal or pipe stops
    the reply and ends the session (the chat is still saved)."""

    def __init__(self, stream: TextIO, chat: Chat):
        self.stream, self.chat, self.closed = stream, chat, False
        self.failed: str | None = None  # why writing failed, if not because the reader left

    def write(self, text: str) -> None:
        if self.closed:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError) as exc:  # EIO after a hang-up, EPIPE, a closed file, a full disk
            self.closed = True
            if isinstance(exc, OSError) and exc.errno not in (errno.EPIPE, errno.EIO):
                self.failed = reason(exc)
            self.chat.stop()
            with suppress(OSError, ValueError, AttributeError):  # what is still buffered goes nowhere, quietly
                os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())


def _reply(chat: Chat, text: str, out: _Output, interactive: bool, notify: Callable[[str], None],
           pin: bool, decoder: Decoder) -> None:
    events = decoder.iterate(chat.submit(text, pin), chat.stop)  # a Ctrl+C from here on stops this turn
    said: list[Notice] = []  # told after the reply, so no line breaks into it
    if interactive:
        out.write("bot> ")
    while True:
        try:
            event = next(events)
        except StopIteration:
            break
        except KeyboardInterrupt:  # only off the main thread (no handler): the engine keeps the reply
            events.close()  # stops the turn and waits for it
            break
        if isinstance(event, TokenText):
            out.write(clean(event.text))
        elif isinstance(event, Notice):
            said.append(event)
        elif isinstance(event, Done):
            out.write("\n")
            if interactive and event.reason == "stopped":
                out.write("[stopped]\n")
                for i in range(max(0, len(chat.messages) - 3), len(chat.messages)):  # a paste read in part
                    m = chat.messages[i]
                    if partial_of(m.note) is not None:
                        out.write(f"[{name(chat.messages, i)} {note_label(m.note, m.end - m.start)}]\n")
    occupancy = chat.occupancy()
    out.write(f"[cache] {occupancy.text()}\n")
    if chat.settings.evict == "turns" and (note := streaming_through(occupancy, chat.messages)):
        out.write(f"[cache] {note}\n")
    for notice in said:  # a message sent pinned: said as a command's answer, or refused as one
        if notice.refused:
            notify(clean(notice.text, one_line=True))
        else:
            out.write(f"[sinkchat] {clean(notice.text, one_line=True)}\n")
