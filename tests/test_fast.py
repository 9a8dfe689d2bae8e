"""The fast path (sinkchat.model.fast) against transformers on the same weights, through the sink cache:
chunks and single tokens, before and after evictions and a rebase; resume for every KV dtype."""

from __future__ import annotations

import contextlib
import math
import os
import time
from types import SimpleNamespace

import pytest
import torch
from test_cache import text_ids

from _helpers import CPU_REPORTS, GREEDY, report_cpu, say
from sinkchat.engine import Chat
from sinkchat.kv import SinkCache, rope_inv_freqs
from sinkchat.kv.cache import local_windows
from sinkchat.model import aot, fast, forward, forward_outputs, load
from sinkchat.model.fast import FastModel
from sinkchat.model.quant import HalfLinear, Int4Linear, NF4Linear
from sinkchat.store import Store

# Relative to the largest logit. float32 activations: the two paths differ only in summation order
# (measured ~1e-6 on SmolLM2-135M); bf16 activations into the int4 kernel round differently per path.
SAME_F32 = 1e-4
SAME_BF16 = 2e-2
# A bf16 KV cache: the fast path attends one token in bf16 (the query rounded to bf16), transformers
# upcasts the same bf16 keys and values to float32 (measured 2.9e-2 on SmolLM2-135M); a wrong position
# or a misplaced token moves logits by the whole scale. What a user sees is bounded by the perplexity test.
SAME_BF16_KV = 5e-2


def compare(loaded, n: int = 150, window: int = 40, max_positions: int = 120, dtype=None) -> float:
    """Stream ``n`` tokens (a 32-token chunk, then one at a time) through two identical sink caches,
    one per path; small ``window`` and ``max_positions`` force evictions and rebases. Returns the
    largest relative difference of the logits."""
    model, fast = loaded.model, loaded.fast
    ids = text_ids(loaded.tokenizer, n)
    caches = [SinkCache(rope_inv_freqs(model), 4, window, 10, max_positions, dtype) for _ in range(2)]
    worst, i = 0.0, 0
    with torch.inference_mode():
        for size in [32] + [1] * (n - 32):
            (p1, _), (p2, _) = (c.reserve(size) for c in caches)
            a = fast(ids[i : i + size], p1, caches[0], 0)
            b = forward_outputs(model, caches[1], ids[i : i + size], p2, 0).logits[0].float()
            worst = max(worst, ((a - b).abs().max() / b.abs().max()).item())
            i += size
    assert caches[0].evictions and caches[0].base > 0  # evicted and rebased on the way
    assert caches[0].evictions == caches[1].evictions
    return worst


def test_fast_path_matches_transformers_in_float32(smollm_f32):
    assert isinstance(smollm_f32.fast, FastModel)
    assert compare(smollm_f32) < SAME_F32


def test_fast_path_matches_transformers_on_the_same_int4_weights(smollm_hf):
    smollm = smollm_hf
    assert isinstance(smollm.fast, FastModel) and smollm.runs == "gguf Q4_1 -> int4 g32 + fp16"
    assert isinstance(smollm.model.get_output_embeddings(), HalfLinear)
    assert compare(smollm) < SAME_BF16
    assert compare(smollm, dtype=torch.bfloat16) < SAME_BF16_KV


def stream_nll(loaded, ids: list[int], kv: torch.dtype, window: int = 64) -> float:
    """Mean negative log-likelihood of ``ids[1:]``, fed one token at a time through a sink cache of
    ``4 + window`` tokens holding K/V in ``kv`` (StreamingLLM's streaming perplexity)."""
    cache = SinkCache(rope_inv_freqs(loaded.model), 4, window, 8, None, kv)
    total = 0.0
    with torch.inference_mode():
        for i in range(len(ids) - 1):
            positions, _ = cache.reserve(1)
            logits = forward(loaded.model, cache, ids[i : i + 1], positions)[-1]
            total -= torch.log_softmax(logits.float(), -1)[ids[i + 1]].item()
    return total / (len(ids) - 1)


def test_a_bf16_kv_cache_keeps_streaming_perplexity_within_one_percent(smollm):
    """The issue's bound: a bf16 KV cache may not raise perplexity more than 1% over float32, here over
    five windows of text with evictions all the way."""
    ids = text_ids(smollm.tokenizer, 330)
    f32, bf16 = (stream_nll(smollm, ids, kv) for kv in (torch.float32, torch.bfloat16))
    assert math.exp(bf16) <= 1.01 * math.exp(f32)


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_fast_path_matches_transformers_on_mistral_and_qwen2(arch, tiny_models):
    """Qwen2 has q/k/v biases (fused with the weights); both are float32 and 4-bit here."""
    f32 = load(str(tiny_models[arch]), quant="none", device="cpu")
    assert f32.fast is not None and compare(f32) < SAME_F32
    int4 = load(str(tiny_models[arch]), quant="4bit", device="cpu", quick=False)
    assert int4.fast is not None and compare(int4) < SAME_BF16


