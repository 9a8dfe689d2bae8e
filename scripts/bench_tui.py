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
import time

from sinkchat import cli, models
from sinkchat.engine import Chat, Done
from sinkchat.tui.app import SinkchatApp
from sinkchat.tui.chat_input import ChatInput
from sinkchat.tui.header import ChatHeader

PROMPT = "Write a long story about a lighthouse keeper and a storm."


def bare(loaded, s) -> tuple[float, int]:
    chat = Chat(loaded, cli.chat_settings(s))
    for event in chat.submit(PROMPT):
        if isinstance(event, Done):
            return event.generated / event.seconds, event.generated
    raise RuntimeError("no Done event")


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
        await pilot.press("enter")
        while not app.generating:
            await pilot.pause(0.01)
        while app.generating:
            await pilot.pause(0.05)
        reply = app.chat.messages[-1]
        return app.query_one(ChatHeader).tokens_per_s, reply.end - reply.start, redraws


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--window", type=int, default=64)
    args = ap.parse_args()
    s = cli.settings(window=args.window, max_new_tokens=args.tokens, temperature=0, seed=0)
    loaded = models.load(s["model"], s["quant"], "cpu", s["dtype"])
    bare(loaded, s)  # warm-up
    rows = []
    for r in range(args.rounds):
        b, n = bare(loaded, s)
        t0 = time.perf_counter()
        t, m, redraws = asyncio.run(tui(loaded, s))
        rows.append((b, t))
        print(f"round {r + 1}: bare {b:6.2f} tok/s ({n} tokens)   tui {t:6.2f} tok/s ({m} tokens, "
              f"{redraws} gauge redraws = {redraws / (m / t):.1f}/s)", flush=True)
    mb, mt = statistics.median(b for b, _ in rows), statistics.median(t for _, t in rows)
    print(f"median: bare {mb:.2f} tok/s, tui {mt:.2f} tok/s, slowdown {100 * (1 - mt / mb):+.1f}%")


if __name__ == "__main__":
    main()
