"""Saves that write what changed: a segment per turn holding only the new tokens' K/V, compaction
into a new base, kill -9 at every new write point, damaged segments, files from before segments."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys

import pytest
import torch

from _helpers import GREEDY, ROOT, say
from sinkchat.engine import Chat
from sinkchat.files import write_atomic, written_bytes
from sinkchat.store import Snapshot, Store, statefile

SETTINGS = GREEDY.replace(sinks=4, window=128, block=16, max_new_tokens=4)
QUESTIONS = ["Name a colour.", "Say a number.", "Name a fruit.", "Name an animal.", "Say hello.",
             "Name a city.", "Name a tool.", "Say a short word.", "Name a planet.", "Name a flower."]
HEADER = 128 * 1024  # what a save may write beyond the new tokens' K/V: headers, sums, database pages and journal


def per_token(tensors: dict, parts: tuple[str, str] = (".k", ".v")) -> int:
    """Bytes of K/V one held token takes, over every layer (``parts``: ``(".stash_k", ".stash_v")`` for
    one evicted token kept to regenerate a turn: its pristine float32 key beside a 16-bit value)."""
    return sum(t[:, :, :1].numel() * t.element_size() for k, t in tensors.items() if k.endswith(parts))


def same_cache(a: Chat, b: Chat) -> bool:
    """Bit-exact: every held K/V tensor, the sinks' pristine keys and the counters."""
    (ta, ma), (tb, mb) = a.cache.state(), b.cache.state()
    return ma == mb and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def reopen(root, chat_id: int, loaded, settings=SETTINGS) -> tuple[Chat, list[str]]:
    chat = Chat(loaded, settings)
    store = Store(root)
    try:
        return chat, store.open(chat_id, chat, read_only=True)
    finally:
        store.close()


@pytest.fixture(scope="module")
def fifty(smollm, tmp_path_factory):
    """A chat of 50 turns saved after each one, with what each save wrote."""
    root = tmp_path_factory.mktemp("fifty")
    store, chat = Store(root), Chat(smollm, SETTINGS)
    say(chat, QUESTIONS[0])
    chat_id = store.create(chat, SETTINGS)
    saves = []
    for t in range(1, 50):
        say(chat, QUESTIONS[t % len(QUESTIONS)])
        n_old = saves[-1]["seen"] if saves else None
        store.save(chat_id, chat)
        tensors, meta = chat.cache.state()
        reopened, notices = reopen(root, chat_id, smollm)
        copies = sum(b - a for a, b, _ in meta["checkpoint"]["stash"])  # what the turn evicted, kept to regenerate it
        saves.append({**store.last_save, "seen": meta["seen"], "n_win": meta["n_win"], "n_old": n_old,
                      "copies": copies,
                      "exact": same_cache(chat, reopened) and not notices and reopened.tokens == chat.tokens,
                      "segments": len(statefile.segment_paths(root / "state", chat_id))})
    sizes = (per_token(tensors), per_token(tensors, (".stash_k", ".stash_v")), per_token(tensors, (".sink",)))
    yield root, chat_id, chat, saves, sizes
    store.close()


def test_each_save_writes_the_new_tokens_and_a_bounded_header(fifty):
    root, chat_id, chat, saves, (token_bytes, copy_bytes, sink_key_bytes) = fifty
    kinds = [s["kind"] for s in saves]
    assert kinds.count("segment") >= 40, kinds
    assert chat.cache.evictions and kinds.count("base") >= 2  # the window slid past the base: compacted
    for s in saves:
        if s["kind"] == "segment":
            held_new = s["seen"] - max(s["seen"] - s["n_win"], s["seen"] - s["tokens"])
            sinks = 4 * (token_bytes + sink_key_bytes)  # the sinks' K/V and pristine keys, when an eviction re-placed them
            top = held_new * token_bytes + s["copies"] * copy_bytes + sinks + HEADER
            assert held_new * token_bytes <= s["bytes"] <= top, s
        else:  # a new base: the sinks (and their pristine keys), the window and the copies, not the chat
            assert s["bytes"] <= (6 + SETTINGS.window) * token_bytes + s["copies"] * copy_bytes + HEADER, s
    assert all(s["segments"] <= 2 * SETTINGS.window for s in saves)
    # on average a save writes about its own tokens and copies, at most about twice over with compactions
    new = sum(s["tokens"] * token_bytes + s["copies"] * copy_bytes for s in saves)
    assert sum(s["bytes"] for s in saves) <= 2.5 * new


