"""What ``sinkchat bench`` shows a person: progress bars on stderr while it measures, then rich tables
of each command's JSON document."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table


class Bars:
    """A rich progress bar per phase on stderr, with tokens/s and an ETA; ``bars(desc, total)`` gives a tick."""

    def __init__(self, quiet: bool):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            ProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.text import Text

        class Rate(ProgressColumn):
            def render(self, task):
                return Text(f"{task.speed:7.1f} tok/s" if task.speed else "      - tok/s")

        console = Console(stderr=True)
        self.log = not quiet and not console.is_terminal  # redirected stderr: one line per phase instead
        self.progress = Progress(
            TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), Rate(),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=console, disable=quiet or not console.is_terminal,
        )

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def __call__(self, description: str, total: int):
        if self.log:
            note(f"sinkchat: {description} ({total} tokens)")
        task = self.progress.add_task(description, total=max(total, 0))
        return lambda n: self.progress.advance(task, n)


def note(message: str) -> None:
    print(message, file=sys.stderr)


def fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def pct(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(100 * value, spec) + "%"


def spans(numbers: list[int]) -> str:
    """``[2, 3, 4, 7]`` -> ``2-4, 7``."""
    out: list[list[int]] = []
    for n in numbers:
        if out and n == out[-1][1] + 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in out) or "none"


def tables_console() -> Console:
    """Where the result tables go: stdout, and paths and notes are never read as markup."""
    return Console(markup=False)


def print_ppl(report: dict) -> None:
    console = tables_console()
    shared = report["shared"] or {"tokens": 0, "ppl": {}}
    table = Table("mode", "tokens scored", "perplexity", f"ppl on the {shared['tokens']} shared tokens",
                  "seconds", "note", title=f"streaming perplexity: {report['text']}, sinks {report['sinks']}, "
                  f"window {report['window']}")
    for r in report["results"]:
        table.add_row(r["mode"], str(r["tokens"]), fmt(r["ppl"]), fmt(shared["ppl"].get(r["mode"])),
                      fmt(r["seconds"], ".0f"), r["note"])
    console.print(table)
    chunks = Table("tokens", *(r["mode"] for r in report["results"]), title="perplexity per chunk")
    rows: dict[tuple[int, int], dict[str, float]] = {}
    for r in report["results"]:
        for c in r["chunks"]:
            rows.setdefault((c["start"], c["end"]), {})[r["mode"]] = c["ppl"]
    for (a, b), by_mode in sorted(rows.items()):
        chunks.add_row(f"{a}-{b}", *(fmt(by_mode.get(r["mode"])) for r in report["results"]))
    console.print(chunks)


def print_speed(report: dict) -> None:
    console = tables_console()
    table = Table("mode", "tokens/s", "median ms/token", "ms at first position", "ms at last position",
                  f"peak {report['memory']} MiB", "note",
                  title=f"decode speed: sinks {report['sinks']}, window {report['window']}")
    for r in report["results"]:
        ms = r["ms_per_token"]
        table.add_row(r["mode"], fmt(r["tokens_per_s"], ".1f"), fmt(r["median_ms"], ".1f"),
                      f"{fmt(ms[0][1], '.1f')} @ {ms[0][0]}" if ms else "-",
                      f"{fmt(ms[-1][1], '.1f')} @ {ms[-1][0]}" if ms else "-",
                      fmt(r["peak_mem_mb"], ".0f"), r["note"])
    console.print(table)
    if report["speedup_vs_recompute"] is not None:
        console.print(f"sinks vs recompute: {fmt(report['speedup_vs_recompute'], '.1f')}x faster per token")
    if report["sinks_last_vs_first"] is not None:
        console.print(f"sinks last/first position time: {fmt(report['sinks_last_vs_first'], '.3f')}")
    if (share := report["upkeep_share"]) is not None:
        console.print(f"cache upkeep (eviction, re-rotation): {share * 100:.2f}% of decode time")
    if report.get("recall_vs_sinks"):
        r = report["recall_vs_sinks"]
        console.print(f"recall ({report['recall']} slots) vs sinks: decode at {fmt(r['decode'], '.2f')}x sinks' speed, "
                      f"prefill (memory writes and block scoring included) at {fmt(r['prefill'], '.2f')}x")
    if report.get("bytes_per_token"):
        parts = ", ".join(f"{k} {v / 1e6:.1f}" for k, v in report["bytes_parts"].items())
        console.print(f"bytes per token: {report['bytes_per_token'] / 1e6:.1f} MB ({parts}); copy bandwidth "
                      f"{report['copy_bandwidth_GBps']:.1f} GB/s; ceiling {report['ceiling_tokens_per_s']:.0f} "
                      f"tokens/s; sinks reach {fmt(report['ceiling_share'] and report['ceiling_share'] * 100, '.1f')}%")
    print_kernels(report["machine"])


def print_sweep(report: dict) -> None:
    budget = report["budget"]
    table = Table("sinks + window", "tokens scored", "perplexity", f"ppl after token {budget}", "seconds", "note",
                  title=f"how many sinks? {report['text']}, every run holds {budget} tokens")
    for r in report["results"]:
        cache = "dense (full history)" if r["sinks"] is None else f"{r['sinks']} + {r['window']}"
        table.add_row(cache, str(r["tokens"]), fmt(r["ppl"]), fmt(r["ppl_full"]), fmt(r["seconds"], ".0f"), r["note"])
    console = tables_console()
    console.print(table)


def print_attention(report: dict) -> None:
    firsts, uniform = report["firsts"], report["uniform"]
    table = Table("layer", *(f"first {k}" for k in firsts), "max head (first 4)", "heads > 50%",
                  title=f"share of attention on the first tokens: {report['model']}, {report['tokens']} tokens of "
                  f"{report['text']}, queries after token {report['from']}")
    for r in report["layers"]:
        head, share = r["max_head"]
        table.add_row(f"{r['layer']}{' *' if r['sink_dominated'] else ''}", *(pct(v) for v in r["share"]),
                      f"{pct(share)} h{head}", f"{len(r['sink_heads'])}/{report['heads']}")
    table.add_section()
    table.add_row("all layers", *(pct(v) for v in report["share"]), "", "")
    table.add_row("uniform attention", *(pct(v) for v in uniform), "", "")
    console = tables_console()
    console.print(table)
    layers = len(report["layers"])
    console.print(f"sink-dominated layers (* , over 50% on the first 4 tokens): {spans(report['sink_layers'])} "
                  f"({len(report['sink_layers'])} of {layers}); sink-dominated heads: {report['sink_heads']} of "
                  f"{layers * report['heads']}")


def print_turns(report: dict) -> None:
    table = Table("--evict", "turns", "empty replies", "repeated replies", "evictions", "window cut mid-message",
                  "transcript ppl", "seconds",
                  title=f"a {report['turns']}-turn chat, greedy, sinks {report['sinks']}, window {report['window']}")
    for r in report["results"]:
        table.add_row(r["mode"], str(r["turns"]), str(r["empty"]), str(r["repeated"]), str(r["evictions"]),
                      str(r["mid_message"]), fmt(r["ppl"]), fmt(r["seconds"], ".0f"))
    tables_console().print(table)


def print_endless(report: dict) -> None:
    console = tables_console()
    table = Table("turn", "tokens", "widgets", "UI ms / message", "decode ms / token", "save ms", "save KiB",
                  "RSS MiB", "chats.db MiB", *(["memory MiB"] if report.get("recall") else []),
                  title=f"an endless chat: sinks {report['sinks']}, window {report['window']}"
                  + (f", recall {report['recall']}" if report.get("recall") else ""))
    for p in report["points"]:
        table.add_row(str(p["turn"]), str(p["tokens"]), str(p["mounted"]), fmt(p["ui_ms"], ".1f"),
                      fmt(p["ms_per_token"], ".1f"), fmt(p["save_ms"], ".0f"), fmt(p["save_kb"], ".0f"),
                      fmt(p["rss_mb"], ".0f"), fmt(p["db_mb"], ".2f"),
                      *([fmt(p["memory_mb"], ".1f")] if report.get("recall") else []))
    console.print(table)
    ratios = report["last_vs_100"]
    if ratios:
        console.print("last turn / turn 100: " + ", ".join(f"{k} {fmt(v, '.2f')}" for k, v in ratios.items()))
    if s := report.get("saves"):
        console.print(f"saves from turn {s['from_turn']}: {s['turns']} turns, {s['bases']} new bases, mean "
                      f"{fmt(s['mean_kb'], '.0f')} KiB per turn = {fmt(s['kb_per_new_token'], '.1f')} KiB per new "
                      f"token, largest {fmt(s['max_kb'], '.0f')} KiB")


def print_peer_ppl(report: dict) -> None:
    console = tables_console()
    ours, theirs = report["sinkchat"], report["llama.cpp"]
    bos = "from BOS" if ours["bos"] else "no BOS"
    table = Table("perplexity", "sinkchat", "llama.cpp", "sinkchat / llama.cpp",
                  title=f"against llama-perplexity: {report['chunks']} chunks of {report['ctx']} tokens ({bos}) of "
                  f"{report['text']}, {report['threads']} threads")
    for i, (a, b) in enumerate(zip(ours["chunks"], theirs["chunks"]), 1):
        table.add_row(f"after chunk {i}", fmt(a, ".4f"), fmt(b, ".4f"), fmt(a / b if a and b else None, ".4f"))
    table.add_row("final", fmt(ours["ppl"], ".4f"), fmt(theirs["ppl"], ".4f"), fmt(report["ratio"].get("ppl"), ".4f"))
    console.print(table)
    print_kernels(report["machine"])


def print_kernels(machine: dict) -> None:
    """What sinkchat ran: ``runs``, for a GGUF which kernel each block type ran on, and how its decode
    step ran (compiled or eager)."""
    from ..model.gguf import LABEL  # numpy: not for every command line

    per = [f"{t} -> " + ", ".join(f"{LABEL.get(k, k)} ({n})" for k, n in kinds.items())
           for t, kinds in (machine.get("kernels") or {}).items()]
    step = f"; decode step {machine['decode_step']}" if machine.get("decode_step") else ""
    step += f"; prefill GEMMs in {machine['prefill_gemm']}" if machine.get("prefill_gemm") else ""
    tables_console().print(f"sinkchat ran {machine.get('runs') or machine.get('weights')}"
                           + (f": {'; '.join(per)} tensors" if per else "") + step)


def print_peer(report: dict) -> None:
    console = tables_console()
    ours, theirs, ratio = report["sinkchat"], report["llama.cpp"], report["ratio"]
    table = Table("tokens/s", "sinkchat", "llama.cpp", "sinkchat / llama.cpp",
                  title=f"against llama-bench: {report['threads']} threads, depth {report['depth']}, medians of "
                  f"{len(report['rounds'])} alternating rounds")
    table.add_row("prompt, 512 tokens (pp512)", fmt(ours["pp"], ".1f"), fmt(theirs.get("pp"), ".1f"),
                  fmt(ratio.get("pp"), ".2f") + "x")
    table.add_row(f"decode at depth {report['depth']} (tg)", fmt(ours["tg"], ".1f"), fmt(theirs.get("tg"), ".1f"),
                  fmt(ratio.get("tg"), ".2f") + "x")
    console.print(table)
    print_kernels(report["machine"])


def print_memory(report: dict) -> None:
    table = Table("task", "tokens", "depth", "answer at token", "mode", "found", "answer's tokens when asked",
                  "seconds", title=f"memory: sinks {report['sinks']}, window {report['window']}, recall "
                  f"{report['recall']} (blocks of {report['recall_block']})")
    for r in report["summary"]:
        where = ", ".join(f"{k} {v}" for k, v in r["where"].items() if v and k != "-")
        table.add_row(r["task"], str(r["tokens"]), fmt(r["depth"] and r["depth"] * 100, ".0f") + "%"
                      if r["depth"] is not None else "-", fmt(r["depth_tokens"], "d"), r["mode"],
                      f"{r['found']}/{r['tasks']}", where or "-", fmt(r["seconds"], ".0f"))
    tables_console().print(table)
