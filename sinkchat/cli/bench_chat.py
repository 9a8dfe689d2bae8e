"""``sinkchat bench endless`` (engine, store and TUI together) and ``sinkchat bench peer`` (against
llama.cpp), on the ``sinkchat bench`` command group of :mod:`.bench`."""

from __future__ import annotations

import typer

from ..errors import SinkchatError
from ..settings import help_for
from .bench import (
    DEVICE,
    DTYPE,
    JSON,
    KV_DTYPE,
    MODEL,
    PLOT,
    QUANT,
    SINKS,
    TEXT,
    app,
    check_positive,
    finish,
    load,
    machine,
    measure,
    read_text,
    settings,
)
from .bench_output import Bars, note, print_endless, print_peer, print_peer_ppl


@app.command("endless")
def endless(
    turns: int = typer.Option(2000, "--turns", "-n", help="Turns of the scripted chat."),
    window: int = typer.Option(None, "--window", "-w", help=help_for("window"), show_default=False),
    max_new_tokens: int = typer.Option(8, help="Longest reply (short turns keep a long run affordable)."),
    data_dir: str = typer.Option(None, "--data-dir", help="Keep the chat here [default: a temporary dir]."),
    recall: int = typer.Option(None, "--recall", help=help_for("recall"), show_default=False),
    recall_block: int = typer.Option(None, "--recall-block", help=help_for("recall_block"), show_default=False),
    sinks: int = SINKS, model: str = MODEL, quant: str = QUANT, device: str = DEVICE, dtype: str = DTYPE,
    as_json: bool = JSON, plot: str = PLOT,
) -> None:
    """A greedy chat of many short turns through the engine, the store and a headless TUI: UI time per
    message, decode time per token, save time and bytes, memory and database size at turns 10, 100,
    1000 and the last. In an endless chat all but the database (the ledger) should stay flat.

    Example: sinkchat bench endless --turns 2000 --plot docs/bench-endless.png

    Example: sinkchat bench endless --turns 2000 --window 256 --recall 128
    """
    from ..bench import endless as bench_endless

    check_positive(turns=turns, max_new_tokens=max_new_tokens)
    s = settings(model=model, sinks=sinks, window=window, quant=quant, device=device, dtype=dtype,
                 temperature=0.0, max_new_tokens=max_new_tokens, recall=recall, recall_block=recall_block)
    loaded = load(s, as_json)
    rows: list[bench_endless.Turn] = []
    interrupted = measure(
        lambda bars: bench_endless.run(loaded, s, turns, bars("turns", turns), rows, data_dir), as_json
    )
    report = bench_endless.report(rows, {"window": s.window, "sinks": s.sinks, "max_new_tokens": max_new_tokens,
                                         "recall": s.recall, "recall_block": s.recall_block,
                                         "interrupted": interrupted, "machine": machine(loaded)})
    if plot and rows:
        from ..bench.plot import endless_plot

        endless_plot(report, plot, f"{loaded.name}: an endless chat, sinks={s.sinks} window={s.window}")
    finish(report, as_json, print_endless, plot, interrupted)


