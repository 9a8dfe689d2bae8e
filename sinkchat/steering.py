"""What the user steers of a chat's memory: pinned messages, taking back the last turn, and
re-prefilling the cache from the ledger. Part of :class:`~sinkchat.engine.Chat` (a base class, so
the engine module stays about chatting).

* **Pins.** A message the cache still holds whole can be pinned: its tokens are never evicted
  (:meth:`SinkCache.pin`), within a budget of ``--pin-max`` tokens. ``--keep-system`` pins the
  system prompt.
* **Rollback.** :meth:`Steering.rollback` removes the last user message and its reply from the
  ledger and brings the cache back to just before them: exactly, from the checkpoint the cache took
  when that turn began (:mod:`.rewind`); otherwise (a chat saved by an older sinkchat, or restored by
  re-prefilling) by keeping what the cache holds before the turn, or re-prefilling it from the ledger.
* **Rebuild.** The K/V is a derived cache of the ledger: :meth:`Steering.rebuild` re-prefills the
  sinks, the parked pinned tokens and the window, at contiguous positions.
"""

from __future__ import annotations

from bisect import bisect_left

import torch

from .errors import SinkchatError
from .kv.layout import run_spans
from .ledger import Message, Span, clip, covered, covered_by, gaps, is_pinned, memory, name
from .model import forward


