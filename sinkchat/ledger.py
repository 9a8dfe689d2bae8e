"""What the cache remembers of each message, computed from the engine's ledger.

The cache's eviction spans and the messages' token ranges are the source of truth; the TUI's gauge
and transcript and the chat exports only draw what these functions return, so they can never
disagree with the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

from .cache import Occupancy, Span, merge_spans
from .engine import Message


@dataclass(frozen=True)
class Memory:
    """How much of one message ``[start, end)`` left the cache; ``cut`` is the first kept token after an evicted run."""

    tokens: int
    evicted: int
    cut: int | None  # conversation token where the kept part begins, if the message is partly evicted

    @property
    def forgotten(self) -> bool:
        return self.tokens > 0 and self.evicted == self.tokens

    @property
    def partly(self) -> bool:
        return 0 < self.evicted < self.tokens


def overlap(a: Span, b: Span) -> int:
    return max(0, min(a[1], b[1]) - max(a[0], b[0]))


def clip(spans: list[Span], start: int, end: int) -> list[Span]:
    """The parts of eviction ``spans`` that fall inside ``[start, end)``."""
    return [(max(a, start), min(b, end)) for a, b in spans if a < end and b > start]


def memory(message: Message, spans: list[Span]) -> Memory:
    """Evicted tokens of ``message`` given merged eviction ``spans``."""
    parts = clip(spans, message.start, message.end)
    evicted = sum(b - a for a, b in parts)
    cut = None
    if 0 < evicted < message.end - message.start:
        ends = [b for _, b in parts if b < message.end]
        cut = max(ends) if ends else None
    return Memory(message.end - message.start, evicted, cut)


def covered(span: Span, messages: list[Message]) -> list[int]:
    """Indices of the messages that ``span`` touches."""
    return [i for i, m in enumerate(messages) if overlap(span, (m.start, m.end))]


def describe_span(span: Span, messages: list[Message]) -> str:
    """``[4, 120) 116 tokens: #1-#3 all, #4 assistant 37/52`` (runs of whole messages condensed)."""
    parts: list[str] = []
    run: list[int] = []  # consecutive messages the span covers completely

    def close_run() -> None:
        if run:
            parts.append(f"#{run[0] + 1} {messages[run[0]].role} all" if len(run) == 1
                         else f"#{run[0] + 1}-#{run[-1] + 1} all")
            run.clear()

    for i in covered(span, messages):
        m = messages[i]
        n = overlap(span, (m.start, m.end))
        if n == m.end - m.start:
            run.append(i)
        else:
            close_run()
            parts.append(f"#{i + 1} {m.role} {n}/{m.end - m.start}")
    close_run()
    a, b = span
    return f"[{a}, {b}) {b - a} tokens: " + (", ".join(parts) or "no message")


def spans(occupancy: Occupancy) -> list[Span]:
    return merge_spans(occupancy.spans)
