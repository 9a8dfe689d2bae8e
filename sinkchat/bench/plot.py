"""PNG figures for ``sinkchat bench`` (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import bisect
import math


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


STYLE = {"dense": dict(color="0.3", ls="--"), "window": dict(color="tab:red"), "sinks": dict(color="tab:blue"),
         "recompute": dict(color="tab:green", ls="-.")}


def rolling(points: list[tuple[int, float]], span: int) -> tuple[list[int], list[float]]:
    """Trailing mean of the values whose position lies in ``(p - span, p]``, at every scored position ``p``."""
    points = sorted(points)
    xs = [p for p, _ in points]
    sums = [0.0]
    for _, v in points:
        sums.append(sums[-1] + v)
    ys = []
    for i, p in enumerate(xs):
        lo = bisect.bisect_right(xs, p - span)
        ys.append((sums[i + 1] - sums[lo]) / (i + 1 - lo))
    return xs, ys


def rolling_lines(ax, curves: dict[str, list[tuple[int, float]]], budget: int, styles: dict | None = None) -> int:
    """Each curve's rolling mean NLL (log perplexity) against tokens, and the cache-full marker; returns the span."""
    end = max((max(p for p, _ in points) for points in curves.values() if points), default=1)
    span = max(10, int(round(end / 20, -1)))  # about a twentieth of the text, a round number
    for label, points in curves.items():
        if not points:
            continue
        every = max(1, round(end / len(points)))
        xs, ys = rolling(points, max(span, 10 * every))  # at least 10 scored tokens per mean
        shown = label if every == 1 else f"{label} (every {every}th token)"
        ax.plot(xs, ys, label=shown, lw=1.3, **(styles or STYLE).get(label, {}))
    if budget and budget < end:
        ax.axvline(budget, color="grey", ls=":", lw=1)
        ax.text(budget, 0.98, " cache full", va="top", fontsize=8, color="grey", transform=ax.get_xaxis_transform())
    ax.set_xlabel("input length (tokens)")
    ax.set_ylabel(f"log perplexity (mean NLL over the last {span} tokens)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return span


def ppl_plot(report: dict, scored: dict[str, list[tuple[int, float]]], path: str, title: str) -> None:
    """Log perplexity against input length, a rolling mean per mode with the cache-full marker, in the
    manner of StreamingLLM's Figure 3 (Xiao et al., ICLR 2024)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    rolling_lines(ax, scored, report.get("sinks", 0) + report.get("window", 0))
    ax.set_title(title, fontsize=10)
    save(fig, path)


def sweep_plot(report: dict, runs, path: str, title: str) -> None:
    """The sink-count sweep (StreamingLLM's Table 2 as a figure): rolling log perplexity per run, and
    perplexity once the cache is full against the number of sinks (``runs``: the sweep's ``PplRun``)."""
    plt = _pyplot()
    fig, (ax_l, ax_r) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    cmap = plt.get_cmap("viridis")
    sweep = [r for r in runs if r.sinks is not None]
    curves, styles = {}, {}
    for i, run in enumerate(runs):
        label = "dense" if run.sinks is None else f"{run.sinks} + {run.window}"
        curves[label] = run.scored
        styles[label] = STYLE["dense"] if run.sinks is None else dict(color=cmap(i / max(1, len(runs) - 1) * 0.9))
    rolling_lines(ax_l, curves, report["budget"], styles)
    ax_l.set_title("rolling log perplexity, per sinks + window", fontsize=9)
    rows = [r for r in report["results"] if r["sinks"] is not None and r["ppl_full"] is not None]
    ax_r.bar([str(r["sinks"]) for r in rows], [r["ppl_full"] for r in rows],
             color=[styles[f"{r['sinks']} + {r['window']}"]["color"] for r in rows])
    for r in report["results"]:
        if r["sinks"] is None and r["ppl_full"] is not None:
            ax_r.axhline(r["ppl_full"], color="0.3", ls="--", lw=1, label="dense (full history)")
            ax_r.legend(fontsize=8)
    ax_r.set_xlabel(f"sink tokens (window = {report['budget']} - sinks)")
    ax_r.set_ylabel(f"perplexity on tokens after {report['budget']}")
    ax_r.set_title("perplexity once the cache is full", fontsize=9)
    ax_r.grid(alpha=0.3, axis="y")
    fig.suptitle(title + ("" if sweep else " (no sinks run finished)"), fontsize=10)
    save(fig, path)


def attention_plot(report: dict, path: str, title: str) -> None:
    """(a) The share of attention on the first 1, 4 and 16 tokens per layer against what uniform attention
    would give; (b) mean attention over heads of a few layers, queries and keys 0..15 (StreamingLLM's Figure 2)."""
    from matplotlib.colors import PowerNorm

    plt = _pyplot()
    maps = report["maps"]
    fig = plt.figure(figsize=(2.3 * max(4, len(maps)), 6.6))
    grid = fig.add_gridspec(2, len(maps), height_ratios=[1.15, 1])
    ax = fig.add_subplot(grid[0, :])
    layers = [r["layer"] for r in report["layers"]]
    for j, k in enumerate(report["firsts"]):
        lw, alpha = (2.2, 1) if k == 4 else (1.2, 0.7)
        line, = ax.plot(layers, [100 * r["share"][j] for r in report["layers"]], marker="o", ms=3, lw=lw, alpha=alpha,
                        label=f"first {k} token{'s' if k > 1 else ''}")
        ax.axhline(100 * report["uniform"][j], color=line.get_color(), ls=":", lw=1, alpha=0.8)
    ax.axhline(50, color="grey", ls="--", lw=0.8)
    ax.text(layers[0], 51, "sink-dominated above 50%", ha="left", va="bottom", fontsize=8, color="grey")
    ax.set_xlabel("layer")
    ax.set_ylabel(f"% of attention (queries after token {report['from']})")
    ax.set_ylim(0, 100)
    ax.set_title("attention on the first tokens per layer (dotted: uniform attention)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    image = None
    for i, (layer, values) in enumerate(maps.items()):
        sub = fig.add_subplot(grid[1, i])
        image = sub.imshow(values, cmap="magma", norm=PowerNorm(0.5, vmin=0, vmax=1))
        sub.set_title(f"layer {layer}", fontsize=9)
        sub.set_xlabel("key", fontsize=8)
        if i == 0:
            sub.set_ylabel("query", fontsize=8)
        sub.tick_params(labelsize=7)
    if image is not None:
        fig.colorbar(image, ax=fig.axes[1:], shrink=0.8, label="mean attention over heads")
    fig.suptitle(title, fontsize=10)
    save(fig, path, tight=False)


def save(fig, path: str, tight: bool = True) -> None:
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    _pyplot().close(fig)


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
    save(fig, path)


def endless_plot(report: dict, path: str, title: str) -> None:
    """Each figure of ``bench endless`` against the turn number: what must stay flat, and the ledger."""
    plt = _pyplot()
    rows = report["turns"]
    panels = [("ui_ms", "UI CPU ms per message"), ("ms_per_token", "decode ms per token"),
              ("save_ms", "save ms"), ("save_kb", "save KiB written"), ("rss_mb", "process RSS MiB"),
              ("db_mb", "chats.db MiB (the ledger)")]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (key, label) in zip(axes.flat, panels):
        points = [(r["turn"], r[key]) for r in rows if r[key] is not None]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, lw=0.6, alpha=0.45)
            rx, ry = rolling(list(points), max(5, len(points) // 40))
            ax.plot(rx, ry, lw=1.6)
        ax.set_xlabel("turn")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    save(fig, path)


def memory_plot(report: dict, path: str, title: str) -> None:
    """``bench memory``: the share of tasks found per mode against the answer's depth in tokens, one
    panel per task (each point a summary row: a length and depth, or a file)."""
    plt = _pyplot()
    names = list(dict.fromkeys(r["task"] for r in report["summary"]))
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.8), squeeze=False)
    styles = STYLE | {"recall": dict(color="tab:green")}
    for ax, name in zip(axes[0], names):
        rows = [r for r in report["summary"] if r["task"] == name]
        for mode in dict.fromkeys(r["mode"] for r in rows):
            points = sorted((r["depth_tokens"] or 0, r["found"] / r["tasks"]) for r in rows if r["mode"] == mode)
            ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=mode, **styles.get(mode, {}))
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("answer's depth (tokens from the start)")
        ax.set_ylabel("found")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    save(fig, path)
