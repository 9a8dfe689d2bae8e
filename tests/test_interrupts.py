"""Plain mode as a person meets it, in real processes: Ctrl+C and a closed terminal in a
pseudo-terminal, SIGTERM in a pipe, bytes that are not UTF-8 on stdin, and disks that refuse
writes. Each ends with the chat resumed and its cache checked against its ledger."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pexpect
import pytest

from _helpers import GREEDY, ROOT, run_cli, say, without_root_override
from sinkchat.engine import Chat, Done, Evicted
from sinkchat.store import Store

pytestmark = pytest.mark.model  # every test starts sinkchat, which loads the bundled model
SETTINGS = GREEDY.replace(sinks=4, window=48, block=8, max_new_tokens=200)
FLAGS = ["--plain", "-t", "0", "--repetition-penalty", "1.1", "--window", "48", "--block", "8",
         "--max-new-tokens", "200"]
STORY = "Write a long story about a dragon and a knight."


def resumed(loaded, root, chat_id: int = 1) -> Chat:
    """The chat as the next start opens it: the KV loads as saved (no notice), and the ledger rows on
    disk mark exactly the tokens the cache holds."""
    store = Store(root)
    chat = Chat(loaded, SETTINGS.replace(max_new_tokens=8))  # (the reply length is no part of what is restored)
    assert store.open(chat_id, chat) == []
    assert chat.cache.seen == len(chat.tokens) == chat.messages[-1].end
    (s0, s1), (w0, w1) = chat.cache.kept()
    kinds = "".join(r["kind"] for r in store.db.db.execute(
        "SELECT kind FROM tokens WHERE chat_id=? ORDER BY pos", (chat_id,)))
    assert kinds == "s" * s1 + "e" * (w0 - s1) + "w" * (w1 - w0)
    store.close()
    return chat


def spawn(root) -> pexpect.spawn:
    return pexpect.spawn(sys.executable, ["-m", "sinkchat", *FLAGS, "--data-dir", str(root)], cwd=str(ROOT),
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, encoding="utf-8", timeout=180,
                         dimensions=(40, 200))


def streamed_then(child: pexpect.spawn, act) -> str:
    """Wait until a reply has streamed a few words, ``act()``, and return what was printed of it."""
    child.expect_exact("bot> ")
    child.expect(r"\S+\s+\S+\s+\S+\s+\S+")
    seen = child.before + child.after
    act()
    return seen


def test_ctrl_c_then_a_closed_terminal_keep_both_partial_replies(smollm, tmp_path):
    child = spawn(tmp_path)
    child.expect_exact("you> ")
    child.sendline(STORY)
    first = streamed_then(child, child.sendintr)
    child.expect_exact("\r\n[stopped]")
    first += child.before
    child.expect_exact("[cache] ")
    child.expect_exact("you> ")  # the chat goes on
    child.sendline("Tell me another one, about a ship.")
    streamed_then(child, lambda: None)
    child.ptyproc.fileobj.close()  # the terminal window closes: SIGHUP, and writes fail from now on
    assert child.ptyproc.wait() == 128 + signal.SIGHUP

    chat = resumed(smollm, tmp_path)
    replies = [m for m in chat.messages if m.role == "assistant"]
    assert [m.note for m in replies] == ["stopped", "stopped"]
    shown = first.replace("^C", "").replace("\r\n", "\n")  # (the terminal echoes Ctrl+C as ^C)
    assert replies[0].content.strip() == shown.strip()  # what the user saw, kept
    assert replies[1].content.strip() and len(replies[1].content) < 2000
    assert say(chat, "Thanks!")

    child = pexpect.spawn(sys.executable, ["-m", "sinkchat", *FLAGS, "--data-dir", str(tmp_path), "--resume", "1"],
                          cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)}, encoding="utf-8", timeout=180,
                          dimensions=(40, 200))
    child.expect(r"resumed chat 1: \d+ messages")  # on a terminal, a resumed chat shows where it stopped
    child.expect_exact("[stopped]")
    child.expect_exact("you> ")
    child.sendeof()
    assert child.wait() == 0


def test_a_stop_while_a_long_message_is_read_ends_it_between_chunks(smollm):
    """Esc or Ctrl+C during a long paste does not wait for all of it to be read: the message keeps
    what was read, marked stopped, the reply is empty, and the chat goes on whole."""
    chat = Chat(smollm, SETTINGS)
    events = chat.submit(STORY * 60)  # about 600 tokens: many chunks of a 48-token window
    for event in events:
        if isinstance(event, Evicted):  # the first chunk went through: stop now
            chat.stop()
        if isinstance(event, Done):
            break
    user, reply = chat.messages[-2:]
    total = len(chat.turns.encode(chat.turns.first(STORY * 60)[1]))
    assert (user.note, reply.note, reply.content) == (f"partial:{total}", "stopped", "")
    assert user.end - user.start < total / 2
    assert chat.cache.seen == len(chat.tokens) == reply.end
    assert say(chat, "Hello!")


def test_a_stop_before_the_turn_runs_is_not_lost(smollm):
    """Esc pressed as Enter was (the turn still waiting for its thread), Ctrl+C right after `bot> `:
    the stop counts for that turn; it was cleared when the turn started running."""
    chat = Chat(smollm, SETTINGS)
    events = chat.submit(STORY)
    chat.stop()
    done = [e for e in events if isinstance(e, Done)]
    assert [d.reason for d in done] == ["stopped"] and chat.messages[-1].content == ""
    assert say(chat, "Hello!")  # the next turn is not stopped


def test_ctrl_c_while_a_long_line_is_read_says_how_much_was_read(tmp_path):
    """Plain mode on a terminal: after Ctrl+C during a long message, a line says how many of its
    tokens the model read (never that it has the message)."""
    child = pexpect.spawn(sys.executable, ["-m", "sinkchat", "--plain", "-t", "0", "--window", "24", "--system",
                                           "Be brief.", "--max-new-tokens", "4", "--data-dir", str(tmp_path)],
                          cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)}, encoding="utf-8", timeout=180,
                          dimensions=(40, 200))
    child.expect_exact("sinkchat: /help lists the commands; Ctrl+D or /quit leaves")  # a newcomer's first line
    child.expect_exact("you> ")
    child.sendline("Hi")
    child.expect_exact("you> ")
    child.sendline("the quick brown fox " * 190)  # ~770 tokens: ~130 prefill chunks of 6
    child.expect_exact("bot> ")
    child.sendintr()
    child.expect(r"\[#4 you stopped: the model read (\d+) of its (\d+) tokens\]")
    read, total = map(int, child.match.groups())
    child.expect_exact("you> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    assert read < total
    user = Store(tmp_path).transcript(1).messages[3]
    assert (user.end - user.start, user.note) == (read, f"partial:{total}")


def test_sigterm_saves_then_exits(smollm, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "sinkchat", *FLAGS, "--data-dir", str(tmp_path)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    proc.stdin.write(b"Hello! Who are you?\n" + STORY.encode() + b"\n")
    proc.stdin.flush()
    while not proc.stdout.readline().startswith(b"[cache]"):
        pass
    assert proc.stdout.read1(64)  # the second reply is streaming
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and b"Traceback" not in err, err
    assert out.count(b"[cache]") == 1  # the stopped reply still got its status line

    chat = resumed(smollm, tmp_path)
    assert [m.role for m in chat.messages][-4:] == ["user", "assistant", "user", "assistant"]
    assert chat.messages[-1].note == "stopped" and chat.messages[-1].content
    assert chat.messages[-3].note in ("", "length")


def test_bytes_that_are_not_utf8_are_replaced_and_said_once(tmp_path):
    proc = run_cli(*FLAGS, "--max-new-tokens", "8", "--data-dir", str(tmp_path), text=False,
                   input=b"caf\xe9 au lait\nAnd hello, \xff\xfe friend\n")
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert proc.stdout.count(b"[cache] ") == 2  # both lines answered
    assert err.count("\n") == 1 and "not valid UTF-8 was replaced with \ufffd" in err
    saved = json.loads(run_cli("chats", "export", "-f", "json", "--data-dir", str(tmp_path)).stdout)
    assert [m["content"] for m in saved["messages"] if m["role"] == "user"] == [
        "caf\ufffd au lait", "And hello, \ufffd\ufffd friend"]
    assert [m["role"] for m in saved["messages"]][-4:] == ["user", "assistant"] * 2


def test_a_read_only_disk_opens_the_chat_read_only_and_goes_on(smollm, tmp_path):
    """As on a read-only file system: no lock file can be made, no file written; the chat answers."""
    data = tmp_path / "data"
    store = Store(data)
    chat = Chat(smollm, SETTINGS.replace(max_new_tokens=8))
    say(chat, "Tell me about Paris.")
    store.create(chat, chat.settings)
    store.close()
    paths = [data, *data.rglob("*")]
    before = {p: p.read_bytes() for p in paths if p.is_file()}
    for p in paths:
        p.chmod(0o500 if p.is_dir() else 0o400)
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o500)
    try:
        out = run_cli("--plain", "--resume", "--data-dir", str(data), "--max-new-tokens", "8",
                      input="And London?\n", prefix=without_root_override())
        new = run_cli(*FLAGS, "--max-new-tokens", "8", "--data-dir", str(empty / "chats"), input="Hello\n",
                      prefix=without_root_override())
    finally:
        for p in paths:
            p.chmod(0o700 if p.is_dir() else 0o600)
    assert out.returncode == 0 and out.stdout.count("[cache]") == 1, out.stderr
    assert out.stderr.count("\n") == 1 and "cannot lock chat 1" in out.stderr and "read-only" in out.stderr
    assert {p: p.read_bytes() for p in before} == before
    assert new.returncode == 0 and new.stdout.count("[cache]") == 1, new.stderr
    assert new.stderr.count("\n") == 1 and "this chat is not saved" in new.stderr


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_sigterm_in_the_tui_stops_the_reply_saves_and_quits(smollm):
    from _helpers import SIZE, send, tui_settings, wait_for
    from sinkchat.tui.app import SinkchatApp
    from sinkchat.tui.chat_input import ChatInput

    app = SinkchatApp(tui_settings(max_new_tokens=200), loaded=smollm)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "Hello!", timeout=600)  # a first turn, saved as usual (up to 200 tokens)
        screen = app.chat_screen
        screen.query_one(ChatInput).insert(STORY)
        await pilot.press("enter")
        await wait_for(pilot, lambda: screen.generating and screen.reply_view and screen.reply_view.content)
        os.kill(os.getpid(), signal.SIGTERM)  # the loop's handler quits the app, as Ctrl+Q does
        await wait_for(pilot, lambda: app._exit)
    [info] = Store().list()
    reply = Store().transcript(info.id).messages[-1]
    assert reply.role == "assistant" and reply.note == "stopped" and reply.content
