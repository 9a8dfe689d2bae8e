"""The cache gauge: a bar of sinks | pinned | window used | free, the counters in words, and the
forgotten spans.

Each part of the bar has its own glyph as well as its own colour (``▓`` sinks, ``▒`` pinned, ``█``
window, ``░`` free), so it reads without colour too. Colours come from the theme's ``gauge-*``
variables through component classes, so every theme restyles the bar. Messages are named as the
transcript numbers them (``#3 model``). ``details`` toggles the list of forgotten spans. With
``--evict turns``, a window that starts inside a turn (one longer than the window, streaming
through token by token) is said so.
"""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from ..ledger import Message, Occupancy, describe_span, spans, streaming_through

SINK, PINNED, WINDOW, FREE = "▓", "▒", "█", "░"


class CacheGauge(Widget):
    """Always visible at the bottom of the chat; redrawn only when the app feeds it new numbers."""

    COMPONENT_CLASSES = {"gauge--sink", "gauge--pinned", "gauge--window", "gauge--free", "gauge--evicted",
                         "gauge--label"}
    details: reactive[bool] = reactive(True, layout=True)
    MAX_SPANS = 6  # most recent spans listed; older ones are summarised in one line

    def __init__(self, occupancy: Occupancy, turns: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.occupancy, self.turns = occupancy, turns
        self.messages: list[Message] = []

    def show(self, occupancy: Occupancy, messages: list[Message]) -> None:
        """New numbers; a relayout (the costly part of a redraw) only when the span list changes."""
        before = self.line_count()
        self.occupancy, self.messages = occupancy, messages
        self.refresh(layout=self.line_count() != before)

    def line_count(self) -> int:
        """Lines the gauge draws (no line wraps), so its height is known without a layout pass."""
        if not self.details:
            return 2
        n = len(spans(self.occupancy))
        return (2 + (min(n, self.MAX_SPANS) + (n > self.MAX_SPANS) if n else 1) + bool(self.streaming())
                + len(self.occupancy.notes()))

    def summary(self) -> str:
        """``sinks 4 · window 57 of 64 · seen 301 · forgotten 240`` (the numbers a user reads;
        ``pinned 12`` after the sinks when something is pinned)."""
        o = self.occupancy
        pinned = f" · pinned {o.pinned}" if o.pinned else ""
        return (f"sinks {o.sinks}{pinned} · window {o.window} of {o.window_capacity} · seen {o.seen} · "
                f"forgotten {o.evicted}")

    def streaming(self) -> str:
        """With ``--evict turns``, the line saying the window starts inside a message (see
        :func:`~sinkchat.ledger.streaming_through`), else ``""``."""
        return streaming_through(self.occupancy, self.messages) if self.turns else ""

    def span_lines(self) -> list[str]:
        return [describe_span(s, self.messages) for s in spans(self.occupancy)]

    def render(self) -> Text:
        o = self.occupancy
        style = self.get_component_rich_style
        label = style("gauge--label")
        width = max(10, self.size.width - 2)
        total = max(1, o.sink_capacity + o.window_capacity)
        n_sink = max(round(width * o.sinks / total), 1 if o.sinks else 0)
        n_pin = max(round(width * o.pinned / total), 1 if o.pinned else 0)
        n_win = max(round(width * o.window / total), 1 if o.window else 0)
        n_free = max(0, width - n_sink - n_pin - n_win)
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append(SINK * n_sink, style("gauge--sink"))
        text.append(PINNED * n_pin, style("gauge--pinned"))
        text.append(WINDOW * n_win, style("gauge--window"))
        text.append(FREE * n_free, style("gauge--free"))
        text.append("\n")
        text.append(f"{SINK} ", style("gauge--sink")).append(f"sinks {o.sinks}", label).append(" · ", label)
        if o.pinned:
            text.append(f"{PINNED} ", style("gauge--pinned")).append(f"pinned {o.pinned}", label).append(" · ", label)
        text.append(f"{WINDOW} ", style("gauge--window")).append(f"window {o.window} of {o.window_capacity}", label)
        text.append(" · ", label).append(f"{FREE} ", style("gauge--free")).append("free", label)
        text.append(f" · seen {o.seen} · ", label)
        text.append(f"forgotten {o.evicted}", style("gauge--evicted") if o.evicted else label)
        if self.details:
            for note in o.notes():
                text.append("\n◐ ", style("gauge--label")).append(note, label)
            if self.streaming():
                text.append("\n⇶ ", style("gauge--evicted")).append(self.streaming(), label)
            lines = self.span_lines()
            if not lines:
                text.append("\nnothing forgotten yet: the model still sees the whole chat", label)
            older = len(lines) - self.MAX_SPANS
            if older > 0:
                text.append(f"\n… {older} older forgotten span(s)", label)
            for line in lines[-self.MAX_SPANS:]:
                text.append("\n✂ forgot ", style("gauge--evicted")).append(line)
        return text
