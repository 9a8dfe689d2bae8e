"""The sinkchat Textual app: themes, the chat store, and switching between chats and screens.

The chat itself (transcript, gauge, message box, model loading, generation) is
:class:`~sinkchat.tui.chat_screen.ChatScreen`; the saved chats list is
:class:`~sinkchat.tui.chats.ChatsScreen`. Both post messages; the app acts on them. It owns one
:class:`~sinkchat.store.Store`, used only on its :class:`StoreThread`: the open chat is saved after
every turn (:class:`ChatScreen.TurnEnded`) and on exit, and stays locked while it is open, so a
second sinkchat process is refused. Every model call (load, turns, a new chat's cache, a restore, a
save's copy of the K/V) runs on its one :class:`~sinkchat.decoder.Decoder` thread.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Iterable
from contextlib import suppress
from typing import TYPE_CHECKING

from textual import on
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen
from textual.theme import BUILTIN_THEMES

from .. import config
from ..decoder import Decoder
from ..errors import LoadFailed, SinkchatError
from ..model import LoadedModel
from ..settings import Settings
from ..store import Autosave, Store, Unanswered
from . import themes
from .chat_input import ChatInput
from .chat_screen import ChatScreen, one_line
from .chats import ChatsScreen
from .help import HelpScreen, bindings_markdown
from .messages import SaveFailed
from .notices import Say
from .sinks_help import sinks_markdown
from .store_thread import StoreThread

if TYPE_CHECKING:
    from ..engine import Chat

ENDING = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class SinkchatApp(Say, App):
    """``SinkchatApp(settings)`` loads the model itself; tests pass ``loaded=`` to reuse one.

    ``store``: the caller's (already holding the resumed chat's lock), else one is opened here;
    either way the app owns it and closes it on exit. ``no_store``: why the caller could open none
    (then the app has no store: the chat goes on in memory). ``resume_id``: the chat to open first.
    """

    CSS_PATH = "app.tcss"
    TITLE = "sinkchat"
    BINDINGS = [
        Binding("ctrl+t", "next_theme", "Theme", show=False),
        Binding("ctrl+o", "chats", "Chats"),
        Binding("f1", "help", "Help"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(self, settings: Settings, loaded: LoadedModel | None = None, store: Store | None = None,
                 resume_id: int | None = None, notices: Iterable[str] = (), save: bool = True,
                 no_store: str | None = None):
        super().__init__()
        self.settings, self.loaded, self.resume_id, self.saving = settings, loaded, resume_id, save
        self.notices = list(notices) + ([] if save else ["--no-save: nothing of this session is saved"])
        self.exit_notes: list[str] = []  # save errors at exit, printed by run() after the screen is gone
        self.turns_ended = 0  # turn ends handled (each one's save submitted): what scripts and tests wait on
        self.load_error: str | None = None  # why the model could not be loaded, for run() to print
        self.store: StoreThread | None = None
        self.decoder = Decoder()  # the one thread that touches the model
        self.autosave: Autosave | None = None
        self._shown_id: int | None = None  # the stored chat on screen, when it is not being saved
        if no_store is None:
            try:
                self.store = StoreThread(store or Store())
            except SinkchatError as exc:
                no_store = str(exc)
        if no_store is not None:
            self.notices.append(f"{no_store}; chats are not saved")
        self.chat_screen = ChatScreen(settings, loaded)
        self.shipped_themes, self.theme_problems = themes.discover()
        for theme in self.shipped_themes.values():
            self.register_theme(theme)
        wanted = settings.theme
        self.theme = wanted if wanted in self.available_themes else themes.DEFAULT_THEME
        if wanted not in self.available_themes:
            self.notices.append(f"no theme named {wanted!r}; using {self.theme}")

    @property
    def chat(self) -> Chat | None:
        return self.chat_screen.chat

    def get_theme_variable_defaults(self) -> dict[str, str]:
        return dict(themes.GAUGE_DEFAULTS)  # Textual's built-in themes lack the gauge colours

    def on_mount(self) -> None:
        for problem in self.theme_problems:
            self.say(problem.text(), title="Theme file", severity="error", timeout=20)
        for notice in self.notices:
            self.say(notice, severity="warning", timeout=20)
        self.theme_changed_signal.subscribe(self, self._remember_theme)
        loop = asyncio.get_running_loop()
        for sig in ENDING:  # SIGTERM or a closed terminal: quit as Ctrl+Q does (the chat is saved)
            with suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no such signal
                loop.add_signal_handler(sig, self.exit)

    def get_default_screen(self) -> Screen:
        return self.chat_screen

    async def action_quit(self) -> None:
        """Stop a running reply (kept, marked stopped) and save before the app closes."""
        await self._leave_chat()
        self.exit()

    async def on_unmount(self) -> None:
        for sig in ENDING:
            with suppress(NotImplementedError, RuntimeError, ValueError):
                asyncio.get_running_loop().remove_signal_handler(sig)
        await self.chat_screen.stop_reply()  # the turn ends after the token in flight; it is kept
        if self.store is not None:
            self.save()
            self.store.close()
        # Wait for the decode thread to end (the stopped turn's last token, a queued copy): a thread still
        # inside torch while Python exits aborted the process ("terminate called without an active
        # exception", exit by SIGABRT after the resume line was printed) in about one quit of three.
        self.decoder.close(timeout=10)

    # -- chats ----------------------------------------------------------------------------------

    @on(ChatScreen.ModelLoaded)
    async def _model_loaded(self, msg: ChatScreen.ModelLoaded) -> None:
        self.loaded = msg.loaded
        if self.resume_id is None or not await self.open_chat(self.resume_id, self.settings):
            await self.new_chat()

    @on(ChatScreen.TurnEnded)
    def save(self) -> None:
        """Save the open chat (a copy is taken here; the store thread writes it)."""
        self.turns_ended += 1
        autosave, chat = self.autosave, self.chat
        if self.store is not None and autosave is not None and chat is not None:
            captured = self.decoder.submit(autosave.capture, chat)  # after the turn, before the next one
            self.store.submit(lambda store: autosave.write(captured.result()))
            if self.chat_screen.holds_unanswered():  # a message given back, still unsent: kept past the save
                draft = self.chat_screen.unanswered
                self.store.submit(lambda store: store.keep_draft(autosave.chat_id, draft))

    @on(ChatScreen.Sent)
    def _sent(self, msg: ChatScreen.Sent) -> None:
        """Keep the message in flight on disk until the save of its turn (after any save queued before);
        forget a message given back that left the box unsent."""
        autosave, draft = self.autosave, msg.draft
        if self.store is not None and autosave is not None and autosave.writable:
            self.store.submit(lambda store: store.keep_draft(autosave.chat_id, draft) if draft is not None
                              else store.drop_draft(autosave.chat_id, new_too=True))

    async def _unanswered(self, chat_id: int | None, carried: tuple | None = None) -> None:
        """Give back the message a killed sinkchat sent to this chat (None: to a new chat) but never
        saved the turn of; it stays on disk, this process's now, while it sits in the box. ``carried``:
        (the chat left, a message given back there that the box still holds): this chat's now."""
        if self.store is None or self.autosave is None or not self.autosave.writable:
            return  # not saving, or opened read-only: another sinkchat has the chat (and its message) open

        def take(store: Store) -> tuple[Unanswered | None, Unanswered | None]:
            """(this chat's message given back, what the box holds of both, kept on disk as this chat's)."""
            draft = store.take_draft(chat_id)
            if carried is None:
                kept = draft
            else:
                store.drop_draft(carried[0], new_too=True)
                kept = carried[1] if draft is None else Unanswered(  # the box: the draft before the carried text
                    f"{draft.typed}\n{carried[1].typed}", pin=draft.pin or carried[1].pin)
            if kept is not None:
                store.keep_draft(chat_id, kept)
            return draft, kept

        try:
            draft, kept = await self.store.call(take)
        except Exception:  # best effort: a message that cannot be read back never stops the chat
            return
        if draft is not None:
            self.chat_screen.give_back_unanswered(draft)
        self.chat_screen.unanswered = kept

    @on(SaveFailed)
    def _save_failed(self, msg: SaveFailed) -> None:
        if self.is_running:
            self.say(msg.text, title="Not saved", severity="error", timeout=15)
        else:
            self.exit_notes.append(msg.text)

    @property
    def chat_id(self) -> int | None:
        """The stored chat on screen (None: a new chat not saved yet)."""
        return self.autosave.chat_id if self.autosave is not None else self._shown_id

    def _follow(self, chat: Chat, chat_id: int | None) -> None:
        """Save ``chat`` from now on as stored chat ``chat_id`` (None: created on its first save)."""
        self._shown_id, self.autosave = chat_id, None
        if self.store is not None and self.saving:
            self.autosave = Autosave(self.store.store, chat, chat.settings, chat_id,
                                     lambda text: self.post_message(SaveFailed(text)))

    def _carried(self) -> tuple | None:
        """Before leaving a chat for another: (its id, the message given back there that the box still
        holds, no longer an edit), which goes with the box to the next chat."""
        screen = self.chat_screen
        if not screen.holds_unanswered():
            return None
        return self.chat_id, Unanswered(screen.unanswered.typed, pin=screen.unanswered.pin)

    async def _leave_chat(self) -> None:
        """Stop the reply, save the open chat and release its lock, so another process may open it."""
        await self.chat_screen.stop_reply()
        if self.store is None:
            return
        self.save()
        await self.store.idle()  # a new chat gets its id on its first save
        chat_id = self.chat_id
        if chat_id is not None:
            await self.store.call(lambda store: store.unlock(chat_id))
        self._shown_id, self.autosave = chat_id, None

    @on(ChatScreen.NewChat)
    async def new_chat(self) -> None:
        """Save the open chat, then start a new stored chat (created on its first turn)."""
        if self.loaded is None:
            return
        from ..engine import Chat

        carried = self._carried()
        await self._leave_chat()
        try:
            chat = await asyncio.wrap_future(self.decoder.submit(Chat, self.loaded, self.settings))
        except SinkchatError as exc:  # the cache does not fit the system prompt (or a system prompt kept whole)
            await self.chat_screen.load_failed(str(exc), "start a chat")
            return
        self._follow(chat, None)
        await self.chat_screen.show(chat)
        await self._unanswered(None, carried)

    async def open_chat(self, chat_id: int, settings: Settings | None = None) -> bool:
        """Replace the open chat with saved chat ``chat_id``; False (and a notification) if it cannot be.

        ``settings``: the CLI's for ``--resume`` (saved ones under the flags); from the chat list,
        the chat's own saved settings. The loaded model stays.
        """
        if chat_id == self.chat_id:
            return True
        if self.store is None or self.loaded is None:
            return False
        carried = self._carried()
        await self._leave_chat()
        loaded, base, decoder = self.loaded, self.settings, self.decoder

        def restore(store: Store) -> tuple[Chat, list[str]]:
            from ..engine import Chat

            chosen = settings or Settings.resolve(saved=store.settings(chat_id),
                                                  saved_source=f"chat {chat_id}'s saved settings")[0]
            chat = decoder.call(Chat, loaded, chosen.replace(theme=base.theme))
            return chat, store.open(chat_id, chat, read_only=not self.saving, on_model=decoder.call)

        try:  # on the store thread: a damaged or foreign state file means re-prefilling the window
            chat, notices = await self.store.call(restore)
        except Exception as exc:  # one line on screen, never a traceback
            self.say(f"cannot open chat {chat_id}: {one_line(exc)}", severity="error", timeout=15)
            return False
        self._follow(chat, chat_id)
        await self.chat_screen.show(chat)
        for notice in notices:
            self.say(notice, title="Resumed", timeout=10)
        await self._unanswered(chat_id, carried)
        return True

    @on(ChatsScreen.Open)
    async def _open_from_list(self, msg: ChatsScreen.Open) -> None:
        if await self.open_chat(msg.chat_id):
            self.pop_screen()
            self.chat_screen.query_one(ChatInput).focus()

    @on(ChatsScreen.Delete)
    async def _delete(self, msg: ChatsScreen.Delete) -> None:
        """Delete a saved chat; deleting the open one first starts a new chat."""
        try:
            if msg.chat_id == self.chat_id:
                self.autosave = None  # nothing more is saved into the chat being deleted
                await self.new_chat()
            await self.store.call(lambda store: store.delete(msg.chat_id))
        except Exception as exc:
            self.say(f"cannot delete chat {msg.chat_id}: {one_line(exc)}", severity="error", timeout=15)
            return
        self.say(f"deleted chat {msg.chat_id}", timeout=3)
        if isinstance(self.screen, ChatsScreen):
            await self.screen.reload()

    # -- actions --------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action == "chats":
            return self.store is not None and not isinstance(self.screen, ChatsScreen)
        return True

    def action_next_theme(self) -> None:
        names = sorted(self.shipped_themes)
        if names:
            nxt = names[(names.index(self.theme) + 1) % len(names)] if self.theme in names else names[0]
            self.theme = nxt
            self.say(f"theme: {nxt}", timeout=2)

    def _remember_theme(self, theme) -> None:
        try:
            if config.load_config().get("theme") != theme.name:
                config.save_config_value("theme", theme.name)
        except (SinkchatError, OSError) as exc:
            self.say(f"could not remember the theme: {one_line(exc)}", severity="warning")

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            data_dir = self.store.store.root if self.store is not None else None
            self.push_screen(HelpScreen(self.bindings_table(), sinks_markdown(self.settings.model, data_dir)))

    def action_chats(self) -> None:
        if self.store is not None:
            store = self.store
            self.push_screen(ChatsScreen(lambda query: store.call(lambda s: s.list(query)), self.chat_id))

    def bindings_table(self) -> str:
        extra = [Binding("ctrl+p", "command_palette", "Command palette")]
        return bindings_markdown(
            [(" (message box)", ChatInput.BINDINGS), ("", ChatScreen.BINDINGS),
             ("", [b for b in self.BINDINGS if b.action != "chats" or self.store]), ("", extra)]
        )

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        chat = self.chat_screen
        yield SystemCommand("New chat", "Start a fresh conversation (ctrl+n)", chat.action_new_chat)
        yield SystemCommand("Stop", "Stop the reply being generated (esc)", chat.action_stop)
        yield SystemCommand("Next theme", "Switch to the next sinkchat theme (ctrl+t)", self.action_next_theme)
        yield SystemCommand("Toggle gauge details", "Show or hide the evicted spans (ctrl+g)",
                            chat.action_toggle_details)
        yield SystemCommand("Copy last reply", "Copy the last reply to the clipboard (ctrl+r)", chat.action_copy_reply)
        yield SystemCommand("Regenerate last reply", "Take back the last reply and generate it again (f5)",
                            chat.action_regenerate)
        yield SystemCommand("Edit last message", "Put the last message in the box; sending replaces it (f2)",
                            chat.action_edit_last)
        yield SystemCommand("Pin or unpin message", "Keep the selected message in the model's memory, or let it "
                            "go (select: alt+up/down; ctrl+l)", chat.action_pin)
        yield SystemCommand("Help", "Show all key bindings (f1)", self.action_help)
        if self.store is not None:
            yield SystemCommand("Chats", "Open saved chats (ctrl+o)", self.action_chats)
        yield SystemCommand("Quit", "Quit sinkchat (ctrl+q)", self.action_quit)
        for command in super().get_system_commands(screen):
            if command.title in ("Theme", "Screenshot"):
                yield command


