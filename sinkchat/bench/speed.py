"""Decode speed and memory against position in the stream, for ``sinks``, ``recall`` (sinks + recall
slots, every prefill chunk recalling from the block memory), ``dense`` and ``recompute``."""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..engine import prefill_chunk
from ..kv import SinkCache, max_positions
from .ceiling import bytes_per_token, ceiling
from .stream import Stream, Tick, dense_cache, recompute_logits


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
    bytes: dict[str, int] | None = None  # what one decode step reads at the last position (sinks mode)
    prefill_s: float = 0.0  # prefill chunks on the way to the positions (recall scoring included)
    prefill_tokens: int = 0

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


def speed_stream(
    run: SpeedRun, model, cache, ids: list[int], positions: list[int], steps: int, chunk: int, progress,
    candidates: int = 0,
) -> None:
    """Stream the text to each position in chunks (fast prefill, as the chat does), then time decode there,
    each step asking for the logits of ``candidates`` tokens as the chat's sampler does (0: all)."""
    stream, meter = Stream(model, cache), Meter(next(model.parameters()).device)
    upkeep = getattr(cache, "upkeep_s", None)
    recall = getattr(cache, "recall", 0) > 0  # each prefill chunk recalls, as a user message's chunks do
    for p in positions:
        p = max(p, stream.seen)
        tick = progress(f"{run.mode}: prefill to {p}", p - stream.seen)
        while stream.seen < p:
            n = min(chunk, p - stream.seen)
            t0 = time.perf_counter()
            stream.forward(ids[stream.seen : stream.seen + n], keep=1, recall=recall)
            meter.sync()
            run.prefill_s += time.perf_counter() - t0
            run.prefill_tokens += n
            tick(n)
        before = getattr(cache, "upkeep_s", 0.0)
        step = lambda t: stream.forward([ids[t]], keep=1, candidates=candidates)  # noqa: E731
        time_steps(run, meter, p, steps, step, progress(f"{run.mode}: decode at {p}", steps))
        if upkeep is not None:
            run.upkeep_s += cache.upkeep_s - before


def compile_untimed(model, make_cache: Callable[[], object], ids: list[int], candidates: int = 0) -> None:
    """A compiled decode step compiles on its first call (seconds), and again for a cache of another
    capacity: take that call on a throwaway cache from ``make_cache``, the geometry about to be timed,
    so no timed step holds it. Nothing to do for an eager step."""
    fast = getattr(model, "sinkchat_fast", None)
    if fast is None or fast.compiled is None:
        return
    cache = make_cache()
    try:
        stream, n = Stream(model, cache), cache.sinks + 1  # the compiled step serves window tokens only
        stream.forward(ids[:n], keep=1)
        stream.forward([ids[n]], keep=1, candidates=candidates)
    finally:
        if getattr(cache, "memory", None) is not None:
            cache.memory.close()


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
    loaded, ids, modes, sinks, window, block, positions, steps, recompute_steps, progress, runs: list[SpeedRun],
    recall: int = 0, recall_block: int = 64, candidates: int = 0,
) -> None:
    """Each mode in turn, appended to ``runs`` as it is measured; ``recall``/``recall_block``: the recall
    mode's slots and block size; ``candidates``: what the chat's sampler asks of a decode step."""
    model = loaded.model
    chunk = prefill_chunk(window)  # the chat's own
    limit = max_positions(model.config)
    for mode in modes:
        run = SpeedRun(mode)
        runs.append(run)
        if mode == "sinks":
            compile_untimed(model, lambda: SinkCache.for_model(model, sinks, window, block), ids, candidates)
            cache = SinkCache.for_model(model, sinks, window, block)
            speed_stream(run, model, cache, ids, positions, steps, chunk, progress, candidates)
            run.bytes = bytes_per_token(model, cache, candidates)
        elif mode == "recall":
            def make() -> SinkCache:
                return SinkCache.for_model(model, sinks, window, block, recall=recall, recall_block=recall_block)

            compile_untimed(model, make, ids, candidates)
            cache = make()
            speed_stream(run, model, cache, ids, positions, steps, chunk, progress, candidates)
            run.note = f"{cache.n_rec} of {recall} recall slots filled, {cache.memory.blocks} blocks in memory"
            cache.memory.close()
        elif mode == "dense":
            fits = [p for p in positions if limit is None or p + steps <= limit]
            if len(fits) < len(positions):
                run.note = f"stopped at the model's maximum context of {limit} tokens"
                if limit - steps > (fits[-1] if fits else 0):
                    fits.append(limit - steps)
            speed_stream(run, model, dense_cache(model), ids, fits, steps, chunk, progress)
        else:
            speed_recompute(run, model, ids, sinks, window, positions, recompute_steps, progress)


def speed_report(runs: list[SpeedRun], extra: dict, bandwidth: float | None = None) -> dict:
    """The JSON report; with ``bandwidth`` (bytes/s, :func:`~.ceiling.copy_bandwidth`) also the sinks
    mode's bytes per token, its bandwidth ceiling and the share of it reached."""
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
            "prefill_tokens_per_s": run.prefill_tokens / run.prefill_s if run.prefill_s else None,
            "note": run.note,
        })
    sinks, recompute, recall = by_mode.get("sinks"), by_mode.get("recompute"), by_mode.get("recall")
    speedup = recompute.ms() / sinks.ms() if sinks and recompute and sinks.ms() and recompute.ms() else None
    upkeep = sinks.upkeep_s / sinks.decode_s if sinks and sinks.decode_s else None
    flat = sinks.points[-1]["ms"] / sinks.points[0]["ms"] if sinks and len(sinks.points) > 1 else None
    roof = ceiling(sinks.bytes, bandwidth, 1000 / sinks.ms() if sinks.ms() else None) if (
        sinks and sinks.bytes and bandwidth) else {}
    return {
        "results": results,
        "speedup_vs_recompute": speedup,
        "upkeep_share": upkeep,
        "sinks_last_vs_first": flat,
        "recall_vs_sinks": _ratios(recall, sinks) if recall and sinks else None,
        **roof,
        **extra,
    }


def _ratios(run: SpeedRun, base: SpeedRun) -> dict:
    """Decode and prefill speed of ``run`` as a share of ``base``'s (1.0: as fast; 0.8: a fifth slower)."""
    decode = base.ms() / run.ms() if run.ms() and base.ms() else None
    prefill = (run.prefill_tokens / run.prefill_s) / (base.prefill_tokens / base.prefill_s) if (
        run.prefill_s and base.prefill_s) else None
    return {"decode": decode, "prefill": prefill}


def speed_positions(sinks: int, window: int, tokens: int, points: int, steps: int = 1) -> list[int]:
    """``points`` positions from just after the window first fills to ``tokens``, evenly spaced, and at
    least ``steps`` apart: each position's decode steps move the stream ``steps`` tokens on, so fewer
    points where they would not fit (a closer position could only be measured later than asked)."""
    first = sinks + window
    if tokens <= first or points < 2:
        return [max(first, tokens)]
    points = min(points, (tokens - first) // max(steps, 1) + 1)
    if points < 2:
        return [tokens]
    return [round(first + k * (tokens - first) / (points - 1)) for k in range(points)]
