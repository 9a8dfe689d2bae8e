"""Model families (sinkchat.model.families) on the fast path: tiny random models of each, built in the
test, against transformers' own forward before anything is evicted, and against an independent
StreamingLLM reference with per-layer geometry through evictions and rebases."""

from __future__ import annotations

import inspect

import pytest
import torch
from test_cache import text_ids
from transformers import AutoModelForCausalLM

from sinkchat.kv import SinkCache, rope_inv_freqs
from sinkchat.kv.cache import local_windows
from sinkchat.model import forward, forward_outputs, load
from sinkchat.model.fast import FastModel, supported

pytestmark = pytest.mark.model

SAME_F32 = 1e-4  # of the largest logit; measured ~1e-6 (summation order), a position off by one moves ~1e-1
FAMILIES = ["llama3", "qwen3", "gemma3"]


def reference_logits(model, ids: list[int], sinks: int, window: int) -> list[torch.Tensor]:
    """StreamingLLM by its definition, one token at a time, written apart from sinkchat's cache and
    fast path: each layer keeps every token's key before RoPE (after any q/k norm) and its value as
    computed; a global layer attends to the first ``sinks`` tokens and the last ``window`` (the new
    one included), a sliding layer of a hybrid model to the last ``sliding_window``; the held tokens
    sit at consecutive positions ending at the query's. The model's own modules do everything else.
    Logits ``[vocab]`` per token."""
    config, body = model.config, model.model
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    hybrid = local_windows(config) is not None
    sandwich = hasattr(body.layers[0], "pre_feedforward_layernorm")
    per_type = "layer_type" in inspect.signature(body.rotary_emb.forward).parameters
    raw_k = [[] for _ in types]
    vals = [[] for _ in types]
    out = []
    with torch.no_grad():
        for t, tok in enumerate(ids):
            x = body.embed_tokens(torch.tensor([[tok]]))
            for i, layer in enumerate(body.layers):
                attn = layer.self_attn
                D = attn.head_dim
                h = layer.input_layernorm(x)
                q = attn.q_proj(h).view(1, 1, -1, D).transpose(1, 2)
                k = attn.k_proj(h).view(1, 1, -1, D).transpose(1, 2)
                if hasattr(attn, "q_norm"):
                    q, k = attn.q_norm(q), attn.k_norm(k)
                raw_k[i].append(k)
                vals[i].append(attn.v_proj(h).view(1, 1, -1, D).transpose(1, 2))
                if hybrid and types[i] == "sliding_attention":
                    held = list(range(max(0, t - config.sliding_window + 1), t + 1))
                else:
                    held = sorted(set(range(min(sinks, t + 1))) | set(range(max(0, t - window + 1), t + 1)))
                keys, values = torch.cat([raw_k[i][j] for j in held], 2), torch.cat([vals[i][j] for j in held], 2)
                pos = torch.arange(len(held))[None]
                cos, sin = body.rotary_emb(values, pos, types[i]) if per_type else body.rotary_emb(values, pos)
                if cos.shape[-1] == D // 2:  # gpt-oss hands out one half (its rotation is rotate-half all the same)
                    cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
                cos, sin = cos[:, None], sin[:, None]
                rot = lambda z, c, s: z * c + torch.cat([-z[..., D // 2 :], z[..., : D // 2]], -1) * s  # noqa: E731
                q, keys = rot(q, cos[:, :, -1:], sin[:, :, -1:]), rot(keys, cos, sin)
                groups = q.shape[1] // keys.shape[1]
                keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
                scores = (q @ keys.transpose(2, 3)) * attn.scaling
                if hasattr(attn, "sinks"):  # a learned sink logit per head joins the softmax, then drops out
                    scores = torch.cat([scores, attn.sinks.view(1, -1, 1, 1)], -1)
                weights = torch.softmax(scores, -1)[..., : len(held)]
                a = attn.o_proj((weights @ values).transpose(1, 2).reshape(1, 1, -1))
                mlp = lambda z: (lambda y: y[0] if isinstance(y, tuple) else y)(layer.mlp(z))  # noqa: E731
                if sandwich:
                    x = x + layer.post_attention_layernorm(a)
                    x = x + layer.post_feedforward_layernorm(mlp(layer.pre_feedforward_layernorm(x)))
                else:
                    x = x + a
                    x = x + mlp(layer.post_attention_layernorm(x))
            out.append(model.lm_head(body.norm(x))[0, -1].float())
    return out


def worst(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(((x - y).abs().max() / y.abs().max()).item() for x, y in zip(a, b))


@pytest.mark.parametrize("arch", FAMILIES)
def test_each_family_runs_on_the_fast_path_and_equals_transformers_before_eviction(arch, tiny_families):
    loaded = load(str(tiny_families[arch]), quant="none", device="cpu", dtype="float32")
    assert isinstance(loaded.fast, FastModel), arch
    ids = text_ids(loaded.tokenizer, 40)
    dense = AutoModelForCausalLM.from_pretrained(tiny_families[arch], dtype=torch.float32)
    with torch.no_grad():
        want = dense(torch.tensor([ids])).logits[0]  # transformers' own cache: its sliding layers slide
    cache = SinkCache.for_model(loaded.model, 4, 64)
    with torch.inference_mode():
        first = forward(loaded.model, cache, ids[:24], cache.reserve(24)[0], keep=0)
        rest = [forward(loaded.model, cache, ids[i : i + 1], cache.reserve(1)[0]) for i in range(24, 40)]
    got = torch.cat([first] + rest)
    assert not cache.evictions and ((got - want).abs().max() / want.abs().max()).item() < SAME_F32


@pytest.mark.parametrize("arch", FAMILIES)
def test_each_family_streams_as_the_reference_through_evictions_and_rebases(arch, tiny_families):
    """Token by token past the window (and, in Gemma 3's sliding layers, far past their 8-token
    native window), with a rebase every few tokens: per-token eviction (block 1) so that the
    reference's held set is exact."""
    loaded = load(str(tiny_families[arch]), quant="none", device="cpu", dtype="float32")
    reference = AutoModelForCausalLM.from_pretrained(tiny_families[arch], dtype=torch.float32).eval()
    ids = text_ids(loaded.tokenizer, 70)
    cache = SinkCache(rope_inv_freqs(loaded.model), 2, 12, 1, 30, local=local_windows(loaded.model.config))
    assert (arch == "gemma3") == bool(cache.local_layers)
    with torch.inference_mode():
        got = [forward(loaded.model, cache, ids[i : i + 1], cache.reserve(1)[0]) [-1] for i in range(len(ids))]
    assert cache.evictions and cache.base > 0
    assert worst(got, reference_logits(reference, ids, 2, 12)) < SAME_F32


@pytest.mark.parametrize("arch", FAMILIES)
def test_transformers_forward_over_the_same_geometry_matches_the_fast_path(arch, tiny_families):
    """What a family the fast path does not serve gets: transformers' own forward over the per-layer
    cache (its masks sized by the layers), here checked against the fast path on the same tokens."""
    loaded = load(str(tiny_families[arch]), quant="none", device="cpu", dtype="float32")
    ids = text_ids(loaded.tokenizer, 60)
    caches = [SinkCache(rope_inv_freqs(loaded.model), 2, 12, 4, 40, local=local_windows(loaded.model.config))
              for _ in range(2)]
    worst_seen, i = 0.0, 0
    with torch.inference_mode():
        for size in [8] + [1] * (len(ids) - 8):
            (p1, _), (p2, _) = (c.reserve(size) for c in caches)
            a = loaded.fast(ids[i : i + size], p1, caches[0], 0)
            b = forward_outputs(loaded.model, caches[1], ids[i : i + size], p2, 0).logits[0].float()
            worst_seen = max(worst_seen, ((a - b).abs().max() / b.abs().max()).item())
            i += size
    assert caches[0].evictions and caches[0].base > 0
    assert worst_seen < SAME_F32


def test_the_gate_refuses_what_the_fast_path_does_not_compute(tiny_families):
    """Gemma 2-style soft-capping and dynamic RoPE stay on transformers' forward."""
    model = AutoModelForCausalLM.from_pretrained(tiny_families["gemma3"], dtype=torch.float32)
    assert supported(model)
    model.config.final_logit_softcapping = 30.0
    assert not supported(model)
    llama = AutoModelForCausalLM.from_pretrained(tiny_families["llama3"], dtype=torch.float32)
    assert supported(llama)
    llama.config.rope_parameters = {**llama.config.rope_parameters, "rope_type": "dynamic"}
    assert not supported(llama)


def test_a_model_with_learned_sinks_streams_without_sink_tokens(tiny_families):
    """gpt-oss learns a sink logit per head (StreamingLLM's section 3.3 "dedicated learnable sink"), so
    ``--sinks 0`` keeps it fluent: through transformers' forward over the per-layer cache (its MoE
    block is not on the fast path), logits equal the reference that applies the sink logit over the
    kept window, through evictions and rebases."""
    folder = tiny_families["gpt_oss"]
    loaded = load(str(folder), quant="none", device="cpu", dtype="float32")
    assert loaded.fast is None
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = text_ids(loaded.tokenizer, 50)
    cache = SinkCache(rope_inv_freqs(loaded.model), 0, 12, 1, 30, local=local_windows(loaded.model.config))
    with torch.inference_mode():
        got = [forward(loaded.model, cache, ids[i : i + 1], cache.reserve(1)[0])[-1] for i in range(len(ids))]
    assert cache.evictions and cache.base > 0 and cache.local_layers
    assert worst(got, reference_logits(reference, ids, 0, 12)) < SAME_F32


def test_a_hybrid_chat_resumes_rolls_back_and_pins_exactly(tiny_families, tmp_path, monkeypatch):
    """Gemma 3's sliding layers roll on their own (8 tokens, a few slots of room here, so they drop
    tokens every turn) beside the global layers' sinks + window, with rebases: saved after every
    turn, each save resumes to the same cache bit for bit; a regenerated reply (from the checkpoint,
    whose copies of what the sliding layers dropped are saved too) is the first one; a pinned message
    the window moved past stays held; the next greedy reply after a resume is the uninterrupted one."""
    from conftest import tiny_model_dir
    from test_saves import QUESTIONS, resumes_exactly

    from _helpers import GREEDY, say
    from sinkchat.engine import Chat
    from sinkchat.kv import cache as kv_cache
    from sinkchat.model import bundled_gguf, gguf_folder
    from sinkchat.store import Store

    monkeypatch.setattr(kv_cache, "LOCAL_ROOM", 12)
    folder = tiny_model_dir("gemma3", gguf_folder(bundled_gguf()), tmp_path / "gemma3", max_position_embeddings=160)
    loaded = load(str(folder), quant="none", device="cpu", dtype="float32")
    settings = GREEDY.replace(sinks=4, window=48, block=8, max_new_tokens=6, pin_max=24)
    store, chat = Store(tmp_path / "data"), Chat(loaded, settings)
    say(chat, QUESTIONS[0])
    chat_id = store.create(chat, settings)
    kinds = []

    def turn(text: str) -> str:
        reply = say(chat, text)
        store.save(chat_id, chat)
        kinds.append(store.last_save["kind"])
        resumes_exactly(tmp_path / "data", chat_id, chat, loaded, settings)
        return reply

    turn("My name is Ada and my cat is called Pixel.")
    chat.pin(3)
    for question in QUESTIONS[1:6]:
        turn(question)
    assert chat.cache.parked and chat.cache.base > 0 and chat.cache.local_layers
    assert "segment" in kinds and "base" in kinds
    first = turn("What is my cat called?")
    assert chat.cache.checkpoint.lstash  # the sliding layers dropped tokens the turn's start needs
    tokens = list(chat.tokens)
    again = resumes_exactly(tmp_path / "data", chat_id, chat, loaded, settings)
    assert again.rollback() is None and say(again, "What is my cat called?") == first and again.tokens == tokens
    assert chat.rollback() is None and turn("What is my cat called?") == first and chat.tokens == tokens
    again = resumes_exactly(tmp_path / "data", chat_id, chat, loaded, settings)
    assert say(again, QUESTIONS[7]) == turn(QUESTIONS[7]) and again.tokens == chat.tokens
    store.close()


def without_chat_template(folder, out):
    """A copy of a model folder whose tokenizer has no chat template (as a base model's)."""
    import json
    import shutil

    shutil.copytree(folder, out)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def test_a_base_model_chats_by_continuing_the_text_with_one_notice(tiny_families, tmp_path):
    from _helpers import GREEDY, say
    from sinkchat.engine import Chat

    folder = without_chat_template(tiny_families["qwen3"], tmp_path / "base")
    loaded = load(str(folder), quant="none", device="cpu")
    notices = loaded.take_notices()
    assert len(notices) == 1 and "no chat template (a base model)" in notices[0]
    chat = Chat(loaded, GREEDY.replace(max_new_tokens=4))
    say(chat, "The cat sat")
    say(chat, "on the mat")
    text = loaded.tokenizer.decode(chat.tokens)
    assert text.startswith(f"{loaded.tokenizer.bos_token}The cat sat\n\n") and "\n\non the mat\n\n" in text


def test_every_bench_streams_bos_first_where_the_tokenizer_adds_it(tmp_path):
    """On a BOS model BOS is the attention sink; a bench stream without it measures something else."""
    from tokenizers import Tokenizer, processors
    from transformers import AutoTokenizer

    from sinkchat import bench
    from sinkchat.model import bundled_gguf, gguf_folder

    plain = AutoTokenizer.from_pretrained(gguf_folder(bundled_gguf()))
    assert not bench.bos_first(plain) and bench.text_ids(plain, "Hello world", 5)[0] != plain.bos_token_id
    folder = tmp_path / "bos"
    plain.save_pretrained(folder)
    backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    backend.post_processor = processors.TemplateProcessing(
        single=f"{plain.bos_token} $A", special_tokens=[(plain.bos_token, plain.bos_token_id)])
    backend.save(str(folder / "tokenizer.json"))
    with_bos = AutoTokenizer.from_pretrained(folder)
    ids = bench.text_ids(with_bos, "Hello world", 5)
    assert bench.bos_first(with_bos) and ids[0] == with_bos.bos_token_id and ids.count(with_bos.bos_token_id) == 1
    assert ids[1:] == bench.text_ids(plain, "Hello world", 4)


@pytest.mark.parametrize("window", [0, 10**12])
def test_a_hybrid_models_odd_sliding_window_is_refused_or_capped(tiny_families, tmp_path, window):
    """0 is one line before the weights load; a window past the context keeps no more than the context
    (a sliding layer sized by the window tried to allocate terabytes)."""
    import json
    import shutil

    from _helpers import run_cli

    folder = shutil.copytree(tiny_families["gemma3"], tmp_path / "g")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "sliding_window": window}))
    out = run_cli("--model", str(folder), "--plain", "--no-save", "-t", "0", "--max-new-tokens", "3", input="hi\n")
    if window == 0:
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and "positive integer" in out.stderr, out.stderr
    else:
        assert out.returncode == 0 and "| sliding 4096" in out.stdout, out.stderr
