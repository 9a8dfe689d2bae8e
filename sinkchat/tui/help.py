"""F1: every key binding of the app and of the message box, read from the bindings themselves, and
what the gauge's sinks are (:mod:`.sinks_help`)."""

from __future__ import annotations

from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown


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
        with VerticalScroll():
            yield Markdown(
                "# sinkchat keys\n\n" + self.table + "\n\nThe command palette (ctrl+p) offers the same "
                "commands by name. Esc or F1 closes this help." + (f"\n\n{self.about}" if self.about else "")
            )
