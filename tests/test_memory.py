"""The block memory's bookkeeping inside the cache, without a model: every token the cache evicts is
in the memory exactly once (in a written block or waiting for one), with the value it was computed
with, however the cache evicted (pins, ``--evict turns``), rewound, was cut back, saved and loaded,
or rebuilt from the ledger in another window (:meth:`SinkCache.refill`).

Driven by hypothesis on the model-free state machine of ``tests/test_cache_core.py`` (random keys
and values, a plain reference of which tokens the cache holds)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, precondition, rule
from test_cache_core import INV_FREQS, RUN, CacheMachine, Reference

from _helpers import stored_chat
from sinkchat.kv import SinkCache
from sinkchat.kv.layer import rotate
from sinkchat.kv.layout import plan_eviction
from sinkchat.ledger import gaps
from sinkchat.store import Store

RECALL_BLOCK = 4


def ids(a: int, b: int) -> list[int]:
    """The stand-in ledger: conversation token t has id 1000 + t."""
    return list(range(1000 + a, 1000 + b))


class RecallMachine(CacheMachine):
    """The cache core's machine with a block memory (``--recall``) in a folder of its own."""

    @initialize(
        sinks=st.integers(0, 4),
        window=st.integers(4, 20),
        block=st.integers(1, 8),
        pin_share=st.integers(0, 2),
        spare=st.integers(0, 40),
        turns=st.booleans(),
    )
    def setup(self, sinks, window, block, pin_share, spare, turns):
        super().setup(sinks, window, block, pin_share, spare, turns)
        self.folder = tempfile.TemporaryDirectory()
        self.spare = spare
        self.cache = self._cache(sinks, window, block, self.cache.pin_max, self.cache.max_positions)
        self.lost: set[int] = set()  # evicted tokens the memory may lack (none: its file is never damaged here)

    def _cache(self, sinks, window, block, pin_max, max_positions, memory=None) -> SinkCache:
        cache = SinkCache(
            INV_FREQS,
            sinks,
            window,
            block,
            max_positions=max_positions + RECALL_BLOCK,
            pin_max=pin_max,
            dtype=self.dtype,
            recall=RECALL_BLOCK,
            recall_block=RECALL_BLOCK,
            memory=memory,
        )
        cache.token_ids = ids
        cache.memory.keep_in(Path(self.folder.name))
        return cache

    def teardown(self):
        self.cache.memory.close()
        self.folder.cleanup()

    def _feed(self, held: list[int], positions: torch.Tensor) -> None:
        """What a model's forward writes for conversation tokens ``held`` at ``positions``: their keys
        as first drawn, rotated there, and their values."""
        for i, (layer, inv_freq) in enumerate(zip(self.cache.layers, INV_FREQS)):
            raw = torch.stack([self.keys[i][t] for t in held], dim=-2)
            value = torch.stack([self.values[i][t] for t in held], dim=-2)
            layer.write(rotate(raw, positions[0].to(torch.float64), inv_freq), value)

    @precondition(lambda self: self.ref.seen > 0)
    @rule(data=st.data())
    @torch.inference_mode()
    def rebuild_in_another_window(self, data):
        """A resume with another ``--window`` (or a rollback without a checkpoint): the cache is rebuilt
        from the ledger, holding the sinks, the pins that fit and a window of the newest tokens."""
        old, ref = self.cache, self.ref
        window = data.draw(st.integers(max(4, 2 * len(ref.pins)), 24), label="new window")
        n_sink = min(old.sinks, ref.seen)
        pins = [(a, b) for a, b in old.pins]
        start = data.draw(st.integers(max(n_sink, ref.seen - (window - len(ref.pins))), ref.seen), label="start")
        parked = [(max(a, n_sink), min(b, start)) for a, b in pins if a < start and b > n_sink]
        if sum(b - a for a, b in parked) + ref.seen - start > window:
            parked, pins = [], [(a, b) for a, b in pins if a >= start]
        cache = self._cache(old.sinks, window, old.block, old.pin_max, old.sinks + window + self.spare, old.memory)
        event("window " + ("smaller" if window < old.window else "larger" if window > old.window else "same"))
        self.cache = cache
        cut = self.cut if self.turns else None
        cache.refill(
            self._feed,
            max(1, window // 4),
            n_sink,
            parked,
            start,
            ref.seen,
            gaps(parked, n_sink, start),
            pins,
            old.evictions,
            cut,
        )
        if cache.seen - cache.n_win > start:
            event("fed again what the memory lacked")
        self.marked = None
        self._follow()

    def _follow(self) -> None:
        """Make the reference hold what the rebuilt cache holds (its layout is the cache's choice)."""
        cache, old = self.cache, self.ref
        ref = Reference(cache.sinks, cache.window, cache.block, cache.pin_max)
        start = cache.seen - cache.n_win
        parked = [t for a, b, _ in cache.parked for t in range(a, b)]
        ref.held = [*range(cache.n_sink), *parked, *range(start, cache.seen)]
        ref.seen, ref.start = cache.seen, start
        ref.pins = {t for a, b in cache.pins for t in range(a, b)}
        ref.evicted = {t for a, b in cache.evictions for t in range(a, b)}
        assert ref.seen == old.seen and set(ref.held) | ref.evicted == set(range(ref.seen))
        self.ref = ref
        self.first = cache.seen - cache.n_win - cache.base - cache.n_pin - cache.n_sink

    @precondition(lambda self: self.ref.seen > 0)
    @rule()
    def save_and_load(self):
        """A save and a resume: the K/V and the memory (its file and its pending tokens) continue."""
        old = self.cache
        tensors, meta = old.state()
        cache = self._cache(old.sinks, old.window, old.block, old.pin_max, old.max_positions - RECALL_BLOCK)
        cache.load_state({k: t.clone() for k, t in tensors.items()}, meta)
        path = old.memory.path or Path(self.folder.name) / "none yet.memory"  # no block written yet
        assert cache.open_memory(path, meta, tensors, ids(0, self.ref.seen)) == []
        old.memory.close()
        self.cache = cache

    @invariant()
    def the_memory_holds_each_evicted_token_once_with_its_value(self):
        memory = self.cache.memory
        held = [t for runs in [*memory.runs, memory.pending] for t0, t1, _ in runs for t in range(t0, t1)]
        assert sorted(held) == sorted(self.ref.evicted)
        assert memory.blocks == len(held) // RECALL_BLOCK and memory.damaged == set()
        for j in range(len(INV_FREQS)):
            for b in range(memory.blocks):
                want = torch.stack(
                    [self.values[j][t] for t, _ in zip(held[b * RECALL_BLOCK :], range(RECALL_BLOCK))], dim=-2
                )
                assert torch.equal(memory.read(j, b)[1], want.to(self.dtype))
            pending = held[memory.blocks * RECALL_BLOCK :]
            if pending:
                want = torch.stack([self.values[j][t] for t in pending], dim=-2)
                assert torch.equal(memory.pending_v[j], want.to(self.dtype))
        assert memory.pending_ids == [1000 + t for t in held[memory.blocks * RECALL_BLOCK :]]


TestRecallBookkeeping = RecallMachine.TestCase
TestRecallBookkeeping.settings = RUN


class BFloat16RecallMachine(RecallMachine):
    """The same with a bfloat16 KV cache (the memory keeps the cache's dtype)."""

    dtype = torch.bfloat16
    tolerance = 3e-2
    windows_between_rebases = 1


TestRecallBookkeepingInBFloat16 = BFloat16RecallMachine.TestCase
TestRecallBookkeepingInBFloat16.settings = settings(RUN, max_examples=40)


def test_orphaned_memory_files_of_dead_processes_are_swept_at_open(tmp_path):
    """A process killed before its store adopted its memory file leaves ``.memory-<pid>-<random>.tmp``;
    opening a chat removes it once that process is gone, never a live process's file, never a link
    (nor what it points to), never another file."""
    chat_id = stored_chat(tmp_path / "data")
    state = tmp_path / "data" / "state"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)
    outside = tmp_path / "outside.tmp"
    outside.write_bytes(b"the user's")
    orphan, live = state / f".memory-{dead}-0123abcd.tmp", state / f".memory-{os.getpid()}-89abcdef.tmp"
    link, other = state / f".memory-{dead}-deadbeef.tmp", state / f".memory-{dead}-x.tmp"
    for path in (orphan, live, other):
        path.write_bytes(b"SINKMEM1")
    link.symlink_to(outside)
    Store(tmp_path / "data").open(chat_id, _Idle())
    assert not orphan.exists() and live.exists() and other.exists()
    assert link.is_symlink() and outside.read_bytes() == b"the user's"


class _Idle:
    """A chat with nothing to restore (the sweep is the store's, whatever the chat)."""

    def restore(self, snap, tensors):
        return []


def test_a_parked_token_and_the_window_s_oldest_leave_to_the_memory_apart():
    """An unpinned parked token and the window's oldest token are neighbours in the conversation: the
    eviction's ledger spans merge them, but the memory must take the window's token from the window's
    slot (the fault the recall machine found: the merged span hid the window's part, which was lost)."""
    plan = plan_eviction([(0, 1, 0)], [], start=1, seen=6, base=0, need=2, want=2)
    assert plan.evicted == [(0, 2)]
    assert plan.dropped == [(0, 1, 0)] and plan.window_evicted == [(1, 2)]
