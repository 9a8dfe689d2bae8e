"""PNG figures for ``sinkchat bench`` (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
import statistics


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def ppl_plot(report: dict, scored: dict[str, list[tuple[int, float]]], path: str, title: str) -> None:
    """Log perplexity against tokens per mode, in bins, in the manner of StreamingLLM's Figure 3."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    end = max((s[-1][0] for s in scored.values() if s), default=1)
    width = max(1, end // 80)
    for mode, points in scored.items():
        # a mode scored on every n-th token (recompute with --stride) gets bins wide enough to hold
        # 10 of its scored tokens, so its line shows a trend rather than single-token noise
        every = max(1, round(end / max(1, len(points))))
        w = max(width, 10 * every)
        bins: dict[int, list[float]] = {}
        for p, v in points:
            bins.setdefault(p // w, []).append(v)
        xs = sorted(bins)
        label = mode if every == 1 else f"{mode} (every {every}th token, {w}-token bins)"
        ax.plot([(b + 0.5) * w for b in xs], [statistics.fmean(bins[b]) for b in xs], label=label, lw=1.4,
                marker="o" if every > 1 else None, ms=3)
    budget = report.get("sinks", 0) + report.get("window", 0)
    if budget and budget < end:
        ax.axvline(budget, color="grey", ls=":", lw=1)
        ax.text(budget, ax.get_ylim()[1], " cache full", va="top", fontsize=8, color="grey")
    ax.set_xlabel("input length (tokens)")
    ax.set_ylabel(f"log perplexity (mean NLL per {width}-token bin)")
    ax.set_title(title, fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def speed_plot(report: dict, path: str, title: str) -> None:
    """Per-token decode latency (log scale) and memory against position in the stream, per mode."""
    plt = _pyplot()
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for result in report["results"]:
        if not result["ms_per_token"]:
            continue
        xs, ms = zip(*result["ms_per_token"])
        ax_t.plot(xs, ms, marker="o", label=result["mode"])
        xs, mb = zip(*result["mem_mb"])
        ax_m.plot(xs, mb, marker="o", label=result["mode"])
    if any(r["ms_per_token"] and min(v for _, v in r["ms_per_token"]) > 0 for r in report["results"]):
        ax_t.set_yscale("log")
    ax_t.set_xlabel("position in the stream (tokens)")
    ax_t.set_ylabel("ms per decoded token (median)")
    ax_m.set_xlabel("position in the stream (tokens)")
    ax_m.set_ylabel(report.get("memory", "memory") + " (MiB)")
    speedup = report.get("speedup_vs_recompute")
    extra = f"  |  sinks {speedup:.1f}x faster than recompute" if speedup and math.isfinite(speedup) else ""
    fig.suptitle(title + extra, fontsize=10)
    for ax in (ax_t, ax_m):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