def test_resume_after_every_save_is_bit_exact(fifty):
    _, _, _, saves, _ = fifty
    assert all(s["exact"] for s in saves), [(i, s["kind"]) for i, s in enumerate(saves) if not s["exact"]]


def test_resume_continues_token_for_token(fifty, smollm):
    root, chat_id, chat, _, _ = fifty
    reopened, notices = reopen(root, chat_id, smollm)
    assert notices == []
    twin = Chat(smollm, SETTINGS)
    twin.restore(*chat.state())  # the uninterrupted chat, copied
    assert say(reopened, "Name a river.") == say(twin, "Name a river.") and reopened.tokens == twin.tokens


def test_compaction_gives_the_same_cache(fifty, smollm, tmp_path, monkeypatch):
    """A chat saved with a new base every time resumes to the same bits as one saved in segments."""
    root, chat_id, chat, _, _ = fifty
    monkeypatch.setattr(statefile, "MAX_SEGMENTS", 0)
    store = Store(tmp_path)
    other = store.create(chat, SETTINGS)
    store.save(other, chat)
    assert store.last_save["kind"] == "base" and not statefile.segment_paths(tmp_path / "state", other)
    a, _ = reopen(root, chat_id, smollm)
    b, _ = reopen(tmp_path, other, smollm)
    assert same_cache(a, b) and same_cache(a, chat)
    store.close()


def test_database_rows_grow_with_the_turn_not_the_chat(fifty):
    """The database part of a save: the new ledger rows and messages, not every message again."""
    root, chat_id, chat, _, _ = fifty
    store = Store(root)  # (the fixture's store holds the chat's lock; rows are written directly here)
    try:
        row = store.db.row(chat_id)
        snap = Snapshot.of(chat.state()[0], json.loads(row["settings"]), row["gen"] + 1)
        before = written_bytes()
        store.db.write(chat_id, snap, json.loads(row["cache_meta"]), row["n_tokens"], len(snap.messages))
        small = written_bytes() - before
        before = written_bytes()
        store.db.write(chat_id, Snapshot.of(chat.state()[0], snap.settings, snap.gen + 1), snap.meta,
                       len(snap.tokens), 0)
        whole = written_bytes() - before
    finally:
        store.close()
    assert small < whole and small <= HEADER


# -- kill -9 at each new write point -----------------------------------------------------------

SAVES = """
import pickle, sys
from sinkchat.store import Store
root, states, upto = sys.argv[1], pickle.load(open(sys.argv[2], "rb")), int(sys.argv[3])
store = Store(root)
chat_id = store.create_state(*states[0])
for state in states[1 : upto + 1]:
    store.save_state(chat_id, *state[:2])
"""
KILL = GREEDY.replace(sinks=4, window=48, block=8, max_new_tokens=12)


@pytest.fixture(scope="module")
def saves(smollm, tmp_path_factory):
    """What a chat hands the store after each of 6 turns, pickled, and what kind each save is."""
    chat = Chat(smollm, KILL)
    states = []
    for t in range(6):
        say(chat, QUESTIONS[t])
        state, tensors = chat.state()
        states.append((state, {k: v.clone() for k, v in tensors.items()}, KILL))
    root = tmp_path_factory.mktemp("kinds")
    store = Store(root)
    chat_id = store.create_state(*states[0])
    kinds = ["base"]
    for state in states[1:]:
        store.save_state(chat_id, *state[:2])
        kinds.append(store.last_save["kind"])
    store.close()
    assert "segment" in kinds and "base" in kinds[2:], kinds
    path = tmp_path_factory.mktemp("states") / "states.pkl"
    path.write_bytes(pickle.dumps(states))
    return path, states, kinds


def _target(kinds: list[str], point: str) -> tuple[int, int]:
    """The save that reaches ``point`` (the first segment, or the first base after a segment) and
    the how-manieth time the point is reached there."""
    if point.startswith("segment-"):
        at = kinds.index("segment")
        return at, kinds[: at + 1].count("segment")
    at = next(i for i in range(2, len(kinds)) if kinds[i] == "base" and kinds[i - 1] == "segment")
    if point == "segments-pruning":
        return at, 1
    if point == "db-mid":
        return at, at + 1
    return at, kinds[: at + 1].count("base")


@pytest.mark.parametrize("point", ["segment-temp", "segment-renamed", "state-temp", "state-renamed",
                                   "segments-pruning", "db-mid"])
