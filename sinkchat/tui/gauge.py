"""The cache gauge: a bar of sinks | window used | free, the counters, and the evicted spans.

Colours come from the theme's ``gauge-*`` variables through component classes, so every theme
restyles the bar. ``details`` toggles the list of evicted spans with the messages they cover.
"""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from ..ledger import Message, Occupancy, describe_span, spans


class CacheGauge(Widget):
    """Always visible at the bottom of the chat; redrawn only when the app feeds it new numbers."""

    COMPONENT_CLASSES = {"gauge--sink", "gauge--window", "gauge--free", "gauge--evicted", "gauge--label"}
    details: reactive[bool] = reactive(True, layout=True)
    MAX_SPANS = 6  # most recent spans listed; older ones are summarised in one line

    def __init__(self, occupancy: Occupancy, **kwargs):
        super().__init__(**kwargs)
        self.occupancy = occupancy
        self.messages: list[Message] = []

    def show(self, occupancy: Occupancy, messages: list[Message]) -> None:
        """New numbers; a relayout (the costly part of a redraw) only when the span list changes."""
        before = self.line_count()
        self.occupancy, self.messages = occupancy, list(messages)
        self.refresh(layout=self.line_count() != before)

    def line_count(self) -> int:
        """Lines the gauge draws (no line wraps), so its height is known without a layout pass."""
        if not self.details:
            return 2
        n = len(spans(self.occupancy))
        return 2 + (min(n, self.MAX_SPANS) + (n > self.MAX_SPANS) if n else 1)

    def summary(self) -> str:
        """``4 + 57 / 64 | seen 301 | evicted 240`` (the numbers a test or a user reads)."""
        o = self.occupancy
        return f"{o.sinks} + {o.window} / {o.window_capacity} | seen {o.seen} | evicted {o.evicted}"

    def span_lines(self) -> list[str]:
        return [describe_span(s, self.messages) for s in spans(self.occupancy)]

    def render(self) -> Text:
        o = self.occupancy
        style = self.get_component_rich_style
        width = max(10, self.size.width - 2 - 28)
        total = max(1, o.sink_capacity + o.window_capacity)
        n_sink = round(width * o.sinks / total) if o.sinks else 0
        n_win = round(width * o.window / total) if o.window else 0
        n_sink = max(n_sink, 1 if o.sinks else 0)
        n_win = max(n_win, 1 if o.window else 0)
        n_free = max(0, width - n_sink - n_win)
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append("█" * n_sink, style("gauge--sink"))
        text.append("█" * n_win, style("gauge--window"))
        text.append("░" * n_free, style("gauge--free"))
        text.append(f" {o.sinks} + {o.window} / {o.window_capacity}")
        text.append("\n")
        label = style("gauge--label")
        text.append("sinks ", label).append("■", style("gauge--sink"))
        text.append("  window ", label).append("■", style("gauge--window"))
        text.append("  free ", label).append("■", style("gauge--free"))
        text.append(f"   seen {o.seen}   ", label)
        text.append(f"evicted {o.evicted}", style("gauge--evicted") if o.evicted else label)
        if self.details:
            lines = self.span_lines()
            if not lines:
                text.append("\nno evicted spans yet: the model still sees the whole chat", label)
            older = len(lines) - self.MAX_SPANS
            if older > 0:
                text.append(f"\n… {older} older span(s)", label)
            for line in lines[-self.MAX_SPANS:]:
                text.append("\n✂ ", style("gauge--evicted")).append(line)
        return text
