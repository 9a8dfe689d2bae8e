"""``sinkchat bench ppl | speed | resume | attention | turns``: flags, progress, JSON and plots.

The measuring lives in :mod:`sinkchat.bench` (imported only when a command runs, so ``--help``
stays quick); this module only turns flags into calls and results into something a person (a
table, from :mod:`.bench_output`; a PNG) or a script (``--json``, alone on stdout) reads. Model,
quantization, device, dtype and sinks default to the chat's :class:`~sinkchat.settings.Settings`
(config file included). Progress goes to stderr; Ctrl+C stops the run and prints what was measured so far.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import typer

from .. import config
from ..errors import SinkchatError
from ..settings import DEFAULT_SINKS, Settings, help_for
from . import bench_output as tables
from .bench_output import Bars, note

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Reproduce StreamingLLM's perplexity, speed and attention results on this code (same cache as the chat).",
)

MODEL = typer.Option(None, "--model", "-m", help=help_for("model"), show_default=False)
QUANT = typer.Option(None, help=help_for("quant"), show_default=False)
DEVICE = typer.Option(None, help=help_for("device"), show_default=False)
DTYPE = typer.Option(None, help=help_for("dtype"), show_default=False)
KV_DTYPE = typer.Option(None, "--kv-dtype", help=help_for("kv_dtype"), show_default=False)
# a benchmark's geometry is given, not guessed from the model: 4 sinks unless asked (also for gpt-oss)
BENCH_SINKS = f"Attention-sink tokens kept forever (0 = plain window attention) [default: {DEFAULT_SINKS}]."
SINKS = typer.Option(None, help=BENCH_SINKS, show_default=False)
JSON = typer.Option(False, "--json", help="Print only the results as JSON on stdout.")


def _plot_path(plot: str | None) -> str | None:
    """A ``--plot`` path that cannot be written is refused before the run, not after it."""
    import os

    if plot is None:
        return None
    path = Path(plot)
    folder = path.parent
    if path.is_dir() or path.is_symlink() or (path.exists() and not path.is_file()):
        raise typer.BadParameter(f"{plot} is not a regular file", param_hint="--plot")
    if path.suffix.lower() not in ("", ".png"):  # matplotlib would pick the format by it, after the run
        raise typer.BadParameter(f"{plot}: the plot is a PNG; name a .png file", param_hint="--plot")
    if not folder.is_dir():
        raise typer.BadParameter(f"{plot}: the folder {folder} does not exist", param_hint="--plot")
    if not os.access(folder, os.W_OK):
        raise typer.BadParameter(f"{plot}: the folder {folder} is not writable", param_hint="--plot")
    return plot


PLOT = typer.Option(None, "--plot", help="Write a PNG plot to this path.", callback=_plot_path)


def _text_path(path: str | None) -> str | None:
    """A ``--text`` file that is not there is refused before the model loads (and before torch is imported)."""
    if path is not None:
        p = Path(path)
        if p.exists() and not p.is_file():
            raise SinkchatError(f"--text {path}: not a regular file")
        if not p.is_file():
            raise SinkchatError(f"--text {path}: no such file")
    return path


TEXT = typer.Option(None, "--text", help="UTF-8 text file [default: Python's documentation, pydoc_data.topics].",
                    callback=_text_path)
BLOCK = typer.Option(None, help="Eviction block of the sink cache [default: the chat's, window/16, max 256].")
RECALL = typer.Option(None, "--recall", show_default=False,
                      help="Recall slots of the recall mode [default: the chat's --recall, else half the window].")
RECALL_BLOCK = typer.Option(None, "--recall-block", show_default=False,
                            help="Tokens per block of the recall mode's memory [default: the chat's, 64].")


# -- shared plumbing ---------------------------------------------------------------------------------


def read_text(path: str | None) -> tuple[str, str]:
    """The text to stream and where it came from; a missing or unreadable file is one clear error."""
    from .. import bench
    from ..files import reason

    if path is None:
        return bench.default_text(), "pydoc_data.topics (Python's documentation)"
    p = Path(_text_path(path))
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
    """The chat's settings (defaults < config.toml < these flags), for what a bench shares with a chat;
    the sinks a measurement uses are always a number (:data:`BENCH_SINKS`)."""
    s, warnings = Settings.resolve(flags, config=config.load_config(), config_source=str(config.config_file()))
    for warning in warnings:
        note(f"sinkchat: warning: {warning}")
    return s.replace(sinks=s.sinks_for())


def load(s: Settings, quiet: bool, context: bool = True):
    """Load the settings' model with transformers' classes (the baselines run transformers' forward);
    ``context=False`` skips the check of sinks + window against its context. Its notices (a GGUF
    re-quantized, a base model) go to stderr."""
    from ..model import load as load_model
    from ..model import load_for

    progress = (lambda m: None) if quiet else note
    if context:
        loaded = load_for(s, progress=progress, quick=False)
    else:
        loaded = load_model(s.model, s.quant, s.device, s.dtype, progress=progress, kv_dtype=s.kv_dtype,
                            compile=s.compile, quick=False)
    for notice in loaded.take_notices():
        note(f"sinkchat: {notice}")
    return loaded


def machine(loaded) -> dict:
    import torch

    from .. import bench

    info = {
        "model": loaded.name,
        "bos": bench.bos_first(loaded.tokenizer),  # every streamed text starts with BOS, as a chat does
        "quant": loaded.quant,
        "weights": loaded.weights,
        "runs": loaded.runs,  # what runs (a GGUF: its file type -> the kernels), and per block type:
        "kernels": loaded.kernels,  # {"Q5_0": {"int8": 81}, ...}
        "fast_path": loaded.fast is not None,
        "decode_step": loaded.fast.step_kind if loaded.fast is not None else "transformers",
        "prefill_gemm": prefill_gemm(loaded),
        "kv_dtype": str(loaded.kv_dtype).replace("torch.", ""),
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).replace("torch.", ""),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if str(loaded.device).startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def prefill_gemm(loaded) -> str | None:
    """The dtype of a prefill chunk's GEMMs on the CPU's dequantized 4-bit weights (None: no such weights)."""
    from ..model.quant import Int4Linear, prefill_dtype

    if not any(isinstance(m, Int4Linear) for m in loaded.model.modules()):
        return None
    return str(prefill_dtype()).replace("torch.", "")


def recall_slots(s: Settings, recall: int | None) -> int:
    """The recall mode's slots: ``--recall``, else the chat's (config.toml), else half the window; one
    error when they hold no block of ``s.recall_block`` tokens."""
    slots = recall if recall is not None else (s.recall or s.window // 2)
    if slots < s.recall_block:
        whence = "" if recall is not None or s.recall else f" (by default half --window {s.window})"
        raise SinkchatError(f"--recall {slots}{whence} holds no block of --recall-block {s.recall_block}")
    return slots


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


# -- bench ppl -----------------------------------------------------------------------------------------


def finish(report: dict, as_json: bool, show, plot: str | None, interrupted: bool) -> None:
    """JSON alone on stdout, or tables; exit 130 after the results so far when interrupted."""
    if as_json:
        print(json.dumps(report, indent=1))
    else:
        show(report)
        if plot:
            tables.tables_console().print(f"plot: {plot}")
    if interrupted:
        raise typer.Exit(130)


SINKS_LIST = typer.Option(
    None, "--sinks", show_default=False,
    help=BENCH_SINKS + " A comma list (0,1,2,4,8,16) runs the sinks mode once per count at one total budget, "
    "the first count + --window (StreamingLLM's Table 2): --sinks 0,4 --window 256 runs 0 + 256 and 4 + 252.",
)


@app.command("ppl")
def ppl(
    text: str = TEXT,
    tokens: int = typer.Option(8000, "--tokens", "-n", help="Tokens of the text to stream."),
    sinks: str = SINKS_LIST,
    window: int = typer.Option(508, "--window", "-w", help="Window (window mode gets sinks + window, no sinks)."),
    modes: str = typer.Option(None, show_default=False, help="Comma list of dense, window, sinks, recompute, recall "
                              "[default: the first four; with a list of --sinks: sinks, and dense may be added]."),
    block: int = BLOCK,
    recall: int = RECALL,
    recall_block: int = RECALL_BLOCK,
    feed: int = typer.Option(1, help="Tokens per forward through the cache in window/sinks modes (1 = the paper's)."),
    stride: int = typer.Option(1, help="Recompute scores every stride-th token only (it is the slow mode)."),
    batch: int = typer.Option(8, help="Recompute contexts per forward pass."),
    chunk: int = typer.Option(1000, help="Tokens per row of the per-chunk table."),
    ctx: int = typer.Option(None, "--ctx", show_default=False,
                            help="Score dense as llama.cpp's llama-perplexity -c CTX does: chunks of CTX tokens, "
                            "each from BOS (where the model adds one) and an empty cache, their second halves "
                            "scored. --modes dense only."),
    model: str = MODEL, quant: str = QUANT, device: str = DEVICE, dtype: str = DTYPE, kv_dtype: str = KV_DTYPE,
    as_json: bool = JSON, plot: str = PLOT,
) -> None:
    """Streaming perplexity, token by token, teacher-forced (StreamingLLM's Figure 3), or with a list of
    --sinks, how many sinks are needed at one cache budget (its Table 2).

    Example: sinkchat bench ppl --tokens 8000 --sinks 4 --window 508 --plot docs/bench-ppl.png

    Example: sinkchat bench ppl --tokens 2000 --sinks 0,1,2,4,8,16 --window 256 --feed 16 --modes dense,sinks

    Example: sinkchat bench ppl --model q4_k_m.gguf --modes dense --ctx 1024 --tokens 4096 --window 500

    Example: sinkchat bench ppl --modes sinks,recall --window 256 --recall 128 --feed 32 --tokens 2048
    """
    from .. import bench

    counts = bench.parse_sinks(sinks)
    check_positive(tokens=tokens, feed=feed, stride=stride, batch=batch, chunk=chunk, ctx=ctx, recall=recall,
                   recall_block=recall_block)
    if ctx is not None and (modes or "").replace(" ", "") != "dense":
        raise SinkchatError("--ctx scores dense in llama.cpp's chunks; use it with --modes dense")
    if ctx is not None and ctx < 4:
        raise SinkchatError(f"--ctx must be 4 or more (got {ctx})")
    flags = dict(model=model, block=block, quant=quant, device=device, dtype=dtype, kv_dtype=kv_dtype)
    if counts is not None and len(counts) > 1:
        return ppl_sweep(counts, text, tokens, window, modes, feed, flags, as_json, plot)
    wanted = bench.parse_modes(modes or ",".join(bench.PPL_DEFAULT), bench.PPL_MODES)
    s = settings(sinks=counts[0] if counts else None, window=window, recall_block=recall_block, **flags)
    sinks, window, block = s.sinks, s.window, s.block
    slots = recall_slots(s, recall) if "recall" in wanted else 0
    if feed > window:
        raise SinkchatError(f"--feed {feed} must be at most --window {window}")
    from ..bench import ppl as measure_ppl

    loaded, ids, source, runs, interrupted = scored_runs(
        s, text, tokens, as_json,
        lambda loaded, ids, bars, runs: measure_ppl.ppl_runs(loaded, ids, wanted, sinks, window, block, stride, batch,
                                                             bars, runs, feed, ctx, (slots, s.recall_block)),
    )
    extra = {"text": source, "tokens": len(ids), "sinks": sinks, "window": window, "feed": feed, "batch": batch,
             "ctx": ctx, "recall": slots, "recall_block": s.recall_block, "interrupted": interrupted,
             "machine": machine(loaded)}
    report = measure_ppl.ppl_report(runs, chunk, stride, extra)
    if plot and runs:
        from ..bench.plot import ppl_plot

        ppl_plot(report, {r.mode: r.scored for r in runs}, plot,
                 f"{loaded.name}: streaming perplexity, sinks={sinks} window={window}")
    finish(report, as_json, tables.print_ppl, plot, interrupted)


def ppl_sweep(counts: list[int], text, tokens: int, window: int, modes: str | None, feed: int, flags: dict,
              as_json: bool, plot: str | None) -> None:
    """``bench ppl --sinks 0,1,2,4,8,16``: every count at the budget of the first count + ``--window``."""
    from .. import bench

    wanted = bench.parse_modes(modes or "sinks", bench.PPL_MODES)
    if not set(wanted) <= set(bench.SWEEP_MODES):
        raise SinkchatError(f"--sinks with several counts runs the sinks mode once per count (and dense, if asked); "
                            f"--modes {modes} needs a single --sinks count")
    first = settings(sinks=counts[0], window=window, **flags)
    budget = first.sinks + first.window
    for count in counts:
        if count >= budget:
            raise SinkchatError(f"--sinks {count} leaves no window in the budget of {budget} tokens "
                                f"({counts[0]} + --window {first.window}); use a larger --window")
        settings(sinks=count, window=budget - count, **flags)  # each run's geometry is checked as the chat's
    smallest = budget - max(counts)
    if feed > smallest:
        raise SinkchatError(f"--feed {feed} must be at most the smallest window of the sweep, {smallest}")
    from ..bench import ppl as measure_ppl

    loaded, ids, source, runs, interrupted = scored_runs(
        first, text, tokens, as_json,
        lambda loaded, ids, bars, runs: measure_ppl.sweep_runs(loaded, ids, counts, budget, first.block, feed, bars,
                                                               runs, dense="dense" in wanted),
    )
    extra = {"text": source, "tokens": len(ids), "sinks": counts, "window": first.window, "feed": feed,
             "interrupted": interrupted, "machine": machine(loaded)}
    report = measure_ppl.sweep_report(runs, budget, extra)
    if plot and runs:
        from ..bench.plot import sweep_plot

        sweep_plot(report, runs, plot, f"{loaded.name}: how many sinks? every run holds {budget} tokens")
    finish(report, as_json, tables.print_sweep, plot, interrupted)


def scored_runs(s: Settings, text: str | None, tokens: int, as_json: bool, work):
    """Read the text, load the model, take the text's first ``tokens`` tokens and run
    ``work(loaded, ids, bars, runs)``; returns ``(loaded, ids, source, runs, interrupted)``."""
    body, source = read_text(text)
    loaded = load(s, as_json)
    ids = stream_ids(loaded, body, source, tokens)
    runs: list = []
    interrupted = measure(lambda bars: work(loaded, ids, bars, runs), as_json)
    return loaded, ids, source, runs, interrupted


def stream_ids(loaded, body: str, source: str, tokens: int) -> list[int]:
    """The first ``tokens`` tokens of the text; at least 2 (one to score), or one clear error."""
    from .. import bench

    ids = bench.text_ids(loaded.tokenizer, body, tokens)
    if len(ids) < 2:
        raise SinkchatError(f"--text {source}: fewer than 2 tokens to score")
    if len(ids) < tokens:
        note(f"sinkchat: the text has only {len(ids)} tokens; using them all")
    return ids


# -- bench speed ---------------------------------------------------------------------------------------


@app.command("speed")
def speed(
    tokens: int = typer.Option(22004, "--tokens", "-n", help="Last stream position measured."),
    sinks: int = SINKS,
    window: int = typer.Option(None, "--window", "-w", help="Window (also the recompute context, plus sinks) "
                               "[default: the chat's, 2000].", show_default=False),
    modes: str = typer.Option("sinks,dense,recompute", help="Comma list of sinks, dense, recompute, recall (sinks "
                              "plus --recall slots, every prefill chunk recalling from the block memory)."),
    points: int = typer.Option(6, help="Positions measured, from the first full window to --tokens."),
    steps: int = typer.Option(200, help="Decode steps timed at each position (sinks, dense)."),
    recompute_steps: int = typer.Option(3, help="Decode steps timed at each position for recompute (slow)."),
    block: int = BLOCK,
    recall: int = RECALL,
    recall_block: int = RECALL_BLOCK,
    text: str = TEXT,
    model: str = MODEL, quant: str = QUANT, device: str = DEVICE, dtype: str = DTYPE, kv_dtype: str = KV_DTYPE,
    as_json: bool = JSON, plot: str = PLOT,
) -> None:
    """Per-token decode latency against stream position, tokens/s, peak memory, upkeep share.

    To reach position p cheaply, the text is prefilled in chunks through the cache (as the chat
    prefills a pasted text), then --steps single-token decode steps are timed there.

    Example: sinkchat bench speed --window 2000 --tokens 22004 --plot docs/bench-speed.png

    Example: sinkchat bench speed --modes sinks,recall --recall 256 --tokens 6000 --points 2
    """
    from .. import bench

    wanted = bench.parse_modes(modes, bench.SPEED_MODES)
    check_positive(tokens=tokens, points=points, steps=steps, recompute_steps=recompute_steps, recall=recall,
                   recall_block=recall_block)
    s = settings(model=model, sinks=sinks, window=window, block=block, quant=quant, device=device, dtype=dtype,
                 kv_dtype=kv_dtype, recall_block=recall_block)
    sinks, window, block = s.sinks, s.window, s.block
    slots = recall_slots(s, recall) if "recall" in wanted else 0
    body, source = read_text(text)
    from ..bench import speed as measure_speed

    loaded = load(s, as_json)
    positions = measure_speed.speed_positions(sinks, window, tokens, points, steps)
    need = positions[-1] + max(steps, recompute_steps) + 1
    ids = bench.text_ids(loaded.tokenizer, body, need)
    if len(ids) < 2:
        raise SinkchatError(f"--text {source}: fewer than 2 tokens")
    if len(ids) < need:  # timing does not depend on the words: repeat the text (not its BOS) to reach them
        first = int(bench.bos_first(loaded.tokenizer))
        ids = ids[:first] + (ids[first:] * (need // len(ids) + 1))[: need - first]
    from ..bench.ceiling import copy_bandwidth
    from ..sampling import Sampler

    bandwidth = copy_bandwidth(next(loaded.model.parameters()).device)
    candidates = Sampler(s).candidates()  # the chat's decode steps: the candidate head where there is one
    runs: list[measure_speed.SpeedRun] = []
    interrupted = measure(
        lambda bars: measure_speed.speed_runs(loaded, ids, wanted, sinks, window, block, positions, steps,
                                              recompute_steps, bars, runs, slots, s.recall_block, candidates),
        as_json,
    )
    extra = {"text": source, "sinks": sinks, "window": window, "positions": positions, "steps": steps,
             "recompute_steps": recompute_steps, "recall": slots, "recall_block": s.recall_block,
             "candidates": candidates,
             "memory": "CUDA max allocated" if str(loaded.device).startswith("cuda") else "process RSS",
             "interrupted": interrupted, "machine": machine(loaded)}
    report = measure_speed.speed_report(runs, extra, bandwidth)
    if plot and runs:
        from ..bench.plot import speed_plot

        speed_plot(report, plot, f"{loaded.name}: decode speed, sinks={sinks} window={window}")
    finish(report, as_json, tables.print_speed, plot, interrupted)


def parse_tasks(text: str) -> tuple[list[str], list[str]]:
    """``--tasks``: built-in task names and ``.jsonl`` files, in one comma list."""
    from ..bench.memory import TASKS

    items = [t.strip() for t in text.split(",") if t.strip()]
    files = [t for t in items if t.endswith(".jsonl")]
    names = [t for t in items if not t.endswith(".jsonl")]
    bad = [t for t in names if t not in TASKS]
    if bad or not items:
        raise SinkchatError(f"--tasks takes a comma list of {', '.join(TASKS)} and FILE.jsonl (got {text!r})")
    return list(dict.fromkeys(names)), list(dict.fromkeys(files))


def parse_lengths(text: str, window: int) -> list[int]:
    """``--tokens``: a comma list of lengths, each in tokens (``1024``) or in windows (``4x``)."""
    try:
        lengths = [int(float(t[:-1]) * window) if t.strip().endswith("x") else int(t) for t in text.split(",")]
    except (ValueError, OverflowError):  # OverflowError: "infx"
        raise SinkchatError(f"--tokens takes a comma list of lengths in tokens (1024) or windows (4x) "
                            f"(got {text!r})") from None
    if any(n < 64 for n in lengths):
        raise SinkchatError(f"--tokens: every length must be 64 tokens or more (got {text!r})")
    return lengths


@app.command("memory")
def memory(
    tasks: str = typer.Option(
        "passkey", "--tasks",
        help="Comma list of built-in tasks (passkey, needle, lines, chat) and FILE.jsonl files of your own, one "
        'JSON object a line: {"context", "question", "answer"}, optional "candidates": [...] and "chat": true. '
        "One option for both, so your tasks run beside the built-in ones in one table; a name ending in .jsonl "
        "is a file."),
    tokens: str = typer.Option("4x", "--tokens", "-n", help="Comma list of context lengths of the built-in tasks, "
                               "in tokens (1024) or in windows (1x,4x,16x)."),
    depths: str = typer.Option("0.15,0.5", help="Comma list of where the fact sits in the context (0..1)."),
    keys: int = typer.Option(10, help="Tasks (random keys or facts) per built-in task, length and depth."),
    modes: str = typer.Option("dense,sinks,recall", help="Comma list of dense, sinks, recall."),
    sinks: int = SINKS,
    window: int = typer.Option(256, "--window", "-w", help="Window of the sinks and recall modes."),
    recall: int = RECALL,
    recall_block: int = RECALL_BLOCK,
    model: str = MODEL, quant: str = QUANT, device: str = DEVICE, dtype: str = DTYPE,
    as_json: bool = JSON, plot: str = PLOT,
) -> None:
    """Long-chat memory: a fact stated early, asked for after the window moved past it; dense
    (everything kept), sinks (sinks + window) and recall (sinks + window + recall from the block memory).
    Exact answers are found in the greedy continuation; free-form facts (needle, chat, a file's
    candidates) by the highest log-likelihood among the candidates.

    Example: sinkchat bench memory --tasks passkey,lines --tokens 16x --depths 0.15 --keys 3 --window 256

    Example: sinkchat bench memory --tasks my-tasks.jsonl --window 256 --json
    """
    from .. import bench
    from ..bench.taskfile import read_tasks

    names, files = parse_tasks(tasks)
    check_positive(keys=keys, window=window, recall=recall)
    wanted = bench.parse_modes(modes, ("dense", "sinks", "recall"))
    lengths = parse_lengths(tokens, window)
    try:
        where = [float(d) for d in depths.split(",")]
    except ValueError:
        raise SinkchatError(f"--depths takes a comma list of numbers between 0 and 1 (got {depths!r})") from None
    if any(not 0 <= d <= 1 for d in where):
        raise SinkchatError(f"--depths must be between 0 and 1 (got {depths!r})")
    user = [task for path in files for task in read_tasks(path)]
    s = settings(model=model, sinks=sinks, window=window, quant=quant, device=device, dtype=dtype,
                 recall_block=recall_block)
    slots = recall_slots(s, recall) if "recall" in wanted else 0
    from ..bench import memory as bench_memory

    loaded = load(s, as_json, context=False)
    results: list = []
    interrupted = measure(lambda bars: bench_memory.run_memory(loaded, wanted, names, user, lengths, where, keys,
                                                               s.sinks, s.window, slots, s.recall_block, bars,
                                                               results, note), as_json)
    extra = {"tasks": names + files, "sinks": s.sinks, "window": s.window, "recall": slots,
             "recall_block": s.recall_block, "interrupted": interrupted, "machine": machine(loaded)}
    report = bench_memory.memory_report(results, extra)
    if plot and results:
        from ..bench.plot import memory_plot

        memory_plot(report, plot, f"{loaded.name}: found share, sinks {s.sinks} + window {s.window}, "
                    f"recall {slots}")
    finish(report, as_json, tables.print_memory, plot, interrupted)


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


@app.command("attention")
def attention(
    text: str = TEXT,
    tokens: int = typer.Option(1024, "--tokens", "-n", help="Tokens of the text to read (more than 64: only "
                               "queries at position 64 and after are counted)."),
    model: str = MODEL, quant: str = QUANT, device: str = DEVICE, dtype: str = DTYPE,
    data_dir: str = typer.Option(None, "--data-dir", help="Where the result is kept for the chat's help (F1) "
                                 "[default: $SINKCHAT_DATA_DIR or the XDG data dir, as for chats]."),
    as_json: bool = JSON, plot: str = PLOT,
) -> None:
    """Where attention goes: the share that queries after token 64 put on the first 1, 4 and 16 tokens, per
    layer and head, against uniform attention; layers and heads above 50% on the first 4 are sink-dominated
    (StreamingLLM's Figure 2). Eager attention, on a growing cache: nothing is evicted.

    The result is also kept in the data dir, so the chat's help (F1) quotes it for this model.

    Example: sinkchat bench attention --tokens 1024 --plot docs/bench-attention.png
    """
    from .. import bench

    if tokens <= bench.ATTENTION_FROM:
        raise SinkchatError(f"--tokens must be more than {bench.ATTENTION_FROM}: only queries at position "
                            f"{bench.ATTENTION_FROM} and after are counted (got {tokens})")
    s = settings(model=model, quant=quant, device=device, dtype=dtype)
    body, source = read_text(text)
    from ..bench import attention as measure_attention
    from ..kv import max_positions

    loaded = load(s, as_json, context=False)
    limit = max_positions(loaded.model.config)
    if limit is not None and tokens > limit:
        raise SinkchatError(f"--tokens {tokens} exceeds {loaded.name}'s context of {limit} tokens")
    ids = stream_ids(loaded, body, source, tokens)
    if len(ids) <= bench.ATTENTION_FROM:
        raise SinkchatError(f"--text {source}: only {len(ids)} tokens; bench attention needs more than "
                            f"{bench.ATTENTION_FROM}")
    shares = measure_attention.Shares(measure_attention.layers_of(loaded.model))
    interrupted = measure(
        lambda bars: measure_attention.measure(loaded.model, ids, bars("attention", len(ids)), shares), as_json
    )
    if not shares.queries:
        raise typer.Exit(130)
    report = {"model": loaded.name, "text": source, **shares.report(), "interrupted": interrupted,
              "machine": machine(loaded)}
    if not interrupted:
        from ..store.attention import save_attention

        try:
            save_attention(report, s.model, data_dir)
        except OSError as exc:
            note(f"sinkchat: warning: could not keep the result for the chat's help: {exc}")
    if plot:
        from ..bench.plot import attention_plot

        attention_plot(report, plot, f"{loaded.name} ({loaded.quant}): where attention goes, {len(ids)} tokens "
                       f"of {source}")
    finish(report, as_json, tables.print_attention, plot, interrupted)


@app.command("turns")
def turns(
    window: int = typer.Option(256, "--window", "-w", help="Window of both chats."),
    sinks: int = SINKS,
    turns: int = typer.Option(30, "--turns", help="Turns of the chat and of the transcript (at most 30)."),
    modes: str = typer.Option("tokens,turns", help="Comma list of --evict modes: tokens, turns."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Longest generated reply."),
    model: str = MODEL, quant: str = QUANT, device: str = DEVICE, dtype: str = DTYPE,
    as_json: bool = JSON,
) -> None:
    """Evicting whole turns against evicting tokens, in a chat: a scripted greedy chat per --evict mode
    (replies that are empty or repeat the previous one; evictions that leave the window starting inside
    a message), and the perplexity of a fixed transcript's reference replies, teacher-forced turn by turn.

    Example: sinkchat bench turns --window 256
    """
    from .. import bench
    from ..bench import turns as measure_turns

    wanted = bench.parse_modes(modes, ("tokens", "turns"))
    check_positive(turns=turns, max_new_tokens=max_new_tokens)
    if turns > len(measure_turns.SCRIPT):
        raise SinkchatError(f"--turns must be at most {len(measure_turns.SCRIPT)}, the script's length (got {turns})")
    s = settings(model=model, sinks=sinks, window=window, quant=quant, device=device, dtype=dtype)
    loaded = load(s, as_json)
    runs: list[measure_turns.TurnsRun] = []
    interrupted = measure(
        lambda bars: measure_turns.run_turns(loaded, wanted, s.sinks, s.window, turns, max_new_tokens, bars, runs),
        as_json,
    )
    report = measure_turns.turns_report(runs, {"sinks": s.sinks, "window": s.window, "turns": turns,
                                               "max_new_tokens": max_new_tokens, "interrupted": interrupted,
                                               "machine": machine(loaded)})
    finish(report, as_json, tables.print_turns, None, interrupted)
