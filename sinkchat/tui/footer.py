"""Textual's key footer, without its leak of one set of key widgets per change of the bindings.

Each time the bindings change (here twice a turn: a reply starts and ends) the footer recomposes,
and each new key widget binds itself to the footer's ``compact`` reactive. Textual drops the
watchers of removed widgets only when ``compact`` next changes, which it never does, so the removed
keys stayed alive: about 12 widgets a turn, thousands in a long chat (Textualize/textual#6666).
After each recompose this footer drops the watchers whose widget is gone.
"""

from __future__ import annotations

from textual.widgets import Footer as TextualFooter


class Footer(TextualFooter):
    async def recompose(self) -> None:
        await super().recompose()
        for watchers in getattr(self, "__watchers", {}).values():  # Textual's own list (see reactive._watch)
            watchers[:] = [(node, callback) for node, callback in watchers if node.is_attached]
