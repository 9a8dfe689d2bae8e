"""The chat database without a model: schema migrations, foreign files, search, and the ledger's kinds."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import stat
from array import array

import pytest
from hypothesis import given
from hypothesis import strategies as st

from _helpers import one_line_error, run_cli, stored_chat
from sinkchat.errors import SinkchatError
from sinkchat.ledger import ChatState, Message
from sinkchat.settings import Settings
from sinkchat.store import NoChats, Refused, Snapshot, Store
from sinkchat.store.db import VERSION
from sinkchat.store.statefile import unchanged

# The schema as the first sinkchat release wrote it (no user_version), kept verbatim.
FIRST_SCHEMA = """
CREATE TABLE IF NOT EXISTS chats (
    id INTEGER PRIMARY KEY AUTOINCREMENT, title TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL,
    settings TEXT NOT NULL, fingerprint TEXT NOT NULL, cache_meta TEXT NOT NULL, n_tokens INTEGER NOT NULL,
    gen INTEGER NOT NULL, checksum TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    chat_id INTEGER NOT NULL, idx INTEGER NOT NULL, role TEXT NOT NULL, content TEXT NOT NULL,
    first_tok INTEGER NOT NULL, end_tok INTEGER NOT NULL, PRIMARY KEY (chat_id, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tokens (
    chat_id INTEGER NOT NULL, pos INTEGER NOT NULL, token INTEGER NOT NULL, msg INTEGER NOT NULL,
    kind TEXT NOT NULL, PRIMARY KEY (chat_id, pos)
) WITHOUT ROWID;
"""


def meta(sinks=4, window=8, n_sink=4, n_win=6, seen=20, evictions=((4, 14),)) -> dict:
    return {"sinks": sinks, "window": window, "block": 1, "n_sink": n_sink, "n_win": n_win, "seen": seen,
            "base": 0, "evictions": [list(e) for e in evictions]}


def state(n=20, **kw) -> ChatState:
    msgs = [Message("user", "Tell me about 100% of Paris_", 0, 10), Message("assistant", "It is big.", 10, n)]
    return ChatState(list(range(100, 100 + n)), msgs, meta(seen=n, **kw), {"model": "m", "tokenizer": "t"})


def kinds(store: Store, chat_id: int) -> str:
    return "".join(r["kind"] for r in store.db.db.execute("SELECT kind FROM tokens WHERE chat_id=? ORDER BY pos",
                                                          (chat_id,)))


def first_release_db(path) -> None:
    """A chats.db as the first release left it: its schema, one chat, rows with a valid checksum."""
    snap = Snapshot.of(state(), {"model": "smollm2-135m"}, 1)
    db = sqlite3.connect(path)
    db.executescript(FIRST_SCHEMA)
    db.execute("INSERT INTO chats VALUES (1, 'old chat', 1.0, 2.0, ?, ?, ?, 20, 1, ?)",
               (json.dumps(snap.settings), json.dumps(snap.fingerprint), json.dumps(snap.meta), snap.checksum()))
    db.executemany("INSERT INTO messages VALUES (1, ?, ?, ?, ?, ?)",
                   [(i, m.role, m.content, m.start, m.end) for i, m in enumerate(snap.messages)])
    db.executemany("INSERT INTO tokens VALUES (1, ?, ?, 0, 'w')", list(enumerate(snap.tokens)))
    db.commit()
    db.close()


def test_a_database_of_the_first_schema_upgrades_and_reads(tmp_path):
    first_release_db(tmp_path / "chats.db")
    store = Store(tmp_path)
    assert store.db.db.execute("PRAGMA user_version").fetchone()[0] == VERSION
    [info] = store.list()
    assert (info.id, info.title, info.model, info.n_tokens, info.n_messages) == (1, "old chat", "smollm2-135m", 20, 2)
    t = store.transcript(1)
    assert [m.content for m in t.messages] == ["Tell me about 100% of Paris_", "It is big."]
    assert t.notices == [] or "state file" in t.notices[0]  # its rows are intact (no state file here)
    assert all(m.note == "" for m in t.messages)


def test_a_half_created_database_is_completed(tmp_path):
    db = sqlite3.connect(tmp_path / "chats.db")
    db.executescript(FIRST_SCHEMA.split(";")[0])  # killed after the first table
    db.close()
    store = Store(tmp_path)
    chat_id = store.create_state(state(), {}, Settings())
    assert store.transcript(chat_id).messages[1].content == "It is big."


def test_newer_and_foreign_files_are_refused_in_one_line(tmp_path):
    (tmp_path / "a").mkdir()
    db = sqlite3.connect(tmp_path / "a" / "chats.db")
    db.execute(f"PRAGMA user_version = {VERSION + 1}")
    db.close()
    with pytest.raises(SinkchatError, match="written by a newer sinkchat"):
        Store(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "chats.db").write_bytes(b"this is not sqlite, just text " * 40)
    with pytest.raises(SinkchatError, match="cannot be used as sinkchat's chat store") as err:
        Store(tmp_path / "b")
    assert "\n" not in str(err.value)


FOREIGN = {
    "another program's tables": ["CREATE TABLE notes (body TEXT)"],
    "a table named chats of other columns": ["CREATE TABLE chats (x)"],
    "sinkchat's tables and another's": [*FIRST_SCHEMA.split(";")[:3], "CREATE TABLE notes (body TEXT)"],
    "a schema version and tables of other columns": ["CREATE TABLE chats (x)", "CREATE TABLE messages (y)",
                                                     "CREATE TABLE tokens (z)", "PRAGMA user_version = 2"],
    "a schema version and none of sinkchat's tables": ["CREATE TABLE notes (body TEXT)", "PRAGMA user_version = 1"],
}


@pytest.mark.parametrize("statements", FOREIGN.values(), ids=FOREIGN.keys())
def test_a_database_that_is_not_sinkchats_is_refused_and_never_written(tmp_path, statements):
    """Another program's SQLite file at chats.db is refused by every command, in one line, exit 2:
    no table is added, no schema version set, no mode changed (not even by a half-done migration)."""
    path = tmp_path / "chats.db"
    db = sqlite3.connect(path)
    for statement in statements:
        db.execute(statement)
    db.commit()
    db.close()
    path.chmod(0o644)
    before = path.read_bytes()
    with pytest.raises(Refused, match="is not sinkchat's chat store"):
        Store(tmp_path)
    for args in (["chats", "list"], ["chats", "show"], ["chats", "export", "1"], ["chats", "rename", "1", "x"],
                 ["chats", "delete", "1", "--yes"], ["--plain"], ["--plain", "--resume"], ["--plain", "--resume", "1"]):
        proc = run_cli(*args, "--data-dir", str(tmp_path), input="hello\n")  # refused before a model loads
        one_line_error(proc, f"{path} is not sinkchat's chat store", "it was left as it is")
        assert proc.stdout == ""
    assert path.read_bytes() == before and stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chats.db"]


def test_commands_that_only_read_create_no_data_dir(tmp_path):
    """`chats list` where there is no data dir says so and makes none; show, export, rename, delete
    and --resume refuse in one line and make none either; an empty data dir gets no chats.db."""
    missing = tmp_path / "nothing" / "here"
    listed = run_cli("chats", "list", "--data-dir", str(missing))
    assert listed.returncode == 0 and listed.stdout == f"no saved chats (no data directory at {missing})\n"
    for args in (["chats", "show"], ["chats", "show", "1"], ["chats", "export", "1"],
                 ["chats", "rename", "1", "x"], ["chats", "delete", "1", "--yes"], ["--plain", "--resume"]):
        one_line_error(run_cli(*args, "--data-dir", str(missing), input="hello\n"),
                       f"no saved chats (no data directory at {missing})")
    assert list(tmp_path.iterdir()) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli("chats", "list", "--data-dir", str(empty)).stdout == f"no saved chats in {empty}\n"
    one_line_error(run_cli("chats", "show", "--data-dir", str(empty)), f"no saved chats in {empty}")
    with pytest.raises(NoChats):
        Store(empty, create=False)
    assert list(empty.iterdir()) == []


@pytest.mark.parametrize("folder", ["state", "locks"])
def test_a_linked_state_or_locks_folder_is_refused_like_a_linked_file(tmp_path, folder):
    """sinkchat writes its lock and state files only into folders of its own: a symbolic link at
    state/ or locks/ is refused in one line, and the folder it points to gets nothing."""
    data = tmp_path / "data"
    stored_chat(data)
    elsewhere = tmp_path / "elsewhere"
    os.replace(data / folder, elsewhere)
    (data / folder).symlink_to(elsewhere)
    before = {p.name: p.read_bytes() for p in elsewhere.iterdir()}
    for args in (["chats", "list"], ["chats", "show", "1"], ["chats", "delete", "1", "--yes"], ["--plain"],
                 ["--plain", "--resume", "1"]):
        one_line_error(run_cli(*args, "--data-dir", str(data), input="hello\n"),
                       f"{data / folder} is a symbolic link; sinkchat does not follow links")
    assert {p.name: p.read_bytes() for p in elsewhere.iterdir()} == before
    with pytest.raises(Refused, match="symbolic link"):
        Store(data)


def test_search_is_literal_text(tmp_path):
    store = Store(tmp_path)
    chat_id = store.create_state(state(), {}, Settings())
    assert [c.id for c in store.list("100%")] == [chat_id]
    assert store.list("100% of London") == [] and store.list("x%y") == []
    assert [c.id for c in store.list("Paris_")] == [chat_id] and store.list("Pari__") == []


def test_ledger_kinds_follow_the_cache_when_sinks_change(tmp_path):
    """Saved with 2 sinks, then with 4: tokens 2 and 3 are sinks again, not left marked evicted."""
    store = Store(tmp_path)
    chat_id = store.create_state(state(sinks=2, n_sink=2, evictions=((2, 14),)), {}, Settings())
    assert kinds(store, chat_id) == "ss" + "e" * 12 + "w" * 6
    store.save_state(chat_id, state(n=22, sinks=4, n_sink=4, evictions=((4, 16),)), {})
    assert kinds(store, chat_id) == "ssss" + "e" * 12 + "w" * 6


def test_a_save_keeps_the_settings_the_chat_runs_with(tmp_path):
    """Settings changed at a resume (flags over the saved ones) are saved with the next turn; a save
    that names none keeps the saved ones."""
    store = Store(tmp_path)
    chat_id = store.create_state(state(), {}, Settings(window=8))
    store.save_state(chat_id, state(n=22), {}, Settings(window=8, temperature=0))
    assert store.settings(chat_id)["temperature"] == 0
    store.save_state(chat_id, state(n=24), {})
    assert store.settings(chat_id) == Settings(window=8, temperature=0).saved()
    assert store.transcript(chat_id).settings == Settings(window=8, temperature=0).saved()


def test_rename_and_delete(tmp_path):
    store = Store(tmp_path)
    chat_id = store.create_state(state(), {}, Settings())
    store.rename(chat_id, "  Trip \n to   Paris ")
    assert store.list()[0].title == "Trip to Paris"
    with pytest.raises(SinkchatError, match="cannot be empty"):
        store.rename(chat_id, " \n ")
    store.delete(chat_id)
    assert store.list() == [] and not store.state_path(chat_id).exists()
    with pytest.raises(SinkchatError, match=f"no chat {chat_id}"):
        store.transcript(chat_id)


def rows(store: Store, chat_id: int) -> list[int]:
    return [r["token"] for r in store.db.db.execute("SELECT token FROM tokens WHERE chat_id=? ORDER BY pos",
                                                    (chat_id,))]


def test_a_save_after_a_rollback_rewrites_the_ledger_from_the_cut(tmp_path):
    """Saved at 20 tokens; the last turn is taken back to token 10 and replaced, first by a longer
    one, then (another rollback) by a shorter one: the rows follow, and the chat reads back intact."""
    store = Store(tmp_path)
    chat_id = store.create_state(state(), {}, Settings())
    longer = ChatState(list(range(100, 110)) + list(range(500, 515)),
                       [Message("user", "Tell me about 100% of Paris_", 0, 10), Message("assistant", "Other.", 10, 25)],
                       {**meta(n_win=8, seen=25, evictions=((4, 17),)), "revision": 1}, {"model": "m", "tokenizer": "t"},
                       cuts=[(1, 10)])
    store.save_state(chat_id, longer, {})
    assert rows(store, chat_id) == longer.tokens and kinds(store, chat_id) == "ssss" + "e" * 13 + "w" * 8
    shorter = ChatState(list(range(100, 110)) + [700, 701], [Message("user", "Tell me about 100% of Paris_", 0, 10),
                                                             Message("assistant", "No.", 10, 12)],
                        {**meta(n_win=8, seen=12, evictions=()), "revision": 2}, {"model": "m", "tokenizer": "t"},
                        cuts=[(1, 10), (2, 10)])
    store.save_state(chat_id, shorter, {})
    assert rows(store, chat_id) == shorter.tokens
    t = store.transcript(chat_id)
    assert t.tokens == shorter.tokens and t.messages[1].content == "No." and t.notices == []


def test_ledger_kinds_mark_pinned_tokens_and_follow_an_unpin(tmp_path):
    store = Store(tmp_path)
    pinned = state(n=20, n_win=6, evictions=((4, 5), (8, 14)))
    pinned.meta.update(parked=[[5, 8, 5]], pins=[[5, 8]])
    chat_id = store.create_state(pinned, {}, Settings())
    assert kinds(store, chat_id) == "ssss" + "e" + "ppp" + "e" * 6 + "w" * 6
    store.save_state(chat_id, state(n=22, n_win=6, evictions=((4, 16),)), {})  # unpinned, then evicted
    assert kinds(store, chat_id) == "ssss" + "e" * 12 + "w" * 6


messages_st = st.lists(st.tuples(st.sampled_from(["user", "assistant"]), st.text(max_size=6),
                                 st.sampled_from(["", "stopped"])), max_size=6)


@given(messages_st, messages_st, st.integers(0, 6), st.lists(st.integers(0, 99), max_size=12),
       st.lists(st.integers(0, 99), max_size=12), st.integers(0, 12))
def test_a_checksum_that_reuses_the_last_save_equals_one_from_scratch(old_rows, new_rows, keep, old_toks,
                                                                      new_toks, cut):
    """A save's checksum reuses what the save before it hashed (the messages both share, the ledger
    it extends); whatever changed in between, it is the checksum of the snapshot computed anew."""

    def messages(rows, offset=0):
        return [Message(role, text, offset + i, offset + i + 1, note) for i, (role, text, note) in enumerate(rows)]

    old = Snapshot(old_toks, messages(old_rows), meta(), {"model": "m"}, {"window": 8}, 1)
    old.checksum()
    shared = old.messages[:keep]
    tokens = old_toks[: min(cut, len(old_toks))] + new_toks
    new = Snapshot(tokens, shared + messages(new_rows, len(shared)), meta(seen=21), {"model": "m"}, {"window": 8}, 2)
    new.follow(old, unchanged(old.messages, new.messages))
    fresh = Snapshot(list(tokens), [Message(*m.row()) for m in new.messages], meta(seen=21), {"model": "m"},
                     {"window": 8}, 2)
    assert new.checksum() == fresh.checksum()
    reference = json.dumps([fresh.settings, fresh.fingerprint, fresh.meta, [m.row() for m in fresh.messages], 2],
                           sort_keys=True)  # the definition older saves were checked with
    assert fresh.checksum() == hashlib.sha256(reference.encode() + array("q", tokens).tobytes()).hexdigest()
