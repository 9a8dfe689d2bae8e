"""The transcript: one numbered view per engine message, with what the cache still remembers of it.

View ``i`` shows ``chat.messages[i]`` and is labelled ``#i+1`` (the gauge names messages the same
way). Assistant replies are Markdown (code blocks highlighted), streamed in batches through
Textual's ``MarkdownStream`` so long replies do not flicker. A message whose tokens have all been
evicted is dimmed with a ``forgotten`` marker; a partly evicted one says how many of its tokens
left and quotes its own words (never the chat template's) where the kept part begins.

The transcript is anchored to its end: it follows a streaming reply to its last line unless the
user scrolls up, and follows again once they scroll back down.
"""

from __future__ import annotations

from rich.text import Text
from textual.containers import Vertical, VerticalScroll
from textual.reactive import reactive
from textual.widget import Widget
from textual.widgets import Markdown, Static

from ..ledger import ROLE_NAME, Memory

NOTE_LABEL = {"stopped": "stopped", "length": "max tokens", "error": "error", "queued": "queued"}


class RoleLine(Widget):
    """The one-line label over a message; a fixed height, so updating it costs a repaint, not a relayout."""

    text: reactive[str] = reactive("")

    def render(self) -> Text:
        return Text(self.text, no_wrap=True, overflow="ellipsis")


class MessageView(Vertical):
    def __init__(self, number: int, role: str, content: str = "", note: str = ""):
        super().__init__(classes=f"-{role}")
        self.number, self.role, self.content = number, role, content
        self.memory: Memory | None = None
        self.note = note  # why a reply ended early: "stopped", "length", "error"; or "queued"
        self.kept_from: tuple[str, int] | None = None  # (words, paragraph) where the kept part begins
        self.stream = None

    def compose(self):
        line = RoleLine(classes="role")
        line.text = self._label()
        yield line
        if self.role == "assistant":
            yield Markdown(self.content, classes="body")
        else:
            yield Static(self.content, classes="body", markup=False)

    def _label(self) -> str:
        parts = [f"#{self.number} {ROLE_NAME.get(self.role, self.role)}"]
        if self.note:
            parts.append(f"[{NOTE_LABEL.get(self.note, self.note)}]")
        m = self.memory
        if m is not None and m.forgotten:
            parts.append(f"⊘ forgotten: the model no longer holds any of its {m.tokens} tokens")
        elif m is not None and m.partly:
            where = ""
            if self.kept_from is not None:
                words, paragraph = self.kept_from
                where = f", kept from “{words}…”" + (f" (paragraph {paragraph})" if paragraph > 1 else "")
            elif m.cut is None:  # the evicted run ends the message: its start is what stays (the sinks)
                where = f", its first {m.tokens - m.evicted} stay as attention sinks"
            parts.append(f"✂ {m.evicted} of {m.tokens} tokens forgotten{where}")
        return "  ".join(parts)

    def set_memory(self, memory: Memory, kept_from: tuple[str, int] | None = None) -> None:
        self.memory, self.kept_from = memory, kept_from
        self.set_class(memory.forgotten, "-forgotten")
        self.set_class(memory.partly, "-partly")
        self.query_one(RoleLine).text = self._label()

    def set_note(self, note: str) -> None:
        self.note = note
        self.query_one(RoleLine).text = self._label()

    async def append(self, text: str) -> None:
        """Stream ``text`` onto the end of an assistant reply."""
        self.content += text
        if self.stream is None:
            self.stream = Markdown.get_stream(self.query_one(Markdown))
        await self.stream.write(text)

    async def finish(self) -> None:
        if self.stream is not None:
            await self.stream.stop()
            self.stream = None


class Transcript(VerticalScroll):
    """Follows the newest text unless the user scrolled up to read (Textual's anchor)."""

    def on_mount(self) -> None:
        self.anchor()

    @property
    def views(self) -> list[MessageView]:
        return list(self.query(MessageView))

    async def add(self, role: str, content: str = "", note: str = "") -> MessageView:
        """Append a message view (numbered after the last one) and follow the end again."""
        view = MessageView(len(self.views) + 1, role, content, note)
        await self.mount(view)
        self.anchor()
        return view

    async def add_all(self, messages: list[tuple[str, str, str]]) -> None:
        """Show a restored chat's ``(role, content, note)`` messages in one mount (one layout pass)."""
        if messages:
            await self.mount_all([MessageView(i + 1, *m) for i, m in enumerate(messages)])
        self.anchor()
