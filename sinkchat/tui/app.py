"""The sinkchat Textual app: chat transcript, live cache gauge, themes, keys.

Threads: the model loads and replies are generated in thread workers; the generation worker batches
the engine's events and posts at most ``STREAM_INTERVAL`` apart, so the UI never slows decoding
(see the README for the measurement). The UI owns all widgets; the engine never sees them.

Saving: the app owns one :class:`Store`; the open chat is saved after every turn and on exit by
a :class:`Saver` thread (a save at a full default window takes most of a second). The open chat's
lock is held while it is open, so a second sinkchat process is refused.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from textual import work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.screen import Screen
from textual.theme import BUILTIN_THEMES
from textual.widgets import Footer, Label, LoadingIndicator

from .. import cli, config
from ..cache import Occupancy
from ..engine import Chat, Done, Evicted, Stats, TokenText
from ..errors import SinkchatError
from ..ledger import memory, spans
from ..models import LoadedModel
from ..store import Store
from . import themes
from .chat_input import ChatInput
from .chats import ChatsScreen
from .gauge import CacheGauge
from .header import ChatHeader
from .help import HelpScreen, bindings_markdown
from .saver import Saver
from .transcript import MessageView, Transcript


@dataclass
class Streamed(Message):
    """A batch of reply text and the latest cache numbers from the generation worker."""

    chat: Chat
    text: str
    occupancy: Occupancy | None
    tokens_per_s: float | None


@dataclass
class Finished(Message):
    chat: Chat
    done: Done | None
    error: str | None = None


def one_line(exc: BaseException) -> str:
    """A readable one-line message for any exception (never a traceback)."""
    if isinstance(exc, SinkchatError):
        return str(exc)
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


class SinkchatApp(App):
    """``SinkchatApp(settings)`` loads the model itself; tests pass ``loaded=`` to reuse one."""

    CSS_PATH = "app.tcss"
    TITLE = "sinkchat"
    BINDINGS = [
        Binding("escape", "stop", "Stop"),
        Binding("ctrl+n", "new_chat", "New chat"),
        Binding("ctrl+t", "next_theme", "Theme"),
        Binding("ctrl+g", "toggle_details", "Gauge details"),
        Binding("ctrl+r", "copy_reply", "Copy reply"),
        Binding("ctrl+o", "chats", "Chats"),
        Binding("f1", "help", "Help"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]
    STREAM_INTERVAL = 0.3  # seconds between batches the worker posts: about 3 screen updates a second
    # The chats screen (saved conversations): a callable app -> Screen; None (ctrl+o hidden) when
    # the chat store could not be opened.
    chats_screen: Callable[["SinkchatApp"], Screen] | None = ChatsScreen

    def __init__(self, settings: dict, loaded: LoadedModel | None = None, store: Store | None = None):
        """``store``: the caller's (already holding the resumed chat's lock), else one is opened here.

        Either way the app owns it and closes it on exit.
        """
        super().__init__()
        self.settings = dict(settings)
        self.loaded = loaded
        self.chat: Chat | None = None
        self.exit_notes: list[str] = []  # save errors at exit, printed by run() after the screen is gone
        self.saver: Saver | None = None
        self._store_error = None
        try:
            self.saver = Saver(store or Store(), self._report_from_saver)
        except SinkchatError as exc:
            self._store_error = f"{exc}; chats are not saved"
            self.chats_screen = None
        self.generating = False
        self._idle = threading.Event()  # set while no generation thread is running
        self._idle.set()
        self.reply_view: MessageView | None = None
        self.last_reply = ""
        self.shipped_themes, self.theme_problems = themes.discover()
        for theme in self.shipped_themes.values():
            self.register_theme(theme)
        wanted = self.settings.get("theme") or themes.DEFAULT_THEME
        self.theme = wanted if wanted in self.available_themes else themes.DEFAULT_THEME
        self._unknown_theme = None if wanted in self.available_themes else wanted

    # -- hooks ----------------------------------------------------------------------------------

    def on_turn_end(self, chat: Chat) -> None:
        """Runs on the UI thread after every reply (finished or stopped): save the chat."""
        self.save()

    def save(self) -> None:
        if self.saver is not None and self.chat is not None:
            self.saver.save(self.chat)

    @property
    def store(self) -> Store | None:
        return self.saver.store if self.saver is not None else None

    @property
    def chat_id(self) -> int | None:
        return self.saver.chat_id if self.saver is not None else None

    def _report_from_saver(self, message: str) -> None:
        self._ui_loop.call_soon_threadsafe(self._save_failed, message)

    def _save_failed(self, message: str) -> None:
        if self.is_running:
            self.notify(message, title="Not saved", severity="error", timeout=15)
        else:
            self.exit_notes.append(message)

    async def settle(self) -> None:
        """Stop a running reply, wait for its thread and for queued saves: the chat can be replaced."""
        if not self._idle.is_set() and self.chat is not None:
            self.chat.stop()
        while not self._idle.is_set():
            await asyncio.sleep(0.02)
        self.generating = False
        if self.saver is not None:
            await self.saver.idle()

    async def on_unmount(self) -> None:
        await self.settle()
        if self.saver is not None:
            self.save()
            await self.saver.idle()
            self.saver.close()

    # -- layout ---------------------------------------------------------------------------------

    def get_theme_variable_defaults(self) -> dict[str, str]:
        return dict(themes.GAUGE_DEFAULTS)  # Textual's built-in themes lack the gauge colours

    def compose(self) -> ComposeResult:
        yield ChatHeader()
        with Transcript():
            with Vertical(id="loading"):
                yield LoadingIndicator()
                yield Label("loading the model…", classes="status", markup=False)
        yield CacheGauge(Occupancy(0, 0, self.settings["window"], self.settings["sinks"], 0, 0))
        yield ChatInput(disabled=True)
        yield Footer()

    async def on_mount(self) -> None:
        self._ui_loop = asyncio.get_running_loop()
        for problem in self.theme_problems:
            self.notify(problem.text(), title="Theme file", severity="error", timeout=20)
        if self._unknown_theme:
            self.notify(f"no theme named {self._unknown_theme!r}; using {self.theme}", severity="warning")
        if self._store_error:
            self.notify(self._store_error, title="Chat store", severity="error", timeout=20)
        self.theme_changed_signal.subscribe(self, self._remember_theme)
        if self.loaded is not None:
            await self.model_ready(self.loaded)
        else:
            self.load_model()

    # -- start-up -------------------------------------------------------------------------------

    @work(thread=True, exit_on_error=False, group="load")
    def load_model(self) -> None:
        try:
            loaded = cli.load_model(self.settings, progress=lambda m: self.call_from_thread(self.loading_status, m))
        except BaseException as exc:  # shown on screen, never a traceback
            self.call_from_thread(self.load_failed, one_line(exc))
            return
        self.call_from_thread(self.model_ready, loaded)

    def loading_status(self, message: str) -> None:
        self.query_one("#loading .status", Label).update(message)

    def load_failed(self, message: str) -> None:
        box = self.query_one("#loading")
        box.add_class("-failed")
        box.query(LoadingIndicator).remove()
        self.loading_status(f"Could not load the model: {message}\n\nPress ctrl+q to quit.")

    async def model_ready(self, loaded: LoadedModel) -> None:
        try:
            chat = Chat(loaded, cli.chat_settings(self.settings))
        except Exception as exc:
            self.load_failed(one_line(exc))
            return
        self.loaded = loaded
        self.query_one(ChatHeader).describe(loaded)
        await self.query_one("#loading").remove()
        resume_id = self.settings.get("resume_id")
        if resume_id is None or not await self.open_chat(resume_id, self.settings):
            await self.start_chat(chat)
        box = self.query_one(ChatInput)
        box.disabled = False
        box.focus()

    async def start_chat(self, chat: Chat, chat_id: int | None = None) -> None:
        """Show ``chat`` (new or restored) and save it from now on as stored chat ``chat_id`` (None: a new one).

        View ``i`` shows ``chat.messages[i]``, so a new chat's system turn gets a view before it exists.
        """
        self.chat, self.reply_view = chat, None
        self.last_reply = next((m.content for m in reversed(chat.messages) if m.role == "assistant"), "")
        if self.saver is not None:
            self.saver.follow(chat, self.settings, chat_id)
        transcript = self.query_one(Transcript)
        await transcript.remove_children()
        self.query_one(ChatHeader).tokens_per_s = None
        shown = [(m.role, m.content) for m in chat.messages] or ([("system", "")] if chat.system_tokens else [])
        await transcript.add_all([(r, self._system_text(chat) if r == "system" else c) for r, c in shown])
        self.refresh_gauge(chat.occupancy())

    async def open_chat(self, chat_id: int, settings: dict | None = None) -> bool:
        """Replace the open chat with saved chat ``chat_id`` (the current one is stopped and saved first).

        ``settings``: the CLI's for ``--resume`` (saved ones under the flags); from the chat list,
        the chat's own saved settings. The loaded model stays. False (and a notification) when it
        cannot be opened: locked by another process, damaged beyond repair...
        """
        if chat_id == self.chat_id:
            return True
        box = self.query_one(ChatInput)
        was_disabled, box.disabled = box.disabled, True  # nothing is sent while the chat changes
        try:
            await self.settle()
            # In a thread: restoring reads the state file (0.5 s at a 2000 window) and a damaged
            # or foreign one means re-prefilling the window; the screen stays live meanwhile.
            chat, notices = await asyncio.to_thread(self._open, chat_id, settings)
        except Exception as exc:  # one line on screen, never a traceback
            self.notify(f"cannot open chat {chat_id}: {one_line(exc)}", severity="error", timeout=15)
            return False
        finally:
            box.disabled = was_disabled
        await self._leave_chat()
        await self.start_chat(chat, chat_id)
        for notice in notices:
            self.notify(notice, title="Resumed", timeout=10)
        return True

    def _open(self, chat_id: int, settings: dict | None) -> tuple[Chat, list[str]]:
        with self.saver.lock:
            chosen = settings or cli.settings(self.store.settings(chat_id))
            return self.store.open(chat_id, self.loaded, cli.chat_settings(chosen))

    async def _leave_chat(self) -> None:
        """Save the open chat and release its lock, so another process may open it."""
        if self.saver is None:
            return
        self.save()
        await self.saver.idle()
        if self.chat_id is not None:
            with self.saver.lock:
                self.store.unlock(self.chat_id)

    async def delete_chat(self, chat_id: int) -> bool:
        """Delete a saved chat; deleting the open one first starts a new chat."""
        try:
            if chat_id == self.chat_id:
                await self.settle()
                self.saver.autosave = None  # nothing more is saved into the chat being deleted
                await self.action_new_chat()
            with self.saver.lock:
                self.store.delete(chat_id)
        except Exception as exc:
            self.notify(f"cannot delete chat {chat_id}: {one_line(exc)}", severity="error", timeout=15)
            return False
        self.notify(f"deleted chat {chat_id}", timeout=3)
        return True

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
        self._idle.clear()
        self.refresh_bindings()
        self.generate(self.chat, event.text)

    @work(thread=True, exclusive=True, group="generate", exit_on_error=False)
    def generate(self, chat: Chat, text: str) -> None:
        """Consume the engine's events; post batched text and cache numbers to the UI."""
        pending: list[str] = []
        occupancy, speed, last = None, None, time.perf_counter()
        try:
            if self.saver is not None:
                self.saver.wait()  # the last turn's save reads the chat: let it finish first
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
        finally:
            self._idle.set()

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
                view.set_note({"stopped": "stopped", "length": "max tokens"}[msg.done.reason])
        if msg.done is not None:
            self.last_reply = msg.done.reply
            self.query_one(ChatHeader).tokens_per_s = (
                msg.done.generated / msg.done.seconds if msg.done.seconds > 0 else None
            )
        self.refresh_gauge(self.chat.occupancy())
        self.generating = False  # only now: the turn is fully on screen (tests and the hook rely on it)
        self.refresh_bindings()
        self.on_turn_end(self.chat)

    def refresh_gauge(self, occupancy: Occupancy) -> None:
        """Draw the gauge and mark each message by what the cache still holds of it."""
        chat = self.chat
        messages = list(chat.messages)
        self.query_one(CacheGauge).show(occupancy, messages)
        merged = spans(occupancy)
        for view, message in zip(self.query_one(Transcript).views, messages):
            mem = memory(message, merged)
            if mem != view.memory:
                view.set_memory(mem, self._snippet(chat, mem.cut) if mem.partly and mem.cut else "")

    @staticmethod
    def _system_text(chat: Chat) -> str:
        """The system prompt as the model reads it: the user's, or the template's default one."""
        if chat.settings.system:
            return chat.settings.system
        ids = chat.encode(chat.turns.first("")[0])
        text = chat.tokenizer.decode(ids, skip_special_tokens=True).strip().removeprefix("system").strip()
        return f"(the model's default) {text}" if text else "(the model's default system prompt)"

    @staticmethod
    def _snippet(chat: Chat, cut: int) -> str:
        """The words where the kept part of a partly evicted message begins."""
        try:
            return chat.tokenizer.decode(chat.tokens[cut : cut + 6], skip_special_tokens=True).replace("\n", " ")
        except Exception:
            return ""

    # -- actions --------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action == "stop":
            return self.generating
        if action == "chats":
            return self.chats_screen is not None and not isinstance(self.screen, ChatsScreen)
        if action in ("new_chat", "copy_reply"):
            return self.chat is not None
        return True

    def action_stop(self) -> None:
        if self.generating and self.chat is not None:
            self.chat.stop()

    async def action_new_chat(self) -> None:
        """Stop and save the open chat, then start a new stored chat (created on its first turn)."""
        if self.loaded is None:
            return
        await self.settle()
        self.refresh_bindings()
        await self._leave_chat()
        await self.start_chat(Chat(self.loaded, cli.chat_settings(self.settings)))
        self.query_one(ChatInput).focus()

    def action_next_theme(self) -> None:
        names = sorted(self.shipped_themes)
        if names:
            nxt = names[(names.index(self.theme) + 1) % len(names)] if self.theme in names else names[0]
            self.theme = nxt
            self.notify(f"theme: {nxt}", timeout=2)

    def _remember_theme(self, theme) -> None:
        try:
            if config.load_config().get("theme") != theme.name:
                config.save_config_value("theme", theme.name)
        except (SinkchatError, OSError) as exc:
            self.notify(f"could not remember the theme: {one_line(exc)}", severity="warning")

    def action_toggle_details(self) -> None:
        gauge = self.query_one(CacheGauge)
        gauge.details = not gauge.details

    def action_copy_reply(self) -> None:
        if not self.last_reply:
            self.notify("no reply to copy yet", severity="warning")
            return
        self.copy_to_clipboard(self.last_reply)
        self.notify(f"copied the last reply ({len(self.last_reply)} characters)", timeout=3)

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self.bindings_table()))

    def action_chats(self) -> None:
        if self.chats_screen is not None:
            self.push_screen(self.chats_screen(self))

    def bindings_table(self) -> str:
        extra = [Binding("ctrl+p", "command_palette", "Command palette")]
        return bindings_markdown(
            [("", [b for b in self.BINDINGS if b.action != "chats" or self.chats_screen]), ("", extra),
             (" (message box)", ChatInput.BINDINGS)]
        )

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield SystemCommand("New chat", "Start a fresh conversation (ctrl+n)", self.action_new_chat)
        yield SystemCommand("Stop", "Stop the reply being generated (esc)", self.action_stop)
        yield SystemCommand("Next theme", "Switch to the next sinkchat theme (ctrl+t)", self.action_next_theme)
        yield SystemCommand("Toggle gauge details", "Show or hide the evicted spans (ctrl+g)", self.action_toggle_details)
        yield SystemCommand("Copy last reply", "Copy the last reply to the clipboard (ctrl+r)", self.action_copy_reply)
        yield SystemCommand("Help", "Show all key bindings (f1)", self.action_help)
        if self.chats_screen is not None:
            yield SystemCommand("Chats", "Open saved chats (ctrl+o)", self.action_chats)
        yield SystemCommand("Quit", "Quit sinkchat (ctrl+q)", self.action_quit)
        for command in super().get_system_commands(screen):
            if command.title in ("Theme", "Screenshot"):
                yield command


def theme_names() -> list[str]:
    return sorted(set(themes.discover()[0]) | set(BUILTIN_THEMES))


def run(settings: dict, store: Store | None = None) -> None:
    """Open the TUI; an unknown ``--theme`` is refused before the model loads."""
    name = settings.get("theme") or themes.DEFAULT_THEME
    if name not in theme_names():
        raise SinkchatError(
            f"unknown theme {name!r} (from --theme or config.toml); available: {', '.join(theme_names())}"
        )
    app = SinkchatApp(settings, store=store)
    app.run()
    for note in app.exit_notes:
        print(f"sinkchat: {note}", file=sys.stderr)
