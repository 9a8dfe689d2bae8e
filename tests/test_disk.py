"""Disks that say no and files that must not be destroyed, without a model: read-only data dirs,
a full disk, planted symbolic links, modes, overwrites, damaged rows and saved numbers."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys

import pytest

from _helpers import ROOT, file_size_limit, one_line_error, run_cli, stored_chat, without_root_override
from sinkchat import cli
from sinkchat.errors import SinkchatError
from sinkchat.ledger import ChatState, Message
from sinkchat.settings import Settings
from sinkchat.store import SaveError, Snapshot, Store


def files(root) -> dict:
    """Every file under ``root`` and its bytes (what must not change)."""
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def read_only(tmp_path):
    """A data dir with one chat, then made read-only all through (as on a read-only file system)."""
    root = tmp_path / "data"
    stored_chat(root)
    paths = [root, *root.rglob("*")]
    for p in paths:
        p.chmod(0o500 if p.is_dir() else 0o400)
    yield root
    for p in paths:
        p.chmod(0o700 if p.is_dir() else 0o600)


def test_every_chats_command_on_a_read_only_disk_reads_or_says_one_line(read_only, tmp_path):
    before = files(read_only)
    d, ro = ["--data-dir", str(read_only)], without_root_override()
    listed = run_cli("chats", "list", *d, prefix=ro)
    assert listed.returncode == 0 and "Tell me about Paris." in listed.stdout, listed.stderr
    shown = run_cli("chats", "show", *d, prefix=ro)
    assert shown.returncode == 0 and "It is big." in shown.stdout, shown.stderr
    exported = run_cli("chats", "export", "1", "-f", "json", *d, prefix=ro)
    assert exported.returncode == 0 and json.loads(exported.stdout)["messages"][1]["content"] == "It is big."
    one_line_error(run_cli("chats", "rename", "1", "Paris", *d, prefix=ro), "cannot rename chat 1")
    one_line_error(run_cli("chats", "delete", "1", "--yes", *d, prefix=ro), "cannot lock chat 1")
    one_line_error(run_cli("chats", "export", "1", "-o", str(read_only / "x.md"), *d, prefix=ro),
                   f"cannot write {read_only / 'x.md'}")
    assert files(read_only) == before


def test_a_new_data_dir_that_cannot_be_made_is_one_line(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir(mode=0o500)
    listed = run_cli("chats", "list", "--data-dir", str(parent / "data"), prefix=without_root_override())
    assert listed.returncode == 0 and listed.stdout.startswith("no saved chats (no data directory at"), listed.stderr
    made = subprocess.run([*without_root_override(), sys.executable, "-c",
                           f"from sinkchat.store import Store; Store({str(parent / 'data')!r})"],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert made.returncode != 0 and "cannot create the data directory" in made.stderr.splitlines()[-1]
    assert list(parent.iterdir()) == []


def test_a_full_disk_at_the_first_save_leaves_no_chat(tmp_path):
    """The kernel refuses the bytes (a file-size limit, like a full disk): the first save's transaction
    fails and leaves nothing behind."""
    store = Store(tmp_path)
    state = ChatState(list(range(100, 120)), [Message("user", "hi", 0, 10), Message("assistant", "yo", 10, 20)],
                      {"sinks": 4, "window": 16, "block": 1, "n_sink": 4, "n_win": 16, "seen": 20, "base": 0,
                       "evictions": []}, {"model": "m"})
    with file_size_limit(256), pytest.raises(SaveError, match="could not save the chat .*goes on in memory"):
        store.create_state(state, {}, Settings())
    assert store.list() == [] and not store.holds(1)
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "chats.db"]  # no state, temp or lock
    assert store.create_state(state, {}, Settings()) == 1  # space again: the chat is made whole


def test_planted_links_are_never_followed(tmp_path, monkeypatch, capsys):
    root = tmp_path / "data"
    chat_id = stored_chat(root)
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    lock = root / "locks" / f"{chat_id}.lock"
    lock.unlink()
    lock.symlink_to(victim)
    one_line_error(run_cli("chats", "delete", "1", "--yes", "--data-dir", str(root)), "symbolic link")
    monkeypatch.setattr(sys, "argv", ["sinkchat", "--plain", "--resume", "--data-dir", str(root)])
    with pytest.raises(SystemExit) as exit_info:
        cli.run()
    assert exit_info.value.code == 2 and "symbolic link" in capsys.readouterr().err
    lock.unlink()

    state = root / "state" / f"{chat_id}.safetensors"
    state.unlink()
    state.symlink_to(victim)
    store = Store(root)
    store.lock(chat_id)
    t = store.transcript(chat_id)  # the rows are read; the link is not
    with pytest.raises(SaveError, match="symbolic link"):
        store.save_state(chat_id, ChatState(t.tokens, t.messages, t.meta, {"model": "m"}), {})
    store.close()

    out = tmp_path / "out.md"
    out.symlink_to(victim)
    for force in ([], ["--force"]):
        proc = run_cli("chats", "export", "1", "-o", str(out), *force, "--data-dir", str(root))
        one_line_error(proc, str(out))
    db = tmp_path / "other"
    db.mkdir()
    (db / "chats.db").symlink_to(victim)
    one_line_error(run_cli("chats", "list", "--data-dir", str(db)), "symbolic link")
    assert victim.read_text() == "keep me"


def test_modes_files_0600_and_a_users_directory_keeps_its_mode(tmp_path):
    root = tmp_path / "data"
    root.mkdir(mode=0o755)
    root.chmod(0o755)
    chat_id = stored_chat(root)
    export = tmp_path / "chat.md"
    assert run_cli("chats", "export", "-o", str(export), "--data-dir", str(root)).returncode == 0
    assert stat.S_IMODE(root.stat().st_mode) == 0o755  # sinkchat did not make it; it keeps its mode
    for d in (root / "state", root / "locks"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    for f in (root / "chats.db", root / "state" / f"{chat_id}.safetensors", root / "locks" / f"{chat_id}.lock",
              export):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


def test_export_never_overwrites_without_force(tmp_path):
    root = tmp_path / "data"
    stored_chat(root)
    notes = tmp_path / "notes.md"
    notes.write_text("my notes")
    one_line_error(run_cli("chats", "export", "1", "-o", str(notes), "--data-dir", str(root)),
                   "exists; pass --force")
    assert notes.read_text() == "my notes"
    assert run_cli("chats", "export", "1", "-o", str(notes), "--force", "--data-dir", str(root)).returncode == 0
    assert "It is big." in notes.read_text()


def test_rows_that_are_not_utf8_still_list_and_show(tmp_path):
    root = tmp_path / "data"
    stored_chat(root)
    with sqlite3.connect(root / "chats.db") as db:
        db.execute("UPDATE chats SET title = CAST(x'636166e92021' AS TEXT)")
    listed = run_cli("chats", "list", "--data-dir", str(root))
    assert listed.returncode == 0 and "caf\ufffd" in listed.stdout, listed.stderr
    assert run_cli("chats", "show", "--data-dir", str(root)).returncode == 0


def test_saved_numbers_out_of_range_are_refused_not_used(tmp_path):
    """A copy with a valid checksum but counters no cache can hold is damaged: the other copy is used,
    and with neither the chat is refused in one line, nothing changed."""
    root = tmp_path / "data"
    chat_id = stored_chat(root)
    store = Store(root)
    snap = store.transcript(chat_id)
    bad = Snapshot(snap.tokens, snap.messages, {**snap.meta, "n_win": 99}, {"model": "m", "tokenizer": "t"},
                   snap.settings, 5)
    store.db.write(chat_id, bad, snap.meta, len(snap.tokens))
    t = store.transcript(chat_id)  # the state file is intact: it wins
    assert t.meta["n_win"] == 6 and "cache counters are out of range" in t.notices[0]
    (root / "state" / f"{chat_id}.safetensors").unlink()
    with pytest.raises(SinkchatError, match="out of range.*state file is missing; nothing was changed"):
        store.transcript(chat_id)


def test_tampered_saved_settings_name_the_chat(tmp_path, monkeypatch, capsys):
    root = tmp_path / "data"
    stored_chat(root)
    with sqlite3.connect(root / "chats.db") as db:
        db.execute("""UPDATE chats SET settings = '{"window": "64", "model": "smollm2-135m"}'""")
    monkeypatch.setattr(sys, "argv", ["sinkchat", "--plain", "--resume", "--data-dir", str(root)])
    with pytest.raises(SystemExit) as exit_info:
        cli.run()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "chat 1's saved settings: window must be an integer (got \"64\")" in err


@pytest.mark.parametrize("env, args, message", [
    ({"SINKCHAT_DATA_DIR": "{file}"}, ["chats", "list"], "(from SINKCHAT_DATA_DIR) is not a directory"),
    ({}, ["chats", "list", "--data-dir", "{file}"], "(from --data-dir) is not a directory"),
    ({"SINKCHAT_CONFIG_DIR": "{file}"}, ["--plain", "--window", "0"], "--window must be 1 or more"),
])
def test_environment_and_paths_that_are_not_what_they_should_be(tmp_path, env, args, message):
    file = tmp_path / "a-file"
    file.write_text("x")
    fill = lambda s: s.replace("{file}", str(file))
    one_line_error(run_cli(*map(fill, args), env={k: fill(v) for k, v in env.items()}), message)


def test_a_malformed_fault_variable_is_ignored(tmp_path, monkeypatch):
    for value in ("state-temp@x", "state-temp@", "@@", "db-mid@1@2"):
        monkeypatch.setenv("SINKCHAT_FAULT", value)
        assert stored_chat(tmp_path / value.replace("@", "_")) == 1


@pytest.mark.parametrize("args", [["chats", "list"], ["--plain"], ["--resume"]])
def test_a_data_dir_sinkchat_may_not_look_into_is_named(tmp_path, args):
    """Its parent may not be searched (mode 0600): the error names the data directory, not "the
    output"; nothing loads."""
    parent = tmp_path / "private"
    (parent / "data").mkdir(parents=True)
    parent.chmod(0o600)
    try:
        proc = run_cli(*args, "--data-dir", str(parent / "data"), input="Hi\n", prefix=without_root_override())
    finally:
        parent.chmod(0o700)
    one_line_error(proc, f"cannot use the data directory {parent / 'data'} (from --data-dir): Permission denied")


