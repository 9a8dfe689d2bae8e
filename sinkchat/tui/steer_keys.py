"""The chat screen's keys for steering the model's memory: select a message, pin or unpin it,
send a message pinned, regenerate the last reply, edit the last message. Part of
:class:`~sinkchat.tui.chat_screen.ChatScreen`.

Alt+Up/Down move a highlight over the messages on screen; Ctrl+L pins or unpins the highlighted
one (Ctrl+P is the command palette), or, with none highlighted, marks the message in the box to be
pinned as it is sent (before its own reply can evict it). F5 regenerates the last reply; F2 puts
the last message back in the box, and sending it replaces that message and its reply (Esc
cancels); a pinned message stays pinned either way. Plain mode's slash commands typed in the box
do the same (:meth:`SteerKeys.run_command`). The engine takes the last turn back
(:meth:`Chat.rollback`) in the generation worker, so a cache that has to be re-prefilled never
freezes the screen. Every refusal is one notification line.
"""

from __future__ import annotations

from textual.binding import Binding

from .. import commands
from ..errors import SinkchatError
from .chat_input import ChatInput
from .transcript import Transcript

HELP = ("commands: /pin N, /unpin N, /pins, /keep TEXT (send it pinned), /retry (f5), /edit TEXT, /help (f1), "
        "/quit or /exit (ctrl+q); start a message with // to send a line that begins with /")


class SteerKeys:
    """Actions mixed into the chat screen (it has ``chat``, ``generating``, ``editing``, ``_send``)."""

    STEER_BINDINGS = [
        # Priority: they work while the message box has the focus. Out of the footer (F1 lists them).
        Binding("alt+up", "select(-1)", "Select the previous message", key_display="alt+↑", show=False,
                priority=True),
        Binding("alt+down", "select(1)", "Select the next message", key_display="alt+↓", show=False, priority=True),
        Binding("ctrl+l", "pin", "Pin / unpin the selected message, or send the one typed pinned (the model "
                "keeps it)", show=False, priority=True),
        Binding("f5", "regenerate", "Regenerate the last reply", show=False, priority=True),
        Binding("f2", "edit_last", "Edit the last message and send it again", show=False, priority=True),
    ]

    def _steerable(self, what: str) -> bool:
        """Whether the chat can be changed now; a one-line notification if not."""
        if self.chat is None:
            self.say(f"the model is still loading; {what} once it is ready", severity="warning")
            return False
        if self.generating:
            self.say(f"wait for the reply (or press Esc to stop it), then {what}", severity="warning")
            return False
        return True

    def _last_turn(self, what: str, none_yet: str) -> int | None:
        """The last user message's index if the chat can be changed now; else a one-line notification."""
        if not self._steerable(what):
            return None
        try:
            return self.chat.last_user()
        except SinkchatError:
            self.say(none_yet, severity="warning")
            return None

    async def run_command(self, command: commands.Command, typed: str) -> None:
        """A slash command from the box, read as plain mode reads it (:func:`sinkchat.commands.check`),
        done by this screen's actions: ``/retry`` is F5, ``/edit TEXT`` sends TEXT in place of the
        last message, ``/keep TEXT`` sends it pinned, ``/help`` is F1, ``/quit`` and ``/exit`` are
        ctrl+q. One that cannot be done now is put back in the box (``typed``), with a line saying why."""
        box = self.query_one(ChatInput)
        try:
            verb, arg = commands.check(command, HELP).name, command.arg
        except SinkchatError as exc:
            box.give_back(typed)
            self.say(str(exc), severity="warning", timeout=10)
            return
        if verb == "help":
            self.app.action_help()
            return
        if verb in ("quit", "exit"):
            await self.app.action_quit()
            return
        if verb == "keep":
            await self.take(arg, typed, pin=True)
            return
        if verb in ("retry", "edit"):
            what = ("regenerate", "there is no reply to regenerate yet") if verb == "retry" else (
                "edit", "there is no message to edit yet")
            index = self._last_turn(*what)
            if index is None:
                box.give_back(typed)
            elif verb == "retry":
                await self.resend(index, self.chat.messages[index].content)
            else:
                await self.take(arg, typed, replace=index)
            return
        if not self._steerable(f"use /{verb}"):  # /pin N, /unpin N, /pins
            box.give_back(typed)
            return
        outcome = commands.execute(self.chat, command)
        if outcome.refused:
            box.give_back(typed)
            self.say(outcome.message, severity="warning", timeout=8)
            return
        self.say(outcome.message, timeout=5)
        if outcome.changed:
            self.refresh_gauge(self.chat.occupancy())
            self.post_message(self.TurnEnded(self.chat))  # saved like a turn: pins survive a resume

    def action_select(self, step: int) -> None:
        if self.query_one(Transcript).select(step) is None:
            self.say("no message to select yet", severity="warning")

    def action_pin(self) -> None:
        """Pin or unpin the highlighted message (the chat is saved as after a turn); with none
        highlighted, send the message being typed pinned (pressed again: not)."""
        index = self.query_one(Transcript).selected
        if index is None and self.query_one(ChatInput).text.strip():
            self.pin_next = not self.pin_next
            self.title_box()
            self.say("this message will be pinned as it is sent: the model keeps it" if self.pin_next else
                     "this message will be sent unpinned", timeout=4)
            return
        if not self._steerable("pin a message"):
            return
        if index is None:
            self.say("select a message first (alt+↑ / alt+↓) and press ctrl+l to pin it, or type one and press "
                     "ctrl+l to send it pinned", severity="warning")
            return
        chat = self.chat
        try:
            pinned = index < len(chat.messages) and chat.is_pinned(chat.messages[index])
            line = chat.unpin(index) if pinned else chat.pin(index)
        except SinkchatError as exc:
            self.say(str(exc), severity="warning", timeout=8)
            return
        self.say(line, timeout=5)
        self.refresh_gauge(chat.occupancy())
        self.post_message(self.TurnEnded(chat))  # saved like a turn: pins survive a resume

    async def action_regenerate(self) -> None:
        """Take back the last reply and generate it again (the same one, with greedy decoding)."""
        index = self._last_turn("regenerate", "there is no reply to regenerate yet")
        if index is not None:
            await self.resend(index, self.chat.messages[index].content)

    def action_edit_last(self) -> None:
        """Put the last user message in the box; sending it replaces that turn."""
        index = self._last_turn("edit", "there is no message to edit yet")
        if index is None:
            return
        box = self.query_one(ChatInput)
        box.text = self.chat.messages[index].content
        box.move_cursor(box.document.end)
        self.editing = index
        self.title_box()
        box.focus()

    def cancel_edit(self) -> None:
        self.query_one(ChatInput).clear()
        self.editing, self.pin_next = None, False
        self.title_box()

    def title_box(self) -> None:
        """The message box's title: what sending it will do (replace a message, pin it)."""
        parts = [f"editing #{self.editing + 1}: Enter replaces it and its reply, Esc cancels"] if (
            self.editing is not None) else []
        parts += ["▒ sent pinned (ctrl+l: not)"] if self.pin_next else []
        self.query_one(ChatInput).border_title = " · ".join(parts)

    async def resend(self, index: int, text: str, pin: bool = False) -> None:
        """Replace the turn from message ``index`` on with ``text`` and its new reply."""
        self.editing = None
        self.title_box()
        await self.query_one(Transcript).truncate(index)
        await self._send(text, rollback=True, pin=pin)
