"""The TUI with the decode step as a CUDA graph, driven by Textual's Pilot: a check for a GPU machine.

The one GPU run of this (a tiny model, ``--compile`` graphs only) stopped after the graph was
recorded on the worker thread: no reply finished, no thread was busy, and what the screen said was
not captured. This script says it: each turn has ``--timeout`` seconds, and on a timeout it prints
the screen's notifications, the last message and where every thread is, then exits 1.

    python scripts/check_gpu_tui.py                        # a tiny random Mistral, NF4, CUDA graph
    python scripts/check_gpu_tui.py --device cpu --compile off   # the same turns on the CPU (a dry run)
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import tiny_model_dir  # noqa: E402

from _helpers import send, tui_settings  # noqa: E402
from sinkchat.model import bundled_gguf, gguf_folder, load  # noqa: E402
from sinkchat.tui.app import SinkchatApp  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Name three museums.", "And in Rome?"]


async def turns(loaded, timeout: float) -> int:
    app = SinkchatApp(tui_settings(), loaded=loaded, save=False)
    async with app.run_test(size=(100, 30)) as pilot:
        for question in QUESTIONS:
            t0 = time.perf_counter()
            try:
                await asyncio.wait_for(send(pilot, question, timeout), timeout + 5)
            except (TimeoutError, AssertionError) as exc:
                print(f"turn {question!r} did not finish ({type(exc).__name__})")
                print("notifications:", [str(n.message) for n in app._notifications])
                if app.chat is not None and app.chat.messages:
                    print("last message:", repr(app.chat.messages[-1]))
                faulthandler.dump_traceback(all_threads=True)
                return 1
            fast = loaded.fast
            print(f"turn done in {time.perf_counter() - t0:.1f} s: {app.chat.messages[-1].content[:60]!r}; "
                  f"step {type(fast.compiled).__name__ if fast else None}; notices {loaded.take_notices()}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--compile", choices=("graph", "on", "off"), default="graph",
                    help="graph: a CUDA graph of the eager step (no inductor); on: inductor + graph")
    ap.add_argument("--timeout", type=float, default=60)
    args = ap.parse_args()
    folder = tiny_model_dir("mistral", gguf_folder(bundled_gguf()), Path(tempfile.mkdtemp()) / "tiny")
    loaded = load(str(folder), quant="4bit", device=args.device, compile="off")
    if args.compile != "off" and loaded.fast is not None:
        loaded.fast.compile(inductor=args.compile == "on", cuda_graph=args.device == "cuda")
    print("weights", loaded.weights, "fast path", loaded.fast is not None)
    return asyncio.run(turns(loaded, args.timeout))


if __name__ == "__main__":
    sys.exit(main())