def load_nf4(folder, compute, double_quant: bool = False):
    """A model as the loader gives it on a GPU (bitsandbytes NF4 linears, ``compute`` dtype), run on
    bitsandbytes' CPU kernels in their standard layout (the same op and packed format as its CUDA ones):
    the AVX512-BF16 repacking bnb does at a first CPU forward is switched off, so every CPU runs this."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
                                bnb_4bit_use_double_quant=double_quant)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu",
                                                 dtype=compute).eval()
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return SimpleNamespace(model=model, tokenizer=AutoTokenizer.from_pretrained(folder), fast=None)


def build_fast(loaded) -> None:
    """The fast path over ``loaded``'s model, attached as :func:`sinkchat.model.kernels.prepare` does on a GPU."""
    assert fast.supported(loaded.model) and fast.nf4_fits(loaded.model)
    loaded.fast = loaded.model.sinkchat_fast = FastModel.build(loaded.model, int4=False)


def nf4_linears(model) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in model.named_modules() if NF4Linear.fits(m)}


def held_weight(module, bf16_absmax: bool) -> torch.Tensor:
    """The float32 weight a bitsandbytes 4-bit linear holds, by bnb's own dequantizer; ``bf16_absmax``:
    with its absmax rounded to bf16, as bnb's AVX512-BF16 CPU repacking leaves it."""
    import copy

    import bitsandbytes.functional as bnbf

    state = copy.copy(module.weight.quant_state)
    if bf16_absmax:
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested else state.absmax
        state.absmax, state.nested, state.state2 = absmax.to(torch.bfloat16).float(), False, None
    state.dtype = torch.float32
    return bnbf.dequantize_4bit(module.weight.data, state)


@pytest.mark.parametrize("layout", ["standard", "cpu-repacked"])
@pytest.mark.parametrize("arch,double_quant", [("mistral", False), ("qwen2", False), ("qwen2", True)])
def test_the_gpu_nf4_path_fuses_the_packed_weights_exactly_and_matches_transformers(arch, double_quant, layout,
                                                                                   tiny_models):
    """Fusing q/k/v and gate/up concatenates bitsandbytes' packed blocks without re-quantizing (a
    double-quantized absmax is expanded exactly): each row slice of a fused weight is exactly the
    weight its module held, in whichever layout bnb left it. ``standard`` is bnb's CUDA layout (and a
    CPU's without AVX512-BF16), where the transformers path then computes bit for bit what it did on
    bnb's own modules; ``cpu-repacked`` is the layout bnb rewrites a weight into at its first forward on
    an AVX512-BF16 CPU, forced here with bnb's own converter so that every CPU tests it. Then the fast
    path, eager and as the static step CUDA graphs capture, matches transformers through evictions and
    a rebase."""
    import bitsandbytes.functional as bnbf

    loaded = load_nf4(tiny_models[arch], torch.bfloat16, double_quant)
    ids = torch.arange(5, 45)[None]
    with torch.inference_mode():
        before = loaded.model(ids).logits
    held = {name: held_weight(m, bf16_absmax=layout == "cpu-repacked") for name, m in nf4_linears(loaded.model).items()}
    assert len(held) == 2 * 7
    if layout == "cpu-repacked":
        for m in nf4_linears(loaded.model).values():
            m.weight.data, m.weight.quant_state = bnbf._convert_weight_packed_for_cpu(m.weight.data,
                                                                                     m.weight.quant_state)
    build_fast(loaded)
    modules = dict(loaded.model.named_modules())
    for name, weight in held.items():
        assert isinstance(modules[name], NF4Linear) and torch.equal(modules[name].dequantize(), weight), name
    if layout == "standard":
        with torch.inference_mode():
            assert torch.equal(loaded.model(ids).logits, before)
    attn = loaded.model.model.layers[0].self_attn
    assert isinstance(loaded.fast.layers[0].qkv, NF4Linear)
    assert attn.k_proj.data.untyped_storage().data_ptr() == loaded.fast.layers[0].qkv.data.untyped_storage().data_ptr()
    assert compare(loaded) < SAME_BF16
    eager = stream_decode(loaded)
    loaded.fast.compiled = loaded.fast.static_step
    static = stream_decode(loaded)
    assert max(((a - b).abs().max() / a.abs().max()).item() for a, b in zip(eager, static)) < SAME_BF16


