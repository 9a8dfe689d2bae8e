"""kill -9 at every write point of a chat's first save and of a later one, for real (SIGKILL from
``SINKCHAT_FAULT``), each followed by the next start: the chat is whole as of its last complete
save, or absent (a first save that did not finish), and nothing blocks the next start."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys

import pytest

from _helpers import GREEDY, ROOT, say
from sinkchat.engine import Chat
from sinkchat.store import Store

SETTINGS = GREEDY.replace(sinks=4, window=48, block=8, max_new_tokens=16)
POINTS = ["state-temp", "state-renamed", "db-mid"]  # inside the temp file, after its rename, inside the transaction
SAVE = """
import pickle, sys
from sinkchat.store import Store
root, states, later = sys.argv[1], pickle.load(open(sys.argv[2], "rb")), sys.argv[3] == "later"
store = Store(root)
chat_id = store.create_state(*states[0])
if later:
    store.save_state(chat_id, *states[1][:2])
"""


@pytest.fixture(scope="module")
def two_saves(smollm, tmp_path_factory):
    """What a chat hands the store at its first save (one turn) and at the next (two turns; the window
    has evicted by then), pickled for the process that will be killed while saving them."""
    chat = Chat(smollm, SETTINGS)
    states = []
    for question in ("Tell me about Paris.", "And London?"):
        say(chat, question)
        state, tensors = chat.state()
        states.append((state, {k: v.clone() for k, v in tensors.items()}, SETTINGS))
    assert chat.cache.evictions
    path = tmp_path_factory.mktemp("saves") / "states.pkl"
    path.write_bytes(pickle.dumps(states))
    return path, states


@pytest.mark.parametrize("save", ["first", "later"])
@pytest.mark.parametrize("point", POINTS)
def test_kill_9_at_every_write_point(smollm, two_saves, tmp_path, point, save):
    path, states = two_saves
    nth = 1 if save == "first" else 2  # a later save reaches each point the second time
    proc = subprocess.run([sys.executable, "-c", SAVE, str(tmp_path), str(path), save], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "SINKCHAT_FAULT": f"{point}@{nth}"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr

    store = Store(tmp_path)  # the next start
    chat = Chat(smollm, SETTINGS)
    if save == "first":
        assert store.list() == []  # no half-made chat: it never existed
        say(chat, "Tell me about Paris.")
        assert store.create(chat, SETTINGS) == 1
        expected, notices = chat.messages, []
    else:
        saved = states[1][0] if point != "state-temp" else states[0][0]  # the renamed state file is complete
        expected = saved.messages
        notices = ["chat 1: the last save was interrupted before the database was updated; restored them from "
                   "the state file"] if point != "state-temp" else []
        assert store.open(1, chat) == notices
        assert chat.tokens == saved.tokens
    assert chat.messages == expected and chat.cache.seen == len(chat.tokens)
    assert not list((tmp_path / "state").glob(".*.tmp"))  # a killed save's temp file is swept
    say(chat, "What about Rome?")
    store.save(1, chat)
    store.close()
    reopened = Chat(smollm, SETTINGS)
    assert Store(tmp_path).open(1, reopened) == [] and reopened.messages == chat.messages
