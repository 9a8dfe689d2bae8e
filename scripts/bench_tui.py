"""Does the live TUI slow generation? Decode tokens/s with and without the app consuming events.

Each round runs the same greedy reply twice on the bundled model: once consuming ``chat.submit``
in a bare loop, once through :class:`SinkchatApp` (headless, via ``run_test``) with the transcript
streaming and the gauge redrawing. Rounds alternate so background load hits both alike; the
medians are compared.

    PYTHONPATH=. python scripts/bench_tui.py --rounds 5 --tokens 200 --window 64
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time

from sinkchat.engine import Chat, Done
from sinkchat.model import load_for
from sinkchat.settings import Settings
from sinkchat.tui.app import SinkchatApp
from sinkchat.tui.chat_input import ChatInput
from sinkchat.tui.header import ChatHeader

PROMPT = "Write a long story about a lighthouse keeper and a storm."


def bare(loaded, s) -> tuple[float, int]:
    """The engine alone, consumed in a side thread like the app's worker (torch runs much slower
    in the main thread than in a side thread on a busy 2-core machine, so both sides use one)."""
    out: list[Done] = []

    def consume() -> None:
        chat = Chat(loaded, s)
        out.extend(e for e in chat.submit(PROMPT) if isinstance(e, Done))

    worker = threading.Thread(target=consume)
    worker.start()
    worker.join()
    return out[0].generated / out[0].seconds, out[0].generated


async def tui(loaded, s) -> tuple[float, int, int]:
    app = SinkchatApp(s, loaded=loaded)
    redraws = 0
    async with app.run_test(size=(120, 40)) as pilot:
        gauge = app.query_one("CacheGauge")
        show = gauge.show

        def counted(*a):
            nonlocal redraws
            redraws += 1
            show(*a)

        gauge.show = counted
        app.query_one(ChatInput).insert(PROMPT)
        cpu0, wall0 = time.thread_time(), time.perf_counter()  # the UI thread's own CPU time
        await pilot.press("enter")
        await pilot.pause(0.1)
        while app.chat_screen.generating:
            await asyncio.sleep(0.02)
        ui_share = (time.thread_time() - cpu0) / (time.perf_counter() - wall0)
        reply = app.chat.messages[-1]
        return app.query_one(ChatHeader).tokens_per_s, reply.end - reply.start, redraws, ui_share


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--window", type=int, default=64)
    args = ap.parse_args()
    s = Settings(window=args.window, max_new_tokens=args.tokens, temperature=0, seed=0, device="cpu")
    loaded = load_for(s)
    bare(loaded, s)  # warm-up
    rows = []
    for r in range(args.rounds):
        b, n = bare(loaded, s)
        t, m, redraws, ui = asyncio.run(tui(loaded, s))
        rows.append((b, t))
        print(f"round {r + 1}: bare {b:6.2f} tok/s ({n} tokens)   tui {t:6.2f} tok/s ({m} tokens, "
              f"{redraws} gauge redraws = {redraws / (m / t):.1f}/s, UI thread {100 * ui:.1f}% of a core)",
              flush=True)
    mb, mt = statistics.median(b for b, _ in rows), statistics.median(t for _, t in rows)
    print(f"median: bare {mb:.2f} tok/s, tui {mt:.2f} tok/s, slowdown {100 * (1 - mt / mb):+.1f}%")


if __name__ == "__main__":
    main()
