"""The conversation's bookkeeping, as plain data: messages and their token ranges, eviction spans,
cache occupancy, and what the cache still holds of each message.

The engine's eviction spans and the messages' token ranges are the source of truth; the TUI's gauge
and transcript, plain mode and the chat exports only draw what these functions return, so they can
never disagree with the engine. No torch here: the store and ``sinkchat chats`` read this without
loading a model.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field

Span = tuple[int, int]  # conversation tokens [start, end)
ROLE_NAME = {"user": "you", "assistant": "model", "system": "system"}  # as the transcript labels them
# why a message is not whole (Message.note), as the transcript, `chats show` and exports label it
NOTE_LABEL = {"stopped": "stopped", "length": "max tokens", "error": "error", "queued": "queued"}
PARTIAL = "partial:"  # the note of a message the model read only part of, then its length in tokens
PINNED = "▒"  # the gauge's glyph for pinned tokens, beside a pinned message's label too


@dataclass(frozen=True)
class Message:
    """One message and the conversation-token range ``[start, end)`` its turn occupies.

    ``note`` says why a reply ended early: ``"stopped"``, ``"length"`` (max_new_tokens) or ``""``.
    A value: the engine replaces the message it is writing, so a copy of the chat (a save, the
    screen) shares the others instead of copying thousands of them at every turn.
    """

    role: str
    content: str
    start: int
    end: int
    note: str = ""

    def row(self) -> list:
        """The message as a list (the note only when there is one, so older saves keep their checksums)."""
        return [self.role, self.content, self.start, self.end] + ([self.note] if self.note else [])


@dataclass
class ChatState:
    """A chat apart from its KV tensors: every token, the messages, the cache's counters
    (``SinkCache.state`` meta, plus the chat's ``revision``) and what the KV depends on
    (``Chat.fingerprint``).

    ``cuts``: ``(revision, token)`` for every rollback of this chat in memory: the ledger from
    ``token`` on was rewritten at that revision, so a store whose rows are of an older revision
    rewrites its rows from there (not saved; a resumed chat starts with none).
    """

    tokens: list[int]
    messages: list[Message]
    meta: dict
    fingerprint: dict
    cuts: list[tuple[int, int]] = field(default_factory=list, kw_only=True)

    def rewritten_from(self, revision: int) -> int | None:
        """The first ledger token rewritten since ``revision`` (None: the ledger only grew)."""
        return min((t for r, t in self.cuts if r > revision), default=None)


def state_problem(state: ChatState) -> str | None:
    """Why ``state`` cannot be a chat that sinkchat saved, or None: every number in a saved copy is
    checked (type and range) before anything uses it, so a crafted or damaged copy is refused."""
    tokens, meta, n = state.tokens, state.meta, len(state.tokens)
    if not all(type(t) is int and t >= 0 for t in tokens):
        return "a token id is not a non-negative integer"
    end = 0
    for m in state.messages:
        if not (isinstance(m.role, str) and isinstance(m.content, str) and isinstance(m.note, str)
                and type(m.start) is int and type(m.end) is int and m.start == end <= m.end <= n):
            return "the messages do not cover the tokens in order"
        end = m.end
    if end != n:
        return "the messages do not cover the tokens in order"
    if not n:
        return None
    keys = ("sinks", "window", "block", "n_sink", "n_win", "seen", "base")
    if not isinstance(meta, dict) or not all(type(meta.get(k)) is int for k in keys):
        return "the cache counters are missing"
    sinks, window, n_sink, n_win, seen = (meta[k] for k in ("sinks", "window", "n_sink", "n_win", "seen"))
    if not (0 <= n_sink <= sinks and 0 <= n_win <= window and 1 <= meta["block"] <= window
            and seen == n and n_sink + n_win <= seen and 0 <= meta["base"] <= seen):
        return "the cache counters are out of range"
    spans = meta.get("evictions")
    if not isinstance(spans, list) or not all(
        isinstance(s, (list, tuple)) and len(s) == 2 and all(type(x) is int for x in s)
        and n_sink <= s[0] < s[1] <= seen - n_win for s in spans
    ):
        return "the eviction spans are out of range"
    return None


@dataclass(frozen=True)
class Recalled:
    """A block of the memory the cache holds right now: its index (``#block + 1`` on screen), its
    conversation tokens, and how many of the model's global layers chose it for this turn."""

    block: int
    spans: tuple[Span, ...]
    layers: int


@dataclass(frozen=True)
class Occupancy:
    """What the cache holds right now, in conversation tokens; ``spans`` are the evicted ranges."""

    sinks: int
    window: int  # held tokens that are neither sinks nor pinned
    window_capacity: int  # room for pinned + window tokens
    sink_capacity: int
    seen: int
    evicted: int
    spans: tuple[Span, ...] = field(default_factory=tuple)
    pinned: int = 0  # pinned tokens the cache holds (never evicted), outside the sinks
    pin_capacity: int = 0  # the most tokens pins may hold (``--pin-max``)
    window_start: int = 0  # first conversation token of the rolling window
    local_window: int | None = None  # a hybrid model's sliding layers see only this many latest tokens
    learned_sinks: bool = False  # the model learned a sink logit per head: no sink tokens needed
    recalled: int = 0  # recall slots in use: tokens brought back from the memory for this turn
    recall_capacity: int = 0  # recall slots (``--recall``; 0: nothing is remembered)
    recall: tuple[Recalled, ...] = ()  # the blocks held in those slots, the most chosen first
    memory_blocks: int = 0  # blocks in the memory of what left the window
    recall_layers: int = 0  # the model's global layers (each chooses its own blocks)

    @property
    def held(self) -> int:
        return self.sinks + self.pinned + self.window

    def recalled_spans(self) -> list[Span]:
        """Every conversation token some global layer holds as recalled, as merged spans."""
        return merge_spans(sorted(s for r in self.recall for s in r.spans))

    def text(self) -> str:
        """One line, e.g. ``4 + 1873 / 2000 | seen 9120 | evicted 7243 [4, 7247)`` (with pins
        ``4 + 12 pinned + 1861 / 2000 | ...``; with a hybrid model's sliding layers ``... | sliding 512``;
        with tokens recalled from the memory ``... | recalled 3 blocks [400, 464) [900, 1028)``)."""
        spans = " ".join(f"[{a}, {b})" for a, b in merge_spans(self.spans)) or "none"
        pinned = f"{self.pinned} pinned + " if self.pinned else ""
        local = f" | sliding {self.local_window}" if self.local_window else ""
        recall = ""
        if self.recall:
            shown = " ".join(f"[{a}, {b})" for a, b in self.recalled_spans())
            recall = f" | recalled {len(self.recall)} block{'s' * (len(self.recall) != 1)} {shown}"
        return (
            f"{self.sinks} + {pinned}{self.window} / {self.window_capacity} | seen {self.seen} | "
            f"evicted {self.evicted} {spans}{local}{recall}"
        )

    def notes(self) -> list[str]:
        """What the numbers do not say about this model's geometry, one line each (for the gauge)."""
        notes = []
        if self.local_window:
            notes.append(f"the model's sliding-window layers see only its last {self.local_window} tokens, as it "
                         "was trained to; the window above is what its global layers see")
        if self.recall_capacity:
            notes.append(f"recall: {self.memory_blocks} blocks of forgotten tokens on disk; each user message brings "
                         f"back the {self.recall_capacity} tokens that best answer it, chosen per layer")
        if self.learned_sinks and not self.sink_capacity:
            notes.append("no sink tokens needed: this model learned its own attention sink (a logit per head)")
        return notes


def merge_spans(spans: tuple[Span, ...] | list[Span]) -> list[Span]:
    """Adjacent eviction blocks merged into the ranges a person reads."""
    merged: list[Span] = []
    for a, b in spans:
        if merged and merged[-1][1] == a:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return merged


def add_span(spans: list[Span], span: Span) -> None:
    """Insert ``span`` into sorted, disjoint ``spans`` in place, merging it with the ones it touches
    (O(1) when it extends the last one, as evictions mostly do; O(log n + k) elsewhere)."""
    a, b = span
    if a >= b:
        return
    if not spans or spans[-1][1] < a:
        spans.append(span)
        return
    if spans[-1][0] <= a:
        spans[-1] = (spans[-1][0], max(b, spans[-1][1]))
        return
    lo = bisect_left(spans, a, key=lambda s: s[1])  # the first span that ends at or after a
    hi = bisect_right(spans, b, key=lambda s: s[0])  # past the last span that starts at or before b
    if lo < hi:
        a, b = min(a, spans[lo][0]), max(b, spans[hi - 1][1])
    spans[lo:hi] = [(a, b)]


def subtract(spans: list[Span], start: int, end: int) -> list[Span]:
    """The parts of sorted, disjoint ``spans`` outside ``[start, end)``."""
    out: list[Span] = []
    for a, b in spans:
        if b <= start or a >= end:
            out.append((a, b))
            continue
        if a < start:
            out.append((a, start))
        if b > end:
            out.append((end, b))
    return out


def gaps(spans: list[Span], start: int, end: int) -> list[Span]:
    """The parts of ``[start, end)`` that sorted, disjoint ``spans`` do not cover."""
    out: list[Span] = []
    for a, b in clip(spans, start, end):
        if a > start:
            out.append((start, a))
        start = max(start, b)
    if start < end:
        out.append((start, end))
    return out


def covered_by(spans: list[Span], start: int, end: int) -> int:
    """How many tokens of ``[start, end)`` sorted, disjoint ``spans`` cover."""
    return sum(b - a for a, b in clip(spans, start, end))


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


def touching(span: Span, messages: list[Message]) -> range:
    """Indices of the messages that reach into ``span`` (and of empty ones on its edges): messages
    tile the conversation in order, so two binary searches find them, O(log n) however long the chat."""
    return range(bisect_right(messages, span[0], key=lambda m: m.end),
                 bisect_left(messages, span[1], key=lambda m: m.start))


def covered(span: Span, messages: list[Message]) -> list[int]:
    """Indices of the messages that share a token with ``span`` (O(log n + k))."""
    return [i for i in touching(span, messages) if overlap(span, (messages[i].start, messages[i].end))]


def streaming_through(occupancy: Occupancy, messages: list[Message]) -> str:
    """For ``--evict turns``: a line when the window starts inside a message, else ``""``. That
    happens when a turn does not fit the room the window has left beside its pinned tokens (a
    message longer than the window, or a question and reply longer than that room): eviction then
    goes token by token until the next turn opens."""
    o = occupancy
    if not o.evicted or o.window_start >= o.seen:
        return ""
    inside = [i for i in covered((o.window_start - 1, o.window_start + 1), messages)
              if messages[i].start < o.window_start < messages[i].end]
    if not inside:
        return ""
    return (f"{name(messages, inside[0])} did not fit the room left in the window: "
            "evicting it token by token until the next turn")


def forgotten_count(messages: list[Message], spans: list[Span], upto: int | None = None) -> int:
    """How many of ``messages[:upto]`` lie wholly inside the merged eviction ``spans`` (O(log n) a span)."""
    upto = len(messages) if upto is None else upto
    count = 0
    for a, b in spans:
        first = bisect_left(messages, a, hi=upto, key=lambda m: m.start)
        last = bisect_right(messages, b, hi=upto, key=lambda m: m.end)
        count += max(0, last - first)
    return count


def describe_span(span: Span, messages: list[Message]) -> str:
    """``tokens 4–119 (116): #1 system 15 of 19, #2–#3 whole, #4 model 37 of 52`` (inclusive token
    numbers; messages numbered and named as the transcript shows them; runs of whole messages condensed).

    Messages tile the conversation, so only the first and last messages the span touches can be
    partly inside it: O(log n) however many whole messages the span covers (the gauge draws this
    for the span of everything forgotten, at every step of a chat of thousands of turns)."""
    near = touching(span, messages)
    first, last = near.start, near.stop
    pieces: list[tuple[int, int, int | None]] = []  # (a, b, None): whole messages a..b-1; (i, i + 1, n)

    def add(a: int, b: int, n: int | None = None) -> None:
        while a < b and messages[a].start == messages[a].end:  # an empty message (a reply stopped at once)
            a += 1  # is named by no part of the line, but does not break a run of whole ones
        while b > a and messages[b - 1].start == messages[b - 1].end:
            b -= 1
        if b > a and n is None and pieces and pieces[-1][2] is None:  # extends a run of whole messages
            a = pieces.pop()[0]
        if b > a:
            pieces.append((a, b, n))

    for i in (first, last - 1) if last - 1 > first else (first,) if last > first else ():
        if i > first + 1:  # the messages between the two ends lie wholly inside the span
            add(first + 1, i)
        m = messages[i]
        n = overlap(span, (m.start, m.end))
        add(i, i + 1, None if n == m.end - m.start else n)
    parts = []
    for a, b, n in pieces:
        m = messages[a]
        parts.append(f"{name(messages, a)} whole" if n is None and b - a == 1 else f"#{a + 1}–#{b} whole"
                     if n is None else f"{name(messages, a)} {n} of {m.end - m.start}")
    a, b = span
    return f"tokens {a}–{b - 1} ({b - a}): " + (", ".join(parts) or "no message")


def spans(occupancy: Occupancy) -> list[Span]:
    return merge_spans(occupancy.spans)


def name(messages: list[Message], index: int) -> str:
    """``#3 model``: message ``index`` as the transcript numbers and names it."""
    role = messages[index].role
    return f"#{index + 1} {ROLE_NAME.get(role, role)}"


def partial(total: int) -> str:
    """The note of a message the model has read only part of (Esc or Ctrl+C while a long paste was
    read): ``partial:<its length in tokens>``; what it read is the message's token range."""
    return f"{PARTIAL}{total}"


def partial_of(note: str) -> int | None:
    """The length in tokens of a message the model read only part of (its :func:`partial` note), else None."""
    total = note.removeprefix(PARTIAL)
    return int(total) if note.startswith(PARTIAL) and total.isascii() and total.isdigit() else None


def note_label(note: str, read: int | None = None) -> str:
    """``note`` in the words every front end uses; ``read``: the message's tokens (its range), for a
    message the model read only part of."""
    total = partial_of(note)
    if total is not None:
        got = f"{read} of its {total}" if read is not None else f"part of its {total}"
        return f"stopped: the model read {got} tokens"
    return NOTE_LABEL.get(note, note)


def is_pinned(message: Message, pins: list[Span], sinks: int) -> bool:
    """Whether every token of ``message`` past the sink region is in ``pins`` (and it has such tokens)."""
    start = max(message.start, sinks)
    return start < message.end and covered_by(pins, start, message.end) == message.end - start


def label(index: int, role: str, note: str, mem: Memory | None, pinned: bool = False,
          kept_from: tuple[str, int] | None = None, recalled: int = 0) -> str:
    """A message's one-line label as the transcript shows it, and ``chats show`` and exports print it:
    ``#5 you  [stopped]  ▒ pinned: the model keeps it  ✂ 12 of 40 tokens forgotten, kept from “…”``
    (with ``recalled``, tokens of it brought back from the memory now: ``↺ 32 recalled for this turn``).

    ``mem``: what the cache holds of it (None: not known yet); ``kept_from``: the words and paragraph
    where its kept part begins (:meth:`Chat.kept_from`; None without a tokenizer)."""
    parts = [f"#{index + 1} {ROLE_NAME.get(role, role)}"]
    if note:
        parts.append(f"[{note_label(note, mem.tokens if mem is not None else None)}]")
    if pinned:
        parts.append(f"{PINNED} pinned: the model keeps it")
    if mem is not None and mem.forgotten:
        parts.append(f"⊘ forgotten: the model no longer holds any of its {mem.tokens} tokens")
    elif mem is not None and mem.partly:
        where = ""
        if kept_from is not None:
            words, paragraph = kept_from
            where = f", kept from “{words}…”" + (f" (paragraph {paragraph})" if paragraph > 1 else "")
        elif mem.cut is None:  # the evicted run ends the message: its start is what stays (the sinks)
            where = f", its first {mem.tokens - mem.evicted} stay as attention sinks"
        parts.append(f"✂ {mem.evicted} of {mem.tokens} tokens forgotten{where}")
    if recalled:
        parts.append(f"↺ {recalled} recalled for this turn")
    return "  ".join(parts)