def test_kill_9_at_each_new_write_point_keeps_every_committed_turn(smollm, saves, tmp_path, point):
    path, states, kinds = saves
    at, nth = _target(kinds, point)
    proc = subprocess.run([sys.executable, "-c", SAVES, str(tmp_path), str(path), str(at)], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "SINKCHAT_FAULT": f"{point}@{nth}"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # a save commits its rows first: only a kill inside that transaction loses the save's turn; a kill
    # before the state file is whole keeps the turn, whose K/V is then rebuilt from the ledger
    state, tensors, _ = states[at - 1 if point == "db-mid" else at]
    store = Store(tmp_path)  # the next start
    chat = Chat(smollm, KILL)
    notices = store.open(1, chat)
    assert chat.tokens == state.tokens and chat.messages == state.messages
    assert not list((tmp_path / "state").glob(".*.tmp"))
    if point.endswith("-temp"):
        assert len(notices) == 1 and "rebuilt the KV cache from the ledger" in notices[0], notices
        twin = Chat(smollm, KILL)
        twin.restore(state, None)  # the same rebuild
    else:
        twin = Chat(smollm, KILL)
        twin.restore(state, tensors)  # the uninterrupted chat at that save
        assert notices == []
    assert same_cache(chat, twin), notices
    assert say(chat, "Name a river.") == say(twin, "Name a river.")  # and it goes on, saving as it goes
    store.save(1, chat)
    store.close()
    again, notices = reopen(tmp_path, 1, smollm, KILL)
    assert notices == [] and same_cache(again, twin)


# -- damaged, foreign and linked segments ------------------------------------------------------


@pytest.fixture
def segmented(smollm, saves, tmp_path):
    """A chat saved as a base and at least one segment after it."""
    _, states, kinds = saves
    n = kinds.index("segment") + 1
    store = Store(tmp_path)
    chat_id = store.create_state(*states[0])
    for state in states[1:n]:
        store.save_state(chat_id, *state[:2])
    store.close()
    segments = statefile.segment_paths(tmp_path / "state", chat_id)
    assert segments
    return tmp_path, chat_id, states[n - 1], max(segments, key=lambda p: int(p.name.split(".")[1]))


@pytest.mark.parametrize("damage", ["truncated", "bit-flip", "symlink", "foreign", "missing"])
def test_a_bad_segment_is_one_line_and_the_ledger_rebuilds_the_cache(smollm, segmented, damage, tmp_path):
    root, chat_id, (state, _, _), segment = segmented
    if damage == "truncated":
        os.truncate(segment, segment.stat().st_size // 2)
    elif damage == "bit-flip":
        data = bytearray(segment.read_bytes())
        data[len(data) * 3 // 4] ^= 0x10
        segment.write_bytes(bytes(data))
    elif damage == "symlink":
        aside = tmp_path / "aside"
        segment.rename(aside)
        segment.symlink_to(aside)
    elif damage == "foreign":  # intact, but it names another file as the one it extends
        data = bytearray(segment.read_bytes())
        at = re.search(rb'prev\\?": \\?"([0-9a-f])', data).start(1)
        data[at] = ord("0") if data[at] != ord("0") else ord("1")
        segment.unlink()
        write_atomic(segment, bytes(data))
    else:
        segment.unlink()
    store = Store(root)
    chat = Chat(smollm, KILL)
    notices = store.open(chat_id, chat)
    assert len(notices) == 1 and "rebuilt the KV cache from the ledger" in notices[0], notices
    assert "segment" in notices[0] or damage == "missing"
    assert ("does not extend" in notices[0]) == (damage == "foreign")
    assert chat.tokens == state.tokens and chat.messages == state.messages
    say(chat, "Name a river.")
    store.save(chat_id, chat)  # a new base: the bad file is gone
    assert store.last_save["kind"] == "base"
    store.close()
    again, notices = reopen(root, chat_id, smollm, KILL)
    assert notices == [] and again.tokens == chat.tokens and same_cache(again, chat)


def test_a_state_file_from_before_segments_resumes_and_gains_segments(smollm, saves, tmp_path):
    """A chat saved by an earlier sinkchat (one state file, rewritten whole each save) opens exactly,
    and its next save appends a segment to that file."""
    from safetensors.torch import save

    _, states, _ = saves
    store = Store(tmp_path)
    chat_id = store.create_state(*states[0])
    store.save_state(chat_id, *states[1][:2])
    snap = store.transcript(chat_id)
    store.close()
    snap = Snapshot(snap.tokens, snap.messages, snap.meta, states[1][0].fingerprint, snap.settings, 2)
    tensors = {k: v.contiguous() for k, v in states[1][1].items()}  # the earlier writer, verbatim:
    tensors["ledger"] = torch.tensor(snap.tokens, dtype=torch.int64)
    header = {**snap.header(), "ledger_sum": snap.checksum(), "tensor_sum": statefile.tensor_sum(tensors)}
    for segment in statefile.segment_paths(tmp_path / "state", chat_id):
        segment.unlink()
    store.state_path(chat_id).write_bytes(save(tensors, metadata={"sinkchat": json.dumps(header)}))

    twin = Chat(smollm, KILL)
    twin.restore(*states[1][:2])
    store = Store(tmp_path)
    chat = Chat(smollm, KILL)
    assert store.open(chat_id, chat) == [] and same_cache(chat, twin)
    say(chat, QUESTIONS[2])
    store.save(chat_id, chat)
    assert store.last_save["kind"] == "segment"
    store.close()
    again, notices = reopen(tmp_path, chat_id, smollm, KILL)
    assert notices == [] and same_cache(again, chat)


# -- pins, rollbacks and turn eviction between segment saves -----------------------------------

STEER = GREEDY.replace(sinks=4, window=64, block=8, max_new_tokens=6, pin_max=24)


def resumes_exactly(root, chat_id: int, chat: Chat, loaded, settings) -> Chat:
    """The chat reopened from its files: the same transcript, ledger and cache, bit for bit."""
    again, notices = reopen(root, chat_id, loaded, settings)
    assert notices == [] and again.tokens == chat.tokens and again.messages == chat.messages
    assert same_cache(again, chat)
    return again


@pytest.mark.parametrize("evict", ["tokens", "turns"])
def test_resume_is_exact_after_pins_rollbacks_and_unpins(smollm, tmp_path, evict):
    """Saved after every turn (segments where they can describe the change): a pinned message the
    window moved past, a regenerated reply (from the checkpoint, and without it), an edited turn and
    an unpin each resume to the same cache, and the next greedy reply is the uninterrupted chat's."""
    settings = STEER.replace(evict=evict)
    store, chat = Store(tmp_path), Chat(smollm, settings)
    say(chat, QUESTIONS[0])
    chat_id = store.create(chat, settings)
    kinds = []

    def turn(text: str) -> str:
        reply = say(chat, text)
        store.save(chat_id, chat)
        kinds.append((store.last_save["kind"], bool(chat.cache.parked)))
        resumes_exactly(tmp_path, chat_id, chat, smollm, settings)
        return reply

    turn("My name is Ada and my cat is called Pixel.")
    assert "pinned #4 you" in chat.pin(3)
    for question in QUESTIONS[1:4]:
        turn(question)
    assert chat.cache.parked and ("segment", True) in kinds  # segments written while the pin was parked
    again = resumes_exactly(tmp_path, chat_id, chat, smollm, settings)
    first = turn("What is my cat called?")
    assert say(again, "What is my cat called?") == first and again.tokens == chat.tokens

    tokens = list(chat.tokens)
    assert chat.cache.checkpoint.stash  # the reply evicted tokens held before it: going back needs their copies
    again = resumes_exactly(tmp_path, chat_id, chat, smollm, settings)
    assert again.rollback() is None and say(again, "What is my cat called?") == first  # regenerated after a resume
    assert chat.rollback() is None and turn("What is my cat called?") == first and chat.tokens == tokens
    chat.cache.checkpoint = None  # going back without the copies: cut off or rebuilt from the ledger, then saved
    chat.rollback()
    turn("What is my cat called?")
    chat.rollback()
    turn("What is my dog called?")
    again = resumes_exactly(tmp_path, chat_id, chat, smollm, settings)
    assert say(again, QUESTIONS[4]) == turn(QUESTIONS[4]) and again.tokens == chat.tokens

    assert "unpinned #4 you" in chat.unpin(3)
    for question in QUESTIONS[5:7]:
        turn(question)
    assert not chat.cache.parked and chat.cache.pins == []  # the unpinned message left
    again = resumes_exactly(tmp_path, chat_id, chat, smollm, settings)
    assert say(again, QUESTIONS[7]) == say(chat, QUESTIONS[7]) and again.tokens == chat.tokens
    assert kinds.count(("segment", False)) >= 2 and kinds.count(("segment", True)) >= 2, kinds
    store.close()
