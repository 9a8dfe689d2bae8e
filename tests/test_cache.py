"""The sink cache against transformers' dense cache and against an independent StreamingLLM reference."""

from __future__ import annotations

import pydoc_data.topics

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin

from sinkchat.kv import SinkCache, rope_inv_freqs
from sinkchat.model import forward

# Bounds on logits that hold on any x86-64 CPU and still fail on a real position bug. Measured on
# SmolLM2-135M in float32: correct caches differ from the dense cache or the reference by at most
# ~1e-4 (summation order varies with the BLAS kernels a CPU picks); a sink key one position off
# moves the logits by ~1.3, a window one position off by ~13.
SAME = 1e-2
# Without sinks the model is ill-conditioned (the point of StreamingLLM): shifting every position of
# the reference by 100, a no-op in exact arithmetic, moves its own logits by up to ~6e-3.
SAME_WITHOUT_SINKS = 5e-2


def text_ids(tokenizer, n: int) -> list[int]:
    """Real English text: Python's own documentation, shipped with Python."""
    text = "\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    return tokenizer(text[:20000], add_special_tokens=False)["input_ids"][:n]


def stream(model, cache: SinkCache, ids: list[int], first_chunk: int) -> list[torch.Tensor]:
    """Feed ``ids`` through ``cache``: one prefill chunk, then token by token; logits per step."""
    out, i = [], 0
    with torch.no_grad():
        for size in [first_chunk] + [1] * (len(ids) - first_chunk):
            pos, _ = cache.reserve(size)
            out.append(forward(model, cache, ids[i : i + size], pos, keep=0))
            i += size
    return out


class ReferenceLayer(CacheLayerMixin):
    """Keeps the pre-RoPE keys of every token and re-applies RoPE at cache positions 0..k each step,
    the way the official StreamingLLM code does. Written independently of sinkchat's cache."""

    is_sliding = False

    def __init__(self, owner: "ReferenceCache", idx: int):
        super().__init__()
        self.owner, self.idx = owner, idx
        self.raw_k: list[torch.Tensor] = []  # per token [b, h, d], un-rotated (from k_proj)
        self.vals: list[torch.Tensor] = []

    def lazy_initialization(self, key_states, value_states):
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raw = self.owner.pending_raw[self.idx]  # [b, h, q, d] pre-RoPE keys of the new tokens
        for j in range(raw.shape[-2]):
            self.raw_k.append(raw[:, :, j])
            self.vals.append(value_states[:, :, j])
        keep = self.owner.context + list(range(len(self.raw_k) - raw.shape[-2], len(self.raw_k)))
        k = torch.stack([self.raw_k[t] for t in keep], dim=2)
        v = torch.stack([self.vals[t] for t in keep], dim=2)
        pos = torch.arange(len(keep)).unsqueeze(0) + self.owner.offset
        cos, sin = self.owner.rotary(v, pos)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        half = k.shape[-1] // 2
        k = k * cos + torch.cat([-k[..., half:], k[..., :half]], dim=-1) * sin
        return k, v

    def get_mask_sizes(self, query_length):
        return len(self.owner.context) + query_length, 0

    def get_seq_length(self):
        return len(self.owner.context)

    def get_max_length(self):
        return -1


class ReferenceCache(Cache):
    def __init__(self, model, offset: int = 0):
        inner = model.model
        super().__init__(layers=[ReferenceLayer(self, i) for i in range(len(inner.layers))])
        self.offset = offset  # shifts every position: the same attention in exact arithmetic
        self.rotary = inner.rotary_emb
        self.context: list[int] = []
        self.pending_raw: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(inner.layers):
            attn = layer.self_attn
            layer.self_attn.k_proj.register_forward_hook(self._hook(i, attn.head_dim))

    def _hook(self, i, head_dim):
        def capture(module, inputs, output):
            if self.active:
                b, q, _ = output.shape
                self.pending_raw[i] = output.view(b, q, -1, head_dim).transpose(1, 2)

        return capture

    active = False


def reference_logits(model, ids, contexts, sizes, offset: int | list[int] = 0) -> list[torch.Tensor]:
    """The reference's logits, step by step; ``offset``: where its positions start, for every step
    or one per step."""
    offsets = offset if isinstance(offset, list) else [offset] * len(contexts)
    ref = ReferenceCache(model)
    ref.active = True
    out, i = [], 0
    try:
        with torch.no_grad():
            for ctx, size, ref.offset in zip(contexts, sizes, offsets):
                ref.context = ctx
                pos = torch.arange(len(ctx), len(ctx) + size).unsqueeze(0) + ref.offset
                out.append(forward(model, ref, ids[i : i + size], pos, keep=0))
                i += size
    finally:
        ref.active = False
    return out


def sink_run(model, ids, sinks, window, block, first_chunk):
    """Stream through the sink cache; also record, per step, which earlier tokens it attended to."""
    cache = SinkCache.for_model(model, sinks, window, block)
    contexts, sizes, out, i = [], [], [], 0
    with torch.no_grad():
        for size in [first_chunk] + [1] * (len(ids) - first_chunk):
            pos, _ = cache.reserve(size)
            (s0, s1), (w0, w1) = cache.kept()
            contexts.append([t for t in [*range(s0, s1), *range(w0, w1)] if t < i])
            sizes.append(size)
            out.append(forward(model, cache, ids[i : i + size], pos, keep=0))
            i += size
    return cache, contexts, sizes, out


