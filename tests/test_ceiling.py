"""The bandwidth ceiling's parts (sinkchat.bench.ceiling): bytes counted once however weights are
viewed, what a decode step of the bundled model reads, and the copy bandwidth on the CPU."""

from __future__ import annotations

import torch

from sinkchat.bench.ceiling import bytes_per_token, ceiling, copy_bandwidth, union_bytes
from sinkchat.kv import SinkCache


def test_union_bytes_counts_each_byte_once():
    a, b = torch.zeros(100, dtype=torch.float32), torch.zeros(10, dtype=torch.float16)
    assert union_bytes([a, b]) == 400 + 20
    assert union_bytes([a, a[10:20], a[50:], a.view(10, 10)[3]]) == 400  # views of one weight
    assert union_bytes([a[:30], a[20:60]]) == 60 * 4  # overlapping views: their union


def test_a_decode_step_reads_the_packed_weights_once_the_head_and_the_held_kv(smollm):
    fast = smollm.fast
    packed = sum(m.packed.nbytes + m.scales.nbytes for layer in fast.layers
                 for m in (layer.qkv, layer.o, layer.gate_up, layer.down))
    norms = sum(p.nbytes for layer in smollm.model.model.layers for p in layer.parameters())  # RMSNorm weights
    cache = SinkCache.for_model(smollm.model, 4, 16)
    with torch.inference_mode():
        positions, _ = cache.reserve(12)
        fast(list(range(100, 112)), positions, cache)
    parts = bytes_per_token(smollm.model, cache)
    assert parts["weights"] == packed + norms  # q, k, v (views of the fused qkv) are not counted again
    assert parts["head"] == 49152 * 576 * 2  # the float16 output head
    # 12 tokens held, K and V in the cache's dtype (bfloat16 where auto picks it, else float32)
    assert parts["kv_cache"] == 30 * 3 * 64 * 2 * cache.dtype.itemsize * 12
    if fast.candidate_head is not None:  # a decode step with 64 candidates: the int4 copy and 64 float16 rows
        scores = fast.candidate_head.scores
        assert bytes_per_token(smollm.model, cache, 64)["head"] == (
            scores.packed.nbytes + scores.scales.nbytes + 64 * 576 * 2)
    assert bytes_per_token(smollm.model, cache, 64)["weights"] == parts["weights"]
    bandwidth = copy_bandwidth(torch.device("cpu"), mib=32, reps=2)
    roof = ceiling(parts, bandwidth, 20.0)
    assert bandwidth > 0 and roof["ceiling_share"] == 20.0 / roof["ceiling_tokens_per_s"]
