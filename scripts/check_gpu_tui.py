"""The chat screen's decode speed on a GPU against plain mode's, on the same model, in one run.

The TUI runs under Textual's Pilot exactly as ``sinkchat`` starts it: the model is loaded (and, by
default, compiled and recorded as one CUDA graph) on the app's one decode thread, ``--replies``
questions are typed and sent, and after each reply the tokens/s is read from the chat header, as a
user reads it. Then the same questions go through plain mode's path (``sinkchat --plain``: a chat
driven through its own decode thread) on the same weights. Printed: each reply's tokens and header
figure, the threads that ran the model, and the median of the replies after the first (the first
one compiles and records the graph) in the TUI against plain mode; the target is the TUI within
10% of plain mode.

The default model is Mistral-7B-Instruct's shape (32 layers, width 4096, 32/8 heads of 128, MLP
14336) with random bf16 weights and the bundled SmolLM2 tokenizer, quantized onto the GPU by the
loader's own ``--quant 4bit`` path (nothing to download); ``--model mistral-7b`` (or any model
sinkchat can load) runs the real one through ``sinkchat``'s own loader instead.

    python scripts/check_gpu_tui.py                         # needs CUDA: 7B-shaped 4-bit, --compile auto
    python scripts/check_gpu_tui.py --model mistral-7b      # the real model, from the HF cache
    python scripts/check_gpu_tui.py --device cpu --shape tiny --replies 2   # a dry run on the CPU

Exit status: 0 when every reply finished and the TUI is within 10% of plain mode; 1 when a reply
did not finish in ``--timeout`` seconds (the screen's notifications, the last message and every
thread's stack are printed) or the TUI is slower than that; 2 when CUDA was asked for and there is
none.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "scripts")]

QUESTIONS = ["What is the capital of France?", "Name three museums in Paris.", "And in Rome?",
             "Which of them is the oldest?", "Tell me a short story about a cat.", "Summarize it in one line.",
             "What did I ask first?", "Thank you. Anything else?"]
TARGET = 0.9  # the TUI's tokens/s at least this share of plain mode's


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def random_model(shape: str, settings, threads: set):
    """A random model of ``shape`` (``7b``: Mistral-7B's, ``tiny``: two small layers) with the bundled
    tokenizer, prepared as :func:`sinkchat.model.load` prepares a downloaded one (``--quant``,
    ``--compile``, KV dtype); run on the decode thread."""
    import torch
    from bench_gpu import MISTRAL_7B, TINY, fresh, weights
    from transformers import AutoTokenizer

    from sinkchat.model import LoadedModel, Source, bundled_gguf, gguf_folder
    from sinkchat.model.kernels import prepare
    from sinkchat.model.load import pick_dtype

    threads.add(threading.current_thread().name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_folder(bundled_gguf()))
    dims = dict(MISTRAL_7B if shape == "7b" else TINY, vocab_size=len(tokenizer),
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    device = settings.device
    compute = pick_dtype(settings.dtype, device)
    state = weights(dims, device)  # made on the device (fast), kept on the CPU as a download would be
    model = fresh(dims, state)
    if compute != torch.bfloat16:
        model.to(compute)
    name = "Mistral-7B-shaped (random)" if shape == "7b" else "tiny Mistral (random)"
    loaded = LoadedModel(model, tokenizer, Source("dir", "random", name), settings.quant, device, compute)
    prepare(loaded, settings.kv_dtype, settings.compile, None)
    return loaded


def watch(loaded, threads: set) -> None:
    """Note the thread of every decode step the model takes from here on (eager and compiled)."""
    fast = loaded.fast
    embed = loaded.model.get_input_embeddings()
    embed.register_forward_pre_hook(lambda *_: threads.add(threading.current_thread().name))
    if fast is not None and fast.compiled is not None:
        step = fast.compiled

        def noted(*args):
            threads.add(threading.current_thread().name)
            return step(*args)

        fast.compiled = noted


def header_speed(app) -> float | None:
    """The tokens/s the chat header shows (``sinkchat │ model │ 123.4 tok/s``)."""
    from sinkchat.tui.header import ChatHeader

    text = app.chat_screen.query_one(ChatHeader).render().plain
    found = re.search(r"([0-9.]+) tok/s", text)
    return float(found.group(1)) if found else None


async def tui(settings, make, replies: int, timeout: float, data: Path) -> dict:
    from _helpers import send
    from sinkchat.store import Store
    from sinkchat.tui.app import SinkchatApp

    threads: set = set()
    app = SinkchatApp(settings, loaded=None, store=Store(data), save=False)
    if make is not None:  # a model made here: made and prepared on the app's decode thread, as a load is
        loaded = await asyncio.wrap_future(app.decoder.submit(make, threads))
        app.loaded = app.chat_screen.loaded = loaded
    out: dict = {"replies": []}
    async with app.run_test(size=(110, 30)) as pilot:
        t0 = time.perf_counter()
        while app.chat_screen.chat is None:
            if app.load_error:
                raise SystemExit(f"check_gpu_tui: the model did not load: {app.load_error}")
            if time.perf_counter() - t0 > 1800:
                raise SystemExit("check_gpu_tui: the model did not load in 30 minutes")
            await pilot.pause(0.2)
        loaded = app.chat_screen.loaded or app.loaded
        out["load_s"] = time.perf_counter() - t0
        watch(loaded, threads)
        out["model"], out["weights"] = loaded.name, loaded.weights
        out["step"] = type(loaded.fast.compiled).__name__ if loaded.fast and loaded.fast.compiled else "eager"
        log(f"TUI: {loaded.name} on {loaded.device}, {loaded.weights}, {out['step']} step")
        for question in QUESTIONS[:replies]:
            t0 = time.perf_counter()
            try:
                await asyncio.wait_for(send(pilot, question, timeout), timeout + 5)
            except (TimeoutError, AssertionError) as exc:
                print(f"check_gpu_tui: the reply to {question!r} did not finish in {timeout:.0f} s "
                      f"({type(exc).__name__})")
                print("notifications:", [str(n.message) for n in app._notifications])
                if app.chat is not None and app.chat.messages:
                    print("last message:", repr(app.chat.messages[-1]))
                faulthandler.dump_traceback(all_threads=True)
                out["hung"] = question
                return out
            reply = app.chat.messages[-1]
            row = {"tokens": reply.end - reply.start, "header_tokens_per_s": header_speed(app),
                   "wall_s": time.perf_counter() - t0, "note": reply.note}
            out["replies"].append(row)
            log(f"TUI reply {len(out['replies'])}: {row['tokens']} tokens, header {row['header_tokens_per_s']} tok/s, "
                f"{row['wall_s']:.1f} s; {reply.content[:50]!r}")
        out["notices"] = [str(n.message) for n in app._notifications]
        out["model_threads"] = sorted(threads)
        out["decode_thread"] = app.decoder.thread.name
        out["loaded"] = loaded
    return out


def plain(loaded, settings, replies: int) -> dict:
    """The same questions through plain mode's path: a chat driven by its own decode thread."""
    from sinkchat.decoder import Decoder
    from sinkchat.engine import Chat, Done

    threads: set = set()
    decoder = Decoder()
    watch(loaded, threads)
    chat = decoder.call(Chat, loaded, settings)
    out: dict = {"replies": []}
    for question in QUESTIONS[:replies]:
        for event in decoder.iterate(chat.submit(question), chat.stop):
            if isinstance(event, Done):
                speed = event.generated / event.seconds if event.seconds > 0 and event.generated else None
                out["replies"].append({"tokens": event.generated, "tokens_per_s": speed})
                log(f"plain reply {len(out['replies'])}: {event.generated} tokens, {speed and round(speed, 1)} tok/s")
    decoder.close(60)
    out["model_threads"] = sorted(threads)
    out["decode_thread"] = decoder.thread.name
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a model sinkchat loads (alias, HF id, folder, .gguf) [default: a random one]")
    ap.add_argument("--shape", choices=("7b", "tiny"), default="7b", help="the random model's shape")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quant", default="4bit")
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto")
    ap.add_argument("--replies", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--window", type=int, default=2000)
    ap.add_argument("--timeout", type=float, default=600, help="seconds each reply may take (the first compiles)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"check_gpu_tui: no CUDA device here (torch {torch.__version__}, "
              f"CUDA build {torch.version.cuda or 'none'}): nothing was measured. Run it on a machine with an "
              "NVIDIA GPU, or `--device cpu --shape tiny` for a dry run of the same turns on the CPU.",
              file=sys.stderr)
        return 2
    from sinkchat.settings import Settings

    settings = Settings(model=args.model or "smollm2-135m", quant=args.quant, device=args.device,
                        compile=args.compile, window=args.window, temperature=0, seed=0,
                        max_new_tokens=args.max_new_tokens)
    make = None if args.model else (lambda threads: random_model(args.shape, settings, threads))
    with tempfile.TemporaryDirectory() as data:
        seen = asyncio.run(tui(settings, make, args.replies, args.timeout, Path(data)))
    loaded = seen.pop("loaded", None)
    report: dict = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                    "torch": torch.__version__, "window": args.window, "max_new_tokens": args.max_new_tokens,
                    "tui": seen}
    ok = "hung" not in seen
    if ok:
        report["plain"] = plain(loaded, settings, args.replies)
        tui_speeds = [r["header_tokens_per_s"] for r in seen["replies"][1:] if r["header_tokens_per_s"]]
        plain_speeds = [r["tokens_per_s"] for r in report["plain"]["replies"][1:] if r["tokens_per_s"]]
        if tui_speeds and plain_speeds:
            t, p = statistics.median(tui_speeds), statistics.median(plain_speeds)
            report.update(tui_median_tokens_per_s=t, plain_median_tokens_per_s=p, tui_vs_plain=t / p)
            ok = t >= TARGET * p
            print(f"TUI header {t:.1f} tok/s, plain mode {p:.1f} tok/s (median of replies 2..{args.replies}): "
                  f"{t / p * 100:.0f}% of plain mode ({'within' if ok else 'NOT within'} 10%); model ran on "
                  f"{seen['model_threads']} in the TUI (decode thread {seen['decode_thread']!r}), "
                  f"{report['plain']['model_threads']} in plain mode")
        else:
            print("check_gpu_tui: too few replies to compare (use --replies 2 or more)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
