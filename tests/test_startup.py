"""Starting sinkchat as a newcomer does: mistakes caught before the screen opens, no terminal, the
real TUI in a pseudo-terminal (a load failure exits non-zero; quitting says how to resume)."""

from __future__ import annotations

import os
import sys

import pexpect
import pytest

from _helpers import ROOT, run_cli
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


def tui(*args: str, env: dict | None = None) -> pexpect.spawn:
    """The real TUI in an 80x24 pseudo-terminal."""
    return pexpect.spawn(
        sys.executable, ["-m", "sinkchat", *args], cwd=str(ROOT), dimensions=(24, 80), timeout=180,
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
    child.expect("resume with: sinkchat --resume 1")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    [info] = Store().list()
    assert info.id == 1 and info.title == "Hi"


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
    import subprocess

    code = "from sinkchat.model import bundled_gguf, gguf_folder; print(gguf_folder(bundled_gguf()))"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SINKCHAT_CACHE_DIR": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=600) + (p.returncode,) for p in procs]
    assert [r[2] for r in results] == [0, 0], [r[1][-300:] for r in results]
    assert results[0][0] == results[1][0] and (tmp_path / "cache" / "models").is_dir()
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir()] == [results[0][0].strip().rsplit("/", 1)[1]]
