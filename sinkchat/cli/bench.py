"""``sinkchat bench ppl | speed | resume``: flags, progress, tables, JSON and plots.

The measuring lives in :mod:`sinkchat.bench` (imported only when a command runs, so ``--help``
stays quick); this module only turns flags into calls and results into something a person (a
table, a PNG) or a script (``--json``, alone on stdout) reads. Model, quantization, device, dtype
and sinks default to the chat's :class:`~sinkchat.settings.Settings` (config file included).
Progress goes to stderr; Ctrl+C stops the run and prints what was measured so far.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import typer

from .. import config
from ..errors import SinkchatError
from ..settings import Settings, help_for

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Reproduce StreamingLLM's perplexity and speed results on this code (same cache as the chat).",
)

MODEL = typer.Option(None, "--model", "-m", help=help_for("model"), show_default=False)
QUANT = typer.Option(None, help=help_for("quant"), show_default=False)
DEVICE = typer.Option(None, help=help_for("device"), show_default=False)
DTYPE = typer.Option(None, help=help_for("dtype"), show_default=False)
SINKS = typer.Option(None, help=help_for("sinks"), show_default=False)
TEXT = typer.Option(None, "--text", help="UTF-8 text file [default: Python's documentation, pydoc_data.topics].")
JSON = typer.Option(False, "--json", help="Print only the results as JSON on stdout.")
PLOT = typer.Option(None, "--plot", help="Write a PNG plot to this path.")
BLOCK = typer.Option(None, help="Eviction block of the sink cache [default: the chat's, window/16, max 256].")


# -- shared plumbing ---------------------------------------------------------------------------------


class Bars:
    """A rich progress bar per phase on stderr, with tokens/s and an ETA; ``bars(desc, total)`` gives a tick."""

    def __init__(self, quiet: bool):
        from rich.console import Console
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


def read_text(path: str | None) -> tuple[str, str]:
    """The text to stream and where it came from; a missing or unreadable file is one clear error."""
    from .. import bench
    from ..files import reason

    if path is None:
        return bench.default_text(), "pydoc_data.topics (Python's documentation)"
    p = Path(path)
    if not p.is_file():
        raise SinkchatError(f"--text {path}: no such file")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise SinkchatError(f"--text {path}: cannot read it ({reason(exc)})") from None
    try:
        return data.decode("utf-8"), str(p)
    except UnicodeDecodeError:
        note(f"sinkchat: --text {path}: bytes that are not UTF-8 were replaced with \ufffd")
        return data.decode("utf-8", errors="replace"), str(p)


def check_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise SinkchatError(f"--{name.replace('_', '-')} must be 1 or more (got {value})")


def settings(**flags) -> Settings:
    """The chat's settings (defaults < config.toml < these flags), for what a bench shares with a chat."""
    s, warnings = Settings.resolve(flags, config=config.load_config(), config_source=str(config.config_file()))
    for warning in warnings:
        note(f"sinkchat: warning: {warning}")
    return s


def load(s: Settings, quiet: bool):
    from ..models import load_for

    return load_for(s, progress=(lambda m: None) if quiet else note)


def machine(loaded) -> dict:
    import torch

    info = {
        "model": loaded.name,
        "quant": loaded.quant,
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).replace("torch.", ""),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if str(loaded.device).startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def measure(run_all, quiet: bool) -> bool:
    """Run ``run_all(bars)``; on Ctrl+C keep what was measured and say so. Returns True if interrupted."""
    with Bars(quiet) as bars:
        try:
            run_all(bars)
            return False
        except KeyboardInterrupt:
            pass
    note("sinkchat: interrupted; results so far:")
    return True


def fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


# -- bench ppl -----------------------------------------------------------------------------------------


def finish(report: dict, as_json: bool, show, plot: str | None, interrupted: bool) -> None:
    """JSON alone on stdout, or tables; exit 130 after the results so far when interrupted."""
    if as_json:
        print(json.dumps(report, indent=1))
    else:
        show(report, plot)
    if interrupted:
        raise typer.Exit(130)


