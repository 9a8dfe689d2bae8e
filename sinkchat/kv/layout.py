"""Where the sink cache's tokens sit, as plain data, and what an eviction does to it (no torch).

The cache's slots hold, in order: the attention sinks, the *parked* region (pinned tokens the
window has moved past), and the rolling window. Parked tokens are described by runs
``(t0, t1, p0)``: conversation tokens ``t0..t1-1`` whose pristine keys were computed at RoPE
positions ``p0, p0+1, ...``; the cache re-rotates those keys to sit right after the sinks, so the
held tokens always occupy contiguous positions (the way StreamingLLM treats the sinks, extended to
pinned tokens).

:func:`plan_eviction` decides what leaves: parked tokens that are no longer pinned, then the
window's oldest tokens until enough room is free, moving pinned ones into the parked region
instead of evicting them; with a ``cut`` (``--evict turns``) the window's new start is moved on
to the next point the caller allows (where a turn opens).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..ledger import Span, clip, gaps, merge_spans

Run = tuple[int, int, int]  # conversation tokens [t0, t1) whose saved keys sit at RoPE positions p0, p0+1, ...


def run_tokens(runs: list[Run]) -> int:
    return sum(t1 - t0 for t0, t1, _ in runs)


def run_spans(runs: list[Run]) -> list[Span]:
    return merge_spans([(t0, t1) for t0, t1, _ in runs])


def run_positions(runs: list[Run]) -> list[int]:
    """The RoPE position of each slot's saved key, slot by slot."""
    return [p for t0, t1, p0 in runs for p in range(p0, p0 + t1 - t0)]


def select(runs: list[Run], spans: list[Span]) -> tuple[list[Run], list[int]]:
    """The parts of ``runs`` inside sorted, disjoint ``spans``, and the slot index of each of their tokens."""
    out: list[Run] = []
    slots: list[int] = []
    first = 0
    for t0, t1, p0 in runs:
        for a, b in clip(spans, t0, t1):
            out.append((a, b, p0 + a - t0))
            slots.extend(range(first + a - t0, first + b - t0))
        first += t1 - t0
    return out, slots


def runs_of(tokens: list[int], positions: list[int]) -> list[Run]:
    """Tokens and their positions, slot by slot, grouped back into runs."""
    runs: list[Run] = []
    for t, p in zip(tokens, positions):
        if runs and runs[-1][1] == t and runs[-1][2] + t - runs[-1][0] == p:
            runs[-1] = (runs[-1][0], t + 1, runs[-1][2])
        else:
            runs.append((t, t + 1, p))
    return runs


@dataclass(frozen=True)
class Eviction:
    """One eviction's plan: what stays parked, what joins it, where the window starts, what leaves."""

    parked: list[Run]  # the parked region afterwards
    keep: list[int]  # slots of the old parked region that stay (in order)
    dropped: list[Run]  # parked runs that leave (unpinned since they were parked)
    dropped_slots: list[int]
    moved: list[Span]  # window tokens that join the parked region (pinned)
    window_start: int
    window_evicted: list[Span]  # the window's oldest tokens that leave (not merged with ``dropped``)
    evicted: list[Span]  # conversation spans that leave the cache, in order


def advance(pins: list[Span], start: int, end: int, count: int) -> int:
    """The first token ``t`` with ``count`` unpinned tokens in ``[start, t)``; ``end`` if there are fewer."""
    for a, b in gaps(pins, start, end):
        if b - a >= count:
            return a + count
        count -= b - a
    return end


def plan_eviction(parked: list[Run], pins: list[Span], start: int, seen: int, base: int, need: int, want: int,
                  cut: Callable[[int], int | None] | None = None) -> Eviction:
    """Free at least ``need`` slots (``want`` if the window has that many unpinned tokens).

    ``start``/``seen``: the window is conversation tokens ``[start, seen)``; ``base``: its token
    ``t`` sits at RoPE position ``t - base``. ``cut(t)``: the first token at or after ``t`` where the
    window may start, or None (the window then starts mid-message: a message longer than the
    window streams through). Raises ValueError if pinned tokens leave fewer than ``need`` to evict.
    """
    kept, keep = select(parked, pins)
    lo = parked[0][0] if parked else 0
    hi = parked[-1][1] if parked else 0
    dropped, dropped_slots = select(parked, gaps(pins, lo, hi))
    freed = len(dropped_slots)
    end = start
    if want > freed:
        end = advance(pins, start, seen, want - freed)
        at = cut(end) if cut is not None else None
        if at is not None and end <= at <= seen:
            end = at
    window_evicted = gaps(pins, start, end)
    if freed + sum(b - a for a, b in window_evicted) < need:
        raise ValueError("pinned tokens leave no room in the window")
    moved = clip(pins, start, end)
    evicted = merge_spans(sorted(run_spans(dropped) + window_evicted))
    parked_after = kept + [(a, b, a - base) for a, b in moved]
    return Eviction(parked_after, keep, dropped, dropped_slots, moved, end, window_evicted, evicted)
