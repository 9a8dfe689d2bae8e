"""The message in flight: a sinkchat killed mid-reply (kill -9, a crash) lost the turn, and with it
what the user had typed; the message is kept on disk until its turn is saved, and the next start
puts it back in the box. The kill is real (a TUI in a pseudo-terminal), the store is real."""

from __future__ import annotations

import os
import signal
import sys
import time

import pexpect
import pytest

from _helpers import ROOT, SIZE, say, send, tui_settings, wait_for
from sinkchat.engine import Chat
from sinkchat.store import Store
from sinkchat.tui.app import SinkchatApp
from sinkchat.tui.chat_input import ChatInput

STORY = "Write a long story about a dragon and a knight, with [bold]brackets[/] kept as typed."


@pytest.fixture
def anyio_backend():
    return "asyncio"


def killed_mid_reply(data, *args: str) -> None:
    """Start the TUI (``args``: e.g. ``--resume 1``), send :data:`STORY`, and kill -9 it while the
    reply streams: after its message was kept, before its turn was saved."""
    child = pexpect.spawn(sys.executable, ["-m", "sinkchat", "-t", "0", "--window", "64", "--max-new-tokens", "400",
                                           "--data-dir", str(data), *args],
                          cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT), "TERM": "xterm-256color"},
                          encoding="utf-8", timeout=180, dimensions=(30, 120))
    try:
        child.expect_exact("smollm2-135m")  # the header names the model: loaded
        time.sleep(1)  # the chat shown, its box focused
        child.send(STORY + "\r")
        deadline = time.monotonic() + 120
        while not list((data / "state").glob("*.draft")):
            assert time.monotonic() < deadline and child.isalive(), "the message was never kept"
            time.sleep(0.05)
        time.sleep(0.5)  # the reply is streaming
    finally:
        child.kill(signal.SIGKILL)
        child.wait()


def unanswered_drafts(data) -> list:
    return sorted(p.name for p in (data / "state").glob("*.draft"))


@pytest.mark.anyio
@pytest.mark.model
async def test_a_message_whose_reply_was_killed_comes_back_in_the_box(smollm, tmp_path):
    data = tmp_path / "data"
    killed_mid_reply(data)  # a new chat's first turn: no chat saved yet
    assert Store(data).list() == [] and len(unanswered_drafts(data)) == 1

    app = SinkchatApp(tui_settings(), loaded=smollm)
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        box = app.query_one(ChatInput)
        await wait_for(pilot, lambda: box.text == STORY)  # as typed: no markup, nothing lost
        assert any("no reply before sinkchat stopped" in n.message for n in app._notifications)
        assert unanswered_drafts(data) == []  # given back once
        box.clear()
        await send(pilot, STORY)  # sent again, answered and saved
        await app.store.idle()
    [info] = Store(data).list()
    assert [m.content for m in Store(data).transcript(info.id).messages if m.role == "user"] == [STORY]

    killed_mid_reply(data, "--resume", str(info.id))  # a saved chat's second turn
    assert unanswered_drafts(data) == [f"{info.id}.draft"]
    app = SinkchatApp(tui_settings(), loaded=smollm, resume_id=info.id)
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        box = app.query_one(ChatInput)
        await wait_for(pilot, lambda: box.text == STORY)
        await send(pilot, "")  # Enter sends what came back
        await app.store.idle()
        assert unanswered_drafts(data) == []
    users = [m.content for m in Store(data).transcript(info.id).messages if m.role == "user"]
    assert users == [STORY, STORY]


@pytest.mark.anyio
@pytest.mark.model
async def test_a_message_saved_with_its_turn_is_not_given_back(smollm, tmp_path):
    """Each save forgets the message it kept; a message whose turn was saved anyway (a kill between
    the save and forgetting it) is known by the chat's save generation and not given back; another
    sinkchat's new chat, still running, keeps its own."""
    app = SinkchatApp(tui_settings(), loaded=smollm)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "Hello!")
        await app.store.idle()
        assert unanswered_drafts(tmp_path / "data") == []
    [info] = Store().list()
    store = Store()
    chat = Chat(smollm, tui_settings())
    store.open(info.id, chat)
    store.keep_draft(info.id, "And you?")  # sent, its turn saved, killed before the message was forgotten
    say(chat, "And you?")
    store.save(info.id, chat)
    store.keep_draft(None, "another sinkchat's message")  # this process (alive): never taken
    store.close()
    app = SinkchatApp(tui_settings(), loaded=smollm, resume_id=info.id)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: not store.draft_path(info.id).exists())  # taken, and found answered
        await app.store.idle()
        await pilot.pause()
        assert app.query_one(ChatInput).text == ""
        await app.new_chat()
        await app.store.idle()
        assert app.query_one(ChatInput).text == ""
    assert unanswered_drafts(tmp_path / "data") == [f"new-{os.getpid()}.draft"]


def test_a_link_in_the_messages_place_is_never_read(tmp_path):
    store = Store()
    secret = tmp_path / "secret.txt"
    secret.write_text("not the user's message")
    (store.root / "state").mkdir(exist_ok=True)
    store.draft_path(7).symlink_to(secret)
    assert store.take_draft(7) is None and store.draft_path(7).is_symlink()
    store.keep_draft(7, "typed")  # never written through the link
    assert secret.read_text() == "not the user's message"


@pytest.mark.model
def test_plain_mode_on_a_terminal_prints_the_message_whose_reply_was_killed(tmp_path):
    """Plain mode keeps what a person types at the prompt the same way; the next start on a terminal
    prints it back (as text: its markup and a control character shown, never run)."""
    data = tmp_path / "data"
    typed = STORY + " \x07bell"

    def spawn() -> pexpect.spawn:
        return pexpect.spawn(sys.executable, ["-m", "sinkchat", "--plain", "-t", "0", "--max-new-tokens", "400",
                                              "--data-dir", str(data)],
                             cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)}, encoding="utf-8",
                             timeout=180, dimensions=(40, 400))

    child = spawn()
    child.expect_exact("you> ")
    child.sendline(typed)
    child.expect_exact("bot> ")
    child.expect(r"\S+\s+\S+\s+\S+")  # the reply streams
    child.kill(signal.SIGKILL)
    child.wait()
    assert len(unanswered_drafts(data)) == 1

    child = spawn()
    child.expect_exact("here it is to send again:")
    child.expect_exact("you> ")
    assert STORY + " ␇bell" in child.before and "\x07" not in child.before
    assert unanswered_drafts(data) == []
    child.sendeof()
    assert child.wait() == 0
