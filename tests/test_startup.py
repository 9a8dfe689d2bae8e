"""Starting sinkchat as a newcomer does: mistakes caught before the screen opens, no terminal, the
real TUI in a pseudo-terminal (a load failure exits non-zero; quitting says how to resume)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest

from _helpers import ROOT, run_cli, without_root_override
from sinkchat.store import Store


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "nosuchmodel"], "unknown model 'nosuchmodel'"),
        (["--window", "100000"], "exceeds smollm2-135m's context of 8192 tokens"),
        (["--model", "./nope.gguf"], "no such GGUF file"),
        (["--model", "some-org/some-model"], "not in the local Hugging Face cache"),
        (["--theme", "no-such-theme"], "unknown theme 'no-such-theme'"),
    ],
)
def test_mistakes_are_caught_before_the_screen_opens(args, message):
    out = run_cli(*args, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stdout == ""  # no escape codes drawn into the pipe
    assert out.stderr.startswith("sinkchat: error: ") and message in out.stderr and out.stderr.count("\n") == 1


def test_without_a_terminal_the_tui_says_to_use_plain():
    out = run_cli("--window", "64", timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == "sinkchat: error: the chat screen needs a terminal; use --plain to chat through a pipe or a script\n"


def test_models_in_a_pipe_keeps_whole_ids():
    out = run_cli("models")
    assert out.returncode == 0
    assert "mistralai/Mistral-7B-Instruct-v0.3" in out.stdout and "meta-llama/Llama-3.1-8B-Instruct" in out.stdout
    assert all(len(line.split()) >= 4 for line in out.stdout.splitlines()[1:])  # one row per line, nothing wrapped


def test_models_on_an_80_column_terminal_keeps_whole_ids():
    """Each Hugging Face id whole on one line (what `hf download` takes); the description wraps."""
    from sinkchat.model import ALIASES

    child = pexpect.spawn(sys.executable, ["-m", "sinkchat", "models"], cwd=str(ROOT), dimensions=(24, 80),
                          env={**os.environ, "PYTHONPATH": str(ROOT), "TERM": "xterm-256color"}, timeout=60,
                          encoding="utf-8")
    child.expect(pexpect.EOF)
    lines = child.before.splitlines()
    for alias, (ref, _) in ALIASES.items():
        if ref != "bundled":
            assert any(line.split()[:2] == [alias, ref] for line in lines if line.split()), (alias, child.before)


def test_chats_list_on_an_80_column_terminal_cuts_nothing(tmp_path):
    """A long title and a Hugging Face id as the model: both wrap onto more lines, neither is cut."""
    from sinkchat.ledger import ChatState, Message
    from sinkchat.settings import Settings

    meta = {"sinks": 4, "window": 8, "block": 1, "n_sink": 4, "n_win": 6, "seen": 20, "base": 0, "evictions": []}
    title = "Tell me about the history of the Eiffel Tower and its architects"
    state = ChatState(list(range(100, 120)), [Message("user", title, 0, 10), Message("assistant", "x", 10, 20)],
                      meta, {"model": "m", "tokenizer": "t"})
    store = Store()
    store.create_state(state, {}, Settings(model="mistralai/Mistral-7B-Instruct-v0.3"))
    store.close()
    child = pexpect.spawn(sys.executable, ["-m", "sinkchat", "chats", "list"], cwd=str(ROOT), dimensions=(24, 80),
                          env={**os.environ, "PYTHONPATH": str(ROOT), "TERM": "xterm-256color"}, timeout=60,
                          encoding="utf-8")
    child.expect(pexpect.EOF)
    shown = [line.split("  ") for line in child.before.splitlines()]  # the columns, two spaces apart
    cells = [cell.strip() for line in shown for cell in line if cell.strip()]
    assert "…" not in child.before, child.before
    assert "mistralai/Mistral-7B-Instruct-v0.3" in "".join(c for c in cells if "/" in c or "Instruct" in c)
    assert all(word in child.before.split() for word in title[:60].split()), child.before


def tui(*args: str, env: dict | None = None, prefix: list[str] = ()) -> pexpect.spawn:
    """The real TUI in an 80x24 pseudo-terminal (``prefix``: a command to run it under)."""
    command = [*prefix, sys.executable, "-m", "sinkchat", *args]
    return pexpect.spawn(
        command[0], command[1:], cwd=str(ROOT), dimensions=(24, 80), timeout=180,
        env={**os.environ, "PYTHONPATH": str(ROOT), "TERM": "xterm-256color", **(env or {})},
    )


@pytest.mark.model
def test_a_failure_after_the_screen_opened_is_shown_in_full_and_exits_non_zero(tmp_path):
    from test_checks import write_gguf

    bad = tmp_path / "broken.gguf"
    write_gguf(bad, "llama")  # a header that passes the checks, no model behind it: found on screen
    child = tui("--model", str(bad), env={"SINKCHAT_CACHE_DIR": str(tmp_path / "cache")})
    child.expect("Could not load the model")
    child.expect("ctrl\\+q")
    child.sendcontrol("q")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1
    assert b"sinkchat: error: cannot read GGUF file" in child.before


@pytest.mark.model
def test_a_short_chat_in_the_real_tui_then_quit_says_how_to_resume():
    child = tui("--window", "64", "-t", "0", "--max-new-tokens", "6")
    child.expect("Message the model")  # the box is there at once, while the model loads
    child.send("Hi\r")
    child.expect("#3 model")  # the reply's label: the message was sent and answered
    child.expect(r"seen \d+")
    child.sendcontrol("q")
    child.expect("resume with: (.+?)\r\n")
    command = child.match.group(1).decode()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, (child.signalstatus, child.before)
    [info] = Store().list()
    assert info.id == 1 and info.title == "Hi"
    # the line works as typed: a shell runs it (here in plain mode, without a terminal) and it resumes chat 1
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(["bash", "-c", f"{command} --plain"], input="Again\n", capture_output=True, text=True,
                          env=env, timeout=180)
    assert proc.returncode == 0 and proc.stdout.count("[cache]") == 1, proc.stderr
    assert Store().list()[0].n_messages == 4


@pytest.mark.model
def test_a_venv_that_is_not_activated_gets_a_resume_line_that_works(tmp_path):
    """After `make chat` the console script runs by its path (.venv/bin/sinkchat), not on PATH: the
    line printed on quit names that path, so pasting it back resumes the chat."""
    exe = Path(sys.executable).with_name("sinkchat")
    if not exe.exists():
        pytest.skip("sinkchat is not installed as a console script next to this Python")
    env = {**os.environ, "PATH": "/usr/bin:/bin", "TERM": "xterm-256color"}
    child = pexpect.spawn(str(exe), ["--plain", "-t", "0", "--window", "64", "--max-new-tokens", "4"], env=env,
                          cwd=str(tmp_path), timeout=180)
    child.expect("you> ")
    child.send("Hi\r")
    child.expect("you> ")
    child.sendeof()
    child.expect("resume with: (.+?)\r\n")
    command = child.match.group(1).decode()
    child.expect(pexpect.EOF)
    assert command == f"{exe} --plain --resume 1"
    proc = subprocess.run(["bash", "-c", command], input="Again\n", capture_output=True, text=True, env=env,
                          cwd=str(tmp_path), timeout=180)
    assert proc.returncode == 0 and proc.stdout.count("[cache]") == 1, proc.stderr
    assert Store().list()[0].n_messages == 4


@pytest.mark.model
@pytest.mark.parametrize("no_save", [[], ["--no-save"]])
def test_a_data_dir_sinkchat_may_not_write_leaves_the_tui_chatting(tmp_path, no_save):
    """As plain mode does, the TUI goes on in memory (the screen says why), with --no-save or without."""
    parent = tmp_path / "ro"
    parent.mkdir(mode=0o500)
    child = tui(*no_save, "--data-dir", str(parent / "data"), "-t", "0", "--window", "64", "--max-new-tokens", "4",
                prefix=without_root_override())
    child.expect("Message the model")
    child.send("Hi\r")
    child.expect("#3 model")
    child.sendcontrol("q")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    assert b"sinkchat: error" not in child.before and b"resume with" not in child.before
    assert not (parent / "data").exists()


@pytest.mark.model
def test_plain_runs_are_saved_unless_no_save():
    out = run_cli("--plain", "--window", "48", "-t", "0", "--max-new-tokens", "4", "--no-save", input="Hi\n")
    assert out.returncode == 0 and out.stdout.count("[cache]") == 1
    assert Store().list() == []
    out = run_cli("--plain", "--window", "48", "-t", "0", "--max-new-tokens", "4", input="Hi\n")
    assert out.returncode == 0 and [c.title for c in Store().list()] == ["Hi"]


@pytest.mark.model
def test_two_first_starts_at_once_both_convert_the_bundled_model(tmp_path):
    """Two sinkchat processes that find no converted model both convert it; the one that finishes
    second keeps the first one's folder instead of failing."""
    code = "from sinkchat.model import bundled_gguf, gguf_folder; print(gguf_folder(bundled_gguf()))"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SINKCHAT_CACHE_DIR": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=600) + (p.returncode,) for p in procs]
    assert [r[2] for r in results] == [0, 0], [r[1][-300:] for r in results]
    assert results[0][0] == results[1][0] and (tmp_path / "cache" / "models").is_dir()
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir()] == [results[0][0].strip().rsplit("/", 1)[1]]


