"""The chat screen: header, transcript, cache gauge, message box; loading the model and generating.

Both long jobs run in Textual thread workers (the one concurrency mechanism here): the model load
posts :class:`ChatScreen.ModelLoaded`, and the generation worker batches the engine's events and
posts them at most ``STREAM_INTERVAL`` apart, so the UI never slows decoding (see the README for
the measurement). The screen never touches the disk: it posts :class:`ChatScreen.TurnEnded` after
every reply and :class:`ChatScreen.NewChat` on Ctrl+N, and the app saves or switches chats.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.css.query import NoMatches
from textual.message import Message
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import Footer, Label, LoadingIndicator
from textual.worker import Worker

from ..engine import Chat, Done, Evicted, Stats, TokenText
from ..errors import SinkchatError
from ..ledger import Occupancy, memory, spans
from ..models import LoadedModel, load_for
from ..settings import Settings
from ..text import clean
from .chat_input import ChatInput
from .gauge import CacheGauge
from .header import ChatHeader
from .transcript import MessageView, Transcript


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


class ChatScreen(Screen):
    BINDINGS = [
        Binding("escape", "stop", "Stop"),
        Binding("ctrl+n", "new_chat", "New chat"),
        Binding("ctrl+g", "toggle_details", "Gauge details"),
        Binding("ctrl+r", "copy_reply", "Copy reply"),
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

    class NewChat(Message):
        """The user asked for a new chat (Ctrl+N)."""

    def __init__(self, settings: Settings, loaded: LoadedModel | None = None):
        super().__init__()
        self.settings, self.loaded = settings, loaded
        self.reply_view: MessageView | None = None
        self.last_reply = ""
        self._worker: Worker | None = None

    def compose(self) -> ComposeResult:
        yield ChatHeader()
        with Transcript():
            with Vertical(id="loading"):
                yield LoadingIndicator()
                yield Label("loading the model…", classes="status", markup=False)
        yield CacheGauge(Occupancy(0, 0, self.settings.window, self.settings.sinks, 0, 0))
        yield ChatInput(disabled=True)
        yield Footer()

    def on_mount(self) -> None:
        if self.loaded is not None:
            self.post_message(self.ModelLoaded(self.loaded))
        else:
            self.load_model()

    # -- the model ------------------------------------------------------------------------------

    @work(thread=True, exit_on_error=False, group="load")
    def load_model(self) -> None:
        try:
            loaded = load_for(self.settings, progress=lambda m: self.app.call_from_thread(self.loading_status, m))
        except BaseException as exc:  # shown on screen, never a traceback
            self.app.call_from_thread(self.load_failed, one_line(exc))
            return
        self.post_message(self.ModelLoaded(loaded))

    def loading_status(self, message: str) -> None:
        self.query_one("#loading .status", Label).update(clean(message))

    def load_failed(self, message: str) -> None:
        box = self.query_one("#loading")
        box.add_class("-failed")
        box.query(LoadingIndicator).remove()
        self.loading_status(f"Could not load the model: {message}\n\nPress ctrl+q to quit.")

    @on(ModelLoaded)
    def _model_loaded(self, msg: ModelLoaded) -> None:
        self.loaded = msg.loaded
        self.query_one(ChatHeader).describe(msg.loaded)  # the app then shows a chat (show())

    # -- showing a chat -------------------------------------------------------------------------

    async def show(self, chat: Chat) -> None:
        """Show ``chat`` (new or restored): its messages with their eviction marks, and the gauge.

        View ``i`` shows ``chat.messages[i]``, so a new chat's system turn gets a view before it exists.
        """
        self.reply_view = None
        self.last_reply = next((m.content for m in reversed(chat.messages) if m.role == "assistant"), "")
        shown = [(m.role, m.content, m.note) for m in chat.messages]
        if not shown and chat.system_tokens:
            shown = [("system", "", "")]
        try:
            transcript = self.query_one(Transcript)
            await transcript.remove_children()
            self.query_one(ChatHeader).tokens_per_s = None
            await transcript.add_all([(r, chat.system_text() if r == "system" else c, n) for r, c, n in shown])
            self.chat = chat
            self.refresh_gauge(chat.occupancy())
            box = self.query_one(ChatInput)
        except NoMatches:  # the app closed while the chat was being shown
            return
        box.disabled = False
        box.focus()

    async def stop_reply(self) -> None:
        """Stop a running reply and wait until its worker has ended (the chat can then be replaced)."""
        worker, chat = self._worker, self.chat
        if worker is not None and worker.is_running and chat is not None:
            chat.stop()
            await worker.wait()
        while chat is not None and chat.busy:  # at exit the worker is cancelled while its thread still runs
            chat.stop()
            await asyncio.sleep(0.02)

    # -- chatting -------------------------------------------------------------------------------

    async def on_chat_input_submitted(self, event: ChatInput.Submitted) -> None:
        if self.chat is None or self.generating:
            busy = "wait for the reply, or press Esc to stop it" if self.generating else "the chat is still loading"
            self.notify(f"{busy}; your message stays in the box", severity="warning")
            return
        self.query_one(ChatInput).clear()
        transcript = self.query_one(Transcript)
        await transcript.add("user", event.text)
        self.reply_view = await transcript.add("assistant")
        self.generating = True
        self._worker = self.generate(self.chat, event.text)

    @work(thread=True, exclusive=True, group="generate", exit_on_error=False)
    def generate(self, chat: Chat, text: str) -> None:
        """Consume the engine's events; post batched text and cache numbers to the UI."""
        pending: list[str] = []
        occupancy, speed, last = None, None, time.perf_counter()
        try:
            for event in chat.submit(text):
                if isinstance(event, TokenText):
                    pending.append(event.text)
                elif isinstance(event, Stats):
                    occupancy, speed = event.occupancy, event.tokens_per_s
                elif isinstance(event, Evicted):
                    occupancy = chat.occupancy()
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

    async def on_streamed(self, msg: Streamed) -> None:
        if msg.chat is not self.chat or self.reply_view is None:
            return
        if msg.text:
            await self.reply_view.append(msg.text)
            self.query_one(Transcript).follow()
        if msg.tokens_per_s is not None:
            self.query_one(ChatHeader).tokens_per_s = msg.tokens_per_s
        if msg.occupancy is not None:
            self.refresh_gauge(msg.occupancy)

    async def on_finished(self, msg: Finished) -> None:
        if msg.chat is not self.chat:
            return
        view, self.reply_view = self.reply_view, None
        if view is not None:
            await view.finish()
            if msg.error:
                view.set_note("error")
                self.notify(f"generation failed: {msg.error}", severity="error", timeout=15)
            elif msg.done.reason != "end":
                view.set_note(msg.done.reason)
        if msg.done is not None:
            self.last_reply = msg.done.reply
            self.query_one(ChatHeader).tokens_per_s = (
                msg.done.generated / msg.done.seconds if msg.done.seconds > 0 else None
            )
        self.refresh_gauge(msg.chat.occupancy())
        self.generating = False  # only now: the turn is fully on screen
        self.post_message(self.TurnEnded(msg.chat))

    def refresh_gauge(self, occupancy: Occupancy) -> None:
        """Draw the gauge and mark each message by what the cache still holds of it."""
        chat = self.chat
        messages = list(chat.messages)
        self.query_one(CacheGauge).show(occupancy, messages)
        merged = spans(occupancy)
        for view, message in zip(self.query_one(Transcript).views, messages):
            mem = memory(message, merged)
            if mem != view.memory:
                view.set_memory(mem, chat.text_at(mem.cut) if mem.partly and mem.cut else "")

    # -- actions --------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action == "stop":
            return self.generating
        if action in ("new_chat", "copy_reply"):
            return self.chat is not None
        return True

    def action_stop(self) -> None:
        if self.generating and self.chat is not None:
            self.chat.stop()

    def action_new_chat(self) -> None:
        self.post_message(self.NewChat())

    def action_toggle_details(self) -> None:
        gauge = self.query_one(CacheGauge)
        gauge.details = not gauge.details

    def action_copy_reply(self) -> None:
        if not self.last_reply:
            self.notify("no reply to copy yet", severity="warning")
            return
        self.app.copy_to_clipboard(self.last_reply)
        self.notify(f"copied the last reply ({len(self.last_reply)} characters)", timeout=3)
