"""``sinkchat bench endless``: a chat of thousands of short turns, measured on every layer at once.

The cache is flat by construction; an endless chat also needs the screen, the saves and the
bookkeeping around the cache to cost the same at turn 5000 as at turn 5. This drives a scripted
greedy chat through the real engine, the real store (a data dir of its own) and the real TUI
(headless, through Textual's test harness), and records per turn:

* ``ui_ms``: CPU time of the UI thread per message added to the screen (two per turn: the question
  and the reply, streamed, marked and laid out) — the cost that grew with every message before the
  transcript was virtualised;
* ``ms_per_token``: the reply's decode time per token (the engine's own clock);
* ``save_ms`` and ``save_kb``: the turn's save, wall time and bytes written (state files, fsyncs and
  SQLite journal; Linux ``/proc/thread-self/io``), ``save_kind`` (``segment``: the turn's new tokens;
  ``base``: the held window, now and then) and ``new_tokens``, the tokens the turn added;
* ``rss_mb``: the process's resident memory; ``db_mb``: the size of ``chats.db`` (the ledger grows
  with the tokens by design; nothing else should); ``memory_mb``: the chat's block memory on disk
  (``--recall``: what left the window, kept to be recalled; it too grows with the tokens by design).
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .speed import rss_mb

PROMPTS = [
    "Name a colour.", "Say a number.", "Name a fruit.", "Name an animal.", "Say hello.",
    "Name a city.", "Name a tool.", "Say a short word.", "Name a planet.", "Name a flower.",
]


@dataclass
class Turn:
    turn: int
    tokens: int  # the ledger: every token of the chat so far
    mounted: int  # message widgets on screen
    ui_ms: float
    ms_per_token: float | None
    save_ms: float | None
    save_kb: float | None
    rss_mb: float
    db_mb: float
    save_kind: str | None = None
    new_tokens: int = 0
    memory_mb: float = 0.0


async def chat_turns(loaded, settings, turns: int, data_dir: Path, tick, rows: list[Turn]) -> None:
    """Run ``turns`` turns, appending one :class:`Turn` per turn to ``rows`` (kept if interrupted)."""
    from ..store import Store
    from ..tui.app import SinkchatApp
    from ..tui.chat_input import ChatInput
    from ..tui.header import ChatHeader
    from ..tui.transcript import MessageView

    store = Store(data_dir)
    app = SinkchatApp(settings, loaded=loaded, store=store)
    async with app.run_test(size=(120, 40)) as pilot:
        while app.chat is None:
            await pilot.pause(0.05)
        screen, db = app.chat_screen, data_dir / "chats.db"
        for t in range(1, turns + 1):
            box = screen.query_one(ChatInput)
            box.insert(PROMPTS[t % len(PROMPTS)])
            cpu0 = time.thread_time()
            await pilot.press("enter")
            await pilot.pause(0.02)
            while screen.generating:
                await pilot.pause(0.01)
            await pilot.pause()  # the finished reply laid out and marked
            ui = time.thread_time() - cpu0
            await app.store.idle()
            saved = store.last_save or {}
            speed = screen.query_one(ChatHeader).tokens_per_s
            rows.append(Turn(
                turn=t, tokens=len(app.chat.tokens), mounted=len(screen.query(MessageView)),
                ui_ms=1000 * ui / 2, ms_per_token=1000 / speed if speed else None,
                save_ms=1000 * saved["seconds"] if "seconds" in saved else None,
                save_kb=saved["bytes"] / 1024 if saved.get("bytes") is not None else None,
                rss_mb=rss_mb(), db_mb=db.stat().st_size / 2**20, save_kind=saved.get("kind"),
                new_tokens=len(app.chat.tokens) - (rows[-1].tokens if rows else 0),
                memory_mb=sum(f.stat().st_size for f in (data_dir / "state").glob("*.memory")) / 2**20,
            ))
            tick(1)


def run(loaded, settings, turns: int, tick, rows: list[Turn], data_dir: Path | None = None) -> None:
    """:func:`chat_turns` in a data dir of its own (a temporary one unless given)."""
    if data_dir is not None:
        asyncio.run(chat_turns(loaded, settings, turns, Path(data_dir), tick, rows))
        return
    with tempfile.TemporaryDirectory(prefix="sinkchat-endless-") as tmp:
        asyncio.run(chat_turns(loaded, settings, turns, Path(tmp), tick, rows))


METRICS = ("ui_ms", "ms_per_token", "save_ms", "save_kb", "rss_mb", "db_mb", "memory_mb")


def at(rows: list[Turn], turn: int, spread: int = 5) -> dict:
    """Medians of each metric over the turns around ``turn`` (one turn is noisy)."""
    near = [r for r in rows if abs(r.turn - turn) <= spread] or rows[-1:]
    out = {"turn": turn, "tokens": near[-1].tokens, "mounted": near[-1].mounted}
    for name in METRICS:
        values = [getattr(r, name) for r in near if getattr(r, name) is not None]
        out[name] = statistics.median(values) if values else None
    return out


def report(rows: list[Turn], extra: dict) -> dict:
    """Figures at turns 10, 100, 1000 and the last, the last/100 ratios, and every turn."""
    last = rows[-1].turn if rows else 0
    marks = [t for t in (10, 100, 1000) if t < last] + ([last] if last else [])
    points = [at(rows, t) for t in marks]
    base = next((p for p in points if p["turn"] == 100), None)
    ratios = {}
    if base is not None and points[-1]["turn"] > 100:
        for name in METRICS:
            a, b = base[name], points[-1][name]
            ratios[name] = b / a if a and b is not None else None
    return {"points": points, "last_vs_100": ratios, "saves": saves(rows), "turns": [asdict(r) for r in rows],
            **extra}


def saves(rows: list[Turn], after: int = 100) -> dict:
    """Save bytes from turn ``after`` on (or every turn of a shorter run), new bases included: the
    mean per turn, and per token the turns added (what a save should be proportional to)."""
    rows = [r for r in rows if r.turn >= after and r.save_kb is not None] or [r for r in rows if r.save_kb]
    if not rows:
        return {}
    kb, tokens = sum(r.save_kb for r in rows), sum(r.new_tokens for r in rows)
    return {"from_turn": rows[0].turn, "turns": len(rows), "bases": sum(r.save_kind == "base" for r in rows),
            "mean_kb": kb / len(rows), "kb_per_new_token": kb / tokens if tokens else None,
            "max_kb": max(r.save_kb for r in rows)}
