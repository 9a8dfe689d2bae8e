"""The message in flight: a sinkchat killed mid-reply (kill -9, a crash) lost the turn, and with it
what the user had typed; the message is kept on disk until its turn is saved, and the next start
puts it back in the box. The kill is real (a TUI in a pseudo-terminal), the store is real."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pexpect
import pytest

from _helpers import ROOT, SIZE, say, send, tui_settings, wait_for
from sinkchat.engine import Chat
from sinkchat.store import Store, Unanswered
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


def left_by_a_kill(chat_id: int | None, draft: Unanswered) -> None:
    """``draft`` kept for chat ``chat_id`` as a sinkchat killed mid-reply leaves it (its process gone)."""
    store = Store()
    store.keep_draft(chat_id, draft)
    store.close()


@pytest.mark.anyio
@pytest.mark.model
async def test_a_message_whose_reply_was_killed_comes_back_in_the_box(smollm, tmp_path):
    data = tmp_path / "data"
    killed_mid_reply(data)  # a new chat's first turn: no chat saved yet
    [left] = unanswered_drafts(data)
    assert Store(data).list() == []

    app = SinkchatApp(tui_settings(), loaded=smollm)
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        box = app.query_one(ChatInput)
        await wait_for(pilot, lambda: box.text == STORY)  # as typed: no markup, nothing lost
        assert any("no reply before sinkchat stopped" in n.message for n in app._notifications)
        await app.store.idle()
        [kept] = unanswered_drafts(data)
        assert kept != left  # this process's now, while it sits in the box: given back once
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
    sinkchat's new chat, still running (its key's lock held), keeps its own."""
    app = SinkchatApp(tui_settings(), loaded=smollm)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "Hello!")
        await app.store.idle()
        assert unanswered_drafts(tmp_path / "data") == []
    [info] = Store().list()
    store = Store()
    chat = Chat(smollm, tui_settings())
    store.open(info.id, chat)
    store.keep_draft(info.id, Unanswered("And you?"))  # sent, its turn saved, killed before it was forgotten
    say(chat, "And you?")
    store.save(info.id, chat)
    store.close()
    other = Store()
    other.keep_draft(None, Unanswered("another sinkchat's message"))  # a live process's: never taken
    app = SinkchatApp(tui_settings(), loaded=smollm, resume_id=info.id)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: not store.draft_path(info.id).exists())  # taken, and found answered
        await app.store.idle()
        await pilot.pause()
        assert app.query_one(ChatInput).text == ""
        await app.new_chat()
        await app.store.idle()
        assert app.query_one(ChatInput).text == ""
    assert unanswered_drafts(tmp_path / "data") == [other.draft_path(None).name]
    other.close()


@pytest.mark.anyio
@pytest.mark.model
async def test_what_comes_back_is_what_was_typed_an_edit_again_an_edit(smollm, tmp_path, monkeypatch):
    """What a kill leaves on disk is the box as typed (``//`` text stays text, a pinned mark stays), an
    edit (F2) records the message it replaces, and a regenerate (F5) keeps nothing (its message is
    saved). Given back, an edit is again an edit; it stays on disk while it sits in the box unsent, and
    is forgotten when the box is cleared before quitting."""
    kept = []
    keep = Store.keep_draft
    monkeypatch.setattr(Store, "keep_draft", lambda self, chat_id, draft: (kept.append(draft), keep(self, chat_id, draft)))
    app = SinkchatApp(tui_settings(), loaded=smollm)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "//not a command")
        app.query_one(ChatInput).insert("Pinned words.")
        await pilot.press("ctrl+l")  # the box's mark: sent pinned
        assert app.chat_screen.pin_next
        await send(pilot, "")
        for keys in (["f5"], ["f2", *" Edited.", "enter"]):
            ended = app.turns_ended
            await pilot.press(*keys)
            await wait_for(pilot, lambda: not app.chat_screen.generating and app.turns_ended > ended)
        chat_id, index = app.chat_id, app.chat.last_user()
    assert kept == [Unanswered("//not a command"), Unanswered("Pinned words.", pin=True),
                    Unanswered("Pinned words. Edited.", replace=index)]  # (F5 kept nothing)

    left_by_a_kill(chat_id, Unanswered("Pinned words. Edited again.", replace=index))
    app = SinkchatApp(tui_settings(), loaded=smollm, resume_id=chat_id)
    async with app.run_test(size=SIZE) as pilot:
        box = app.query_one(ChatInput)
        await wait_for(pilot, lambda: box.text == "Pinned words. Edited again.")
        assert app.chat_screen.editing == index and f"editing #{index + 1}" in box.border_title
        await app.store.idle()
        assert unanswered_drafts(tmp_path / "data") == [f"{chat_id}.draft"]  # still there while in the box
    assert unanswered_drafts(tmp_path / "data") == [f"{chat_id}.draft"]  # quit with it in the box: kept
    app = SinkchatApp(tui_settings(), loaded=smollm, resume_id=chat_id)
    async with app.run_test(size=SIZE) as pilot:
        box = app.query_one(ChatInput)
        await wait_for(pilot, lambda: box.text == "Pinned words. Edited again.")
        box.clear()
        await pilot.pause()
        await app.store.idle()
        assert unanswered_drafts(tmp_path / "data") == []  # taken out of the box: forgotten at once
    assert unanswered_drafts(tmp_path / "data") == []  # taken out of the box, then quit: forgotten


