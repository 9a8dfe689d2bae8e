"""The message box: multi-line; Enter sends, Ctrl+J (or Shift/Alt+Enter where the terminal reports them) adds a line."""

from __future__ import annotations

from dataclasses import dataclass

from textual.binding import Binding
from textual.message import Message
from textual.widgets import TextArea


class ChatInput(TextArea):
    BINDINGS = [
        Binding("enter", "send", "Send", priority=True),
        # Not in the footer (the placeholder says it; F1 lists it), so every app key fits in 110 columns.
        Binding("ctrl+j,shift+enter,alt+enter", "newline", "New line", key_display="ctrl+j", show=False),
    ]
    @dataclass
    class Submitted(Message):
        text: str

    def __init__(self, **kwargs):
        super().__init__(soft_wrap=True, show_line_numbers=False, tab_behavior="focus", **kwargs)
        self.placeholder = "Message the model (Enter sends, Ctrl+J new line, F1 help)"

    def action_send(self) -> None:
        text = self.text.strip()
        if text:  # the app clears the box once it takes the message, so a refused one is not lost
            self.post_message(self.Submitted(text))

    def action_newline(self) -> None:
        self.insert("\n")