def theme_names() -> list[str]:
    return sorted(set(themes.discover()[0]) | set(BUILTIN_THEMES))


def check_theme(name: str) -> None:
    if name not in theme_names():
        raise SinkchatError(
            f"unknown theme {name!r} (from --theme or config.toml); available: {', '.join(theme_names())}"
        )


def run(settings: Settings, store: Store | None, resume_id: int | None = None, notices: Iterable[str] = (),
        save: bool = True, no_store: str | None = None) -> int | None:
    """Run the TUI until the user quits; returns the id the chat was saved as (None: not saved).

    Raises :class:`LoadFailed` (exit code 1) when the model could not be loaded on screen.
    """
    from .typeahead import typed_ahead

    app = SinkchatApp(settings, store=store, resume_id=resume_id, notices=notices, save=save, no_store=no_store)
    app.chat_screen.typed = typed_ahead()  # read last, just before the screen takes the terminal
    app.run()
    for note in app.exit_notes:
        print(f"sinkchat: {note}", file=sys.stderr)
    if app.load_error:
        raise LoadFailed(app.load_error)
    if app.return_code:  # an unexpected error ended the app (Textual printed its traceback)
        saved = (f"; resume the saved chat with: {config.resume_command(store.root, app.chat_id)}"
                 if save and app.chat_id and store is not None else "")
        raise LoadFailed(f"the chat screen stopped on an unexpected error{saved}")
    return app.chat_id if save else None