def test_a_new_chats_message_is_taken_once_its_process_is_gone_whatever_its_pid(tmp_path):
    """A new chat's message is named by a random key whose lock its process holds: a later process
    with the same pid (a container's every start, a reboot) still takes it back once the first is gone."""
    first = Store()
    first.keep_draft(None, Unanswered("lost words"))
    second = Store()  # same pid, first still running
    assert second.take_draft(None) is None
    first.locks.close()  # killed: the kernel lets its locks go
    assert second.take_draft(None) == Unanswered("lost words")
    assert second.take_draft(None) is None and unanswered_drafts(second.root) == []


def test_what_is_not_a_message_in_the_state_folder_is_never_read_and_never_stops_a_start(tmp_path):
    """A link, a FIFO (reading one would wait forever), a folder, names no process can have, and
    a damaged file: nothing raises, nothing waits, and nothing is read through a link."""
    store = Store()
    state = store.root / "state"
    state.mkdir(exist_ok=True)
    secret = tmp_path / "secret.txt"
    secret.write_text("not the user's message")
    store.draft_path(7).symlink_to(secret)
    os.mkfifo(store.draft_path(8))
    store.draft_path(9).mkdir()
    for name in ("new-99999999999999999999.draft", "new-²³.draft", "new-.draft"):
        os.mkfifo(state / name)
    (state / "new-abcd.draft").write_bytes(b"\xff\xfeplain words")  # not JSON: its text all the same
    os.utime(state / "new-99999999999999999999.draft", (time.time() + 60,) * 2)  # newer: never chosen
    store.locks.dir.mkdir(exist_ok=True)
    (store.locks.dir / "new-gone.lock").touch()  # a lock its message left without
    assert [store.take_draft(n) for n in (7, 8, 9)] == [None, None, None]
    assert store.take_draft(None) == Unanswered("\ufffd\ufffdplain words")
    assert store.take_draft(None) is None
    assert sorted(p.name for p in store.locks.dir.iterdir()) == []  # neither lock stays
    store.keep_draft(7, Unanswered("typed"))  # never written through the link
    assert secret.read_text() == "not the user's message"


@pytest.mark.model
def test_a_save_that_kept_the_messages_but_not_the_cache_forgets_the_message(smollm, tmp_path):
    """A full disk: the turn's messages are saved, its K/V is not (the chat says so); the message in
    flight is forgotten all the same, never given back later as unanswered."""
    from _helpers import file_size_limit
    from sinkchat.store import Autosave

    store = Store()
    chat = Chat(smollm, tui_settings())
    autosave = Autosave(store, chat, tui_settings(), None)
    store.keep_draft(None, Unanswered("Tell me about cats."))
    say(chat, "Tell me about cats.")
    with file_size_limit(64 * 1024):
        autosave(chat)
    assert autosave.failure and "messages but not its KV cache" in autosave.failure
    assert unanswered_drafts(store.root) == []