class Steering:
    """Pins, rollback and rebuild; mixed into :class:`~sinkchat.engine.Chat`, whose attributes it uses."""

    # -- pins ----------------------------------------------------------------------------------

    def pinnable(self, index: int) -> Message:
        """``messages[index]``, or :class:`SinkchatError` saying in one line why it cannot be (un)pinned."""
        messages = self.messages
        if not 0 <= index < len(messages):
            raise SinkchatError(f"there is no message #{index + 1}" + (f" (the chat has #1–#{len(messages)})"
                                                                         if messages else " yet"))
        return messages[index]

    def is_pinned(self, message: Message) -> bool:
        """Whether every token of ``message`` past the sink region is pinned (and it has such tokens)."""
        return is_pinned(message, self.cache.pins, self.cache.sinks)

    def pin(self, index: int) -> str:
        """Never evict message ``index`` (0-based: the transcript's ``#index+1``); returns a one-line
        confirmation. Raises :class:`SinkchatError` with a one-line refusal: no such message, not
        wholly in the cache any more, already pinned or kept as sinks, or over the ``--pin-max`` budget."""
        m = self.pinnable(index)
        label, cache = name(self.messages, index), self.cache
        start = max(m.start, cache.sinks)
        if start >= m.end:
            raise SinkchatError(f"{label} is kept whole as attention sinks already")
        if self.is_pinned(m):
            raise SinkchatError(f"{label} is pinned already")
        gone = memory(m, cache.evictions).evicted
        if gone:
            raise SinkchatError(f"cannot pin {label}: {gone} of its {m.end - m.start} tokens are forgotten already; "
                                "only a message the model still holds whole can be pinned")
        new = m.end - start - covered_by(cache.pins, start, m.end)
        total = cache.pinned_count() + new
        if total > cache.pin_max:
            raise SinkchatError(f"cannot pin {label}: its {new} tokens would make {total} pinned, over the budget of "
                                f"{cache.pin_max} (--pin-max); unpin something first")
        cache.pin(start, m.end)
        self.revision += 1
        return f"pinned {label} ({new} tokens; {total} of {cache.pin_max} pinned): the model keeps it"

    def unpin(self, index: int) -> str:
        """Let message ``index`` be evicted again (at the next eviction); returns a one-line confirmation.
        Raises :class:`SinkchatError` if it is not pinned."""
        m = self.pinnable(index)
        label = name(self.messages, index)
        if not self.cache.unpin(m.start, m.end):
            raise SinkchatError(f"{label} is not pinned")
        self.revision += 1
        return f"unpinned {label}: the model may forget it from the next eviction on"

    def fit_pins(self) -> list[str]:
        """Unpin the newest pinned messages until the pins fit ``--pin-max`` (a chat resumed with a
        smaller budget than it was pinned under); returns a one-line notice for each, or ``[]``."""
        cache, notices = self.cache, []
        if cache.pinned_count() <= cache.pin_max:
            return notices
        for index in reversed(self.pinned_messages()):
            if cache.pinned_count() <= cache.pin_max:
                break
            m = self.messages[index]
            cache.unpin(m.start, m.end)
            notices.append(self._over_budget(index))
        if cache.pinned_count() > cache.pin_max:  # a pin on part of a message only (not made by sinkchat)
            cache.pins = []
            notices.append(f"unpinned everything: the pins held more than --pin-max {cache.pin_max} tokens")
        self.revision += 1
        return notices

    def _over_budget(self, index: int) -> str:
        """The notice for message ``index``, unpinned because the pins held more than ``--pin-max``."""
        return (f"unpinned {name(self.messages, index)}: the pins held more than --pin-max {self.cache.pin_max} "
                "tokens; the model may forget it from the next eviction on")

    def pinned_messages(self) -> list[int]:
        """Indices of the pinned messages, oldest first (O(log n) per pinned span)."""
        found: list[int] = []
        for span in self.cache.pins:
            for i in covered(span, self.messages):
                if self.is_pinned(self.messages[i]) and found[-1:] != [i]:
                    found.append(i)
        return found

    # -- taking back the last turn --------------------------------------------------------------

    def last_user(self) -> int:
        """Index of the last user message; :class:`SinkchatError` when there is none yet."""
        for i in range(len(self.messages) - 1, -1, -1):
            if self.messages[i].role == "user":
                return i
        raise SinkchatError("there is no turn to take back yet")

    def rollback(self) -> str | None:
        """Remove the last user message and everything after it, and bring the cache back to just
        before it. Returns a notice when the cache could not be restored exactly (then it keeps
        what it holds before the turn, or is re-prefilled from the ledger), or when pins went with
        the removed messages: a pinned reply's pin goes (a new reply replaces it); a pinned user
        message is pinned again when the next :meth:`submit` sends it (regenerated or edited)."""
        index = self.last_user()
        start = self.messages[index].start
        pinned = [i for i in self.pinned_messages() if i >= index]
        self.taken_back = index in pinned
        gone = [f"unpinned {name(self.messages, i)}: a new reply replaces it" for i in pinned if i != index]
        cache = self.cache
        notice = None
        checkpoint = cache.checkpoint
        if not (checkpoint is not None and checkpoint.seen == start and cache.rewind()):
            notice = self._fallback(start)
        del self.tokens[start:]
        del self.messages[index:]
        self.revision += 1
        self.cuts.append((self.revision, start))
        return "; ".join(([notice] if notice else []) + gone) or None

    def _fallback(self, start: int) -> str | None:
        """Without a checkpoint: cut the turn off the end when the cache holds the tokens before it as
        they were computed and at least as many as a rebuild would (the turn evicted none of them);
        otherwise re-prefill from the ledger, with a notice."""
        cache = self.cache
        pins = clip(cache.pins, 0, start)
        layout = self._fit(start, pins)  # (keeps the pins that fit the budget in ``pins``)
        held_from = cache.seen - cache.n_win  # the first window token
        if (cache.n_sink <= start and held_from <= min(start, layout[2]) and cache.local_covers(start)
                and all(b <= start for _, b in run_spans(cache.parked))):
            cache.truncate(start)
            return None
        self._refill(*layout, start, pins=pins)
        return ("the cache was rebuilt from the chat's text for this turn (its state before the turn was not "
                "kept), so the reply may differ from the first")

    def pin_sent(self, asked: bool) -> tuple[str, bool] | None:
        """After a user message was fed: pin it if it was sent pinned (``asked``) or re-sends a pinned
        message that :meth:`rollback` took back (regenerate or edit keep the pin). Pinning changes
        no K/V, and the first reply was generated before any pin on its message could be made, so a
        greedy regenerated reply stays the same. Returns ``(line, refused)`` to tell the user (a
        re-pin that works needs no word), or None."""
        again, self.taken_back = self.taken_back, False
        if not (asked or again):
            return None
        index = len(self.messages) - 1
        try:
            if self.messages[index].note:
                raise SinkchatError(f"the model read only part of {name(self.messages, index)}")
            line = self.pin(index)
        except SinkchatError as exc:
            return f"not pinned: {exc}", True
        return (line, False) if asked else None

    # -- rebuilding the cache from the ledger ---------------------------------------------------

    def rebuild(self, meta: dict | None = None) -> list[str]:
        """Re-prefill the ledger's sink, parked and window tokens through a cleared cache.

        They go in at contiguous positions: sinks at ``0..S-1``, parked tokens after them, the
        window after those. RoPE scores depend only on query-key distance, so this is the saved
        layout (the cache keeps it contiguous anyway). With the saved geometry (``meta``) the
        held ranges are the saved ones; otherwise the first ``sinks`` tokens, the saved pins that
        fit ``--pin-max``, and the most recent tokens (the window less a block, if anything is
        evicted) are held. Returns a one-line notice for each pinned message that does not fit
        ``--pin-max`` here and so is no longer pinned, or ``[]``.
        """
        cache, seen = self.cache, len(self.tokens)
        pins = [tuple(s) for s in (meta or {}).get("pins", [])]
        before = [tuple(s) for s in (meta or {}).get("evictions", [])]  # what the saved memory should hold
        if meta and (meta["sinks"], meta["window"]) == (cache.sinks, cache.window) and meta["seen"] == seen:
            parked = run_spans([tuple(r) for r in meta.get("parked", [])])
            self._refill(meta["n_sink"], parked, seen - meta["n_win"], seen, before, pins, before)
            return []
        asked = clip(pins, cache.sinks, seen)
        self._refill(*self._fit(seen, pins), seen, pins=pins, before=before)
        dropped = [span for span in asked if span not in pins]  # whole spans: _fit keeps or drops each
        gone = sorted({i for span in dropped for i in covered(span, self.messages)})
        return [self._over_budget(i) for i in gone]

    def _fit(self, end: int, pins: list[Span]) -> tuple[int, list[Span], int]:
        """A layout holding tokens before ``end`` in this geometry: ``(n_sink, parked spans, window start)``."""
        cache = self.cache
        n_sink = min(cache.sinks, end)
        kept, total = [], 0
        for a, b in clip(pins, cache.sinks, end):  # the oldest pins first, while they fit the budget
            if total + b - a <= cache.pin_max:
                kept.append((a, b))
                total += b - a
        pins[:] = kept
        room = cache.window - total - (cache.block if end - n_sink > cache.window else 0)
        start = end
        for a, b in reversed(gaps(kept, n_sink, end)):  # back from the end over unpinned tokens
            take = min(room, b - a)
            start, room = b - take, room - take
            if room == 0:
                break
        if room or start <= n_sink:
            start = n_sink
        elif self.settings.evict == "turns":
            cut = self._cut(start)
            start = cut if cut is not None and cut < end else start
        return n_sink, clip(kept, n_sink, start), start

    @torch.inference_mode()
    def _refill(self, n_sink: int, parked: list[Span], start: int, end: int,
                evictions: list[Span] | None = None, pins: list[Span] = (), before: list[Span] | None = None) -> None:
        """Clear the cache and feed tokens ``[0, n_sink)``, the ``parked`` spans and ``[start, end)``
        (:meth:`SinkCache.refill`: with a block memory, what it lacks is fed from its first token on;
        ``before``: the spans evicted before, default the cache's ledger now)."""
        if evictions is None:
            evictions = gaps(parked, n_sink, start)
        turns = self.settings.evict == "turns"
        cut = (lambda t: c if (c := self._cut(t)) is not None and c < end else None) if turns else None
        tokens = self.tokens
        feed = lambda held, positions: forward(self.model, self.cache, [tokens[t] for t in held], positions)  # noqa: E731
        self.cache.refill(feed, self.chunk, n_sink, parked, start, end, evictions, list(pins), before, cut)

    # -- --evict turns ---------------------------------------------------------------------------

    def _cut(self, t: int) -> int | None:
        """The first token at or after ``t`` where a user turn opens (its tokens carry the chat
        template's opening of the turn; the message being prefilled counts), or None when no turn
        opens there yet."""
        messages = self.messages
        i = bisect_left(messages, t, key=lambda m: m.start)
        while i < len(messages) and messages[i].role != "user":
            i += 1
        return messages[i].start if i < len(messages) else None