@app.command("ppl")
def ppl(
    text: str = TEXT,
    tokens: int = typer.Option(8000, "--tokens", "-n", help="Tokens of the text to stream."),
    sinks: int = SINKS,
    window: int = typer.Option(508, "--window", "-w", help="Window (window mode gets sinks + window, no sinks)."),
    modes: str = typer.Option("dense,window,sinks,recompute", help="Comma list of dense, window, sinks, recompute."),
    block: int = BLOCK,
    feed: int = typer.Option(1, help="Tokens per forward through the cache in window/sinks modes (1 = the paper's)."),
    stride: int = typer.Option(1, help="Recompute scores every stride-th token only (it is the slow mode)."),
    batch: int = typer.Option(8, help="Recompute contexts per forward pass."),
    chunk: int = typer.Option(1000, help="Tokens per row of the per-chunk table."),
    model: str = MODEL, quant: str = QUANT, device: str = DEVICE, dtype: str = DTYPE,
    as_json: bool = JSON, plot: str = PLOT,
) -> None:
    """Streaming perplexity, token by token, teacher-forced (StreamingLLM's Figure 3).

    Example: sinkchat bench ppl --tokens 8000 --sinks 4 --window 508 --plot docs/bench-ppl.png
    """
    from .. import bench

    wanted = bench.parse_modes(modes, bench.PPL_MODES)
    check_positive(tokens=tokens, feed=feed, stride=stride, batch=batch, chunk=chunk)
    s = settings(model=model, sinks=sinks, window=window, block=block, quant=quant, device=device, dtype=dtype)
    sinks, window, block = s.sinks, s.window, s.block
    if feed > window:
        raise SinkchatError(f"--feed {feed} must be at most --window {window}")
    body, source = read_text(text)
    from ..bench import ppl as measure_ppl

    loaded = load(s, as_json)
    ids = bench.text_ids(loaded.tokenizer, body, tokens)
    if len(ids) < 2:
        raise SinkchatError(f"--text {source}: fewer than 2 tokens to score")
    if len(ids) < tokens:
        note(f"sinkchat: the text has only {len(ids)} tokens; using them all")
    runs: list[measure_ppl.PplRun] = []
    interrupted = measure(
        lambda bars: measure_ppl.ppl_runs(loaded, ids, wanted, sinks, window, block, stride, batch, bars, runs, feed),
        as_json,
    )
    extra = {"text": source, "tokens": len(ids), "sinks": sinks, "window": window, "feed": feed, "batch": batch,
             "interrupted": interrupted, "machine": machine(loaded)}
    report = measure_ppl.ppl_report(runs, chunk, stride, extra)
    if plot and runs:
        from ..bench.plot import ppl_plot

        ppl_plot(report, {r.mode: r.scored for r in runs}, plot,
                 f"{loaded.name}: streaming perplexity, sinks={sinks} window={window}")
    finish(report, as_json, print_ppl, plot, interrupted)


