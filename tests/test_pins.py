"""Pinned tokens and rewinding in the sink cache, against the independent StreamingLLM reference."""

from __future__ import annotations

import pytest
import torch
from test_cache import reference_logits, text_ids, worst
from transformers import AutoModelForCausalLM

from sinkchat.kv import SinkCache, rope_inv_freqs
from sinkchat.model import forward

# Logits with pins match the reference to this (float32; they reach ~41 on this model). The reference
# holds the kept set at contiguous positions starting where the cache's does (the same attention as at
# 0..k-1 in exact arithmetic): float32 RoPE at other positions alone moves the logits by ~1.2e-4 (the
# reference against itself one position on). Aligned they match to 6e-5, after a rebase too.
PIN_SAME = 1e-4

# What happens to the pins while the text streams: (step, action, tokens). Token 10-17 is pinned
# early (it is parked once the window passes it), 25-28 too, and then 10-17 is unpinned again, so
# it leaves at the next eviction; 95-98 is pinned late, and parked by the end.
PIN_EVENTS = {20: ("pin", 10, 18), 30: ("pin", 25, 29), 90: ("unpin", 10, 18), 100: ("pin", 95, 99)}


def pinned_run(model, ids, block, max_positions=None, events=PIN_EVENTS):
    """Stream ``ids`` (a prefill chunk, then token by token) through a 4 + 40 cache with pins;
    record each step's held tokens in slot order (sinks, parked pinned tokens, window) and the
    position of the first of them."""
    cache = SinkCache(rope_inv_freqs(model), 4, 40, block, max_positions=max_positions, pin_max=20)
    contexts, sizes, starts, out, i = [], [], [], [], 0
    with torch.no_grad():
        for size in [16] + [1] * (len(ids) - 16):
            if i in events:
                action, a, b = events[i]
                getattr(cache, action)(a, b)
            pos, _ = cache.reserve(size)
            contexts.append([t for a, b in cache.held() for t in range(a, b) if t < i])
            starts.append(pos[0, 0].item() - len(contexts[-1]))
            sizes.append(size)
            out.append(forward(model, cache, ids[i : i + size], pos, keep=0))
            i += size
    return cache, contexts, sizes, starts, out


@pytest.mark.parametrize("block, max_positions", [(1, None), (8, None), (8, 70)])
def test_logits_with_pins_equal_the_reference_at_contiguous_positions(smollm_f32, block, max_positions):
    """The reference builds the same kept set (sinks + pinned + window) at contiguous positions and
    re-applies RoPE every step; the cache re-rotates parked keys from float32 copies instead."""
    model = smollm_f32.model
    ids = text_ids(smollm_f32.tokenizer, 150)
    cache, contexts, sizes, starts, got = pinned_run(model, ids, block, max_positions)
    assert cache.parked and [r[:2] for r in cache.parked] == [(25, 29), (95, 99)]  # 10-17 was unpinned, then left
    assert all(a >= 18 or b <= 10 for a, b in [s for s in cache.held() if s[0] >= 4])
    assert any(10 in ctx for ctx in contexts[40:70])  # the pin held 10-17 long after the window passed it
    if max_positions:
        assert cache.base > 0  # rebased with parked tokens in place
    assert worst(got, reference_logits(model, ids, contexts, sizes, starts)) <= PIN_SAME


def test_pinned_tokens_do_not_drift_in_bf16(smollm_f32):
    """Parked keys are re-placed at every one-token eviction and across many rebases; from their
    float32 copies, the loss stays that of a cache that never rebases."""
    from sinkchat.model import bundled_gguf, gguf_folder

    folder = gguf_folder(bundled_gguf())
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    ids = text_ids(smollm_f32.tokenizer, 360)
    events = {20: ("pin", 8, 20), 200: ("pin", 190, 196)}

    def nll(max_positions):
        cache, _, _, _, logits = pinned_run(model, ids, 1, max_positions, events)
        flat = torch.cat(logits)[:-1].float()
        return cache, torch.nn.functional.cross_entropy(flat, torch.tensor(ids[1:])).item()

    drifting, a = nll(100)  # rebases every ~36 tokens
    steady, b = nll(None)
    assert drifting.base > 250 and drifting.n_pin == 18
    assert abs(a - b) / b < 0.01