def test_an_nf4_model_the_fused_kernel_cannot_take_stays_on_transformers(tiny_models, tmp_path):
    """Rows of 96 inputs are not whole 64-weight blocks: no fast path, and transformers still answers."""
    from conftest import tiny_model_dir

    odd = tiny_model_dir("mistral", tiny_models["mistral"], tmp_path / "odd", hidden_size=96)
    loaded = load_nf4(odd, torch.bfloat16)
    assert fast.supported(loaded.model) and not fast.nf4_fits(loaded.model)
    assert fast.nf4_fits(load_nf4(tiny_models["mistral"], torch.bfloat16).model)


def test_the_cuda_graph_step_replays_the_eager_step_and_records_again_for_new_buffers(tiny_models, monkeypatch):
    """:class:`~sinkchat.model.fast.CudaGraphStep`'s bookkeeping: inputs copied in, one recording per set of
    cache buffers, logits equal to the eager step's through evictions and a rebase. CUDA cannot run on
    the machines the tests run on, so torch.cuda's stream and graph calls are stand-ins here: a
    "graph" keeps the step calls made while capturing and its replay runs them again into the
    captured outputs, which is what a CUDA graph does with its kernels."""
    capturing, graphs = [], []

    class Graph:
        def __init__(self):
            self.calls = []
            graphs.append(self)

        def replay(self):
            for step, args, out in self.calls:
                out.copy_(step(*args))

    class Stream:
        def wait_stream(self, other):
            pass

    @contextlib.contextmanager
    def capture(graph, capture_error_mode=None):
        capturing.append(graph)
        yield
        capturing.pop()

    for name, value in {"Stream": Stream, "current_stream": Stream, "CUDAGraph": Graph, "graph": capture,
                        "stream": lambda s: contextlib.nullcontext(),
                        "device": lambda d: contextlib.nullcontext()}.items():
        monkeypatch.setattr(torch.cuda, name, value)
    loaded = load_nf4(tiny_models["mistral"], torch.bfloat16)
    build_fast(loaded)
    eager = stream_decode(loaded)
    loaded.fast.compile(inductor=False, cuda_graph=True)
    step = loaded.fast.compiled.step

    def recorded(*args):
        out = step(*args)
        if capturing:
            capturing[-1].calls.append((step, args, out))
        return out

    loaded.fast.compiled.step = recorded
    for run in range(1, 3):  # each run is a new cache: new buffers, recorded again
        steps = stream_decode(loaded)
        assert len(graphs) == run and loaded.fast.compiled is not None, loaded.fast.notice
        assert max(((a - b).abs().max() / a.abs().max()).item() for a, b in zip(eager, steps)) < SAME_BF16
    assert loaded.fast.notice.startswith("compiled the decode step in")


def test_eight_bit_on_the_cpu_runs_on_transformers(tiny_models):
    loaded = load(str(tiny_models["mistral"]), quant="8bit", device="cpu")
    assert loaded.fast is None and loaded.weights == "bnb-int8"
    chat = Chat(loaded, GREEDY.replace(sinks=4, window=32, max_new_tokens=12))
    say(chat, "Hello there, how are you today?")
    say(chat, "Tell me more please.")
    assert chat.occupancy().evicted > 0


def test_four_bit_on_the_cpu_is_packed_int4_shared_by_both_paths(smollm_hf):
    smollm = smollm_hf
    linear = [m for m in smollm.model.modules() if isinstance(m, Int4Linear)]
    assert len(linear) == 30 * 7  # q k v o gate up down of the 30 layers
    qkv = smollm.fast.layers[0].qkv
    q = smollm.model.model.layers[0].self_attn.q_proj
    assert q.packed.untyped_storage().data_ptr() == qkv.packed.untyped_storage().data_ptr()  # one copy
    assert smollm.fingerprint["quant"] == "auto" and smollm.fingerprint["weights"] == "auto: gguf Q4_1 -> int4 g32 + fp16"


def test_other_architectures_fall_back_to_transformers(tiny_models, monkeypatch):
    lfm2 = load(str(tiny_models["lfm2"]), quant="4bit", device="cpu")  # not Llama-family
    assert lfm2.fast is None and lfm2.weights == "int4pack-g32"
    assert any(isinstance(m, Int4Linear) for m in lfm2.model.modules())
    monkeypatch.setattr(fast, "supported", lambda model: False)  # as for any architecture it does not know
    other = load(str(tiny_models["mistral"]), quant="4bit", device="cpu")
    assert other.fast is None and isinstance(other.model.model.layers[0].self_attn.q_proj, Int4Linear)
    chat = Chat(other, GREEDY.replace(sinks=4, window=32, max_new_tokens=20))
    say(chat, "Hello there, how are you today?")
    say(chat, "Tell me more please.")
    assert chat.occupancy().evicted > 0


