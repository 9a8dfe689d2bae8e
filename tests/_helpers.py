"""Helpers shared by the test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from textual.app import App

from sinkchat.engine import Chat, Done
from sinkchat.settings import Settings
from sinkchat.tui import themes

ROOT = Path(__file__).resolve().parents[1]
GREEDY = Settings(temperature=0, repetition_penalty=1.1)
SIZE = (110, 40)  # the TUI tests' terminal
# What ``torch.cpu.get_capabilities()`` may report, and whether that is native bf16 math (None: a torch
# without the function); the bf16 KV cache and bf16 prefill are chosen from it (``native_bf16``)
CPU_REPORTS = [({"avx512_bf16": True}, True), ({"amx_bf16": True}, True),
               ({"avx512_bf16": False, "avx2": True}, False), ({"avx512_bf16": False, "avx512f": True}, False),
               (None, False)]


def report_cpu(monkeypatch, found: dict | None) -> None:
    """Make torch report ``found`` as this CPU's capabilities (None: as a torch without the function)."""
    import torch

    if found is None:
        monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    else:
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: found, raising=False)


def run_cli(*args: str, input: str | bytes | None = None, env: dict | None = None, timeout: float = 300,
            prefix: list[str] = (), text: bool = True):
    """Run ``python -m sinkchat`` from this checkout in a subprocess, as a user's shell would
    (``prefix``: a command to run it under, such as :func:`without_root_override`)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [*prefix, sys.executable, "-m", "sinkchat", *args],
        input=input, capture_output=True, text=text, env=full_env, timeout=timeout, cwd=ROOT,
    )


def stand_in(path: Path, script: str) -> Path:
    """An executable Python ``script`` at ``path``: a stand-in for a program the suite does not have
    (llama.cpp's llama-bench, llama-perplexity); ``{python}`` in it becomes this interpreter."""
    path.write_text(script.format(python=sys.executable))
    path.chmod(0o755)
    return path


def stored_chat(root, user: str = "Tell me about Paris.", reply: str = "It is big.", title: str | None = None) -> int:
    """A chat saved without a model (the store never runs one): 20 tokens, tokens [4, 14) evicted."""
    from sinkchat.ledger import ChatState, Message
    from sinkchat.store import Store

    meta = {"sinks": 4, "window": 8, "block": 1, "n_sink": 4, "n_win": 6, "seen": 20, "base": 0,
            "evictions": [[4, 14]]}
    state = ChatState(list(range(100, 120)), [Message("user", user, 0, 10), Message("assistant", reply, 10, 20)],
                      meta, {"model": "m", "tokenizer": "t"})
    store = Store(root)
    try:
        return store.create_state(state, {}, Settings(), title)
    finally:
        store.close()


@contextmanager
def file_size_limit(size: int):
    """The kernel refuses writes past ``size`` bytes in any file (EFBIG), as a full disk would."""
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, handler)


def one_line_error(proc, *expected: str) -> None:
    """What every refusal looks like: exit 2, one ``sinkchat: error:`` line saying ``expected``, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert proc.stderr.startswith("sinkchat: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert all(e in proc.stderr for e in expected), proc.stderr


def say(chat: Chat, text: str) -> str:
    """Send ``text`` and return the whole reply."""
    for event in chat.submit(text):
        if isinstance(event, Done):
            return event.reply
    raise AssertionError("no Done event")


def without_root_override() -> list[str]:
    """Root ignores file modes; drop that capability so a read-only directory is read-only."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: cannot make a directory read-only")
    caps = "-dac_override,-dac_read_search,-fowner"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]


def tui_settings(**over) -> Settings:
    """The TUI tests' chat: greedy, a 64-token window so eviction happens within two questions."""
    return Settings(**{"window": 64, "temperature": 0, "seed": 0, "max_new_tokens": 40, **over})


async def wait_for(pilot, condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await pilot.pause(0.05)


async def send(pilot, text: str, timeout: float = 60) -> None:
    """Type ``text``, press Enter and wait until the reply is finished and saved."""
    from sinkchat.tui.chat_input import ChatInput

    app = pilot.app
    screen = app.chat_screen
    await wait_for(pilot, lambda: screen.chat is not None, timeout)
    await pilot.click(ChatInput)
    screen.query_one(ChatInput).insert(text)
    turns, ended = len(screen.chat.messages), app.turns_ended
    await pilot.press("enter")
    await wait_for(pilot, lambda: not screen.generating and len(screen.chat.messages) > turns, timeout)
    await wait_for(pilot, lambda: app.turns_ended > ended, timeout)  # the turn's end reached the app: saved
    if app.store is not None:
        await app.store.idle()


class TranscriptApp(App):
    """The transcript and the message box alone, with sinkchat's stylesheet: no model needed."""

    CSS_PATH = Path(themes.__file__).parent / "app.tcss"

    def get_theme_variable_defaults(self) -> dict[str, str]:
        return dict(themes.GAUGE_DEFAULTS)

    def compose(self):
        from sinkchat.tui.chat_input import ChatInput
        from sinkchat.tui.transcript import Transcript

        yield Transcript()
        yield ChatInput()