@pytest.mark.parametrize("replace", ["removed", "emptied", "another database"])
def test_a_replaced_database_never_gives_a_new_chat_the_id_of_files_still_there(tmp_path, replace):
    root = tmp_path / "data"
    assert stored_chat(root, "Tell me about Paris.") == 1
    stored_chat(root, "Tell me about Rome.")
    (root / "locks" / "2.lock").unlink()  # chat 2 is known by its state file alone
    before = files(root / "state")
    db = root / "chats.db"
    if replace == "removed":
        db.unlink()
    elif replace == "emptied":
        db.write_bytes(b"")
    else:
        Store(tmp_path / "other").close()
        db.write_bytes((tmp_path / "other" / "chats.db").read_bytes())
    assert stored_chat(root, "Tell me about Oslo.") == 3
    assert {p: b for p, b in files(root / "state").items() if p in before} == before  # nothing written over
    assert Store(root).transcript(3).messages[0].content == "Tell me about Oslo."


def test_a_first_save_never_writes_over_a_state_file_it_did_not_make(tmp_path, monkeypatch):
    """Even a file that appears after the ids were chosen (another program, a restore) is kept: the
    chat is saved (its messages), its K/V is not, and the next save writes its own."""
    from sinkchat.store import statefile

    root = tmp_path / "data"
    stranger = root / "state" / "1.safetensors"
    real = statefile.write_state

    def planted(path, *args, **kwargs):  # the file appears just before the first save writes its own
        stranger.write_bytes(b"not sinkchat's")
        return real(path, *args, **kwargs)

    monkeypatch.setattr("sinkchat.store.chats.write_state", planted)
    with pytest.raises(SaveError, match="saved chat 1's messages but not its KV cache") as failed:
        stored_chat(root)
    assert failed.value.chat_id == 1 and stranger.read_bytes() == b"not sinkchat's"
    assert [c.title for c in Store(root).list()] == ["Tell me about Paris."]