@pytest.mark.model
def test_plain_mode_on_a_terminal_prints_the_message_whose_reply_was_killed(tmp_path):
    """Plain mode keeps what a person types at the prompt (with line editing: the cursor moved back
    and a word inserted) the same way; the next start on a terminal prints it back, as text (a
    control character from a message kept by the TUI shown, never sent to the terminal)."""
    data = tmp_path / "data"

    def spawn() -> pexpect.spawn:
        return pexpect.spawn(sys.executable, ["-m", "sinkchat", "--plain", "-t", "0", "--max-new-tokens", "400",
                                              "--data-dir", str(data)],
                             cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)}, encoding="utf-8",
                             timeout=180, dimensions=(40, 400))

    child = spawn()
    child.expect_exact("you> ")
    child.send(STORY.replace(" and a knight", ""))
    child.send("\x1b[D" * len(", with [bold]brackets[/] kept as typed.") + " and a knight\r")  # Left arrows
    child.expect_exact("bot> ")
    child.expect(r"\S+\s+\S+\s+\S+")  # the reply streams
    child.kill(signal.SIGKILL)
    child.wait()
    assert len(unanswered_drafts(data)) == 1

    child = spawn()
    child.expect_exact("here it is to send again:")
    child.expect_exact("you> ")
    assert STORY in child.before
    assert unanswered_drafts(data) == []
    child.sendeof()
    assert child.wait() == 0

    store = Store(data)
    store.keep_draft(None, Unanswered("ring \x07 the bell"))  # as the TUI keeps a pasted control character
    store.close()
    child = spawn()
    child.expect_exact("here it is to send again:")
    child.expect_exact("you> ")
    assert "ring ␇ the bell" in child.before and "\x07" not in child.before
    child.sendeof()
    assert child.wait() == 0


@pytest.mark.anyio
@pytest.mark.model
async def test_a_message_given_back_stays_kept_through_saves_and_goes_with_the_box_to_a_new_chat(smollm, tmp_path):
    """While a message given back sits in the box unsent, a save of its chat (a regenerate) keeps it
    on disk as that chat's; Ctrl+N carries it, with the box, to the new chat (no longer an edit), so it
    is given back there after a kill, never again in the chat it left."""
    data = tmp_path / "data"
    app = SinkchatApp(tui_settings(), loaded=smollm)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "Hello!")
        chat_id, index = app.chat_id, app.chat.last_user()
    left_by_a_kill(chat_id, Unanswered("Hello again, edited.", replace=index))
    app = SinkchatApp(tui_settings(), loaded=smollm, resume_id=chat_id)
    async with app.run_test(size=SIZE) as pilot:
        box = app.query_one(ChatInput)
        await wait_for(pilot, lambda: box.text == "Hello again, edited." and app.chat_screen.editing == index)
        await pilot.press("escape")  # the edit is cancelled: the box empties, the message is forgotten
        await pilot.pause()
        await app.store.idle()
        assert unanswered_drafts(data) == []
    left_by_a_kill(chat_id, Unanswered("Still here?"))
    app = SinkchatApp(tui_settings(), loaded=smollm, resume_id=chat_id)
    async with app.run_test(size=SIZE) as pilot:
        box = app.query_one(ChatInput)
        await wait_for(pilot, lambda: box.text == "Still here?")
        ended = app.turns_ended
        await pilot.press("f5")  # a save of the chat while the message waits in the box
        await wait_for(pilot, lambda: not app.chat_screen.generating and app.turns_ended > ended)
        await app.store.idle()
        gen = Store().db.row(chat_id)["gen"]
        assert json.loads(Store().draft_path(chat_id).read_text())["gen"] == gen  # kept past the save
        await pilot.press("ctrl+n")
        await wait_for(pilot, lambda: app.chat_id is None and app.chat is not None and not app.chat.messages)
        await app.store.idle()
        assert box.text == "Still here?" and app.chat_screen.editing is None and "editing" not in box.border_title
        [kept] = unanswered_drafts(data)
        assert kept.startswith("new-")  # the new chat's now
        await send(pilot, "")
        await app.store.idle()
        assert unanswered_drafts(data) == []


@pytest.mark.anyio
@pytest.mark.model
async def test_a_message_carried_into_a_chat_with_its_own_unanswered_message_keeps_both(smollm, tmp_path):
    """Ctrl+O from a chat whose given-back message is still in the box to a chat a kill left a
    message of its own: the box holds both (that chat's first), both are kept on disk as the opened
    chat's, none is given back twice, and the chat left keeps nothing."""
    data = tmp_path / "data"
    app = SinkchatApp(tui_settings(), loaded=smollm)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "First chat.")
        first = app.chat_id
        await app.new_chat()
        await send(pilot, "Second chat.")
        second = app.chat_id
    store = Store()
    store.keep_draft(first, Unanswered("carried words"))
    store.keep_draft(second, Unanswered("its own words"))
    store.close()
    app = SinkchatApp(tui_settings(), loaded=smollm, resume_id=first)
    async with app.run_test(size=SIZE) as pilot:
        box = app.query_one(ChatInput)
        await wait_for(pilot, lambda: box.text == "carried words")
        assert await app.open_chat(second)
        await app.store.idle()
        assert box.text == "its own words\ncarried words"
        assert unanswered_drafts(data) == [f"{second}.draft"]
        kept = Store().take_draft(second)
        assert kept == Unanswered("its own words\ncarried words")
