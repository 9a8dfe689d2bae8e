"""Measurements behind ``sinkchat bench``: streaming perplexity and decode speed, through the chat's own cache.

Every mode that streams (``sinks``, ``window``) feeds tokens through :class:`~sinkchat.cache.SinkCache`
exactly as :class:`~sinkchat.engine.Chat` does: ``reserve`` before each forward, its position ids to
the model. ``dense`` is transformers' ``DynamicCache`` (an ever-growing reference); ``recompute``
rebuilds each token's context (the first ``sinks`` tokens plus the last ``window``) from scratch.

Results are appended while they are measured, so an interrupted run still has everything done so far.
"""

from __future__ import annotations

import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .cache import SinkCache, max_positions
from .errors import SinkchatError
from .models import forward

PPL_MODES = ("dense", "window", "sinks", "recompute")
SPEED_MODES = ("sinks", "dense", "recompute")

Tick = Callable[[int], None]


def default_text() -> str:
    """Python's own documentation (``pydoc_data.topics``): a long real text every Python install ships."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def parse_modes(text: str, allowed: tuple[str, ...]) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in allowed]
    if bad or not modes:
        raise SinkchatError(f"--modes takes a comma list of {', '.join(allowed)} (got {text!r})")
    return list(dict.fromkeys(modes))


class Stream:
    """Feeds tokens to ``model`` through one cache, the way the chat does (``reserve`` first for a SinkCache)."""

    def __init__(self, model, cache):
        self.model, self.cache, self.seen = model, cache, 0
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def forward(self, ids: list[int], keep: int = 0) -> torch.Tensor:
        """Logits ``[n or keep, vocab]`` for the new tokens; ``keep=0`` keeps every position."""
        if isinstance(self.cache, SinkCache):
            positions, _ = self.cache.reserve(len(ids))
        else:
            positions = torch.arange(self.seen, self.seen + len(ids), device=self.device).unsqueeze(0)
        logits = forward(self.model, self.cache, ids, positions, keep)
        self.seen += len(ids)
        return logits


def dense_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def nll(logits: torch.Tensor, targets: list[int]) -> list[float]:
    """Negative log-likelihood of each target under the matching row of logits."""
    logits = logits.float()
    tgt = torch.tensor(targets, device=logits.device)
    return (torch.logsumexp(logits, -1) - logits.gather(-1, tgt[:, None])[:, 0]).tolist()


@torch.inference_mode()
def recompute_logits(model, contexts: list[list[int]]) -> torch.Tensor:
    """Last-position logits ``[B, vocab]`` of equal-length contexts, each computed from scratch in one batch."""
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor(contexts, device=device), use_cache=False, logits_to_keep=1)
    return out.logits[:, -1]


# -- perplexity ------------------------------------------------------------------------------------


@dataclass
class PplRun:
    """Per-token NLL of one mode: ``scored`` holds ``(position, nll)`` for each predicted token."""

    mode: str
    scored: list[tuple[int, float]] = field(default_factory=list)
    note: str = ""
    seconds: float = 0.0

    def ppl(self, positions: set[int] | None = None) -> float | None:
        values = [v for p, v in self.scored if positions is None or p in positions]
        return math.exp(statistics.fmean(values)) if values else None


def ppl_cache(run: PplRun, model, cache, ids: list[int], tick: Tick, feed: int = 1) -> None:
    """Teacher-forced through a SinkCache, ``feed`` tokens per forward (1 = the paper's token by token).

    With ``feed > 1`` each token still sees the sinks and the window the cache holds, plus the
    earlier tokens of its own feed: the same cache code the chat's chunked prefill runs, many times
    cheaper on a CPU, where one forward costs nearly as much for 16 tokens as for 1.
    """
    stream = Stream(model, cache)
    for a in range(0, len(ids) - 1, feed):
        part = ids[a : min(a + feed, len(ids) - 1)]
        targets = ids[a + 1 : a + 1 + len(part)]
        run.scored.extend(zip(range(a + 1, a + 1 + len(part)), nll(stream.forward(part), targets)))
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
    stride: int, batch: int, progress, runs: list[PplRun], feed: int = 1,
) -> None:
    """Run each mode in turn, appending to ``runs`` as it goes (so Ctrl+C keeps finished work)."""
    model = loaded.model
    for mode in modes:
        run = PplRun(mode)
        runs.append(run)
        if mode == "recompute":
            total = len([t for t in range(1, len(ids)) if (t - 1) % stride == 0])
        elif mode == "dense":
            total = min(len(ids), max_positions(model.config) or len(ids)) - 1
        else:
            total = len(ids) - 1
        tick = progress(f"ppl {mode}", total)
        t0 = time.perf_counter()
        try:
            ppl_mode(run, model, ids, mode, sinks, window, block, stride, batch, tick, feed)
        finally:
            run.seconds = time.perf_counter() - t0


def ppl_mode(run: PplRun, model, ids, mode, sinks, window, block, stride, batch, tick, feed) -> None:
    if mode == "dense":
        ppl_dense(run, model, ids, tick)
    elif mode == "recompute":
        ppl_recompute(run, model, ids, sinks, window, stride, batch, tick)
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


# -- speed -----------------------------------------------------------------------------------------


def rss_mb() -> float:
    """Resident memory of this process now (Linux /proc), else its peak so far (getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024


@dataclass
class SpeedRun:
    """Per-position decode timings of one mode."""

    mode: str
    points: list[dict] = field(default_factory=list)  # position, ms (median), mem_mb
    step_ms: list[float] = field(default_factory=list)
    peak_mem_mb: float = 0.0
    decode_s: float = 0.0
    upkeep_s: float = 0.0
    note: str = ""

    def ms(self) -> float | None:
        return statistics.median(self.step_ms) if self.step_ms else None


class Meter:
    """Times one decode step (GPU work included) and tracks memory: RSS on the CPU, max allocated on CUDA."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def mem_mb(self) -> float:
        return torch.cuda.max_memory_allocated() / 2**20 if self.cuda else rss_mb()


def time_steps(run: SpeedRun, meter: Meter, position: int, steps: int, step: Callable[[int], None], tick: Tick) -> None:
    """Time ``steps`` decode steps starting at ``position``; record their median as one point."""
    times = []
    for k in range(steps):
        meter.sync()
        t0 = time.perf_counter()
        step(position + k)
        meter.sync()
        times.append(time.perf_counter() - t0)
        tick(1)
    mem = meter.mem_mb()
    run.peak_mem_mb = max(run.peak_mem_mb, mem)
    run.step_ms.extend(t * 1000 for t in times)
    run.decode_s += sum(times)
    run.points.append({"position": position, "ms": statistics.median(times) * 1000, "mem_mb": mem})


def speed_stream(run: SpeedRun, model, cache, ids: list[int], positions: list[int], steps: int, chunk: int, progress) -> None:
    """Stream the text to each position in chunks (fast prefill, as the chat does), then time decode there."""
    stream, meter = Stream(model, cache), Meter(next(model.parameters()).device)
    upkeep = getattr(cache, "upkeep_s", None)
    for p in positions:
        p = max(p, stream.seen)
        tick = progress(f"{run.mode}: prefill to {p}", p - stream.seen)
        while stream.seen < p:
            n = min(chunk, p - stream.seen)
            stream.forward(ids[stream.seen : stream.seen + n], keep=1)
            tick(n)
        before = getattr(cache, "upkeep_s", 0.0)
        step = lambda t: stream.forward([ids[t]], keep=1)  # noqa: E731
        time_steps(run, meter, p, steps, step, progress(f"{run.mode}: decode at {p}", steps))
        if upkeep is not None:
            run.upkeep_s += cache.upkeep_s - before


def speed_recompute(run: SpeedRun, model, ids, sinks, window, positions, steps, progress) -> None:
    """Each new token recomputes its whole context (first ``sinks`` + last ``window`` tokens) from scratch.

    Every step is the same ``sinks + window`` tokens wherever it is, so only the first and last
    positions are timed (this is the slow mode).
    """
    meter = Meter(next(model.parameters()).device)
    step = lambda t: recompute_logits(model, [ids[:sinks] + ids[t - window : t]])  # noqa: E731
    for p in sorted({positions[0], positions[-1]}):
        time_steps(run, meter, p, steps, step, progress(f"recompute: decode at {p}", steps))


def speed_runs(
    loaded, ids, modes, sinks, window, block, positions, steps, recompute_steps, progress, runs: list[SpeedRun]
) -> None:
    model = loaded.model
    chunk = max(1, min(256, window // 4))  # the chat's prefill chunk
    limit = max_positions(model.config)
    for mode in modes:
        run = SpeedRun(mode)
        runs.append(run)
        if mode == "sinks":
            speed_stream(run, model, SinkCache.for_model(model, sinks, window, block), ids, positions, steps, chunk, progress)
        elif mode == "dense":
            fits = [p for p in positions if limit is None or p + steps <= limit]
            if len(fits) < len(positions):
                run.note = f"stopped at the model's maximum context of {limit} tokens"
                if limit - steps > (fits[-1] if fits else 0):
                    fits.append(limit - steps)
            speed_stream(run, model, dense_cache(model), ids, fits, steps, chunk, progress)
        else:
            speed_recompute(run, model, ids, sinks, window, positions, recompute_steps, progress)


def speed_report(runs: list[SpeedRun], extra: dict) -> dict:
    by_mode = {run.mode: run for run in runs}
    results = []
    for run in runs:
        ms = run.ms()
        results.append({
            "mode": run.mode,
            "tokens_per_s": 1000 / ms if ms else None,
            "median_ms": ms,
            "ms_per_token": [[pt["position"], pt["ms"]] for pt in run.points],
            "mem_mb": [[pt["position"], pt["mem_mb"]] for pt in run.points],
            "peak_mem_mb": run.peak_mem_mb or None,
            "note": run.note,
        })
    sinks, recompute = by_mode.get("sinks"), by_mode.get("recompute")
    speedup = recompute.ms() / sinks.ms() if sinks and recompute and sinks.ms() and recompute.ms() else None
    upkeep = sinks.upkeep_s / sinks.decode_s if sinks and sinks.decode_s else None
    flat = sinks.points[-1]["ms"] / sinks.points[0]["ms"] if sinks and len(sinks.points) > 1 else None
    return {
        "results": results,
        "speedup_vs_recompute": speedup,
        "upkeep_share": upkeep,
        "sinks_last_vs_first": flat,
        **extra,
    }


def speed_positions(sinks: int, window: int, tokens: int, points: int) -> list[int]:
    """``points`` positions from just after the window first fills to ``tokens``, evenly spaced."""
    first = sinks + window
    if tokens <= first or points < 2:
        return [max(first, tokens)]
    return [round(first + k * (tokens - first) / (points - 1)) for k in range(points)]


def text_ids(tokenizer, text: str, tokens: int) -> list[int]:
    """The first ``tokens`` tokens of ``text`` (only a generous prefix is tokenized, so long files stay quick)."""
    ids: list[int] = []
    size = max(4096, tokens * 8)
    while True:
        ids = tokenizer(text[:size], add_special_tokens=False)["input_ids"]
        if len(ids) > tokens or size >= len(text):
            return ids[:tokens]
        size *= 2
