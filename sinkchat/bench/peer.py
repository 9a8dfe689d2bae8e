"""``sinkchat bench peer``: sinkchat and llama.cpp's ``llama-bench`` on the same GGUF file, thread count
and depth, in one run, so the ratio between them is measured on one machine in one state; with
``--ppl``, sinkchat's dense perplexity and llama.cpp's ``llama-perplexity`` on the same file, text and
chunks (:func:`sinkchat.bench.ppl.ppl_chunks` scores them as ``llama-perplexity`` does).

llama.cpp is what a user of a local chat would otherwise run; its ``llama-bench`` reports prompt
processing (``pp``: tokens/s for a prompt of ``-p`` tokens) and text generation (``tg``: tokens/s for
``-n`` tokens generated after ``-d`` tokens already in the KV cache). sinkchat is measured the same
way through its own cache and engine: a 512-token message prefilled in the chat's chunks, and single
tokens decoded at the position where the sink cache is full (``sinks + window``), with the output head
the chat's sampler settings ask for (:mod:`sinkchat.model.head`). Each side runs ``rounds`` times,
alternating (llama.cpp first in even rounds, sinkchat first in odd ones), and the medians are compared,
so that a slow minute of a shared machine does not decide the ratio.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from ..errors import SinkchatError

HOW_TO_GET = (
    "build it from llama.cpp's source (cmake -DGGML_NATIVE=ON -DLLAMA_BUILD_SERVER=OFF, then "
    "`cmake --build build --target {name}`) and pass --{name} PATH, or put it on PATH"
)


def find_llama_bench(path: str | None, name: str = "llama-bench") -> Path:
    """The ``name`` binary of llama.cpp (``llama-bench``, ``llama-perplexity``): ``path`` if given, else
    the one on PATH; one-line error if none."""
    how = HOW_TO_GET.format(name=name)
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file() or not os.access(p, os.X_OK):
            raise SinkchatError(f"--{name} {path}: not an executable file; {how}")
        return p
    found = shutil.which(name)
    if found is None:
        raise SinkchatError(f"no {name} binary found; {how}")
    return Path(found)


def run_llama_bench(binary: Path, gguf: str, threads: int, depth: int, prompt: int = 512, gen: int = 128,
                    repetitions: int = 3, timeout: float = 3600) -> dict:
    """llama.cpp's figures: ``{"pp": tokens/s for a prompt at depth 0, "tg": tokens/s at ``depth``, "raw": [...]}``.

    Raises :class:`SinkchatError` when the binary fails or prints something other than its JSON.
    """
    args = [str(binary), "-m", gguf, "-p", str(prompt), "-n", str(gen), "-d", f"0,{depth}", "-t", str(threads),
            "-r", str(repetitions), "-o", "json"]
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SinkchatError(f"llama-bench did not run: {exc}".splitlines()[0]) from None
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no message"])[-1]
        raise SinkchatError(f"llama-bench failed (exit {out.returncode}): {last}")
    try:
        rows = json.loads(out.stdout)
        pp = next(r for r in rows if r["n_prompt"] == prompt and r["n_gen"] == 0 and r.get("n_depth", 0) == 0)
        tg = next(r for r in rows if r["n_gen"] == gen and r["n_prompt"] == 0 and r.get("n_depth", 0) == depth)
        return {"pp": float(pp["avg_ts"]), "tg": float(tg["avg_ts"]), "raw": rows}
    except (ValueError, KeyError, TypeError, StopIteration):
        raise SinkchatError("llama-bench printed no JSON with the expected pp and tg rows") from None


def sinkchat_figures(loaded, sinks: int, window: int, ids: list[int], prompt: int = 512, steps: int = 64,
                     repetitions: int = 3, candidates: int = 0) -> dict:
    """sinkchat's figures on the same terms: ``{"pp": tokens/s, "tg": tokens/s at sinks + window}``;
    ``candidates``: the decode steps' (:meth:`~sinkchat.sampling.Sampler.candidates`)."""
    from ..engine import prefill_chunk
    from ..kv import SinkCache
    from .speed import compile_untimed
    from .stream import Stream

    model, chunk = loaded.model, prefill_chunk(window)
    times = []
    for _ in range(repetitions):  # a message of `prompt` tokens, prefilled as the chat does
        stream = Stream(model, SinkCache.for_model(model, sinks, window))
        t0 = time.perf_counter()
        for a in range(0, prompt, chunk):
            stream.forward(ids[a : min(a + chunk, prompt)], keep=1)
        times.append(time.perf_counter() - t0)
    compile_untimed(model, lambda: SinkCache.for_model(model, sinks, window), ids, candidates)
    stream = Stream(model, SinkCache.for_model(model, sinks, window))
    depth = sinks + window
    while stream.seen < depth:  # fill the cache, then time decode steps where it is full
        stream.forward(ids[stream.seen : min(stream.seen + chunk, depth)], keep=1)
    steps_ms = []
    for k in range(steps):
        t0 = time.perf_counter()
        stream.forward([ids[depth + k]], keep=1, candidates=candidates)
        steps_ms.append(1000 * (time.perf_counter() - t0))
    return {"pp": prompt / statistics.median(times), "tg": 1000 / statistics.median(steps_ms)}


