"""The decode step's candidate head (sinkchat.model.head) on the bundled model: int4 picks the
candidates, float16 computes their logits; what the user gets must be what the whole float16 head
gives, and every logit that is shown or scored comes from the whole head."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from _helpers import GREEDY, ROOT
from sinkchat.bench.stream import Stream
from sinkchat.engine import Chat, Done
from sinkchat.kv import SinkCache
from sinkchat.model.head import CandidateHead
from sinkchat.sampling import MIN_CANDIDATES, Sampler
from sinkchat.settings import Settings

PROMPTS = [
    "Write a long story about a lighthouse keeper and a storm.",
    "Explain step by step how a refrigerator keeps food cold.",
    "List twenty animals, with one fact about each.",
]
SAMPLED = Settings(seed=7)  # the defaults: temperature 0.7, top_k 50, top_p 0.9, repetition penalty 1.1


def replies(loaded, settings: Settings, max_new_tokens: int = 150) -> list[Chat]:
    """One chat per prompt, each a single turn decoded to its end or ``max_new_tokens``."""
    chats = []
    for prompt in PROMPTS:
        chat = Chat(loaded, settings.replace(max_new_tokens=max_new_tokens))
        assert any(isinstance(e, Done) for e in chat.submit(prompt))
        chats.append(chat)
    return chats


def full_head(monkeypatch, loaded) -> None:
    monkeypatch.setattr(loaded.fast, "candidate_head", None)


def test_greedy_and_sampled_replies_are_the_whole_heads(smollm, monkeypatch):
    """A few hundred decode steps from several prompts: greedy (64 candidates) and seeded sampling at
    the default top_k 50 (400 candidates) give the same tokens as the whole float16 head."""
    assert isinstance(smollm.fast.candidate_head, CandidateHead)
    greedy, sampled = replies(smollm, GREEDY), replies(smollm, SAMPLED)
    assert sum(len(c.tokens) - c.messages[-1].start for c in greedy) >= 300
    assert torch.isfinite(greedy[0]._logits).sum() == MIN_CANDIDATES  # the last step ran on the candidates
    with monkeypatch.context() as m:
        full_head(m, smollm)
        assert [c.tokens for c in replies(smollm, GREEDY)] == [c.tokens for c in greedy]
        assert [c.tokens for c in replies(smollm, SAMPLED)] == [c.tokens for c in sampled]


def decode_both(loaded, ids: list[int], start: int, candidates: int):
    """``ids`` through two sink caches, ``ids[:start]`` as one chunk and the rest a token at a time, one
    stream asking for ``candidates`` and one for every logit: (candidates' logits, whole logits) per step."""
    streams = [Stream(loaded.model, SinkCache.for_model(loaded.model, 4, 1020)) for _ in range(2)]
    for s in streams:
        s.forward(ids[:start], keep=1)
    for t in ids[start:]:
        yield streams[0].forward([t], keep=1, candidates=candidates)[0], streams[1].forward([t], keep=1)[0]


def test_candidates_hold_the_exact_top_k_at_every_step(smollm):
    """Over the greedy replies to several prompts: at every decode step the candidates (400 for top_k
    50) hold the whole head's top 50, and their logits are the whole head's, bit for bit."""
    candidates = Sampler(Settings()).candidates()
    assert candidates == 400
    steps = 0
    for chat in replies(smollm, GREEDY, max_new_tokens=100):
        start = chat.messages[-1].start
        for some, whole in decode_both(smollm, chat.tokens, start, candidates):
            kept = torch.isfinite(some)
            assert kept.sum() == candidates and torch.isfinite(whole).all()
            assert kept[whole.topk(50).indices].all()
            assert torch.equal(some[kept], whole[kept])
            steps += 1
    assert steps >= 200


def test_the_whole_head_where_every_logit_counts(smollm):
    """No top-k, a repetition penalty that lifts tokens, prefill and the streams of bench ppl: every
    logit exact."""
    assert Sampler(Settings(top_k=0)).candidates() == 0
    assert Sampler(Settings(repetition_penalty=0.9)).candidates() == 0
    chat = Chat(smollm, Settings(top_k=0, seed=1, max_new_tokens=8))
    assert any(isinstance(e, Done) for e in chat.submit(PROMPTS[0]))
    assert torch.isfinite(chat._logits).all()  # its last decode step
    stream = Stream(smollm.model, SinkCache.for_model(smollm.model, 4, 60))
    ids = chat.tokens
    assert torch.isfinite(stream.forward(ids[:20], keep=0, candidates=64)).all()  # a chunk: never candidates
    for t in ids[20:30]:  # bench ppl's decode steps ask for every logit
        assert torch.isfinite(stream.forward([t], keep=1)).all()


def test_the_static_step_takes_the_candidates_too(smollm, monkeypatch):
    """The static-shape decode step torch.compile captures, run eagerly: the same greedy replies with
    the candidates as with the whole head."""
    for name in ("notice", "compiled_s"):  # the first static step leaves both: other tests share this model
        monkeypatch.setattr(smollm.fast, name, getattr(smollm.fast, name))
    monkeypatch.setattr(smollm.fast, "compiled", smollm.fast.static_step)
    static = replies(smollm, GREEDY, max_new_tokens=40)
    assert torch.isfinite(static[0]._logits).sum() == MIN_CANDIDATES
    full_head(monkeypatch, smollm)
    assert [c.tokens for c in replies(smollm, GREEDY, max_new_tokens=40)] == [c.tokens for c in static]


def test_without_avx512_the_float16_head_stays():
    """Where PyTorch's int4 kernel has no AVX-512 (forced here) it is no faster than float16: the whole
    float16 head serves every step, candidates asked for or not."""
    code = (
        "import torch; from sinkchat.model import load, forward; from sinkchat.kv import SinkCache\n"
        "m = load('smollm2-135m', quant='auto', device='cpu')\n"
        "cache = SinkCache.for_model(m.model, 4, 60); p, _ = cache.reserve(1)\n"
        "logits = forward(m.model, cache, [1], p, candidates=64)\n"
        "print(torch.backends.cpu.get_cpu_capability(), m.fast.candidate_head, bool(torch.isfinite(logits).all()))"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-2:] == ["None", "True"], out.stdout