def feed(model, cache, ids, start, end, size=1) -> list[torch.Tensor]:
    out = []
    with torch.no_grad():
        for i in range(start, end, size):
            chunk = ids[i : min(i + size, end)]
            pos, _ = cache.reserve(len(chunk))
            out.append(forward(model, cache, chunk, pos, keep=0))
    return out


@pytest.mark.parametrize("turn", [3, 40])
def test_rewind_restores_the_cache_bit_for_bit(tiny_loaded, turn):
    """A turn of 3 tokens evicts nothing held before it; one of 40 evicts parked tokens that were
    unpinned and window tokens. Either way the cache comes back exactly, and the same tokens then
    give exactly the same logits."""
    model = tiny_loaded["mistral"]
    ids = [(i * 37) % 1000 + 5 for i in range(160)]
    cache = SinkCache(rope_inv_freqs(model), 4, 40, 8, pin_max=20)
    feed(model, cache, ids, 0, 50, 16)
    cache.pin(30, 38)
    cache.pin(44, 46)
    feed(model, cache, ids, 50, 100)
    cache.unpin(30, 34)
    start = 100
    while turn == 3 and cache.n_pin + cache.n_win > 40 - turn:  # a turn that fits the room left
        feed(model, cache, ids, start, start + 1)
        start += 1
    tensors, meta = cache.state()
    before = {k: v.clone() for k, v in tensors.items()}
    cache.mark()
    first = feed(model, cache, ids, start, start + turn)
    assert ([list(s) for s in cache.evictions] != meta["evictions"]) == (turn == 40)
    assert cache.rewind()
    tensors, after = cache.state()
    after.pop("checkpoint")
    assert after == meta
    assert all(torch.equal(before[k], tensors[k]) for k in before)
    again = feed(model, cache, ids, start, start + turn)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_rewind_across_a_rebase_and_a_save(tiny_loaded):
    """Rebased during the turn, the window keys are rotated back (float32, not bit for bit); the
    checkpoint and its copies also survive state() / load_state()."""
    model = tiny_loaded["mistral"]
    ids = [(i * 37) % 1000 + 5 for i in range(160)]
    cache = SinkCache(rope_inv_freqs(model), 4, 40, 8, max_positions=80, pin_max=20)
    feed(model, cache, ids, 0, 60, 4)
    cache.pin(40, 44)
    cache.mark()
    first = feed(model, cache, ids, 60, 100)
    assert cache.base > 0
    tensors, meta = cache.state()
    loaded = SinkCache(rope_inv_freqs(model), 4, 40, 8, max_positions=80, pin_max=20)
    loaded.load_state({k: v.clone() for k, v in tensors.items()}, meta)
    assert loaded.rewind() and loaded.base == 0 and loaded.seen == 60
    again = feed(model, loaded, ids, 60, 100)
    assert worst(first, again) <= 1e-4


def test_turn_cut_starts_the_window_at_allowed_tokens(tiny_loaded):
    """With a cut, every eviction ends where the caller allows; a run longer than the window
    between two allowed points streams through token by token."""
    model = tiny_loaded["mistral"]
    ids = [(i * 37) % 1000 + 5 for i in range(220)]
    allowed = [0, 12, 30, 41, 70, 78, 95, 180, 200]  # 95-180: longer than the 32-token window

    def cut(t):
        return next((a for a in allowed if a >= t), None)

    cache = SinkCache(rope_inv_freqs(model), 4, 32, 4)
    starts = []
    with torch.no_grad():
        for i in range(len(ids)):
            pos, spans = cache.reserve(1, cut)
            forward(model, cache, ids[i : i + 1], pos)
            if spans:
                starts.append(cache.kept()[1][0])
    assert starts and all(s in allowed or 95 < s < 180 for s in starts)
    assert any(95 < s < 180 for s in starts) and any(s in (180, 200) for s in starts)
    assert all(layer.get_seq_length() <= 4 + 32 for layer in cache.layers)