@app.command("peer")
def peer(
    llama_bench: str = typer.Option(None, "--llama-bench", help="The llama-bench binary [default: on PATH]."),
    window: int = typer.Option(None, "--window", "-w", help=help_for("window"), show_default=False),
    steps: int = typer.Option(64, help="Decode steps timed where the cache is full."),
    repetitions: int = typer.Option(3, help="Repetitions of each llama-bench test and of sinkchat's prefill."),
    rounds: int = typer.Option(3, "--rounds", help="Alternating runs of each side; the medians are compared."),
    ppl: bool = typer.Option(False, "--ppl", help="Compare perplexity instead of speed: sinkchat's dense "
                             "perplexity and llama.cpp's llama-perplexity on the same file, text and chunks."),
    llama_perplexity: str = typer.Option(None, "--llama-perplexity",
                                         help="With --ppl: the llama-perplexity binary [default: on PATH]."),
    ctx: int = typer.Option(1024, "--ctx", help="With --ppl: tokens per chunk (llama-perplexity -c)."),
    chunks: int = typer.Option(4, "--chunks", help="With --ppl: chunks scored (llama-perplexity --chunks)."),
    text: str = TEXT,
    sinks: int = SINKS, model: str = MODEL, quant: str = QUANT, device: str = DEVICE, dtype: str = DTYPE,
    kv_dtype: str = KV_DTYPE, as_json: bool = JSON,
) -> None:
    """sinkchat against llama.cpp's llama-bench on the same GGUF file, threads and depth: prompt
    tokens/s for a 512-token message, and decode tokens/s where the sink cache is full (decoded as the
    chat samples with these settings), medians of --rounds alternating runs of each. With --ppl,
    perplexity against llama-perplexity instead: the same file, text, context and BOS, both numbers and
    their ratio.

    Example: sinkchat bench peer --llama-bench ~/llama.cpp/build/bin/llama-bench --window 2000

    Example: sinkchat bench peer --ppl --llama-perplexity ~/llama.cpp/build/bin/llama-perplexity --model x.gguf
    """
    from .. import bench
    from ..bench import peer as measure_peer
    from ..model import resolve

    check_positive(steps=steps, repetitions=repetitions, rounds=rounds, ctx=ctx, chunks=chunks)
    if ppl:
        return peer_ppl(llama_perplexity, ctx, chunks, text, as_json, model=model, quant=quant, device=device,
                        dtype=dtype, kv_dtype=kv_dtype)
    binary = measure_peer.find_llama_bench(llama_bench)
    s = settings(model=model, sinks=sinks, window=window, quant=quant, device=device, dtype=dtype, kv_dtype=kv_dtype)
    source = resolve(s.model)
    if source.kind != "gguf":
        raise SinkchatError(f"bench peer compares on one GGUF file; {s.model} is a {source.describe()}")
    import torch

    from ..sampling import Sampler

    depth, threads = s.sinks + s.window, torch.get_num_threads()
    llama = lambda: measure_peer.run_llama_bench(binary, source.ref, threads, depth, repetitions=repetitions)  # noqa: E731
    first = llama()
    loaded = load(s, as_json)
    ids = bench.text_ids(loaded.tokenizer, bench.default_text(), max(512, depth + steps + 1))
    candidates = Sampler(s).candidates()
    per_round = measure_peer.alternate(
        lambda: measure_peer.sinkchat_figures(loaded, s.sinks, s.window, ids, steps=steps, repetitions=repetitions,
                                              candidates=candidates),
        llama, rounds, first)
    ours, theirs = measure_peer.medians(per_round)
    info = machine(loaded)  # after the run: how its decode steps ran (compiled at the first, or not)
    rows = [{side: {k: v for k, v in figures.items() if k != "raw"} for side, figures in r.items()}
            for r in per_round]
    report = measure_peer.report(ours, theirs, {"gguf": source.ref, "depth": depth, "threads": threads,
                                                "llama_bench": str(binary), "rounds": rows,
                                                "candidates": candidates, "machine": info})
    finish(report, as_json, print_peer, None, False)


def peer_ppl(binary: str | None, ctx: int, chunks: int, text: str | None, as_json: bool, **flags) -> None:
    """``bench peer --ppl``: llama-perplexity on the text file (the default text written to a temporary
    file), then sinkchat's dense perplexity on the same chunks; the two and their ratio."""
    import tempfile
    from pathlib import Path

    import torch

    from .. import bench
    from ..bench import peer as measure_peer
    from ..model import resolve

    if ctx < 4:
        raise SinkchatError(f"--ctx must be 4 or more (got {ctx})")
    found = measure_peer.find_llama_bench(binary, "llama-perplexity")
    s = settings(**flags)
    source = resolve(s.model)
    if source.kind != "gguf":
        raise SinkchatError(f"bench peer --ppl compares on one GGUF file; {s.model} is a {source.describe()}")
    body, where = read_text(text)
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(text) if text is not None else Path(tmp) / "text.txt"
        if text is None:
            path.write_text(body, encoding="utf-8")
        if not as_json:
            note(f"sinkchat: llama-perplexity -c {ctx} --chunks {chunks} on {where} ...")
        theirs = measure_peer.run_llama_perplexity(found, source.ref, path, ctx, chunks, threads)
    loaded = load(s, as_json, context=False)
    ids = bench.text_ids(loaded.tokenizer, body, ctx * chunks)
    ours: dict = {}
    with Bars(as_json) as bars:
        ours = measure_peer.sinkchat_ppl(loaded, ids, ctx, chunks, bars)
    report = measure_peer.report(ours, theirs, {"gguf": source.ref, "text": where, "ctx": ctx, "chunks": chunks,
                                                "threads": threads, "llama_perplexity": str(found),
                                                "machine": machine(loaded)})
    report.pop("llama_bench_raw")
    finish(report, as_json, print_peer_ppl, None, False)
