"""kill -9 at every write point of a chat's first save and of a later one, for real (SIGKILL from
``SINKCHAT_FAULT``), each followed by the next start: the chat holds every turn whose rows were
committed (a save commits its ledger rows first, then writes the K/V), its K/V as saved or rebuilt
from the ledger when the kill came before the state file was whole, and nothing blocks the next start."""

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
# inside the transaction, after its commit, inside the temp file, after its rename; a first save
# writes a base state file, the later one a segment after it (tests/test_saves.py kills compactions too)
POINTS = {"first": ["db-mid", "ledger-committed", "state-temp", "state-renamed"],
          "later": ["db-mid", "ledger-committed", "segment-temp", "segment-renamed"]}
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


@pytest.mark.parametrize("save, point", [(save, point) for save, points in POINTS.items() for point in points])
def test_kill_9_at_every_write_point(smollm, two_saves, tmp_path, point, save):
    path, states = two_saves
    nth = 2 if point in ("db-mid", "ledger-committed") and save == "later" else 1  # the second time there
    proc = subprocess.run([sys.executable, "-c", SAVE, str(tmp_path), str(path), save], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "SINKCHAT_FAULT": f"{point}@{nth}"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr

    store = Store(tmp_path)  # the next start
    chat = Chat(smollm, SETTINGS)
    committed = point != "db-mid"  # a kill inside the transaction rolls it back
    written = point.endswith("-renamed")  # the state file (or segment) of the save is whole
    if save == "first" and not committed:
        assert store.list() == []  # no half-made chat: it never existed
        say(chat, "Tell me about Paris.")
        chat_id = store.create(chat, SETTINGS)  # (past the killed one's lock file: that id may be held)
        expected = chat.messages
    else:
        saved = states[1 if save == "later" and committed else 0][0]
        expected = saved.messages
        rebuilt = not written and committed
        chat_id, notices = 1, store.open(1, chat)
        assert len(notices) == rebuilt, notices
        assert all("rebuilt the KV cache from the ledger" in n for n in notices), notices
        assert chat.tokens == saved.tokens
    assert chat.messages == expected and chat.cache.seen == len(chat.tokens)
    assert not list((tmp_path / "state").glob(".*.tmp"))  # a killed save's temp file is swept
    say(chat, "What about Rome?")
    store.save(chat_id, chat)
    store.close()
    reopened = Chat(smollm, SETTINGS)
    assert Store(tmp_path).open(chat_id, reopened) == [] and reopened.messages == chat.messages
