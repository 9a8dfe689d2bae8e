"""F1: every key binding (read from the bindings themselves), how to read the gauge, and what the
attention sinks are on the loaded model (:mod:`.sinks_help`)."""

from __future__ import annotations

from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

GAUGE = """\
## The cache gauge

The model keeps only part of the chat in its memory (its KV cache): the first few tokens,
the **attention sinks** (`▓`, kept forever, because the model leans on them whatever they say),
**pinned** messages (`▒`, kept until you unpin them) and a rolling **window** of the most recent
tokens (`█`; `░` is room left in it). When the window is full its oldest tokens are **forgotten**:
`seen` counts every token of the chat, `forgotten` those no longer in memory, and each `✂ forgot
tokens a–b` line names the messages they came from, numbered as in the transcript (`#3 model 21
of 34`: 21 of message 3's 34 tokens). In the transcript a forgotten message is dimmed, and a partly
forgotten one quotes where what is kept begins. Ctrl+G shows or hides those lines.

To keep a message, select it with alt+↑/alt+↓ and press ctrl+l: it is pinned (`▒ pinned` in its
label) and never forgotten, up to `--pin-max` tokens in all (a quarter of the window unless set);
ctrl+l again lets it go. F5 regenerates the last reply, F2 edits your last message.

The message box takes plain mode's commands too: `/pin N`, `/unpin N`, `/pins`, `/keep TEXT` (send
it pinned), `/retry`, `/edit TEXT`, `/help`, `/quit`. Start a message with `//` to send a line that
begins with a slash command's word (one slash is dropped); `/usr/bin ...` is sent as it is.
"""


def bindings_markdown(groups: list[tuple[str, list[Binding]]]) -> str:
    rows = ["| Key | Action |", "|---|---|"]
    for where, bindings in groups:
        for b in bindings:
            keys = b.key_display or b.key.replace(",", " / ")
            rows.append(f"| `{keys}` | {b.description}{where} |")
    return "\n".join(rows)


class HelpScreen(ModalScreen):
    BINDINGS = [Binding("escape,f1,q", "dismiss", "Close help")]

    def __init__(self, table: str, about: str = ""):
        """``table``: the key bindings (Markdown); ``about``: more Markdown shown after them."""
        super().__init__()
        self.table, self.about = table, about

    def compose(self):
        with VerticalScroll(can_focus=True):
            yield Markdown(
                "# sinkchat keys\n\n" + self.table + "\n\nThe command palette (ctrl+p) offers the same "
                "commands by name. Scroll this help with the arrows or PageUp/PageDown; Esc or F1 "
                "closes it.\n\n" + GAUGE + (f"\n\n{self.about}" if self.about else "")
            )

    def on_mount(self) -> None:
        self.query_one(VerticalScroll).focus()
