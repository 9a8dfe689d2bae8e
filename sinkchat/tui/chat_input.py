"""The message box: multi-line; Enter sends, Ctrl+J (or Shift/Alt+Enter where the terminal reports
them) adds a line. It shows how many tokens a long message takes against the window.

Enter is handled in the box's own key handler, not by a priority binding: a priority binding
fires when the key arrives, before the keys typed just ahead of it have been inserted, so text
and Enter arriving in one burst (a paste without bracketed paste, tmux send-keys, a text
expander) would send nothing or half a message.
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
        # Not in the footer (the placeholder says it; F1 lists it), so the essential keys fit in 80 columns.
        Binding("ctrl+j,shift+enter,alt+enter", "newline", "New line", key_display="ctrl+j", show=False),
    ]

    @dataclass
    class Submitted(Message):
        text: str

    def __init__(self, **kwargs):
        super().__init__(soft_wrap=True, show_line_numbers=False, tab_behavior="focus", **kwargs)
        self.placeholder = "Message the model (Enter sends, Ctrl+J new line, F1 help)"

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.action_send()
            return
        await super()._on_key(event)

    def action_send(self) -> None:
        text = self.text.strip()
        if text:  # the screen clears the box once it takes the message, so a refused one is not lost
            self.post_message(self.Submitted(text))

    def action_newline(self) -> None:
        self.insert("\n")