def run_llama_perplexity(binary: Path, gguf: str, text: Path, ctx: int, chunks: int, threads: int,
                         timeout: float = 3600) -> dict:
    """llama.cpp's perplexity of ``gguf`` on the file ``text``: ``{"ppl": its final estimate, "chunks":
    [running perplexity after each chunk]}``, over the first ``chunks`` chunks of ``ctx`` tokens.

    Raises :class:`SinkchatError` when the binary fails or prints no final estimate.
    """
    args = [str(binary), "-m", gguf, "-f", str(text), "-c", str(ctx), "--chunks", str(chunks), "-t", str(threads)]
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SinkchatError(f"llama-perplexity did not run: {exc}".splitlines()[0]) from None
    final = re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr)
    if out.returncode != 0 or final is None:
        last = ((out.stderr.strip() or "no message").splitlines())[-1]
        raise SinkchatError(f"llama-perplexity failed (exit {out.returncode}): {last}")
    running = [float(v) for v in re.findall(r"\[\d+\]([0-9.]+),", out.stdout + out.stderr)]
    return {"ppl": float(final.group(1)), "chunks": running}


def sinkchat_ppl(loaded, ids: list[int], ctx: int, chunks: int, progress) -> dict:
    """sinkchat's dense perplexity on llama-perplexity's chunks of ``ids`` (the text's tokens):
    ``{"ppl": ..., "chunks": [running perplexity after each chunk], "bos": whether chunks start with BOS}``."""
    from . import bos_first
    from .ppl import PplRun, llama_chunks, ppl_chunks

    bos = loaded.tokenizer.bos_token_id if bos_first(loaded.tokenizer) else None
    cut = llama_chunks(ids, ctx, bos)[:chunks]
    if len(cut) < chunks:
        raise SinkchatError(f"the text gives {len(cut)} chunks of {ctx} tokens, not {chunks}; use a longer --text "
                            "or fewer --chunks")
    run = PplRun("dense")
    ppl_chunks(run, loaded.model, cut, progress("ppl dense (llama.cpp chunks)", chunks * (ctx - 1 - ctx // 2)))
    running = [run.ppl({p for p, _ in run.scored if p < (i + 1) * ctx}) for i in range(chunks)]
    return {"ppl": run.ppl(), "chunks": running, "bos": bos is not None}


def alternate(ours, theirs, rounds: int, first: dict) -> list[dict]:
    """``rounds`` rounds of ``theirs()`` and ``ours()`` (each a dict of figures), llama.cpp first in even
    rounds and sinkchat first in odd ones: ``[{"sinkchat": ..., "llama.cpp": ...}, ...]``. ``first``:
    llama.cpp's figures of round 0, run before the model loaded (so a broken binary fails at once)."""
    out = []
    for r in range(rounds):
        sides = [("llama.cpp", theirs if r else lambda: first), ("sinkchat", ours)]
        out.append({name: run() for name, run in (sides if r % 2 == 0 else sides[::-1])})
    return out


def medians(rounds: list[dict]) -> tuple[dict, dict]:
    """Each side's median of each figure over ``rounds`` (:func:`alternate`); llama.cpp's ``raw`` rows
    of every round, end to end."""
    def median(side: str) -> dict:
        keys = [k for k in rounds[0][side] if k != "raw"]
        return {k: statistics.median(r[side][k] for r in rounds) for k in keys}

    theirs = median("llama.cpp")
    if "raw" in rounds[0]["llama.cpp"]:
        theirs["raw"] = [row for r in rounds for row in r["llama.cpp"]["raw"]]
    return median("sinkchat"), theirs


def report(ours: dict, theirs: dict, extra: dict) -> dict:
    return {
        "sinkchat": ours,
        "llama.cpp": {k: v for k, v in theirs.items() if k != "raw"},
        "ratio": {k: ours[k] / theirs[k] for k in ("pp", "tg", "ppl") if theirs.get(k) and k in ours},
        "llama_bench_raw": theirs.get("raw"),
        **extra,
    }
