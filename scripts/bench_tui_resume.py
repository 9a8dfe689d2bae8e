"""How long ``--resume`` takes to put a saved chat on screen, whatever its length.

For each data dir, opens its chat 1 in the headless TUI (model loaded once beforehand, so the time
is the store's read, the cache restore and the transcript's first layout) and prints the seconds
until the newest messages are on screen, twice. Compare a chat of thousands of turns (the data dir
of ``sinkchat bench endless --data-dir``) with a short one at the same window.

    PYTHONPATH=. python scripts/bench_tui_resume.py DIR_LONG DIR_SHORT
"""

from __future__ import annotations

import asyncio
import sys
import time

from sinkchat.model import load
from sinkchat.settings import Settings
from sinkchat.store import Store
from sinkchat.tui.app import SinkchatApp
from sinkchat.tui.transcript import MessageView


async def resume(data_dir: str, loaded) -> tuple[int, float]:
    store = Store(data_dir)
    settings = Settings.resolve(saved=store.settings(1))[0]
    store.lock(1)
    t0 = time.perf_counter()
    app = SinkchatApp(settings, loaded=loaded, store=store, resume_id=1, save=False)
    async with app.run_test(size=(120, 40)) as pilot:
        while app.chat is None or not app.chat_screen.query(MessageView):
            await pilot.pause(0.01)
        await pilot.pause()
        return len(app.chat.messages), time.perf_counter() - t0


def main(dirs: list[str]) -> None:
    loaded = None
    for data_dir in dirs:
        if loaded is None:
            settings = Settings.resolve(saved=Store(data_dir).settings(1))[0]
            loaded = load(settings.model, quant=settings.quant, device=settings.device)
        for _ in range(2):
            n, seconds = asyncio.run(resume(data_dir, loaded))
            print(f"{data_dir}: {n} messages on screen in {seconds:.2f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
