"""The chat screen: header, transcript, cache gauge, message box; loading the model and generating.

Both long jobs run on the app's :class:`~sinkchat.decoder.Decoder`, the one thread that owns the
model (torch itself is imported there, so the screen is up before it has loaded): the model load
posts :class:`ChatScreen.ModelLoaded`, and a turn's pump batches the engine's events and posts
them at most ``STREAM_INTERVAL`` apart as plain values, so the UI never slows decoding (see the
README for the measurement) and never touches a tensor. The screen never touches the disk: it
posts :class:`ChatScreen.TurnEnded` after every reply (and after a pin) and
:class:`ChatScreen.NewChat` on Ctrl+N, and the app saves or switches chats.
Pinning, regenerating and editing are in :mod:`.steer_keys`.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Future
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING

from textual import events, on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.css.query import NoMatches
from textual.message import Message
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import Label, LoadingIndicator

from .. import commands
from ..errors import SinkchatError
from ..ledger import Occupancy, covered_by, spans
from ..model import LoadedModel, load_for
from ..settings import Settings
from ..store.records import Unanswered
from ..text import clean
from .chat_input import ChatInput
from .footer import Footer
from .gauge import CacheGauge
from .header import ChatHeader
from .notices import Say
from .steer_keys import SteerKeys
from .transcript import Entry, MessageView, Transcript

if TYPE_CHECKING:  # the engine (and torch) load in the worker, after the screen is up
    from collections.abc import Iterator

    from ..engine import Chat, Done, Event


def one_line(exc: BaseException) -> str:
    """A readable one-line message for any exception (never a traceback)."""
    if isinstance(exc, SinkchatError):
        return clean(str(exc), one_line=True)
    first = clean((str(exc).strip().splitlines() or [""])[0])
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


@dataclass
class Streamed(Message):
    """A batch of reply text and the latest cache numbers from the generation worker."""

    bubble = False
    chat: Chat
    text: str
    occupancy: Occupancy | None
    tokens_per_s: float | None


@dataclass
class Finished(Message):
    bubble = False
    chat: Chat
    done: Done | None
    error: str | None = None


@dataclass
class Told(Message):
    """A line for the user from the decode thread (a rollback's or a pin's notice)."""

    bubble = False
    text: str
    severity: str = "information"


@dataclass
class Loading(Message):
    """What the model load is doing now (shown under the loading indicator)."""

    bubble = False
    text: str


class ChatScreen(Say, SteerKeys, Screen):
    BINDINGS = [
        Binding("escape", "stop", "Stop"),
        Binding("ctrl+n", "new_chat", "New chat"),
        # Out of the footer, so the essential keys fit in 80 columns; F1 and the palette list them.
        Binding("ctrl+g", "toggle_details", "Gauge details", show=False),
        Binding("ctrl+r", "copy_reply", "Copy reply", show=False),
        # Priority: they work while the message box has the focus (which owns these keys otherwise).
        Binding("pageup", "scroll('page_up')", "Scroll the transcript up", show=False, priority=True),
        Binding("pagedown", "scroll('page_down')", "Scroll the transcript down", show=False, priority=True),
        Binding("ctrl+home", "scroll('home')", "Transcript: first message", show=False, priority=True),
        Binding("ctrl+end", "scroll('end')", "Transcript: newest text (and follow it)", show=False,
                priority=True),
        *SteerKeys.STEER_BINDINGS,
    ]
    STREAM_INTERVAL = 0.3  # seconds between batches the worker posts: about 3 screen updates a second

    generating: reactive[bool] = reactive(False, bindings=True)
    chat: reactive[Chat | None] = reactive(None, bindings=True, init=False)

    @dataclass
    class ModelLoaded(Message):
        loaded: LoadedModel

    @dataclass
    class TurnEnded(Message):
        """A reply finished (or was stopped): the chat has something new to save."""

        chat: Chat

    @dataclass
    class Sent(Message):
        """A message the user typed went to the model: kept on disk until its turn is saved (None: the
        message given back was taken out of the box unsent: forgotten)."""

        draft: Unanswered | None

    class NewChat(Message):
        """The user asked for a new chat (Ctrl+N)."""

    def __init__(self, settings: Settings, loaded: LoadedModel | None = None):
        super().__init__()
        self.settings, self.loaded = settings, loaded
        self.reply_view: MessageView | None = None
        self.last_reply = ""
        self.queued: tuple[str, Unanswered] | None = None  # a message sent before the chat was ready (its
        # text, and as typed with its pin); sent once it is
        self.unanswered: Unanswered | None = None  # a message a killed sinkchat sent, given back in the box
        self._box_holds_text = False
        self._confirmed = ""  # a message over the window the user was warned about (Enter again sends)
        self._turn: Future | None = None  # the running turn's job on the decode thread
        self.editing: int | None = None  # the index of the user message the box is replacing (F2)
        self.turn_from = 0  # the first message the turn being generated may change
        self.pin_next = False  # the message in the box is sent pinned (Ctrl+L with no message selected)
        self.typed: tuple[str, bool] = ("", False)  # typed before the screen started, and whether Enter was

    def compose(self) -> ComposeResult:
        yield ChatHeader()
        with Transcript():
            with Vertical(id="loading"):
                yield LoadingIndicator()
                yield Label("loading the model…", classes="status", markup=False)
        yield CacheGauge(Occupancy(0, 0, self.settings.window, self.settings.sinks_for(), 0, 0),
                         turns=self.settings.evict == "turns")
        yield ChatInput()
        yield Footer()

    def on_mount(self) -> None:
        box = self.query_one(ChatInput)
        box.focus()  # typing starts at once; a message sent early is queued
        text, sent = self.typed
        if text:  # typed while sinkchat started: in the box, as if typed there
            box.insert(text)
            if sent:
                box.action_send()
        if self.loaded is not None:
            self.post_message(self.ModelLoaded(self.loaded))
        else:
            self.load_model()

    def on_key(self, event: events.Key) -> None:
        """A character that reached the screen, not the box (it arrived before the box had the
        focus, or with the transcript focused; the box stops every one it inserts), goes into the
        box, which takes the focus."""
        if event.is_printable and event.character:
            event.stop()
            box = self.query_one(ChatInput)
            box.focus()
            box.insert(event.character)

    def on_screen_resume(self) -> None:
        self.query_one(ChatInput).focus()  # back from help, the chat list or a dialog: type on

    def on_resize(self, event: events.Resize) -> None:
        self.query_one(CacheGauge).refresh(layout=True)  # its details take at most half the height

    # -- the model ------------------------------------------------------------------------------

    def load_model(self) -> None:
        """Load the model on the decode thread (``--compile`` means there what it means in plain mode)."""
        job = self.app.decoder.submit(load_for, self.settings, progress=lambda m: self.post_message(Loading(m)))
        self.run_worker(self._loaded(job), group="load")

    async def _loaded(self, job: Future) -> None:
        try:
            loaded = await asyncio.wrap_future(job)
        except BaseException as exc:  # shown on screen, never a traceback
            await self.load_failed(one_line(exc))
            return
        self.post_message(self.ModelLoaded(loaded))

    @on(Loading)
    def _loading(self, msg: Loading) -> None:
        with suppress(NoMatches):  # the chat may already be on screen
            self.loading_status(msg.text)

    def loading_status(self, message: str) -> None:
        self.query_one("#loading .status", Label).update(clean(message))

    async def load_failed(self, message: str, what: str = "load the model") -> None:
        """Say on screen why there can be no chat (the model, or a chat the settings do not fit)."""
        self.app.load_error = message
        self.loading_status(f"Could not {what}: {message}\n\nPress ctrl+q to quit.")
        box = self.query_one("#loading")
        await box.query(LoadingIndicator).remove()
        box.add_class("-failed")
        if self.queued is not None:  # give the queued message back, so it is not lost
            await self.query_one(Transcript).reset([])
            self.query_one(ChatInput).give_back(self.queued[1].typed)  # before anything typed since
            self.queued = None

    @on(ModelLoaded)
    def _model_loaded(self, msg: ModelLoaded) -> None:
        self.loaded = msg.loaded
        self.query_one(ChatHeader).describe(msg.loaded)  # the app then shows a chat (show())
        for notice in msg.loaded.take_notices():  # before the first reply: e.g. that it compiles the decode step
            self.say(notice, severity="warning", timeout=10)

    # -- showing a chat -------------------------------------------------------------------------

    async def show(self, chat: Chat) -> None:
        """Show ``chat`` (new or restored): its messages with their eviction marks, and the gauge.

        Entry ``i`` shows ``chat.messages[i]``, so a new chat's system turn gets one before it exists.
        """
        self.reply_view = None
        self.editing = None
        self.last_reply = next((m.content for m in reversed(chat.messages) if m.role == "assistant"), "")
        entries = [Entry(m.role, chat.system_text() if m.role == "system" else m.content, m.note)
                   for m in chat.messages]
        if not entries and chat.system_tokens:
            entries = [Entry("system", chat.system_text())]
        try:
            transcript = self.query_one(Transcript)
            await transcript.query("#loading").remove()
            await transcript.reset(entries)
            self.query_one(ChatHeader).tokens_per_s = None
            self.chat = chat
            self.refresh_gauge(chat.occupancy())
            box = self.query_one(ChatInput)
        except NoMatches:  # the app closed while the chat was being shown
            return
        box.focus()
        self.title_box()  # no edit of the chat before
        self._count_tokens()
        if self.queued is not None:
            (text, draft), self.queued = self.queued, None
            self.post_message(self.Sent(draft))
            await self._send(text, pin=draft.pin)

    def replying(self) -> bool:
        """Whether a turn is running on the decode thread (the chat is then mid-step, not to be saved)."""
        return self._turn is not None and not self._turn.done()

    async def stop_reply(self) -> None:
        """Stop a running reply and wait until its turn has ended (the chat can then be replaced)."""
        turn, chat = self._turn, self.chat
        if turn is not None and not turn.done() and chat is not None:
            chat.stop()
            await asyncio.wait([asyncio.wrap_future(turn)])  # its failure, if any, was shown as it happened
            if self.reply_view is not None:  # the reply's last batch never reached the screen: mark it here
                with suppress(NoMatches):
                    self.reply_view.set_note("stopped")

    # -- chatting -------------------------------------------------------------------------------

    async def on_chat_input_submitted(self, event: ChatInput.Submitted) -> None:
        """A slash command (as in plain mode: :mod:`sinkchat.commands`) or a message; either is put
        back in the box (it is emptied as Enter is handled), before anything typed since, when it
        cannot be done now, with a line saying why."""
        parsed = commands.parse(event.text)
        if isinstance(parsed, commands.Command):
            await self.run_command(parsed, event.typed)
        else:
            await self.take(parsed, event.typed)

    async def take(self, text: str, typed: str, pin: bool | None = None, replace: int | None = None) -> None:
        """Send ``text`` (``typed``: what the box held, given back if it is not sent), pinned if the box
        is marked so (``pin``: as a command says instead), replacing the message being edited (or
        message ``replace`` and its reply)."""
        box = self.query_one(ChatInput)
        if self.generating:
            box.give_back(typed)
            self.say("wait for the reply, or press Esc to stop it; your message stays in the box",
                     severity="warning")
            return
        if self.chat is None:
            if self.queued is not None or self.app.load_error:
                box.give_back(typed)
                self.say("a message is already waiting for the model; this one stays in the box",
                         severity="warning")
                return
            pin = self.pin_next if pin is None else pin  # the box's mark goes with the text
            self.pin_next = False
            self.title_box()
            self.queued = text, Unanswered(typed or text, pin=pin)  # shown as queued; sent when the chat is ready
            await self.query_one(Transcript).add("user", text, note="queued")
            return
        tokens = len(self.chat.encode(text))
        if tokens > self.chat.cache.window - self.chat.cache.pinned_count() and self._confirmed != text:
            self._confirmed = text
            box.give_back(typed)
            self.say(f"This message is {tokens} tokens, more than the {self.chat.cache.window}-token window: "
                     "the model will keep only its end. Press Enter again to send it.",
                     title="Longer than the window", severity="warning", timeout=15)
            return
        marked = pin is None  # the box's mark (ctrl+l), kept with the text if it is refused
        if marked:
            pin, self.pin_next = self.pin_next, False
        if pin:
            try:
                self.chat.check_pin(text)
            except SinkchatError as exc:  # the message stays in the box
                self.pin_next = marked
                box.give_back(typed)
                self.say(str(exc), title="Not sent", severity="warning", timeout=10)
                return
        replace = self.editing if replace is None else replace
        self.unanswered = None
        self.post_message(self.Sent(Unanswered(typed or text, replace, marked and pin)))
        if replace is not None:
            await self.resend(replace, text, pin)
            return
        self.title_box()
        await self._send(text, pin=pin)

    async def _send(self, text: str, rollback: bool = False, pin: bool = False) -> None:
        transcript = self.query_one(Transcript)
        await transcript.jump_end()  # sending is coming back to the newest text
        self.turn_from = max(0, len(transcript.entries) - 1)  # the turn's messages (a first turn's system one too)
        await transcript.add("user", text)
        self.reply_view = await transcript.add("assistant")
        transcript.streaming = self.generating = True
        events = self.chat.submit(text, pin)  # here, not on the decode thread: an Esc from now on stops the turn
        self._turn = self.app.decoder.submit(self.pump, self.chat, events, rollback)

    def give_back_unanswered(self, draft: Unanswered) -> None:
        """Put back in the box a message whose turn a stopped sinkchat never saved (killed mid-reply),
        as it was typed: an edit of the last message again an edit, a pinned mark again marked."""
        if self.chat is None:
            return
        box = self.query_one(ChatInput)
        alone = not box.text.strip()  # (text carried from the chat before stays after it: no edit then)
        box.give_back(draft.typed)
        self.unanswered = draft
        with suppress(SinkchatError):
            if alone and draft.replace is not None and not draft.typed.startswith("/") and (
                    draft.replace == self.chat.last_user()):
                self.editing = draft.replace
        self.pin_next = self.pin_next or draft.pin
        self.title_box()
        self.say("Your last message got no reply before sinkchat stopped; it is back in the box (Enter sends it).",
                 title="Not answered", severity="warning", timeout=15)

    def holds_unanswered(self) -> bool:
        """Whether a message given back by :meth:`give_back_unanswered` may still be in the box, unsent
        (the box is not empty; at quit, when the box may be gone, as it last changed)."""
        with suppress(NoMatches):
            self._box_holds_text = bool(self.query_one(ChatInput).text.strip())
        return self.unanswered is not None and self._box_holds_text

    def on_text_area_changed(self, event: ChatInput.Changed) -> None:
        self._box_holds_text = bool(event.text_area.text.strip())
        if self.unanswered is not None and not self._box_holds_text:
            self.unanswered = None
            self.post_message(self.Sent(None))
        if self.pin_next and not self.query_one(ChatInput).text.strip():  # the mark goes with the text
            self.pin_next = False
            self.title_box()
        self._count_tokens()

    def _count_tokens(self) -> None:
        """The message's size against the window, live in the box's border (once the model is loaded)."""
        box = self.query_one(ChatInput)
        if self.chat is None or not box.text.strip():
            box.border_subtitle = ""
            box.remove_class("-over")
            return
        tokens, window = len(self.chat.encode(box.text.strip())), self.chat.cache.window
        over = tokens > window
        box.set_class(over, "-over")
        box.border_subtitle = (f"{tokens} tokens: more than the {window}-token window, only its end will stay"
                               if over else f"{tokens} of {window} tokens")

    def pump(self, chat: Chat, events: Iterator[Event], rollback: bool = False) -> None:
        """On the decode thread: run the engine's events (a :meth:`Chat.submit` not yet started) and
        post batched text and cache numbers to the UI, as plain values. ``rollback``: take back the
        last turn first (regenerate, edit)."""
        from ..engine import Done, Evicted, Notice, Stats, TokenText

        pending: list[str] = []
        occupancy, speed, last = None, None, time.perf_counter()
        try:
            notice = chat.rollback() if rollback else None
            if notice:
                self.post_message(Told(notice, "warning"))
            for event in events:
                if isinstance(event, TokenText):
                    pending.append(event.text)
                elif isinstance(event, Stats):
                    occupancy, speed = event.occupancy, event.tokens_per_s
                elif isinstance(event, Evicted):
                    occupancy = chat.occupancy()
                elif isinstance(event, Notice):  # a message sent pinned, or why it could not be
                    self.post_message(Told(event.text, "warning" if event.refused else "information"))
                elif isinstance(event, Done):
                    self.post_message(Streamed(chat, "".join(pending), occupancy, speed))
                    self.post_message(Finished(chat, event))
                    return
                now = time.perf_counter()
                if now - last >= self.STREAM_INTERVAL:
                    self.post_message(Streamed(chat, "".join(pending), occupancy, speed))
                    pending, occupancy, last = [], None, now
        except BaseException as exc:
            self.post_message(Streamed(chat, "".join(pending), None, None))
            self.post_message(Finished(chat, None, one_line(exc)))

    def on_told(self, msg: Told) -> None:
        self.say(msg.text, severity=msg.severity, timeout=10 if msg.severity == "warning" else 8)

    async def on_streamed(self, msg: Streamed) -> None:
        if msg.chat is not self.chat or self.reply_view is None:
            return
        if msg.text:
            await self.reply_view.append(msg.text)
        if msg.tokens_per_s is not None:
            self.query_one(ChatHeader).tokens_per_s = msg.tokens_per_s
        if msg.occupancy is not None:
            self.refresh_gauge(msg.occupancy)

    async def on_finished(self, msg: Finished) -> None:
        if msg.chat is not self.chat:
            return
        view, self.reply_view = self.reply_view, None
        for notice in msg.chat.loaded.take_notices():  # e.g. a compile that fell back to eager
            self.say(notice, severity="warning", timeout=10)
        self.query_one(Transcript).renote(msg.chat.messages, self.turn_from)  # e.g. a paste read in part
        if view is not None:
            await view.finish()
            if msg.error:
                view.set_note("error")
                self.say(f"generation failed: {msg.error}", severity="error", timeout=15)
            elif msg.done.reason != "end":
                view.set_note(msg.done.reason)
        if msg.done is not None:
            self.last_reply = msg.done.reply
            self.query_one(ChatHeader).tokens_per_s = (
                msg.done.generated / msg.done.seconds if msg.done.seconds > 0 and msg.done.generated else None
            )
        self.refresh_gauge(msg.chat.occupancy())
        self.query_one(Transcript).streaming = self.generating = False  # only now: the turn is fully on screen
        self.post_message(self.TurnEnded(msg.chat))

    def refresh_gauge(self, occupancy: Occupancy) -> None:
        """Draw the gauge and mark the messages on screen by what the cache still holds of them
        (work bounded by the mounted views and the few merged spans, not by the chat's length)."""
        chat = self.chat
        self.query_one(CacheGauge).show(occupancy, chat.messages)
        back = occupancy.recalled_spans()
        self.query_one(Transcript).mark(chat.messages, spans(occupancy), chat.kept_from, chat.is_pinned,
                                        lambda m: covered_by(back, m.start, m.end) if back else 0)

    # -- actions --------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action == "stop":
            return self.generating or self.editing is not None
        if action in ("new_chat", "copy_reply"):
            return self.chat is not None
        return True

    def action_stop(self) -> None:
        if self.generating and self.chat is not None:
            self.chat.stop()
        elif self.editing is not None:
            self.cancel_edit()

    def action_new_chat(self) -> None:
        self.post_message(self.NewChat())

    async def action_scroll(self, where: str) -> None:
        transcript = self.query_one(Transcript)
        if where == "end":
            await transcript.jump_end()  # and follow the newest text again
        elif where == "home":
            await transcript.jump_home()
        else:
            if where == "page_up":
                transcript.release_anchor()  # the user is reading back: stop following
            getattr(transcript, f"scroll_{where}")(animate=False)

    def action_toggle_details(self) -> None:
        gauge = self.query_one(CacheGauge)
        gauge.details = not gauge.details

    def action_copy_reply(self) -> None:
        if not self.last_reply:
            self.say("no reply to copy yet", severity="warning")
            return
        self.app.copy_to_clipboard(self.last_reply)
        self.say(f"copied the last reply ({len(self.last_reply)} characters)", timeout=3)
