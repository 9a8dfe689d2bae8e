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

from ..ledger import PINNED, Message, Occupancy, describe_span, name, partial_of, spans, streaming_through

SINK, WINDOW, FREE = "▓", "█", "░"


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
        self._height = 0  # lines at the last show()

    def show(self, occupancy: Occupancy, messages: list[Message]) -> None:
        """New numbers; a relayout (the costly part of a redraw) only when the gauge's height changes."""
        self.occupancy, self.messages = occupancy, messages
        before, self._height = self._height, self.line_count()
        self.refresh(layout=self._height != before)

    def line_count(self, width: int | None = None) -> int:
        """Lines the gauge draws at ``width`` (its own by default): each line of it is flowed to the width."""
        return len(self._shown(self._width() if width is None else width))

    def get_content_height(self, container, viewport, width: int) -> int:
        return self.line_count(width)

    def _width(self) -> int:
        return max(10, self.content_size.width)

    def summary(self) -> str:
        """``sinks 4 · window 57 of 64 · seen 301 · forgotten 240`` (the numbers a user reads;
        ``pinned 12`` after the sinks when something is pinned). The sinks are the chat's first
        tokens, held for ever: their number is the one set (``--sinks``), from a chat's start on."""
        o = self.occupancy
        pinned = f" · pinned {o.pinned}" if o.pinned else ""
        recalled = f" · recalled {len(o.recall)} blocks" if o.recall else ""
        return (f"sinks {o.sink_capacity}{pinned} · window {o.window} of {o.window_capacity} · seen {o.seen} · "
                f"forgotten {o.evicted}{recalled}")

    def recall_lines(self) -> list[str]:
        """What the model recalled from the memory of forgotten tokens for this turn, a block a line:
        ``#3 (27 of 30 layers) tokens 68–99 (32): #2 user 20 of 41``."""
        o = self.occupancy
        return [f"#{r.block + 1} ({r.layers} of {o.recall_layers} layers) {describe_span(s, self.messages)}"
                for r in o.recall for s in r.spans]

    def streaming(self) -> str:
        """With ``--evict turns``, the line saying the window starts inside a message (see
        :func:`~sinkchat.ledger.streaming_through`), else ``""``."""
        return streaming_through(self.occupancy, self.messages) if self.turns else ""

    def unread(self) -> str:
        """What follows "nothing forgotten yet": that the model sees the whole chat, unless it read
        only part of a message (a long paste stopped with Esc): then which, and how much."""
        parts = [f"{m.end - m.start} of the {total} tokens of {name(self.messages, i)}"
                 for i, m in enumerate(self.messages) if (total := partial_of(m.note)) is not None]
        return f", but the model read only {', '.join(parts)} (stopped)" if parts else (
            ": the model still sees the whole chat")

    def span_lines(self) -> list[str]:
        return [describe_span(s, self.messages) for s in spans(self.occupancy)]

    def render(self) -> Text:
        return Text("\n", no_wrap=True, overflow="ellipsis").join(self._shown(self._width()))

    def _shown(self, width: int) -> list[Text]:
        """:meth:`_lines`, at most half the screen's height: the transcript keeps the screen, and
        the details' tail gives way with a line that says so."""
        lines = self._lines(width)
        budget = max(4, self.screen.size.height // 2) if self.is_attached else len(lines)
        if len(lines) <= budget:
            return lines
        return lines[: budget - 1] + [Text(f"… {len(lines) - budget + 1} more line(s): a taller terminal shows them, "
                                           "Ctrl+G hides the details", self.get_component_rich_style("gauge--label"))]

    def _lines(self, width: int) -> list[Text]:
        """The bar, the counters and (with ``details``) what the model read and forgot, each flowed
        to ``width`` (at 80 columns nothing is cut: a counter or a span's part moves to the next line)."""
        o = self.occupancy
        style = self.get_component_rich_style
        label, gone = style("gauge--label"), style("gauge--evicted")
        total = max(1, o.sink_capacity + o.window_capacity)
        n_sink = max(round(width * o.sinks / total), 1 if o.sinks else 0)
        n_pin = max(round(width * o.pinned / total), 1 if o.pinned else 0)
        n_win = max(round(width * o.window / total), 1 if o.window else 0)
        bar = Text()
        for glyph, n, part in ((SINK, n_sink, "sink"), (PINNED, n_pin, "pinned"), (WINDOW, n_win, "window"),
                               (FREE, max(0, width - n_sink - n_pin - n_win), "free")):
            bar.append(glyph * n, style(f"gauge--{part}"))
        counters = [Text.assemble((f"{SINK} ", style("gauge--sink")), (f"sinks {o.sink_capacity}", label))]
        if o.pinned:
            counters.append(Text.assemble((f"{PINNED} ", style("gauge--pinned")), (f"pinned {o.pinned}", label)))
        counters += [Text.assemble((f"{WINDOW} ", style("gauge--window")),
                                   (f"window {o.window} of {o.window_capacity}", label)),
                     Text.assemble((f"{FREE} ", style("gauge--free")), ("free", label)),
                     Text(f"seen {o.seen}", label), Text(f"forgotten {o.evicted}", gone if o.evicted else label)]
        if o.recall_capacity:
            counters.append(Text(f"recalled {len(o.recall)} of {o.memory_blocks} blocks", label))
        lines = [bar, *flow(counters, Text(" · ", label), width)]
        if self.details:
            for note in o.notes():
                lines += flow(words(Text.assemble(("◐ ", label), (note, label))), Text(" "), width)
            if streaming := self.streaming():
                lines += flow(words(Text.assemble(("⇶ ", gone), (streaming, label))), Text(" "), width)
            spans = self.span_lines()
            if not spans:
                lines += flow(words(Text("nothing forgotten yet" + self.unread(), label)), Text(" "), width)
            if len(spans) > self.MAX_SPANS:
                lines.append(Text(f"… {len(spans) - self.MAX_SPANS} older forgotten span(s)", label))
            for span in spans[-self.MAX_SPANS:]:
                lines += flow(words(Text.assemble(("✂ forgot ", gone), span)), Text(" "), width)
            recalled = self.recall_lines()
            for line in recalled[: self.MAX_SPANS]:
                lines += flow(words(Text.assemble(("↺ recalled ", label), line)), Text(" "), width)
            if len(recalled) > self.MAX_SPANS:  # the counter above counts them all: say where the rest went
                lines.append(Text(f"… {len(recalled) - self.MAX_SPANS} more recalled span(s), chosen by fewer layers",
                                  label))
        return lines


def words(text: Text) -> list[Text]:
    """``text`` cut at its spaces (styles kept), for :func:`flow`."""
    return [word for word in text.split(" ") if word.plain]


def flow(units: list[Text], sep: Text, width: int, indent: str = "  ") -> list[Text]:
    """``units`` joined by ``sep`` into lines of at most ``width`` cells, broken only between units;
    lines after the first are indented. A unit wider than a line gets a line of its own."""
    lines = [Text()]
    for unit in units:
        line = lines[-1]
        if line.plain.strip() and line.cell_len + sep.cell_len + unit.cell_len > width:
            lines.append(line := Text(indent))
        elif line.plain.strip():
            line.append_text(sep)
        line.append_text(unit)
    return lines
