"""Streaming perplexity, teacher-forced, in four modes: ``dense``, ``window``, ``sinks``, ``recompute``
(StreamingLLM's Figure 3 and Table 1, on this code), and the sink-count sweep at one cache budget
(its Table 2); and ``recall``: ``sinks`` plus recall slots filled from the block memory of what left
the window, every fed chunk recalling as a user message does (:mod:`sinkchat.kv.memory`)."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

import torch

from ..kv import SinkCache, max_positions
from . import bos_first
from .stream import Stream, Tick, dense_cache, nll, recompute_logits


@dataclass
class PplRun:
    """Per-token NLL of one mode: ``scored`` holds ``(position, nll)`` for each predicted token."""

    mode: str
    scored: list[tuple[int, float]] = field(default_factory=list)
    note: str = ""
    seconds: float = 0.0
    sinks: int | None = None  # the cache's geometry, for the runs of a sweep
    window: int | None = None

    def ppl(self, positions: set[int] | None = None) -> float | None:
        values = [v for p, v in self.scored if positions is None or p in positions]
        return math.exp(statistics.fmean(values)) if values else None


def ppl_cache(run: PplRun, model, cache, ids: list[int], tick: Tick, feed: int = 1) -> None:
    """Teacher-forced through a SinkCache, ``feed`` tokens per forward (1 = the paper's token by token).

    With ``feed > 1`` each token still sees the sinks and the window the cache holds, plus the
    earlier tokens of its own feed: the same cache code the chat's chunked prefill runs, many times
    cheaper on a CPU, where one forward costs nearly as much for 16 tokens as for 1.
    """
    stream, recall = Stream(model, cache), cache.recall > 0
    for a in range(0, len(ids) - 1, feed):
        part = ids[a : min(a + feed, len(ids) - 1)]
        targets = ids[a + 1 : a + 1 + len(part)]
        run.scored.extend(zip(range(a + 1, a + 1 + len(part)), nll(stream.forward(part, recall=recall), targets)))
        tick(len(part))


def ppl_dense(run: PplRun, model, ids: list[int], tick: Tick, chunk: int = 256) -> None:
    """An ever-growing cache, fed in chunks (exact: nothing is evicted); stops at the model's context."""
    limit = max_positions(model.config)
    if limit is not None and len(ids) > limit:
        run.note = f"stopped at the model's maximum context of {limit} tokens"
        ids = ids[:limit]
    stream = Stream(model, dense_cache(model))
    for a in range(0, len(ids) - 1, chunk):
        part = ids[a : a + chunk]
        targets = ids[a + 1 : a + 1 + len(part)]
        values = nll(stream.forward(part)[: len(targets)], targets)
        run.scored.extend((a + 1 + j, v) for j, v in enumerate(values))
        tick(len(targets))


def llama_chunks(ids: list[int], ctx: int, bos: int | None) -> list[list[int]]:
    """The chunks llama.cpp's ``llama-perplexity -c ctx`` evaluates: the text's tokens as the model
    starts a text (:func:`sinkchat.bench.text_ids`: BOS first where the model adds one, as llama.cpp
    tokenizes it) cut into whole chunks of ``ctx`` (a shorter rest is dropped), each chunk's first
    token replaced by ``bos`` where there is one (tools/perplexity/perplexity.cpp, ``perplexity()``)."""
    chunks = [ids[a : a + ctx] for a in range(0, len(ids) - ctx + 1, ctx)]
    return [[bos, *c[1:]] if bos is not None else c for c in chunks]


def ppl_chunks(run: PplRun, model, chunks: list[list[int]], tick: Tick, piece: int = 256) -> None:
    """Dense perplexity as ``llama-perplexity`` scores it: each chunk from an empty cache, and only its
    second half scored (the tokens after position ``ctx / 2``, each seeing at least half a chunk),
    ``ctx / 2 - 1`` tokens a chunk. The first half is fed without logits (``keep=1``)."""
    for i, chunk in enumerate(chunks):
        ctx = len(chunk)
        first = ctx // 2
        stream = Stream(model, dense_cache(model))
        for a in range(0, first, piece):
            stream.forward(chunk[a : min(a + piece, first)], keep=1)
        for a in range(first, ctx - 1, piece):
            part = chunk[a : min(a + piece, ctx - 1)]
            values = nll(stream.forward(part), chunk[a + 1 : a + 1 + len(part)])
            run.scored.extend((i * ctx + a + 1 + j, v) for j, v in enumerate(values))
            tick(len(part))


def ppl_recompute(
    run: PplRun, model, ids: list[int], sinks: int, window: int, stride: int, batch: int, tick: Tick
) -> None:
    """Sliding window with recomputation: token t is predicted from ``ids[:sinks] + ids[t-window:t]``.

    Affordable because (1) every token whose whole history fits in ``sinks + window`` comes from one
    chunked causal pass (that is exactly its recomputed context), (2) the rest are computed ``batch``
    contexts per forward with only the last position's logits, and (3) with ``stride > 1`` only
    every ``stride``-th token is scored (the other modes are then also compared on those tokens).
    """
    span = sinks + window
    wanted = [t for t in range(1, len(ids)) if (t - 1) % stride == 0]
    head = [t for t in wanted if t <= span]
    if head:
        stream = Stream(model, dense_cache(model))
        prefix = ids[: head[-1]]
        rows = torch.cat([stream.forward(prefix[a : a + 256]) for a in range(0, len(prefix), 256)])
        values = nll(rows[[t - 1 for t in head]], [ids[t] for t in head])
        run.scored.extend(zip(head, values))
        tick(len(head))
    tail = [t for t in wanted if t > span]
    for a in range(0, len(tail), batch):
        group = tail[a : a + batch]
        logits = recompute_logits(model, [ids[:sinks] + ids[t - window : t] for t in group])
        run.scored.extend(zip(group, nll(logits, [ids[t] for t in group])))
        tick(len(group))


def ppl_runs(
    loaded, ids: list[int], modes: list[str], sinks: int, window: int, block: int | None,
    stride: int, batch: int, progress, runs: list[PplRun], feed: int = 1, ctx: int | None = None,
    recall: tuple[int, int] = (0, 64),
) -> None:
    """Run each mode in turn, appending to ``runs`` as it goes (so Ctrl+C keeps finished work).
    ``ctx``: dense is scored in chunks of ``ctx`` tokens as llama.cpp's ``llama-perplexity`` does
    (:func:`ppl_chunks`); ``recall``: the recall mode's slots and tokens per block."""
    model = loaded.model
    for mode in modes:
        if mode == "dense" and ctx is not None:
            chunks = llama_chunks(ids, ctx, loaded.tokenizer.bos_token_id if bos_first(loaded.tokenizer) else None)
            timed(PplRun(mode, note=f"{len(chunks)} chunks of {ctx} from BOS, second halves scored (llama.cpp's)"),
                  runs, progress("ppl dense (llama.cpp chunks)", len(chunks) * (ctx - 1 - ctx // 2)),
                  lambda run, tick: ppl_chunks(run, model, chunks, tick))
            continue
        if mode == "recompute":
            total = len([t for t in range(1, len(ids)) if (t - 1) % stride == 0])
        elif mode == "dense":
            total = min(len(ids), max_positions(model.config) or len(ids)) - 1
        else:
            total = len(ids) - 1
        timed(PplRun(mode), runs, progress(f"ppl {mode}", total),
              lambda run, tick: ppl_mode(run, model, ids, mode, sinks, window, block, stride, batch, tick, feed,
                                         recall))


def timed(run: PplRun, runs: list[PplRun], tick: Tick, work) -> None:
    """Append ``run`` to ``runs`` and fill it with ``work(run, tick)``, timing it even when interrupted."""
    runs.append(run)
    t0 = time.perf_counter()
    try:
        work(run, tick)
    finally:
        run.seconds = time.perf_counter() - t0


def sweep_runs(
    loaded, ids: list[int], counts: list[int], budget: int, block: int | None, feed: int, progress,
    runs: list[PplRun], dense: bool = False,
) -> None:
    """How many sinks are needed (StreamingLLM, Xiao et al., ICLR 2024, Table 2): one ``sinks`` run per
    count in ``counts``, each with ``window = budget - count``, so every run holds the same number of
    tokens; ``dense`` first as a reference when asked. A run is exactly ``ppl_runs`` in ``sinks``
    mode with that sink count and window (``block`` None: the default of each window)."""
    if dense:
        ppl_runs(loaded, ids, ["dense"], 0, budget, block, 1, 1, progress, runs, feed)
    for count in counts:
        window = budget - count
        run = PplRun("sinks", sinks=count, window=window)
        timed(run, runs, progress(f"ppl sinks {count} + {window}", len(ids) - 1),
              lambda run, tick: ppl_cache(run, loaded.model, SinkCache.for_model(loaded.model, count, window, block),
                                          ids, tick, feed))


def sweep_report(runs: list[PplRun], budget: int, extra: dict) -> dict:
    """The sweep's JSON document: per run its sinks and window, perplexity over every scored token and
    over the tokens predicted once the cache was full (position > budget, where evictions matter)."""
    full = {p for run in runs for p, _ in run.scored if p > budget}
    results = [
        {"mode": run.mode, "sinks": run.sinks, "window": run.window, "ppl": run.ppl(), "ppl_full": run.ppl(full),
         "tokens": len(run.scored), "tokens_full": len([p for p, _ in run.scored if p > budget]), "note": run.note,
         "seconds": round(run.seconds, 2)}
        for run in runs
    ]
    return {"results": results, "budget": budget, **extra}


def ppl_mode(run: PplRun, model, ids, mode, sinks, window, block, stride, batch, tick, feed,
             recall: tuple[int, int] = (0, 64)) -> None:
    if mode == "dense":
        ppl_dense(run, model, ids, tick)
    elif mode == "recompute":
        ppl_recompute(run, model, ids, sinks, window, stride, batch, tick)
    elif mode == "recall":
        slots, size = recall
        cache = SinkCache.for_model(model, sinks, window, block, recall=slots, recall_block=size)
        run.note = f"+{slots} recall slots"
        try:
            ppl_cache(run, model, cache, ids, tick, feed)
        finally:
            cache.memory.close()
    else:
        # window: the same cache with no sinks and the same total budget (sinks + window)
        s, w = (sinks, window) if mode == "sinks" else (0, sinks + window)
        ppl_cache(run, model, SinkCache.for_model(model, s, w, block), ids, tick, feed)


def ppl_report(runs: list[PplRun], chunk: int, stride: int, extra: dict) -> dict:
    """The JSON document: overall and per-chunk perplexity per mode, and a comparison on shared tokens."""
    results = []
    end = max((run.scored[-1][0] + 1 for run in runs if run.scored), default=0)
    for run in runs:
        chunks = []
        if run.scored:
            for a in range(0, end, chunk):
                values = [v for p, v in run.scored if a <= p < a + chunk]
                if values:
                    chunks.append({"start": a, "end": min(a + chunk, end), "ppl": math.exp(statistics.fmean(values))})
        results.append(
            {"mode": run.mode, "ppl": run.ppl(), "tokens": len(run.scored), "chunks": chunks, "note": run.note,
             "seconds": round(run.seconds, 2)}
        )
    shared = None
    if runs:
        common = set.intersection(*(set(p for p, _ in run.scored) for run in runs if run.scored)) if any(
            run.scored for run in runs
        ) else set()
        shared = {"tokens": len(common), "ppl": {run.mode: run.ppl(common) for run in runs}}
    return {"results": results, "shared": shared, "stride": stride, "chunk": chunk, **extra}