@pytest.mark.parametrize("kv", ["float32", "bfloat16", "float16"])
def test_resume_is_exact_for_every_kv_dtype(smollm, kv):
    settings = GREEDY.replace(sinks=4, window=48, block=8, max_new_tokens=16, kv_dtype=kv)
    store = Store()
    chat = Chat(smollm, settings)
    say(chat, "What is the capital of France?")
    chat_id = store.create(chat, settings)
    say(chat, "And of Italy?")
    store.save(chat_id, chat)
    assert chat.cache.evictions and chat.cache.layers[0].keys.dtype == getattr(torch, kv)
    assert chat.fingerprint()["kv_dtype"] == kv
    store.unlock(chat_id)
    chat2 = Chat(smollm, settings)
    assert Store(store.root).open(chat_id, chat2) == []
    assert chat2.cache.layers[0].sink_orig.dtype == torch.float32  # the sinks' pristine copy
    n = len(chat.tokens)
    assert say(chat2, "And of Spain?") == say(chat, "And of Spain?")
    assert chat2.tokens[n:] == chat.tokens[n:]


def test_auto_picks_a_bf16_cache_on_a_cpu_with_native_bf16_only(tiny_models, monkeypatch):
    """The capability torch reports decides, forced both ways here (and absent, as in an older torch):
    AVX512-BF16 or AMX-BF16 gives a 4-bit fast-path model a bf16 cache, anything else float32. A
    ``--quant none`` model stays float32, and a model off the fast path keeps its compute dtype."""
    folder = str(tiny_models["mistral"])
    for found, native in CPU_REPORTS:
        report_cpu(monkeypatch, found)
        want = torch.bfloat16 if native else torch.float32
        loaded = load(folder, quant="4bit", device="cpu")
        assert loaded.fast is not None and loaded.kv_dtype == want, found
        assert Chat(loaded, GREEDY).cache.dtype == want
        assert load(folder, quant="4bit", device="cpu", kv_dtype="float32").kv_dtype == torch.float32
    report_cpu(monkeypatch, {"avx512_bf16": True})
    assert load(folder, quant="none", device="cpu").kv_dtype == torch.float32
    monkeypatch.setattr(fast, "supported", lambda model: False)
    assert load(folder, quant="4bit", device="cpu").kv_dtype == torch.float32


@pytest.mark.parametrize("saved,auto", [("float32", torch.bfloat16), ("bfloat16", torch.float32),
                                        ("bfloat16", torch.bfloat16)])
def test_auto_resumes_a_chat_in_the_kv_dtype_it_was_saved_in(smollm, saved, auto, monkeypatch):
    """A chat saved with a float32 cache (auto before it picked bf16, or a CPU without native bf16)
    goes on token for token where auto now picks bf16, and the other way round, without a rebuild."""
    settings = GREEDY.replace(sinks=4, window=48, block=8, max_new_tokens=16)
    store = Store()
    chat = Chat(smollm, settings.replace(kv_dtype=saved))
    say(chat, "What is the capital of France?")
    chat_id = store.create(chat, settings)  # the chat's setting is auto
    say(chat, "And of Italy?")
    store.save(chat_id, chat)
    assert chat.cache.evictions
    store.unlock(chat_id)
    monkeypatch.setattr(smollm, "kv_dtype", auto)  # what auto means on this CPU
    chat2 = Chat(smollm, settings)
    assert chat2.cache.dtype == auto
    assert Store(store.root).open(chat_id, chat2) == []
    assert chat2.cache.dtype == getattr(torch, saved) and chat2.fingerprint()["kv_dtype"] == saved
    n = len(chat.tokens)
    assert say(chat2, "And of Spain?") == say(chat, "And of Spain?")
    assert chat2.tokens[n:] == chat.tokens[n:]


def test_a_chat_saved_with_another_kv_dtype_is_rebuilt(smollm):
    settings = GREEDY.replace(sinks=4, window=48, block=8, max_new_tokens=8)
    store = Store()
    chat = Chat(smollm, settings.replace(kv_dtype="bfloat16"))
    say(chat, "What is the capital of France?")
    chat_id = store.create(chat, settings)
    store.unlock(chat_id)
    chat2 = Chat(smollm, settings.replace(kv_dtype="float32"))
    notices = Store(store.root).open(chat_id, chat2)
    assert len(notices) == 1 and "kv_dtype" in notices[0] and "rebuilt" in notices[0]
    assert chat2.cache.layers[0].keys.dtype == torch.float32


