"""Save the README's screenshot: a short greedy chat in a 64-token window, so the gauge shows evictions.

    PYTHONPATH=. python scripts/screenshot.py docs/screenshot.svg
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from sinkchat.settings import Settings
from sinkchat.tui.app import SinkchatApp
from sinkchat.tui.chat_input import ChatInput
from sinkchat.tui.header import ChatHeader

PROMPTS = ["What is the capital of France?", "Write a Python function that reverses a string."]


async def main(path: str) -> None:
    s = Settings(window=64, temperature=0, seed=0, max_new_tokens=80, theme="sinkchat-dark")
    app = SinkchatApp(s)
    async with app.run_test(size=(110, 42)) as pilot:
        while app.chat is None:
            await pilot.pause(0.2)
        app.query_one(ChatInput).cursor_blink = False
        for prompt in PROMPTS:
            app.query_one(ChatInput).insert(prompt)
            await pilot.press("enter")
            await pilot.pause(0.1)
            while app.chat_screen.generating:
                await pilot.pause(0.05)
        speed = app.query_one(ChatHeader).tokens_per_s
        await pilot.pause(0.5)
        app.save_screenshot(Path(path).name, str(Path(path).parent))
        print(f"saved {path} ({speed:.1f} tok/s shown in the header)")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "docs/screenshot.svg"))
