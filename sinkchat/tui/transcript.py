"""The transcript: one numbered view per engine message, with what the cache still remembers of it.

Entry ``i`` is ``chat.messages[i]``, labelled ``#i+1`` (the gauge names messages the same way).
Assistant replies are Markdown (code blocks highlighted), streamed in batches through Textual's
``MarkdownStream`` so long replies do not flicker. A message whose tokens have all been evicted is
dimmed with a ``forgotten`` marker; a partly evicted one says how many of its tokens left and
quotes its own words (never the chat template's) where the kept part begins.

An endless chat cannot keep a widget per message: layout and memory would grow with every turn.
Only a window of the entries is mounted (the newest ``MOUNTED`` while following the end); the rest
stay as data, summed up in one line above (and below, when reading back), and are mounted
``BATCH`` at a time as the user scrolls into them, or all at once around the first message with
Ctrl+Home. The transcript follows the end (Textual's anchor) unless the user scrolls up.

One message can be *selected* (Alt+Up/Down move the highlight over the mounted views), for the
keys that act on a message (pinning it); a pinned message says so in its label (``▒ pinned``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from rich.text import Text
from textual.containers import Vertical, VerticalScroll
from textual.reactive import reactive
from textual.widget import Widget
from textual.widgets import Markdown, Static

from ..ledger import Memory, Message, Span, forgotten_count, label, memory
from ..text import clean

KeptFrom = Callable[[Message, int], "tuple[str, int] | None"]
Pinned = Callable[[Message], bool]
Recalled = Callable[[Message], int]


@dataclass
class Entry:
    role: str
    content: str = ""
    note: str = ""


class RoleLine(Widget):
    """The one-line label over a message; a fixed height, so updating it costs a repaint, not a relayout."""

    text: reactive[str] = reactive("")

    def render(self) -> Text:
        return Text(self.text, no_wrap=True, overflow="ellipsis")


class MessageView(Vertical):
    def __init__(self, index: int, entry: Entry):
        super().__init__(classes=f"-{entry.role}")
        self.index, self.entry = index, entry
        self.memory: Memory | None = None
        self.kept_from: tuple[str, int] | None = None  # (words, paragraph) where the kept part begins
        self.pinned = False
        self.recalled = 0  # tokens of it the cache recalled from the memory for this turn
        self.stream = None

    @property
    def role(self) -> str:
        return self.entry.role

    @property
    def content(self) -> str:
        return self.entry.content

    @property
    def note(self) -> str:
        return self.entry.note

    def compose(self):
        line = RoleLine(classes="role")
        line.text = self._label()
        yield line
        if self.role == "assistant":  # chat text is shown clean: no control character reaches the terminal
            yield Markdown(clean(self.content), classes="body")
        else:
            yield Static(clean(self.content), classes="body", markup=False)

    def _label(self) -> str:
        return clean(label(self.index, self.role, self.note, self.memory, self.pinned, self.kept_from, self.recalled),
                     one_line=True)

    def set_memory(self, mem: Memory, kept_from: tuple[str, int] | None = None, pinned: bool = False,
                   recalled: int = 0) -> None:
        self.memory, self.kept_from, self.pinned, self.recalled = mem, kept_from, pinned, recalled
        self.set_class(mem.forgotten, "-forgotten")
        self.set_class(mem.partly, "-partly")
        self.set_class(pinned, "-pinned")
        if self.is_mounted:
            self.query_one(RoleLine).text = self._label()

    def set_note(self, note: str) -> None:
        self.entry.note = note
        self.query_one(RoleLine).text = self._label()

    async def append(self, text: str) -> None:
        """Stream ``text`` onto the end of an assistant reply."""
        if not text:  # (a stream started and stopped with nothing written fails in Textual)
            return
        self.entry.content += text
        if self.stream is None:
            self.stream = Markdown.get_stream(self.query_one(Markdown))
        await self.stream.write(clean(text))

    async def finish(self) -> None:
        if self.stream is not None:
            await self.stream.stop()
            self.stream = None


class Transcript(VerticalScroll):
    """Every entry of the chat, a bounded window of them mounted; follows the newest text."""

    MOUNTED = 40  # views mounted while following the end
    BATCH = 20  # views mounted at a time when scrolling back (or forward again)

    def __init__(self, *children, **kwargs):
        earlier = Static("", id="earlier", classes="more", markup=False)
        later = Static("", id="later", classes="more", markup=False)
        super().__init__(earlier, *children, later, **kwargs)
        self.entries: list[Entry] = []
        self.lo = self.hi = 0  # entries[lo:hi] are mounted
        self.streaming = False  # the last view is being streamed into: never unmount it
        self._jumping = False
        self._messages: list[Message] = []  # the chat's messages, for the eviction marks
        self._spans: list[Span] = []
        self._kept_from: KeptFrom = lambda message, token: None
        self._pinned: Pinned = lambda message: False
        self._recalled: Recalled = lambda message: 0
        self.selected: int | None = None  # the highlighted message's index

    def on_mount(self) -> None:
        self._update_more()
        self.anchor()

    @property
    def views(self) -> list[MessageView]:
        return list(self.query(MessageView))

    # -- entries ---------------------------------------------------------------------------------

    async def add(self, role: str, content: str = "", note: str = "") -> MessageView | None:
        """Append an entry; while following the end it is mounted (the oldest view may go)."""
        self.entries.append(Entry(role, content, note))
        if self.hi < len(self.entries) - 1:  # the user is reading back: just count it below
            self._update_more()
            return None
        view = self._view(len(self.entries) - 1)
        await self.mount(view, before=self.query_one("#later"))
        self.hi += 1
        await self._trim_top(self.hi - self.lo - self.MOUNTED)
        self.anchor()
        return view

    async def reset(self, entries: list[Entry]) -> None:
        """Show a chat's entries: only the newest ``MOUNTED`` become widgets, in one layout pass.
        Nothing of the chat shown before carries over (its eviction marks, the selection): the
        caller marks the new chat's views with :meth:`mark`."""
        self.entries = list(entries)
        self._messages, self._spans, self.selected = [], [], None
        await self._remount(max(0, len(self.entries) - self.MOUNTED), len(self.entries))
        self.anchor()

    def renote(self, messages: list[Message], since: int) -> None:
        """Take the engine's notes of ``messages[since:]`` (a turn's end: a paste the model read only
        part of, a reply stopped), on the views mounted and the entries that are not."""
        for i in range(since, min(len(self.entries), len(messages))):
            if self.entries[i].note != messages[i].note:
                view = self.view_of(i)
                if view is not None:
                    view.set_note(messages[i].note)
                else:
                    self.entries[i].note = messages[i].note

    def view_of(self, index: int) -> MessageView | None:
        return next((v for v in self.views if v.index == index), None)

    async def truncate(self, count: int) -> None:
        """Drop the entries from ``count`` on (a turn taken back), and their views."""
        views = [v for v in self.views if v.index >= count]
        if views:
            await self.remove_children(views)
        del self.entries[count:]
        self.hi = min(self.hi, count)
        self.lo = min(self.lo, self.hi)
        if self.selected is not None and self.selected >= count:
            self.selected = None
        self._update_more()

    # -- selection -------------------------------------------------------------------------------

    def select(self, step: int) -> int | None:
        """Move the highlight ``step`` messages (over the mounted views; from the newest when
        none is highlighted) and scroll it into view; returns the selected index."""
        indices = [v.index for v in self.views]
        if not indices:
            return None
        if self.selected in indices:
            at = max(0, min(len(indices) - 1, indices.index(self.selected) + step))
        else:
            at = len(indices) - 1 if step < 0 or self.selected is None else 0
        self.selected = indices[at]
        for view in self.views:
            view.set_class(view.index == self.selected, "-selected")
        view = self.view_of(self.selected)
        self.release_anchor()
        self.scroll_to_widget(view, animate=False)
        return self.selected

    # -- eviction marks --------------------------------------------------------------------------

    def mark(self, messages: list[Message], spans: list[Span], kept_from: KeptFrom,
             pinned: Pinned = lambda message: False, recalled: Recalled = lambda message: 0) -> None:
        """Record what the cache holds; re-mark the mounted views (the others are marked on mount)."""
        self._messages, self._spans, self._kept_from, self._pinned = messages, spans, kept_from, pinned
        self._recalled = recalled
        for view in self.views:
            self._mark(view)
        self._update_more()

    def _mark(self, view: MessageView) -> None:
        if view.index >= len(self._messages):
            return
        message = self._messages[view.index]
        mem, pinned, recalled = memory(message, self._spans), self._pinned(message), self._recalled(message)
        if mem != view.memory or pinned != view.pinned or recalled != view.recalled:
            view.set_memory(mem, self._kept_from(message, mem.cut) if mem.partly and mem.cut else None, pinned,
                            recalled)

    def _update_more(self) -> None:
        earlier, later = self.query_one("#earlier", Static), self.query_one("#later", Static)
        if self.lo:
            gone = forgotten_count(self._messages, self._spans, min(self.lo, len(self._messages)))
            earlier.update(f"↑ {self.lo} earlier messages ({gone} forgotten by the model): scroll up or "
                           "PageUp to read them, Ctrl+Home for the first")
        later.update(f"↓ {len(self.entries) - self.hi} newer messages: scroll down, or Ctrl+End to follow "
                     "the newest" if self.hi < len(self.entries) else "")
        earlier.display, later.display = bool(self.lo), self.hi < len(self.entries)
        if self.hi < len(self.entries) and self.is_anchored:
            self.anchor(False)  # the end is not on screen: nothing to follow until it is

    # -- the mounted window ----------------------------------------------------------------------

    def _view(self, index: int) -> MessageView:
        view = MessageView(index, self.entries[index])
        view.set_class(index == self.selected, "-selected")
        self._mark(view)
        return view

    async def _mount_range(self, lo: int, hi: int, before: Widget | None = None) -> None:
        if hi > lo:
            anchor = before or self.query_one("#later")
            await self.mount_all([self._view(i) for i in range(lo, hi)], before=anchor)
        self._update_more()

    async def _trim_top(self, count: int) -> None:
        views = self.views[: max(0, count)]
        if views:
            await self.remove_children(views)
            self.lo += len(views)
            self._update_more()

    async def _trim_bottom(self, count: int) -> None:
        views = self.views[::-1][: max(0, count)]
        if self.streaming and views and views[0].index == len(self.entries) - 1:
            views = views[1:]
        if views:
            await self.remove_children(views)
            self.hi -= len(views)
            self._update_more()

    async def _scrolled(self) -> None:
        """Mount the next batch when the user reaches the top or the bottom of the mounted window."""
        if self.scroll_y <= 0 and self.lo > 0:
            first = self.views[0] if self.views else None
            lo = max(0, self.lo - self.BATCH)
            await self._mount_range(lo, self.lo, before=first)
            self.lo = lo
            await self._trim_bottom(self.hi - self.lo - 2 * self.MOUNTED)
            self._update_more()
            if first is not None:  # the text being read stays where it was; the new views are above it
                self.call_after_refresh(self.scroll_to_widget, first, animate=False, top=True)
        elif self.scroll_y >= self.max_scroll_y and self.hi < len(self.entries):
            hi = min(len(self.entries), self.hi + self.BATCH)
            await self._mount_range(self.hi, hi)
            self.hi = hi
            await self._trim_top(self.hi - self.lo - 2 * self.MOUNTED)
            self._update_more()

    @property
    def following(self) -> bool:
        """Anchored to the end and not let go by the user scrolling up (Textual's anchor state)."""
        return self.is_anchored and not self._anchor_released

    def watch_scroll_y(self, old: float, new: float) -> None:
        super().watch_scroll_y(old, new)
        if self.following or self._jumping:  # new text arrives at the end: the window moves with add()
            return
        at_end = new >= self.max_scroll_y
        if at_end and self.hi == len(self.entries):
            self.anchor()  # back at the newest text: follow it again
        elif new <= 0 < self.lo or (at_end and self.hi < len(self.entries)):
            self.run_worker(self._scrolled(), exclusive=True, group="transcript-scroll")

    async def jump_home(self) -> None:
        """The first message: mount the window around it (Ctrl+Home)."""
        self.anchor(False)
        await self._remount(0, min(len(self.entries), self.MOUNTED))
        self.scroll_home(animate=False, immediate=True)

    async def jump_end(self) -> None:
        """The newest text, followed again (Ctrl+End)."""
        if self.hi < len(self.entries) or self.lo < len(self.entries) - self.MOUNTED:
            await self._remount(max(0, len(self.entries) - self.MOUNTED), len(self.entries))
        self.anchor()

    async def _remount(self, lo: int, hi: int) -> None:
        """Replace the mounted window by ``entries[lo:hi]``; scroll events meanwhile mount nothing."""
        self._jumping = True
        try:
            self.workers.cancel_group(self, "transcript-scroll")
            self.lo, self.hi = lo, hi
            await self.query(MessageView).remove()
            await self._mount_range(lo, hi)
        finally:
            self._jumping = False