def stream_decode(loaded, n: int = 120, window: int = 40, max_positions: int = 100,
                  kv: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """A 32-token chunk, then single tokens, through a sink cache (K/V in ``kv``, rolling buffers in a hybrid
    model's sliding layers) that evicts and rebases; logits per step."""
    ids = text_ids(loaded.tokenizer, n)
    cache = SinkCache(rope_inv_freqs(loaded.model), 4, window, 10, max_positions, dtype=kv,
                      local=local_windows(loaded.model.config))
    out, i = [], 0
    with torch.inference_mode():
        for size in [32] + [1] * (n - 32):
            positions, _ = cache.reserve(size)
            out.append(forward(loaded.model, cache, ids[i : i + size], positions, keep=1))
            i += size
    assert cache.evictions and cache.base > 0
    return out


def test_static_step_matches_the_eager_step(tiny_models):
    """The static-shape step (whole buffers, masked) that torch.compile captures, run eagerly."""
    loaded = load(str(tiny_models["qwen2"]), quant="none", device="cpu")
    eager = stream_decode(loaded)
    loaded.fast.compiled = loaded.fast.static_step  # same dispatch as a compiled step, without compiling
    static = stream_decode(loaded)
    assert max(((a - b).abs().max() / a.abs().max()).item() for a, b in zip(eager, static)) < SAME_F32


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_a_bf16_cache_on_the_cpu_attends_alike_in_the_eager_and_static_steps(arch, tiny_models, tiny_families):
    """Both steps attend one token in a bf16 cache with :func:`~sinkchat.model.fast.matmul_attention`
    (Gemma 3: sliding layers of 8 tokens beside a global one, and its own query scale), so they agree
    as in float32 (what a bf16 cache moves is bounded on the real model, against transformers and by
    the perplexity test)."""
    loaded = load(str({**tiny_models, **tiny_families}[arch]), quant="none", device="cpu")
    eager = stream_decode(loaded, kv=torch.bfloat16)
    loaded.fast.compiled = loaded.fast.static_step
    static = stream_decode(loaded, kv=torch.bfloat16)
    assert max(((a - b).abs().max() / a.abs().max()).item() for a, b in zip(eager, static)) < SAME_F32


def test_matmul_attention_matches_float32_attention_over_the_slots_it_keeps():
    """One query against random bf16 K/V, stale slots past the new token and (a sliding layer) those
    a window back masked: float32 SDPA over the same kept bf16 values is the reference."""
    gen = torch.Generator().manual_seed(0)
    H, KV, D, capacity, slot, window = 9, 3, 64, 300, 250, 100
    q = torch.randn(1, H, D, generator=gen)
    keys, values = (torch.randn(1, KV, capacity, D, generator=gen).to(torch.bfloat16) for _ in range(2))
    at = torch.arange(capacity)
    for mask in (at <= slot, (at <= slot) & (at > slot - window)):
        got = fast.matmul_attention(q, keys, values, mask, scale=0.1)
        kept = mask.nonzero()[:, 0]
        want = torch.nn.functional.scaled_dot_product_attention(
            q.view(1, H, 1, D), keys[:, :, kept].float(), values[:, :, kept].float(), enable_gqa=True, scale=0.1)
        assert ((got - want.reshape(1, -1)).norm() / want.norm()).item() < 1e-2


def test_compiled_step_matches_the_eager_step(tiny_models, fresh_compile):
    loaded = load(str(tiny_models["mistral"]), quant="none", device="cpu", compile="off")
    eager = stream_decode(loaded)
    compiled = load(str(tiny_models["mistral"]), quant="none", device="cpu", compile="on")
    steps = stream_decode(compiled)
    notices = compiled.take_notices()
    assert compiled.fast.compiled is not None, notices  # it compiled, no fallback
    assert notices[0].startswith("the first reply compiles") and "compiled the decode step in" in notices[1]
    assert max(((a - b).abs().max() / a.abs().max()).item() for a, b in zip(eager, steps)) < SAME_F32


def test_a_failed_compile_falls_back_to_eager_with_one_notice(tiny_models):
    loaded = load(str(tiny_models["mistral"]), quant="none", device="cpu")
    eager = stream_decode(loaded)

    def broken(*args):
        raise RuntimeError("no C compiler\nsecond line")

    loaded.fast.compiled = broken
    steps = stream_decode(loaded)
    assert loaded.fast.compiled is None and loaded.fast.step_kind == "eager"
    assert loaded.take_notices() == ["compiling the decode step failed (RuntimeError); decoding eagerly"]
    assert loaded.take_notices() == []
    assert max(((a - b).abs().max() / a.abs().max()).item() for a, b in zip(eager, steps)) < SAME_F32


def test_packed_weights_are_kept_for_the_next_start(tiny_models, tmp_path, monkeypatch):
    """The first 4-bit load quantizes and keeps the packed weights; the next one reads them (same
    logits); a damaged file is quantized again and replaced, never trusted."""
    monkeypatch.setenv("SINKCHAT_CACHE_DIR", str(tmp_path / "cache"))
    folder = str(tiny_models["mistral"])
    ids = [1, 2, 3, 4, 5, 6]

    def logits():
        loaded = load(folder, quant="4bit", device="cpu")
        cache = SinkCache.for_model(loaded.model, 4, 32)
        with torch.inference_mode():
            positions, _ = cache.reserve(len(ids))
            return forward(loaded.model, cache, ids, positions, keep=0)

    first = logits()
    (kept,) = (tmp_path / "cache" / "packed").iterdir()
    stamp = kept.stat().st_mtime_ns
    assert torch.equal(logits(), first) and kept.stat().st_mtime_ns == stamp  # read, not rewritten
    kept.write_bytes(b"not a safetensors file")
    assert torch.equal(logits(), first)
    assert kept.read_bytes() != b"not a safetensors file"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
def test_the_graph_step_agrees_with_the_eager_step_in_16_bits(dtype):
    """What a CUDA graph replays (:meth:`FastModel.static_step`: the whole buffers, the empty slots
    masked) against the eager step, on the bundled model's bf16 weights with compute and KV cache in
    ``dtype``, through evictions: within 1e-2 of the largest logit (the output head is bf16 either
    way, so one rounding step of a logit is ~4e-3). Before the eager step shared the static step's
    attention for one token, bf16 SDPA over the filled slots alone rounded differently (1.4e-2)."""
    from sinkchat.model.gpu import DenseLinear

    loaded = load("smollm2-135m", quant="none", device="cpu", dtype="bfloat16", quick=False)
    fast_model = FastModel.build(loaded.model, make=lambda w, b, key: DenseLinear(w, b, dtype))
    ids = text_ids(loaded.tokenizer, 200)
    runs = []
    for static in (False, True):
        cache = SinkCache.for_model(loaded.model, 4, 120, dtype=dtype)
        out, at = [], 0
        with torch.inference_mode():
            for size in [64, 64] + [1] * 72:  # past 124 held tokens: evictions
                positions, _ = cache.reserve(size)
                fast_model.compiled = fast_model.static_step if static and size == 1 else None
                out.append(fast_model(ids[at : at + size], positions, cache))
                at += size
        assert cache.evictions
        runs.append(out[2:])
    eager, graph = runs
    worst = max(((g - e).abs().max() / e.abs().max()).item() for g, e in zip(graph, eager))
    assert worst < 1e-2


@pytest.mark.parametrize("kv", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
def test_the_compiled_step_is_one_layer_package_that_matches_the_eager_step(kv, smollm, fresh_compile, monkeypatch):
    """The CPU's compiled decode step (``--compile auto`` where inductor finds a C++ compiler): AOTInductor
    compiles one layer into one package that all 30 layers run, kept on disk; on the bundled model (int4
    weights, a float32 or bf16 cache, evictions and rebases) its logits follow the eager static step's,
    and the next start reads the package (compiles nothing, says nothing) and decodes the same logits."""
    fm = smollm.fast
    for name in ("compiled", "layer_step", "notice", "compiled_s"):  # the session's model: put back afterwards
        monkeypatch.setattr(fm, name, getattr(fm, name))
    fm.compiled = fm.static_step
    eager = stream_decode(smollm, kv=kv)
    fm.compile()
    steps = stream_decode(smollm, kv=kv)
    assert fm.compiled is not None and fm.notice.startswith("compiled the decode step in"), fm.notice
    assert fm.layer_step.compiled == 1 and len(fm.layer_step.runs) == 1  # 30 layers, one package
    assert len(list(fresh_compile.glob("*.pt2"))) == 1
    assert fm.step_kind == "compiled layers"  # what the benchmarks report
    # int4 kernels take bf16 activations: a fused norm that rounds one element the other way moves the
    # logits ~2e-2 of the largest (measured 1.6e-2 float32, 2.3e-2 bf16; the same greedy token all 89
    # steps); a wrong slot, position or mask moves them by ~1
    worst = max(((a - b).abs().max() / a.abs().max()).item() for a, b in zip(eager, steps))
    same = sum(int(a.argmax() == b.argmax()) for a, b in zip(eager, steps))
    assert worst < SAME_BF16_KV and same >= 0.95 * len(steps), (worst, same)
    (package,) = fresh_compile.glob("*.pt2")
    os.utime(package, (0, 0))
    fm.notice = None
    fm.compile()  # as at the next start
    again = stream_decode(smollm, kv=kv)
    assert fm.layer_step.compiled == 0 and fm.notice is None and fm.step_kind == "compiled layers"
    assert all(torch.equal(a, b) for a, b in zip(steps, again))
    assert package.stat().st_mtime > time.time() - 3600  # marked as used: not swept as stale


def test_a_damaged_or_linked_compiled_layer_is_compiled_again(tiny_models, fresh_compile, monkeypatch, tmp_path):
    """A package on disk that cannot be loaded (damaged, foreign) or that is a symlink is never trusted:
    the layer is compiled again and a real file replaces it; the logits stay those of the first start.
    No unpacked package is left in the temporary dir, where AOTInductor's loader used to leave one
    (1.8 MB) at each start for good (inductor's precompiled headers are a cache of its own there)."""
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    def start() -> tuple[int, list[torch.Tensor]]:
        loaded = load(str(tiny_models["mistral"]), quant="none", device="cpu", compile="on")
        steps = stream_decode(loaded)
        return loaded.fast.layer_step.compiled, steps

    built, first = start()
    (package,) = fresh_compile.glob("*.pt2")
    assert built == 1
    package.write_bytes(b"not a package")
    built, steps = start()
    assert built == 1 and package.read_bytes()[:2] == b"PK" and all(map(torch.equal, first, steps))
    elsewhere = package.with_name("elsewhere")
    package.rename(elsewhere)
    package.symlink_to(elsewhere)
    built, steps = start()
    assert built == 1 and not package.is_symlink() and all(map(torch.equal, first, steps))
    assert start()[0] == 0  # kept, read
    assert not [p.name for p in scratch.iterdir() if p.name.startswith(("aotinductor_", "sinkchat-aoti-"))]


def test_a_folder_in_the_compiled_layers_place_still_runs_compiled(tiny_models, fresh_compile):
    """Something that cannot be replaced by a file where the package goes (here a folder of its name)
    costs the next start the compile, not the compiled step: the chat decodes through the package just
    compiled, where it used to fall back to eager after compiling (IsADirectoryError)."""
    def start():
        loaded = load(str(tiny_models["mistral"]), quant="none", device="cpu", compile="on")
        return loaded.fast, stream_decode(loaded)

    fm, first = start()
    (package,) = fresh_compile.glob("*.pt2")
    package.unlink()
    package.mkdir()
    fm, steps = start()
    assert fm.step_kind == "compiled layers" and fm.layer_step.compiled == 1, fm.notice
    assert fm.notice.startswith("compiled the decode step in") and all(map(torch.equal, first, steps))
    assert package.is_dir() and list(fresh_compile.iterdir()) == [package]  # no temporary file left


def test_a_compile_killed_midway_leaves_nothing_behind_at_the_next_compile(tiny_models, fresh_compile):
    """A sinkchat killed (kill -9) while compiling leaves its part-written package in the cache dir; the
    next compile there removes it (its process is gone) and keeps only whole packages, those a start
    has used within ``STALE_DAYS``."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    code = ("from sinkchat.model.load import load; from test_fast import stream_decode; "
            f"loaded = load({str(tiny_models['mistral'])!r}, quant='none', device='cpu', compile='on'); "
            "print('loaded', flush=True); stream_decode(loaded)")
    env = {**os.environ, "TORCH_COMPILE_DISABLE": "0", "PYTHONPATH": str(Path(__file__).parent)}
    child = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "loaded"
        for _ in range(600):
            if fresh_compile.is_dir() and list(fresh_compile.iterdir()):
                break
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert len(list(fresh_compile.iterdir())) == 1  # what the killed compile left
    stale, recent = fresh_compile / "0stale.pt2", fresh_compile / "1recent.pt2"  # an older torch's, a sibling's
    for path, days in ((stale, aot.STALE_DAYS + 1), (recent, aot.STALE_DAYS - 1)):
        path.write_bytes(b"package")
        os.utime(path, (time.time() - days * 86400,) * 2)
    (fresh_compile / "99999999999999999999.part.x.pt2").touch()  # no process has that pid (it stopped compiles)
    loaded = load(str(tiny_models["mistral"]), quant="none", device="cpu", compile="on")
    stream_decode(loaded)
    assert loaded.fast.step_kind == "compiled layers", loaded.fast.notice
    recent.unlink()
    (package,) = fresh_compile.iterdir()
    assert package.stat().st_size > 0


def test_compile_auto_on_the_cpu_compiles_where_inductor_can(tiny_models, compiling, monkeypatch):
    """``--compile auto`` compiles the CPU's decode step where inductor finds a C++ compiler, leaves it
    eager without one (nothing to say: eager is the default there) and under PyTorch's own
    ``TORCH_COMPILE_DISABLE=1``, where an explicit ``--compile on`` says why it runs eagerly."""
    from sinkchat.model import kernels

    path = str(tiny_models["mistral"])
    loaded = load(path, quant="none", device="cpu")
    assert loaded.fast.compiled is not None
    assert loaded.take_notices() == ["the first reply compiles the decode step (seconds the first time)"]
    monkeypatch.setattr(kernels, "_cpp_compiler", lambda: False)
    loaded = load(path, quant="none", device="cpu")
    assert loaded.fast.compiled is None and loaded.take_notices() == []
    monkeypatch.setattr(torch._dynamo.config, "disable", True)
    loaded = load(path, quant="none", device="cpu", compile="on")
    assert loaded.fast.compiled is None
    assert loaded.take_notices() == ["--compile on: TORCH_COMPILE_DISABLE=1 is set, the decode step runs eagerly"]


def test_compile_with_an_unusable_inductor_cache_dir_still_compiles(tiny_models, compiling, monkeypatch, tmp_path):
    """A cache dir where inductor's kernels cannot be kept (here a file named like their folder; a
    read-only cache of converted models alike) leaves them in torch's default place: the chat starts
    and compiles, where inductor's setup used to raise out of the load and end the chat."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    (tmp_path / "inductor").write_text("")
    (tmp_path / "aoti").write_text("")  # and the compiled layer: compiled into a temporary file, not kept
    monkeypatch.setenv("SINKCHAT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # as importing transformers leaves it
    loaded = load(str(tiny_models["mistral"]), quant="none", device="cpu", compile="on")
    assert loaded.fast.compiled is not None
    assert loaded.take_notices() == ["the first reply compiles the decode step (seconds the first time)"]
    stream_decode(loaded)
    notices = loaded.take_notices()
    assert len(notices) == 1 and notices[0].startswith("compiled the decode step in"), notices
    assert notices[0].endswith("(not kept: the cache dir cannot be written; the next start compiles again)")
    assert (tmp_path / "aoti").is_file() and not list(tmp_path.glob("*.pt2"))


def test_a_replys_speed_leaves_out_the_compile_its_first_step_took(tiny_models, fresh_compile):
    """The header's tok/s of the first reply: the step that compiled the decode step (seconds) is not
    decoding, so the reply's seconds leave it out (before, a chat's first reply read 1.5 tok/s)."""
    from sinkchat.engine import Done

    loaded = load(str(tiny_models["mistral"]), quant="none", device="cpu", compile="on")
    chat = Chat(loaded, GREEDY.replace(max_new_tokens=4))
    t0 = time.perf_counter()
    done = [e for e in chat.submit("Hi") if isinstance(e, Done)][0]
    wall = time.perf_counter() - t0
    assert loaded.fast.compiled_s is not None and done.generated > 1
    assert done.seconds <= wall - loaded.fast.compiled_s  # the compile is in the wall time, not in the reply's


def test_a_compiled_layer_is_named_by_the_cpu_it_was_built_for(monkeypatch):
    """Inductor builds a package for this CPU's instruction set (``-march=native``): a CPU that reports
    other features (a cache dir shared over NFS, a copied home) gets a name of its own and compiles,
    rather than loading code that stops it with an illegal instruction; so do another thread count
    and another cache shape."""
    from sinkchat.model.aot import _digest

    args = [torch.zeros(1, 3, 64, 8, dtype=torch.bfloat16)]
    names = set()
    for found, _ in CPU_REPORTS:
        report_cpu(monkeypatch, found)
        names.add(_digest("a layer", args))
    assert len(names) == len(CPU_REPORTS)
    report_cpu(monkeypatch, {"avx512_bf16": True})
    same = _digest("a layer", args)
    assert _digest("a layer", args) == same
    assert _digest("a layer", [torch.zeros(1, 3, 65, 8, dtype=torch.bfloat16)]) != same
    with_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(with_threads + 1)
        assert _digest("a layer", args) != same
    finally:
        torch.set_num_threads(with_threads)
