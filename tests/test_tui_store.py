"""The TUI with the chat store, driven by Pilot on the real bundled model (64-token window): saving
after each turn, resuming exactly, the lock, the chat list screen, and a read-only data dir."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from _helpers import ROOT, SIZE, run_cli, send, wait_for, without_root_override
from _helpers import tui_settings as make_settings
from sinkchat.engine import Chat, Done
from sinkchat.store import ChatLocked, Store
from sinkchat.tui.app import SinkchatApp
from sinkchat.tui.chats import ChatsScreen, ConfirmDelete
from sinkchat.tui.gauge import CacheGauge
from sinkchat.tui.help import HelpScreen
from sinkchat.tui.transcript import Transcript

pytestmark = pytest.mark.anyio
QUESTIONS = ["What is the capital of France?", "Name three famous museums in Paris.", "Which one is the oldest?"]


@pytest.fixture
def anyio_backend():
    return "asyncio"


def screen_state(app) -> tuple:
    """What the user sees of a chat: every view's role, text and eviction marks, and the gauge."""
    views = app.query_one(Transcript).views
    gauge = app.query_one(CacheGauge)
    return (
        [(v.role, v.content, v.has_class("-forgotten"), v.has_class("-partly")) for v in views],
        gauge.summary(),
        gauge.span_lines(),
    )


def engine_replies(loaded, settings: dict, questions: list[str]) -> list[str]:
    chat = Chat(loaded, settings)
    return [next(e.reply for e in chat.submit(q) if isinstance(e, Done)) for q in questions]


async def test_saved_after_each_turn_and_resumed_exactly(smollm):
    settings = make_settings(max_new_tokens=24)
    app = SinkchatApp(settings, loaded=smollm)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, QUESTIONS[0])
        await send(pilot, QUESTIONS[1])
        await app.store.idle()  # saves run on the store thread
        chat, chat_id = app.chat, app.chat_id
        assert chat.cache.evictions, "the 64-token window must have evicted before the save"
        store = Store()
        [info] = store.list()
        assert (info.id, info.n_tokens, info.n_messages) == (chat_id, len(chat.tokens), 4)
        assert info.title == QUESTIONS[0]
        saved = store.transcript(chat_id)
        assert [(m.role, m.content) for m in saved.messages] == [(m.role, m.content) for m in chat.messages]
        assert saved.tokens == chat.tokens
        with pytest.raises(ChatLocked):  # the app holds the chat's lock while it is open
            store.open(chat_id, Chat(smollm, settings))
        refused = run_cli("--resume", str(chat_id), timeout=120)  # a second process, through the CLI
        assert refused.returncode == 2 and "open in another sinkchat process" in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr
        before = screen_state(app)
    store.lock(chat_id)  # the app released the lock on exit
    store.close()

    app = SinkchatApp(settings, loaded=smollm, resume_id=chat_id)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.chat is not None)
        await pilot.pause()
        assert screen_state(app) == before
        assert not app._notifications  # the KV came back from the state file: nothing to report
        await send(pilot, QUESTIONS[2])
        resumed_reply = app.chat.messages[-1].content
    assert resumed_reply == engine_replies(smollm, settings, QUESTIONS)[-1]
    assert Store().transcript(chat_id).messages[-1].content == resumed_reply  # saved on that turn too


async def test_chat_list_lists_filters_opens_and_deletes(smollm):
    app = SinkchatApp(make_settings(max_new_tokens=6), loaded=smollm)
    async with app.run_test(size=SIZE) as pilot:
        assert app.screen.active_bindings["ctrl+o"].binding.action == "chats"  # in the footer
        assert any(c.title == "Chats" for c in app.get_system_commands(app.screen))  # in the palette
        await send(pilot, "Tell me about Paris.")
        first = app.chat_id
        await pilot.press("ctrl+n")
        await send(pilot, "Tell me about Rome.")
        second = app.chat_id
        assert first is not None and second not in (None, first)
        await pilot.press("f1")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen) and "Chats" in app.screen.table
        await pilot.press("escape")

        await pilot.press("ctrl+o")
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, ChatsScreen)
        assert [c.id for c in screen.rows] == [second, first]  # newest first
        await pilot.press(*"paris")
        await pilot.pause()
        assert [c.id for c in screen.rows] == [first]
        await pilot.press("enter")  # open it
        await wait_for(pilot, lambda: not isinstance(app.screen, ChatsScreen), 10)
        assert app.chat_id == first
        assert [v.content for v in app.query_one(Transcript).views][1] == "Tell me about Paris."

        await pilot.press("ctrl+o")
        await pilot.pause()
        screen = app.screen
        assert [c.id for c in screen.rows] == [second, first] and screen.selected().id == second
        await pilot.press("ctrl+d", "n")  # asked, then kept
        await pilot.pause()
        assert len(Store().list()) == 2
        await pilot.press("ctrl+d")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmDelete)
        await pilot.press("y")
        await pilot.pause()
        assert [c.id for c in screen.rows] == [first]
        await pilot.press("ctrl+d", "y")  # the open chat: deleted, and a new chat starts
        await pilot.pause()
        assert screen.rows == [] and app.chat_id is None and not app.chat.messages
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, ChatsScreen)
    assert Store().list() == []


DRIVER = textwrap.dedent(
    """
    import asyncio, time
    from sinkchat.settings import Settings
    from sinkchat.tui.app import SinkchatApp

    async def main():
        app = SinkchatApp(Settings(window=64, temperature=0, max_new_tokens=6))
        async with app.run_test(size=(110, 40)) as pilot:
            deadline = time.monotonic() + 120
            while app.chat is None and time.monotonic() < deadline:
                await pilot.pause(0.1)
            for text in ("Hi", "And again?"):
                app.query_one("ChatInput").insert(text)
                await pilot.press("enter")
                await pilot.pause(0.2)
                while app.chat_screen.generating:
                    await pilot.pause(0.05)
            await app.store.idle()
            print("REPLIES", sum(1 for m in app.chat.messages if m.role == "assistant" and m.content))
            for n in app._notifications:
                print("NOTE", n.message)

    asyncio.run(main())
    """
)


@pytest.mark.model  # a subprocess loads the bundled model
def test_read_only_data_dir_is_reported_and_chat_goes_on(tmp_path):
    data = tmp_path / "data"
    Store(data).close()
    before = data.joinpath("chats.db").read_bytes()
    data.chmod(0o500)
    try:
        out = subprocess.run(
            [*without_root_override(), sys.executable, "-c", DRIVER], capture_output=True, text=True, cwd=ROOT,
            timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), "SINKCHAT_DATA_DIR": str(data)},
        )
    finally:
        data.chmod(0o700)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "REPLIES 2" in out.stdout, out.stdout  # the chat went on after the failed save
    notes = [line for line in out.stdout.splitlines() if line.startswith("NOTE")]
    assert notes and all("could not save the chat" in n and "in memory" in n for n in notes), notes
    assert "Traceback" not in out.stdout + out.stderr
    assert data.joinpath("chats.db").read_bytes() == before and Store(data).list() == []