def print_ppl(report: dict, plot: str | None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(markup=False)  # paths and notes are never read as markup
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
    if plot:
        console.print(f"plot: {plot}")


# -- bench speed ---------------------------------------------------------------------------------------


@app.command("speed")
def speed(
    tokens: int = typer.Option(22004, "--tokens", "-n", help="Last stream position measured."),
    sinks: int = SINKS,
    window: int = typer.Option(None, "--window", "-w", help="Window (also the recompute context, plus sinks) "
                               "[default: the chat's, 2000].", show_default=False),
    modes: str = typer.Option("sinks,dense,recompute", help="Comma list of sinks, dense, recompute."),
    points: int = typer.Option(6, help="Positions measured, from the first full window to --tokens."),
    steps: int = typer.Option(200, help="Decode steps timed at each position (sinks, dense)."),
    recompute_steps: int = typer.Option(3, help="Decode steps timed at each position for recompute (slow)."),
    block: int = BLOCK,
    text: str = TEXT,
    model: str = MODEL, quant: str = QUANT, device: str = DEVICE, dtype: str = DTYPE,
    as_json: bool = JSON, plot: str = PLOT,
) -> None:
    """Per-token decode latency against stream position, tokens/s, peak memory, upkeep share.

    To reach position p cheaply, the text is prefilled in chunks through the cache (as the chat
    prefills a pasted text), then --steps single-token decode steps are timed there.

    Example: sinkchat bench speed --window 2000 --tokens 22004 --plot docs/bench-speed.png
    """
    from .. import bench

    wanted = bench.parse_modes(modes, bench.SPEED_MODES)
    check_positive(tokens=tokens, points=points, steps=steps, recompute_steps=recompute_steps)
    s = settings(model=model, sinks=sinks, window=window, block=block, quant=quant, device=device, dtype=dtype)
    sinks, window, block = s.sinks, s.window, s.block
    body, source = read_text(text)
    from ..bench import speed as measure_speed

    loaded = load(s, as_json)
    positions = measure_speed.speed_positions(sinks, window, tokens, points)
    need = positions[-1] + max(steps, recompute_steps) + 1
    ids = bench.text_ids(loaded.tokenizer, body, need)
    if len(ids) < 2:
        raise SinkchatError(f"--text {source}: fewer than 2 tokens")
    if len(ids) < need:  # timing does not depend on the words: repeat the text to reach the positions
        ids = (ids * (need // len(ids) + 1))[:need]
    runs: list[measure_speed.SpeedRun] = []
    interrupted = measure(
        lambda bars: measure_speed.speed_runs(loaded, ids, wanted, sinks, window, block, positions, steps,
                                              recompute_steps, bars, runs), as_json
    )
    extra = {"text": source, "sinks": sinks, "window": window, "positions": positions, "steps": steps,
             "recompute_steps": recompute_steps,
             "memory": "CUDA max allocated" if str(loaded.device).startswith("cuda") else "process RSS",
             "interrupted": interrupted, "machine": machine(loaded)}
    report = measure_speed.speed_report(runs, extra)
    if plot and runs:
        from ..bench.plot import speed_plot

        speed_plot(report, plot, f"{loaded.name}: decode speed, sinks={sinks} window={window}")
    finish(report, as_json, print_speed, plot, interrupted)


def print_speed(report: dict, plot: str | None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(markup=False)  # paths and notes are never read as markup
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
    console.print(f"sinks vs recompute: {fmt(report['speedup_vs_recompute'], '.1f')}x faster per token")
    console.print(f"sinks last/first position time: {fmt(report['sinks_last_vs_first'], '.3f')}")
    share = report["upkeep_share"]
    console.print(f"cache upkeep (eviction, re-rotation): {fmt(share and share * 100, '.2f')}% of decode time")
    if plot:
        console.print(f"plot: {plot}")


@app.command("resume")
def resume(
    window: int = typer.Option(None, "--window", "-w", help="Window to fill [default: the chat's, 2000].",
                               show_default=False),
    sinks: int = SINKS,
    repeats: int = typer.Option(3, help="Timed restores; the best is reported."),
    rebuild_repeats: int = typer.Option(1, help="Timed rebuilds (each re-prefills the whole window)."),
    model: str = MODEL, quant: str = QUANT, device: str = DEVICE, dtype: str = DTYPE,
    as_json: bool = JSON,
) -> None:
    """Resume speed: restoring a full window's KV from disk vs re-prefilling it; state size on disk.

    Example: sinkchat bench resume --window 2000 --json
    """
    from ..bench.resume import format_table, run_resume_bench

    check_positive(repeats=repeats, rebuild_repeats=rebuild_repeats)
    s = settings(model=model, sinks=sinks, window=window, quant=quant, device=device, dtype=dtype)
    loaded = load(s, as_json)
    report = run_resume_bench(loaded, s, repeats=repeats, rebuild_repeats=rebuild_repeats)
    report["machine"] = machine(loaded)
    print(json.dumps(report, indent=1) if as_json else format_table(report))
