"""The message box: multi-line; Enter sends, Ctrl+J (or Shift/Alt+Enter where the terminal reports
them) adds a line. It shows how many tokens a long message takes against the window.

Enter and Ctrl+J are handled in the box's own key handler, not by bindings: a priority binding
fires when the key arrives, before the keys typed just ahead of it have been inserted, so text
and Enter arriving in one burst (a paste without bracketed paste, tmux send-keys, a text
expander) would send nothing or half a message. For the same reason the box gives up the message
as Enter is handled: keys typed after Enter (the rest of such a burst) stay in the box, and a
message the screen does not take now is put back before them (:meth:`ChatInput.give_back`).
"""

from __future__ import annotations

from dataclasses import dataclass

from textual import events
from textual.binding import Binding
from textual.message import Message
from textual.widgets import TextArea


class ChatInput(TextArea):
    BINDINGS = [
        Binding("enter", "send", "Send"),  # shown in the footer; the key itself is handled in _on_key
        # Not in the footer (the placeholder says it; F1 lists it), so the essential keys fit in 80 columns;
        # handled in _on_key too, as Enter is (a binding ran after the keys typed just behind it).
        Binding("ctrl+j,shift+enter,alt+enter", "newline", "New line", key_display="ctrl+j", show=False),
    ]

    @dataclass
    class Submitted(Message):
        text: str  # the message, stripped
        typed: str = ""  # the box's text as it was sent (what give_back puts back)

    def __init__(self, **kwargs):
        super().__init__(soft_wrap=True, show_line_numbers=False, tab_behavior="focus", **kwargs)
        self.placeholder = "Message the model (Enter sends, Ctrl+J new line, F1 help)"

    NEWLINE_KEYS = ("ctrl+j", "shift+enter", "alt+enter")

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter" or event.key in self.NEWLINE_KEYS:  # in order with the keys around them
            event.stop()
            event.prevent_default()
            self.action_send() if event.key == "enter" else self.action_newline()
            return
        await super()._on_key(event)

    def action_send(self) -> None:
        typed = self.text
        if typed.strip():
            # Posted before the box empties, so the screen reads the message's marks (sent pinned)
            # before the change; cleared now, not when the screen takes it, so the keys after Enter stay.
            self.post_message(self.Submitted(typed.strip(), typed))
            self.clear()

    def give_back(self, typed: str) -> None:
        """Put back a message that was not sent, before what was typed since (on its own line);
        the cursor stays where it was in that text, or ends the message in an empty box."""
        self.insert(typed + ("\n" if self.text else ""), (0, 0))

    def action_newline(self) -> None:
        self.insert("\n")