SAVE_FIRST = """
import sys
sys.path.insert(0, "tests")
from _helpers import stored_chat
stored_chat(sys.argv[1])
"""


@pytest.mark.parametrize("point", ["ledger-committed", "state-temp", "state-renamed"])
def test_a_kill_during_the_first_save_keeps_the_first_turn(tmp_path, point):
    """The ledger is committed first (real SIGKILL at each point after it): the chat is there with its
    first turn; its K/V is rebuilt from the ledger when it is opened (tests/test_faults.py)."""
    proc = subprocess.run([sys.executable, "-c", SAVE_FIRST, str(tmp_path)], cwd=ROOT, capture_output=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "SINKCHAT_FAULT": point}, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    store = Store(tmp_path)
    [info] = store.list()
    t = store.transcript(info.id)
    assert [(m.role, m.content) for m in t.messages] == [("user", "Tell me about Paris."), ("assistant", "It is big.")]
    assert len(t.tokens) == 20


def test_modes_are_made_private_again_when_the_store_opens(tmp_path):
    """A data dir copied or restored with a umask of 022: the database and sinkchat's own directories
    lose what others could read (the README's 0600/0700); the user's data dir keeps its mode."""
    root = tmp_path / "data"
    stored_chat(root)
    root.chmod(0o755)
    for path, mode in ((root / "chats.db", 0o644), (root / "state", 0o755), (root / "locks", 0o755)):
        path.chmod(mode)
    Store(root).close()
    assert [stat.S_IMODE(p.stat().st_mode) for p in (root, root / "chats.db", root / "state", root / "locks")] == [
        0o755, 0o600, 0o700, 0o700]