def test_equals_dense_cache_before_eviction(smollm_f32):
    model, tok = smollm_f32.model, smollm_f32.tokenizer
    ids = text_ids(tok, 160)
    with torch.no_grad():
        dense = forward(model, DynamicCache(), ids, torch.arange(len(ids)).unsqueeze(0), keep=0)
    cache = SinkCache.for_model(model, 4, 400)
    got = torch.cat(stream(model, cache, ids, 64))
    assert cache.occupancy().evicted == 0
    assert (got - dense).abs().max().item() <= SAME


def worst(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("block", [1, 8])
def test_attention_after_eviction_equals_reference(arch, block, smollm_f32, tiny_loaded):
    model = smollm_f32.model if arch == "llama" else tiny_loaded[arch]
    ids = text_ids(smollm_f32.tokenizer, 140)
    cache, contexts, sizes, got = sink_run(model, ids, 4, 40, block, first_chunk=16)
    assert cache.occupancy().evicted > 60  # the comparison covers many evictions
    assert worst(got, reference_logits(model, ids, contexts, sizes)) <= SAME


def test_window_without_sinks_equals_the_reference(smollm_f32):
    model = smollm_f32.model
    ids = text_ids(smollm_f32.tokenizer, 140)
    cache, contexts, sizes, got = sink_run(model, ids, 0, 40, 4, first_chunk=16)
    assert cache.occupancy().sinks == 0 and cache.occupancy().evicted > 60
    assert worst(got, reference_logits(model, ids, contexts, sizes)) <= SAME_WITHOUT_SINKS


def test_no_layer_holds_more_than_sinks_plus_window(smollm_f32):
    model = smollm_f32.model
    sinks, window = 4, 48
    ids = text_ids(smollm_f32.tokenizer, 3 * window + 10)
    cache = SinkCache.for_model(model, sinks, window)
    size0 = None
    for step in range(len(ids)):
        stream_ids = ids[step : step + 1]
        pos, _ = cache.reserve(1)
        with torch.no_grad():
            forward(model, cache, stream_ids, pos)
        assert all(layer.get_seq_length() <= sinks + window for layer in cache.layers)
        size0 = size0 or cache.memory_bytes()
        assert cache.memory_bytes() == size0  # preallocated once, never grows
    occ = cache.occupancy()
    assert occ.seen == len(ids) and occ.sinks == sinks and occ.window <= window
    assert occ.evicted == occ.seen - occ.sinks - occ.window > 2 * window


def test_ledger_and_kept_ranges_cover_every_token(smollm_f32):
    cache, *_ = sink_run(smollm_f32.model, text_ids(smollm_f32.tokenizer, 150), 4, 32, 5, first_chunk=20)
    (s0, s1), (w0, w1) = cache.kept()
    covered = list(range(s0, s1)) + [t for a, b in cache.evictions for t in range(a, b)] + list(range(w0, w1))
    assert sorted(covered) == list(range(150))
    assert len(covered) == len(set(covered))


def test_rebase_keeps_attention_exact(smollm_f32):
    """Positions rebase before they pass max_positions; the logits must not notice."""
    model = smollm_f32.model
    ids = text_ids(smollm_f32.tokenizer, 200)
    plain = SinkCache.for_model(model, 4, 40, 4)
    rebasing = SinkCache(rope_inv_freqs(model), 4, 40, 4, max_positions=60)
    a = stream(model, plain, ids, 8)
    b = stream(model, rebasing, ids, 8)
    assert rebasing.base > 0 and plain.base == 0
    assert max((x - y).abs().max().item() for x, y in zip(a, b)) <= SAME


def test_bf16_long_stream_does_not_drift(smollm_f32, tmp_path):
    """In bf16, many evictions and rebases must not degrade the model: sinks are re-rotated from
    pristine copies and window keys are rotated rarely, so loss stays that of a float32 cache."""
    from sinkchat.model import bundled_gguf, gguf_folder

    folder = gguf_folder(bundled_gguf())
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    ids = text_ids(smollm_f32.tokenizer, 360)

    def nll(cache):
        logits = stream(model, cache, ids, 8)
        flat = torch.cat(logits)[:-1].float()
        return torch.nn.functional.cross_entropy(flat, torch.tensor(ids[1:])).item()

    inv = rope_inv_freqs(model)
    drifting = SinkCache(inv, 4, 60, block=1, max_positions=100)  # rebases every ~36 tokens
    steady = SinkCache(inv, 4, 60, block=1, max_positions=None)
    a, b = nll(drifting), nll(steady)
    assert drifting.base > 250  # many rebases happened
    assert abs(a - b) / b < 0.01


def test_bookkeeping_per_step_does_not_grow_with_evictions(tiny_loaded):
    """Hundreds of one-token evictions: the occupancy a step reports stays one merged span."""
    model = tiny_loaded["mistral"]
    cache = SinkCache.for_model(model, 4, 16, block=1)
    with torch.no_grad():
        for t in range(400):
            pos, span = cache.reserve(1)
            forward(model, cache, [100 + t % 50], pos)
            occ = cache.occupancy()
            assert len(occ.spans) <= 1 and len(cache.evictions) <= 1
    assert occ.spans == ((4, 400 - 16),) and occ.evicted == 400 - 4 - 16
