"""The transcript: one view per engine message, with what the cache still remembers of it.

View ``i`` shows ``chat.messages[i]``. Assistant replies are Markdown (code blocks highlighted),
streamed in batches through Textual's ``MarkdownStream`` so long replies do not flicker. A message
whose tokens have all been evicted is dimmed with a ``forgotten`` marker; a partly evicted one says
how many of its tokens left and quotes the words where the kept part begins.
"""

from __future__ import annotations

from rich.text import Text
from textual.containers import Vertical, VerticalScroll
from textual.reactive import reactive
from textual.widget import Widget
from textual.widgets import Markdown, Static

from ..ledger import Memory
from ..text import clean

ROLE_LABEL = {"user": "you", "assistant": "model", "system": "system"}
NOTE_LABEL = {"stopped": "stopped", "length": "max tokens", "error": "error"}


class RoleLine(Widget):
    """The one-line label over a message; a fixed height, so updating it costs a repaint, not a relayout."""

    text: reactive[str] = reactive("")

    def render(self) -> Text:
        return Text(self.text, no_wrap=True, overflow="ellipsis")


class MessageView(Vertical):

    def __init__(self, role: str, content: str = "", note: str = ""):
        super().__init__(classes=f"-{role}")
        self.role, self.content = role, content
        self.memory: Memory | None = None
        self.note = note  # why a reply ended early: "stopped", "length", "error" or ""
        self.snippet = ""  # words where the kept part of a partly evicted message begins
        self.stream = None

    def compose(self):
        line = RoleLine(classes="role")
        line.text = self._label()
        yield line
        if self.role == "assistant":  # chat text is shown clean: no control character reaches the terminal
            yield Markdown(clean(self.content), classes="body")
        else:
            yield Static(clean(self.content), classes="body", markup=False)

    def _label(self) -> str:
        parts = [ROLE_LABEL.get(self.role, self.role)]
        if self.note:
            parts.append(f"[{NOTE_LABEL.get(self.note, self.note)}]")
        m = self.memory
        if m is not None and m.forgotten:
            parts.append(f"⊘ forgotten: all {m.tokens} tokens evicted from the cache")
        elif m is not None and m.partly:
            if self.snippet.strip():
                where = f", kept from “{clean(self.snippet.strip(), one_line=True)}…”"
            else:  # the evicted run ends the message: its start is what stays (the attention sinks)
                where = f", its first {m.tokens - m.evicted} stay as attention sinks" if m.cut is None else ""
            parts.append(f"✂ {m.evicted}/{m.tokens} tokens evicted{where}")
        return "  ".join(parts)

    def set_memory(self, memory: Memory, snippet: str = "") -> None:
        self.memory, self.snippet = memory, snippet
        self.set_class(memory.forgotten, "-forgotten")
        self.set_class(memory.partly, "-partly")
        self.query_one(RoleLine).text = self._label()

    def set_note(self, note: str) -> None:
        self.note = note
        self.query_one(RoleLine).text = self._label()

    async def append(self, text: str) -> None:
        """Stream ``text`` onto the end of an assistant reply."""
        if not text:  # (a stream started and stopped with nothing written fails in Textual)
            return
        self.content += text
        if self.stream is None:
            self.stream = Markdown.get_stream(self.query_one(Markdown))
        await self.stream.write(clean(text))

    async def finish(self) -> None:
        if self.stream is not None:
            await self.stream.stop()
            self.stream = None


class Transcript(VerticalScroll):
    """Scrolls to the newest text unless the user scrolled up to read."""

    @property
    def views(self) -> list[MessageView]:
        return list(self.query(MessageView))

    async def add(self, role: str, content: str = "") -> MessageView:
        view = MessageView(role, content)
        await self.mount(view)
        self.scroll_end(animate=False)
        return view

    async def add_all(self, messages: list[tuple[str, str, str]]) -> None:
        """Show a restored chat's ``(role, content, note)`` messages in one mount (one layout pass)."""
        if messages:
            await self.mount_all([MessageView(role, content, note) for role, content, note in messages])
            self.scroll_end(animate=False)

    def follow(self) -> None:
        if self.max_scroll_y - self.scroll_y <= 3:
            self.scroll_end(animate=False)
