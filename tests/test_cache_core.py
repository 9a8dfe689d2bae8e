"""The cache core without a model: SinkCache, its SinkLayers, the eviction layout and the rewind
checkpoint, driven by hypothesis with random keys and values against a plain reference.

The reference knows nothing of slots, runs or parked regions: it keeps the sorted list of the
conversation tokens the cache should hold (the first ``sinks``, every pinned token it still holds,
and the window from its start), and evicts by the rules the README states: when a chunk does not
fit, every parked token no longer pinned leaves, then the window's oldest unpinned tokens until
``max(needed, block)`` left (with a ``cut``, on to where the caller allows the window to start).
Held token ``i`` in that order must sit in slot ``i``, its value as written and its key the same
random key rotated to one contiguous run of positions ending right before the next token's, so
attention sees sinks, pinned tokens and window as one unbroken sequence, however often the cache
evicted, re-rotated, rebased, rewound or was saved and loaded.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from sinkchat.kv import SinkCache
from sinkchat.kv.layer import rotate
from sinkchat.ledger import merge_spans

HEADS, DIM = 2, 8
# per layer: the rotary frequencies (the second layer rotates only half its dims, as partial-rotary
# models do, at another base, as models with per-layer RoPE do)
INV_FREQS = [1.0 / (10000 ** (torch.arange(0, DIM, 2, dtype=torch.float32) / DIM)),
             1.0 / (1000 ** (torch.arange(0, DIM // 2, 2, dtype=torch.float32) / (DIM // 2)))]


def spans_of(tokens) -> list[tuple[int, int]]:
    return merge_spans([(t, t + 1) for t in sorted(tokens)])


class Reference:
    """Which conversation tokens a sink cache holds, in slot order, computed the plain way."""

    def __init__(self, sinks: int, window: int, block: int, pin_max: int):
        self.sinks, self.window, self.block, self.pin_max = sinks, window, block, pin_max
        self.held: list[int] = []
        self.seen = self.start = 0  # tokens fed; the window's first token
        self.pins: set[int] = set()
        self.evicted: set[int] = set()

    def copy(self) -> "Reference":
        other = Reference(self.sinks, self.window, self.block, self.pin_max)
        other.held, other.seen, other.start = list(self.held), self.seen, self.start
        other.pins, other.evicted = set(self.pins), set(self.evicted)
        return other

    @property
    def n_sink(self) -> int:
        return min(self.seen, self.sinks)

    def fits(self, n: int) -> bool:
        to_sink = min(n, self.sinks - self.n_sink) if self.seen < self.sinks else 0
        return n - to_sink <= self.window - len(self.pins)

    def feed(self, n: int, cut=None) -> None:
        to_sink = min(n, self.sinks - self.n_sink) if self.seen < self.sinks else 0
        overflow = len(self.held) - self.n_sink + (n - to_sink) - self.window
        if overflow > 0:
            want = max(overflow, self.block)
            dropped = [t for t in self.held if self.n_sink <= t < self.start and t not in self.pins]
            end, count = self.start, want - len(dropped)
            while count > 0 and end < self.seen:  # just past the count-th unpinned window token
                count -= end not in self.pins
                end += 1
            if want > len(dropped) and cut is not None:
                at = cut(end)
                end = at if at is not None and end <= at <= self.seen else end
            gone = set(dropped) | {t for t in range(self.start, end) if t not in self.pins}
            self.held = [t for t in self.held if t not in gone]
            self.evicted |= gone
            self.start = end
        self.held += range(self.seen, self.seen + n)
        self.seen += n
        self.start = max(self.start, self.n_sink)  # the window begins after the sinks

    def pin(self, a: int, b: int) -> bool:
        """What SinkCache.pin should do; False where it must refuse."""
        a = max(a, self.sinks)
        if a >= b:
            return True
        if not set(range(a, b)) <= set(self.held) or len(self.pins | set(range(a, b))) > self.pin_max:
            return False
        self.pins |= set(range(a, b))
        return True


class CacheMachine(RuleBasedStateMachine):
    dtype = torch.float32
    tolerance = 1e-4
    windows_between_rebases = 0  # float32 keys: a rebase as often as every token (max_positions = sinks + window)

    @initialize(sinks=st.integers(0, 4), window=st.integers(4, 20), block=st.integers(1, 8),
                pin_share=st.integers(0, 2), spare=st.integers(0, 40), turns=st.booleans())
    def setup(self, sinks, window, block, pin_share, spare, turns):
        pin_max = window * pin_share // 4  # --pin-max is at most half the window
        spare += window * self.windows_between_rebases
        self.cache = SinkCache(INV_FREQS, sinks, window, block, max_positions=sinks + window + spare,
                               pin_max=pin_max, dtype=self.dtype)
        self.ref = Reference(sinks, window, self.cache.block, pin_max)
        self.keys: list[list[torch.Tensor]] = [[] for _ in INV_FREQS]  # per layer, per token: its key before RoPE
        self.values: list[list[torch.Tensor]] = [[] for _ in INV_FREQS]
        self.first = 0  # RoPE position of slot 0 (None: learnt at the next feed)
        self.turns, self.starts = turns, []  # with turns, the window may start only where a "turn" opens
        self.marked = None
        self.generator = torch.Generator().manual_seed(sinks * 1000 + window * 10 + block)

    def cut(self, t: int) -> int | None:
        return next((s for s in self.starts if s >= t), None)

    # -- rules ---------------------------------------------------------------------------------

    @rule(n=st.integers(1, 12), opens_turn=st.booleans())
    @torch.inference_mode()  # as the engine runs every forward (the buffers are inference tensors then)
    def feed(self, n, opens_turn):
        ref = self.ref
        if not ref.fits(n):
            before = self.cache.state()[1]
            try:
                self.cache.reserve(n)
            except ValueError:
                assert self.cache.state()[1] == before  # refused before anything changed
                return
            raise AssertionError(f"a chunk of {n} was taken beside {len(ref.pins)} pinned tokens")
        if opens_turn or not self.starts:
            self.starts.append(ref.seen)
        cut = self.cut if self.turns else None
        base = self.cache.base
        positions, spans = self.cache.reserve(n, cut)
        event("evicted" if spans else "no eviction")
        event("rebased" if self.cache.base != base else "not rebased")
        if self.cache.n_pin:
            event("pinned tokens parked")
        evicted_before = set(ref.evicted)
        ref.feed(n, cut)
        assert merge_spans(sorted(spans)) == spans_of(ref.evicted - evicted_before)  # what reserve says it evicted
        positions = positions[0].to(torch.float64)
        assert torch.equal(positions, positions[0] + torch.arange(n, dtype=torch.float64))
        self.first = int(positions[0]) - (len(ref.held) - n)  # the new tokens continue the held run
        for i, (layer, inv_freq) in enumerate(zip(self.cache.layers, INV_FREQS)):
            raw = torch.randn(1, HEADS, n, DIM, generator=self.generator)
            value = torch.randn(1, HEADS, n, DIM, generator=self.generator)
            layer.write(rotate(raw, positions, inv_freq), value)  # as a model's attention writes them
            self.keys[i] += list(raw.unbind(-2))
            self.values[i] += list(value.unbind(-2))

    @rule(n=st.integers(1, 4))
    def decode(self, n):
        """Token after token, as a reply is generated (most of what a cache sees)."""
        for _ in range(n):
            self.feed(1, False)

    @rule(data=st.data())
    def pin(self, data):
        ref = self.ref
        a = data.draw(st.integers(0, max(0, ref.seen - 1)))
        b = data.draw(st.integers(a + 1, max(a + 1, min(ref.seen, a + 8))))
        try:
            self.cache.pin(a, b)
            done = True
        except ValueError:
            done = False
        assert done == ref.pin(a, b)

    @rule(data=st.data())
    def unpin(self, data):
        ref = self.ref
        a = data.draw(st.integers(0, max(0, ref.seen - 1)))
        b = data.draw(st.integers(a + 1, a + 8))
        assert self.cache.unpin(a, b) == len(ref.pins & set(range(a, b)))
        ref.pins -= set(range(a, b))

    @precondition(lambda self: self.ref.seen > 0)
    @rule(data=st.data())
    def truncate(self, data):
        """Cut the newest tokens off the window (a turn taken back without a checkpoint)."""
        ref = self.ref
        parked = [t for t in ref.held if ref.n_sink <= t < ref.start]
        end = data.draw(st.integers(max([ref.start, ref.n_sink, *(t + 1 for t in parked)]), ref.seen))
        self.cache.truncate(end)
        ref.held = [t for t in ref.held if t < end]
        ref.pins = {t for t in ref.pins if t < end}
        ref.seen = end
        for i in range(len(INV_FREQS)):
            del self.keys[i][end:], self.values[i][end:]
        self.marked = None  # a truncation ends the checkpoint

    @rule()
    def mark(self):
        self.cache.mark()
        self.marked = (self.ref.copy(), self._slots(), self.first, list(self.starts))

    @precondition(lambda self: self.marked is not None)
    @rule()
    def rewind(self):
        ref, slots, first, starts = self.marked
        pins = {t for t in self.ref.pins if t < ref.seen}  # pins on tokens after the mark go with them
        event("rewound across an eviction" if self.ref.evicted != ref.evicted else "rewound")
        assert self.cache.rewind()
        self.ref, self.first, self.starts = ref.copy(), first, list(starts)
        self.ref.pins = pins
        for i in range(len(INV_FREQS)):
            del self.keys[i][ref.seen:], self.values[i][ref.seen:]
        for (k, v), (k0, v0) in zip(self._slots(), slots):
            assert torch.allclose(k, k0, atol=self.tolerance) and torch.equal(v, v0)

    @precondition(lambda self: self.ref.seen > 0)  # (a chat with no token restores no cache)
    @rule()
    def save_and_load(self):
        """What a save writes and a resume reads: a fresh cache continues where this one was."""
        tensors, meta = self.cache.state()
        cache = SinkCache(INV_FREQS, self.cache.sinks, self.cache.window, self.cache.block,
                          max_positions=self.cache.max_positions, pin_max=self.cache.pin_max, dtype=self.dtype)
        cache.load_state({k: t.clone() for k, t in tensors.items()}, meta)
        for (k, v), (k1, v1) in zip(self._slots(), self._slots(cache)):
            assert torch.equal(k, k1) and torch.equal(v, v1)
        self.cache = cache

    # -- what must hold after every step -------------------------------------------------------

    def _slots(self, cache: SinkCache | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        cache = cache or self.cache
        empty = torch.empty(1, HEADS, 0, DIM, dtype=self.dtype)
        return [(layer.keys[:, :, : layer.length].clone(), layer.values[:, :, : layer.length].clone())
                if layer.is_initialized else (empty, empty) for layer in cache.layers]

    @invariant()
    def counters_match_the_reference(self):
        ref, cache = self.ref, self.cache
        o = cache.occupancy()
        n_pin = sum(1 for t in ref.held if ref.n_sink <= t < ref.start)
        assert (o.sinks, o.seen, o.evicted, o.pinned) == (ref.n_sink, ref.seen, ref.seen - len(ref.held), len(ref.pins))
        assert o.window == len(ref.held) - ref.n_sink - len(ref.pins) and o.window_start == ref.start
        assert cache.n_pin == n_pin and cache.held() == spans_of(ref.held)
        assert cache.evictions == spans_of(ref.evicted) and cache.pins == spans_of(ref.pins)
        assert o.sinks + o.pinned + o.window <= cache.sinks + cache.window  # never more than it may hold

    @invariant()
    def each_held_token_sits_in_its_slot_at_contiguous_positions(self):
        if self.first is None or not self.ref.held:
            return
        held = self.ref.held
        positions = torch.arange(self.first, self.first + len(held), dtype=torch.float64)
        for i, (layer, inv_freq) in enumerate(zip(self.cache.layers, INV_FREQS)):
            assert layer.length == len(held)
            raw = torch.stack([self.keys[i][t] for t in held], dim=-2)
            expected = rotate(raw, positions, inv_freq).to(self.dtype)
            values = torch.stack([self.values[i][t] for t in held], dim=-2).to(self.dtype)
            assert torch.allclose(layer.keys[:, :, : len(held)].float(), expected.float(), atol=self.tolerance), i
            assert torch.equal(layer.values[:, :, : len(held)], values), i


class BFloat16CacheMachine(CacheMachine):
    """The same in bfloat16 buffers: sinks and pinned tokens re-rotated from float32 copies, so the
    error stays one rounding however many evictions (it never accumulates). A model's context is
    far longer than its window, so a window key is rotated by a rebase at most about once: here
    too (each rebase rounds the window keys to bfloat16 again)."""

    dtype = torch.bfloat16
    tolerance = 3e-2
    windows_between_rebases = 1


RUN = settings(max_examples=150, stateful_step_count=50, deadline=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestSinkCache = CacheMachine.TestCase
TestSinkCache.settings = RUN
TestSinkCacheInBFloat16 = BFloat16CacheMachine.TestCase
TestSinkCacheInBFloat16.settings = settings(RUN, max_examples=50)
