"""Long-chat memory: a pass key hidden in filler, asked for after the window moved past it, in three
modes: ``dense`` (everything kept: the model's own ceiling), ``sinks`` (sinks + window: what left
the window is forgotten) and ``recall`` (sinks + window + recall from the block memory of what left
it, :mod:`sinkchat.kv.memory`, after InfLLM, Xiao et al., 2024).

Raw text, no chat template, greedy; a key is found when the first five digits of the continuation
are the key. The report says where the key's tokens were when the question was asked: in the
window, recalled, or evicted.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

import torch

from ..kv import SinkCache
from ..ledger import covered_by
from ..model import forward
from . import bos_first
from .stream import Tick, dense_cache

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"
MODES = ("dense", "sinks", "recall")


@dataclass
class Passkey:
    """One task: ``ids`` (context then question), the key, and the key's token span in ``ids``."""

    ids: list[int]
    key: str
    span: tuple[int, int]
    depth: float


@dataclass
class Result:
    mode: str
    key: str
    depth: float
    tokens: int
    found: bool
    answer: str
    where: str  # the key's tokens when the question was asked: window, recalled, evicted
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def passkey_task(tokenizer, tokens: int, depth: float, seed: int) -> Passkey:
    """About ``tokens`` tokens of filler with a five-digit key at ``depth`` (0..1) of it, then the question."""
    key = str(random.Random(seed).randint(10000, 99999))
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    filler = encode(FILLER)
    n = max(1, tokens // len(filler))
    at = int(round(depth * n))
    bos = [tokenizer.bos_token_id] if bos_first(tokenizer) else []
    before = bos + filler * at
    needle = encode(NEEDLE.format(key=key))
    ids = before + needle + filler * (n - at) + encode(QUESTION)
    return Passkey(ids, key, (len(before), len(before) + len(needle)), depth)


@torch.inference_mode()
def run_passkey(model, tokenizer, task: Passkey, mode: str, sinks: int, window: int, recall: int = 0,
                recall_block: int = 64, chunk: int = 64, new_tokens: int = 8, tick: Tick | None = None) -> Result:
    """Feed ``task`` through a cache of ``mode`` in chunks of ``chunk`` tokens, then decode greedily."""
    device = next(model.parameters()).device
    if mode == "dense":
        cache, seen = dense_cache(model), 0
    else:
        cache = SinkCache.for_model(model, sinks, window, recall=recall if mode == "recall" else 0,
                                    recall_block=recall_block)
        cache.token_ids = lambda a, b: task.ids[a:b]

    def step(ids: list[int], recalling: bool) -> torch.Tensor:
        nonlocal seen
        if isinstance(cache, SinkCache):
            positions, _ = cache.reserve(len(ids), recall=recalling)
        else:
            positions = torch.arange(seen, seen + len(ids), device=device)[None]
            seen += len(ids)
        return forward(model, cache, ids, positions)

    ids = task.ids
    for a in range(0, len(ids), chunk):
        logits = step(ids[a : a + chunk], mode == "recall")
        if tick is not None:
            tick(min(chunk, len(ids) - a))
    where = _where(cache, task.span)
    out: list[int] = []
    for _ in range(new_tokens):
        tok = int(logits[-1].argmax())
        out.append(tok)
        logits = step([tok], False)
    answer = tokenizer.decode(out, skip_special_tokens=True)
    digits = "".join(re.findall(r"\d", answer))[:5]
    return Result(mode, task.key, task.depth, len(ids), digits == task.key, answer.strip(), where)


def _where(cache, span: tuple[int, int]) -> str:
    if not isinstance(cache, SinkCache):
        return "window"
    a, b = span
    evicted = covered_by(cache.evictions, a, b)
    if not evicted:
        return "window"
    recalled = cache.occupancy().recalled_spans()
    return "recalled" if covered_by(recalled, a, b) >= (b - a) // 2 else "evicted"


def run_memory(loaded, modes: list[str], lengths: list[int], depths: list[float], keys: int, sinks: int,
               window: int, recall: int, recall_block: int, bars, results: list[Result]) -> None:
    """Every (length, depth, key) task in every mode, appended to ``results`` as it is measured."""
    import time

    model, tokenizer = loaded.model, loaded.tokenizer
    for tokens in lengths:
        for depth in depths:
            tasks = [passkey_task(tokenizer, tokens, depth, seed) for seed in range(keys)]
            for mode in modes:
                tick = bars(f"passkey {tokens} @ {depth:.0%} {mode}", sum(len(t.ids) for t in tasks))
                for task in tasks:
                    t0 = time.perf_counter()
                    r = run_passkey(model, tokenizer, task, mode, sinks, window, recall, recall_block, tick=tick)
                    r.seconds = time.perf_counter() - t0
                    results.append(r)


def memory_report(results: list[Result], extra: dict) -> dict:
    """Per task and mode records (``mode``, ``found``...) and a summary per (length, depth, mode)."""
    groups: dict[tuple[int, float, str], list[Result]] = {}
    for r in results:
        groups.setdefault((r.tokens, r.depth, r.mode), []).append(r)
    summary = []
    for (tokens, depth, mode), rs in groups.items():
        where = {w: sum(r.where == w for r in rs) for w in ("window", "recalled", "evicted")}
        summary.append({"tokens": tokens, "depth": depth, "mode": mode, "found": sum(r.found for r in rs),
                        "tasks": len(rs), "where": where, "seconds": sum(r.seconds for r in rs)})
    records = [{"task": "passkey", "mode": r.mode, "found": bool(r.found), "tokens": r.tokens, "depth": r.depth,
                "key": r.key, "answer": r.answer, "where": r.where, "seconds": round(r.seconds, 3)} for r in results]
    return {**extra, "summary": summary, "results": records}