@pytest.mark.model
def test_a_window_the_system_prompt_does_not_fit_is_refused():
    """--window 10 with the bundled model's 19-token system prompt: it would evict itself before a
    word was said. Plain mode refuses it in one line; the TUI says so on screen and exits non-zero."""
    out = run_cli("--plain", "--window", "10", input="Hi\n")
    assert out.returncode == 2 and out.stdout == "", out.stderr
    assert out.stderr.startswith("sinkchat: error: --window 10 is too small: the system prompt alone is ")
    assert out.stderr.count("\n") == 1 and "give --window" in out.stderr
    assert run_cli("--plain", "--window", "10", "--system", "Be brief.", input="", timeout=120).returncode == 0
    child = tui("--window", "10")
    child.expect("Could not start a chat")
    child.sendcontrol("q")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1 and b"sinkchat: error: --window 10 is too small" in child.before


@pytest.mark.model
def test_keys_typed_while_sinkchat_starts_are_not_lost():
    """Typed from the first instant, one key every 50 ms while Python starts, the screen opens and
    the model loads, then Enter: the whole message is sent (the keys the screen read before its box
    had the focus were dropped; those waiting on the terminal before it started were never read)."""
    child = tui("--window", "64", "-t", "0", "--max-new-tokens", "4")
    message = "abcdefghijklmnopqrstuvwxyz0123456789"
    for key in message:
        child.send(key)
        time.sleep(0.05)
    child.send("\r")
    child.expect("#3 model")
    child.sendcontrol("q")
    child.expect(pexpect.EOF)
    child.close()
    assert [c.title for c in Store().list()] == [message]
