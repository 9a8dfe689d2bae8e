"""Chats on disk: exact resume, every fault reproduced for real (kill -9, damaged files, read-only
and full disks, a second process), fingerprint mismatches, export round-trips, the resume bench."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys

import pytest
import torch

from _helpers import ROOT, file_size_limit, run_cli, say, without_root_override
from sinkchat.engine import Chat, Evicted
from sinkchat.errors import SinkchatError
from sinkchat.export import to_json, to_markdown
from sinkchat.ledger import ROLE_NAME, merge_spans
from sinkchat.settings import Settings
from sinkchat.store import Autosave, ChatLocked, SaveError, Store

SMALL = Settings(sinks=4, window=48, block=8, max_new_tokens=12, temperature=0, repetition_penalty=1.0)
CLI_FLAGS = ["--plain", "--temperature", "0", "--window", "48", "--block", "8", "--max-new-tokens", "12"]
QUESTIONS = ["Tell me about Paris.", "And London?", "What about Rome?"]


def saved_chat(loaded, store: Store, turns=QUESTIONS[:2], settings=SMALL) -> tuple[int, Chat]:
    """A chat whose window already evicted tokens when it was saved."""
    chat = Chat(loaded, settings)
    say(chat, turns[0])
    chat_id = store.create(chat, settings)
    for text in turns[1:]:
        say(chat, text)
        store.save(chat_id, chat)
    if len(turns) > 1:
        assert chat.cache.evictions, "the test needs a window that has evicted before the save"
    return chat_id, chat


def open_chat(store: Store, chat_id: int, loaded, settings=SMALL, read_only: bool = False):
    chat = Chat(loaded, settings)
    return chat, store.open(chat_id, chat, read_only=read_only)


def reopen(store: Store, chat_id: int, loaded, settings=SMALL):
    store.unlock(chat_id)  # as if the first process had quit
    return open_chat(Store(store.root), chat_id, loaded, settings)


def test_resume_is_exact_after_evictions(smollm):
    store = Store()
    chat_id, chat = saved_chat(smollm, store)
    chat2, notices = reopen(store, chat_id, smollm)
    assert notices == []
    assert chat2.tokens == chat.tokens and chat2.messages == chat.messages
    assert chat2.occupancy() == chat.occupancy()
    n = len(chat.tokens)
    assert say(chat2, QUESTIONS[2]) == say(chat, QUESTIONS[2])
    assert chat2.tokens[n:] == chat.tokens[n:]  # token for token, evictions included
    assert chat2.cache.evictions == chat.cache.evictions


def test_files_are_private(smollm):
    store = Store()
    chat_id, _ = saved_chat(smollm, store, turns=QUESTIONS[:1])
    assert stat.S_IMODE(store.root.stat().st_mode) == 0o700
    for path in (store.db_path, store.state_path(chat_id)):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


@pytest.mark.model  # a subprocess loads the bundled model
def test_cli_resume_continues_token_for_token(tmp_path):
    """`sinkchat --resume` in a new process gives the reply the uninterrupted chat gave."""
    whole = run_cli(*CLI_FLAGS, "--data-dir", str(tmp_path / "a"), input="\n".join(QUESTIONS[:2]) + "\n")
    assert whole.returncode == 0, whole.stderr
    first = run_cli(*CLI_FLAGS, "--data-dir", str(tmp_path / "b"), input=QUESTIONS[0] + "\n")
    resumed = run_cli("--plain", "--resume", "--data-dir", str(tmp_path / "b"), input=QUESTIONS[1] + "\n")
    assert resumed.returncode == 0, resumed.stderr
    assert "evicted 0 none" not in whole.stdout.splitlines()[-1]  # eviction happened in the second turn
    assert first.stdout + resumed.stdout == whole.stdout  # replies and [cache] lines alike
    listed = run_cli("chats", "list", "--data-dir", str(tmp_path / "b"))
    assert QUESTIONS[0] in listed.stdout and listed.stdout.count("\n") == 2  # header + one chat


def _plain(data_dir, *extra, env=None):
    return subprocess.Popen(
        [sys.executable, "-m", "sinkchat", *CLI_FLAGS, "--data-dir", str(data_dir), *extra],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )


def _export(data_dir, *ids) -> tuple[dict, str]:
    out = run_cli("chats", "export", *ids, "--format", "json", "--data-dir", str(data_dir))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout), out.stderr


def test_kill_9_during_generation_keeps_completed_turns(smollm, tmp_path):
    proc = _plain(tmp_path, "--max-new-tokens", "60")
    proc.stdin.write(b"Tell me about Paris.\n")
    proc.stdin.flush()
    lines = []
    while not (line := proc.stdout.readline()).startswith(b"[cache]"):
        assert line, "sinkchat ended before its first reply"
        lines.append(line.decode())
    reply = "".join(lines).strip()
    proc.stdin.write(b"Write a long story about a dragon.\n")
    proc.stdin.flush()
    assert proc.stdout.read1(64)  # the second reply is streaming
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved, _ = _export(tmp_path)
    assert [(m["role"], m["content"].strip()) for m in saved["messages"][-2:]] == [
        ("user", "Tell me about Paris."), ("assistant", reply)]
    assert len(saved["tokens"]) == saved["messages"][-1]["end"]
    chat, notices = open_chat(Store(tmp_path), 1, smollm, SMALL)  # the killed process's lock died with it
    assert notices == [] and say(chat, "And London?")


@pytest.mark.parametrize("fault, turns_kept", [("segment-temp@1", 2), ("db-mid@2", 1)])
def test_kill_9_during_save(smollm, tmp_path, fault, turns_kept):
    """Killed while writing the second save's state segment (its rows were committed first: the turn
    is kept, the K/V is rebuilt from the ledger) or inside its SQLite transaction (it rolls back;
    the first save stands)."""
    proc = _plain(tmp_path, env={"SINKCHAT_FAULT": fault})
    proc.communicate(b"Tell me about Paris.\nAnd London?\n", timeout=300)
    assert proc.returncode == -signal.SIGKILL
    saved, stderr = _export(tmp_path)
    users = [m["content"] for m in saved["messages"] if m["role"] == "user"]
    assert users == QUESTIONS[:turns_kept] and stderr == ""
    half_written = list((tmp_path / "state").glob(".*.tmp"))
    assert bool(half_written) == fault.startswith("segment-temp")
    store = Store(tmp_path)
    chat, notices = open_chat(store, 1, smollm, SMALL)
    assert notices == (["chat 1: the state file is older than the database (a save stopped before writing it); "
                        "rebuilt the KV cache from the ledger's sink and window tokens"] if turns_kept == 2 else [])
    assert not list((tmp_path / "state").glob(".*.tmp"))  # the killed save's temp file is swept
    say(chat, QUESTIONS[2])
    store.save(1, chat)
    t = Store(tmp_path).transcript(1)
    assert t.notices == [] and [m.content for m in t.messages if m.role == "user"][-1] == QUESTIONS[2]


def _flip(path, at: float) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["missing", "truncated", "bit-flip"])
def test_damaged_state_file_rebuilds_kv_from_ledger(smollm, damage):
    store = Store()
    chat_id, chat = saved_chat(smollm, store)
    path = store.state_path(chat_id)
    if damage == "missing":
        path.unlink()
    elif damage == "truncated":
        os.truncate(path, path.stat().st_size // 2)
    else:
        _flip(path, 0.7)
    chat2, notices = reopen(store, chat_id, smollm)
    assert len(notices) == 1 and "rebuilt the KV cache from the ledger" in notices[0]
    assert damage.split("-")[0] in notices[0] or "damaged" in notices[0]
    assert chat2.tokens == chat.tokens and chat2.messages == chat.messages
    assert chat2.occupancy() == chat.occupancy()
    win_start = chat.cache.kept()[1][0]
    events = list(chat2.submit(QUESTIONS[2]))  # the rebuilt cache goes on: the next eviction starts where the window did
    new = [e.span for e in events if isinstance(e, Evicted)]
    assert new and new[0][0] == win_start
    assert chat2.occupancy().window <= 48


def test_damaged_database_row_restored_from_state_file(smollm):
    store = Store()
    chat_id, chat = saved_chat(smollm, store)
    store.close()
    with sqlite3.connect(store.db_path) as db:
        db.execute("UPDATE tokens SET token = token + 1 WHERE chat_id=? AND pos=30", (chat_id,))
        db.execute("UPDATE messages SET content = 'tampered' WHERE chat_id=? AND idx=1", (chat_id,))
    chat2, notices = open_chat(Store(store.root), chat_id, smollm, SMALL)
    assert len(notices) == 1 and "database rows are damaged" in notices[0]
    assert chat2.tokens == chat.tokens and chat2.messages == chat.messages
    assert Store(store.root).transcript(chat_id).notices == []  # the rows were repaired


def test_both_copies_damaged_refuses_and_changes_nothing(smollm):
    store = Store()
    chat_id, _ = saved_chat(smollm, store)
    store.close()
    os.truncate(store.state_path(chat_id), 100)
    with sqlite3.connect(store.db_path) as db:
        db.execute("DELETE FROM tokens WHERE chat_id=? AND pos=3", (chat_id,))
    before = store.db_path.read_bytes(), store.state_path(chat_id).read_bytes()
    with pytest.raises(SinkchatError, match="cannot be opened.*nothing was changed"):
        open_chat(Store(store.root), chat_id, smollm, SMALL)
    assert (store.db_path.read_bytes(), store.state_path(chat_id).read_bytes()) == before


def test_disk_that_refuses_the_state_file_keeps_the_turn(smollm, tmp_path):
    """A file-size limit makes the kernel refuse the state file's writes (EFBIG), like a full disk: the
    turn's rows, committed first, are kept; the next save writes the K/V again."""
    store = Store()
    chat_id, chat = saved_chat(smollm, store, turns=QUESTIONS[:1])
    say(chat, QUESTIONS[1])
    with file_size_limit(64 * 1024):
        with pytest.raises(SaveError, match="saved chat 1's messages but not its KV cache .*goes on in memory"):
            store.save(chat_id, chat)
    after = Store(store.root).transcript(chat_id)
    assert (after.tokens, after.messages, after.notices) == (chat.tokens, chat.messages, [])
    say(chat, QUESTIONS[2])  # the chat goes on
    assert not list(store.state_path(chat_id).parent.glob(".*.tmp"))
    store.save(chat_id, chat)  # space again: the next save catches up
    store.close()
    assert open_chat(Store(store.root), chat_id, smollm, SMALL)[1] == []  # the K/V is whole on disk again


def test_a_first_save_whose_state_file_fails_keeps_saving_into_the_same_chat(smollm, tmp_path):
    """The first save's rows are committed, its state file refused: the chat exists (with its first
    turn) and the next save goes into it, not into a second chat."""
    store, chat, said = Store(tmp_path), Chat(smollm, SMALL), []
    autosave = Autosave(store, chat, SMALL, None, said.append)
    say(chat, QUESTIONS[0])
    with file_size_limit(64 * 1024):
        autosave(chat)
    assert len(said) == 1 and said[0].startswith("saved chat 1's messages but not its KV cache"), said
    assert autosave.chat_id == 1 and Store(tmp_path).transcript(1).messages == chat.messages
    say(chat, QUESTIONS[1])
    autosave(chat)
    store.close()
    assert [c.id for c in Store(tmp_path).list()] == [1]
    reopened, notices = open_chat(Store(tmp_path), 1, smollm, SMALL)
    assert notices == [] and reopened.tokens == chat.tokens


def test_a_resumed_chat_is_private_again(smollm, tmp_path):
    """Files copied or restored with a umask of 022 (chats.db 0644, state/ 0755): a resume makes them
    what the README promises, 0600 files and 0700 directories."""
    store = Store(tmp_path)
    chat_id, _ = saved_chat(smollm, store, turns=QUESTIONS[:1])
    store.close()
    mine = [tmp_path / "chats.db", tmp_path / "state", tmp_path / "locks", store.state_path(chat_id),
            tmp_path / "locks" / f"{chat_id}.lock"]
    for path in mine:
        path.chmod(0o755 if path.is_dir() else 0o644)
    out = run_cli("--plain", "--resume", "--data-dir", str(tmp_path), input="")
    assert out.returncode == 0, out.stderr
    assert [oct(stat.S_IMODE(p.stat().st_mode)) for p in mine] == ["0o600", "0o700", "0o700", "0o600", "0o600"]


def test_read_only_data_dir_chat_goes_on(smollm, tmp_path):
    data = tmp_path / "data"
    store = Store(data)
    chat_id, _ = saved_chat(smollm, store, turns=QUESTIONS[:1])
    store.close()
    before = data.joinpath("chats.db").read_bytes(), store.state_path(chat_id).read_bytes()
    for d in (data, data / "state"):
        d.chmod(0o500)
    try:
        out = subprocess.run(
            [*without_root_override(), sys.executable, "-m", "sinkchat", "--plain", "--resume", "--data-dir", str(data)],
            input="And London?\nWhat about Rome?\n", capture_output=True, text=True, cwd=ROOT, timeout=300,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    finally:
        for d in (data, data / "state"):
            d.chmod(0o700)
    assert out.returncode == 1, out.stderr  # the chat went on, but a script must see it was not saved
    assert out.stdout.count("[cache]") == 2  # both replies came
    assert "could not save chat 1" in out.stderr and "Traceback" not in out.stderr
    assert (data.joinpath("chats.db").read_bytes(), store.state_path(chat_id).read_bytes()) == before


@pytest.mark.model  # subprocesses load the bundled model
def test_flags_given_at_resume_become_the_chats_settings(tmp_path):
    """`--resume 1 --window 300` on a chat made with --window 64 saves 300 as the chat's window, beside
    the cache it saved: the printed `resume with:` line (a plain --resume) runs the chat as it was,
    from the saved cache, with no rebuild."""
    data = ["--data-dir", str(tmp_path)]
    made = run_cli(*CLI_FLAGS, "--window", "64", *data, input="hello\n")
    assert made.returncode == 0 and "/ 64 |" in made.stdout, made.stderr
    wider = run_cli("--plain", "--resume", "1", "--window", "300", "--max-new-tokens", "4", *data, input="hello\n")
    assert wider.returncode == 0 and "/ 300 |" in wider.stdout, wider.stderr
    doc, _ = _export(tmp_path, "1")
    assert doc["settings"]["window"] == doc["cache"]["window"] == 300
    assert doc["settings"]["max_new_tokens"] == 4 and doc["settings"]["block"] == 8  # given, and kept
    again = run_cli("--plain", "--resume", "1", *data, input="hi\n")
    assert again.returncode == 0 and "/ 300 |" in again.stdout, again.stderr
    assert "another window" not in again.stderr and "rebuilt" not in again.stderr, again.stderr


def test_second_process_is_refused(smollm, tmp_path):
    store = Store(tmp_path)
    chat_id, _ = saved_chat(smollm, store, turns=QUESTIONS[:1])  # this process holds the chat
    for args in (["--plain", "--resume", str(chat_id)], ["chats", "delete", str(chat_id), "--yes"]):
        out = run_cli(*args, "--data-dir", str(tmp_path), input="hello\n")
        assert out.returncode == 2 and "open in another sinkchat process" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
    shown = run_cli("chats", "show", "--data-dir", str(tmp_path))  # reading is still allowed
    assert shown.returncode == 0 and QUESTIONS[0] in shown.stdout
    with pytest.raises(ChatLocked):
        open_chat(Store(tmp_path), chat_id, smollm, SMALL)
    reader, _ = open_chat(Store(tmp_path), chat_id, smollm, SMALL, read_only=True)
    with pytest.raises(SaveError, match="read-only"):
        Store(tmp_path).save(chat_id, reader)


def test_other_window_rebuilds_from_ledger(smollm):
    store = Store()
    chat_id, chat = saved_chat(smollm, store)
    wider = SMALL.replace(window=64)
    chat2, notices = reopen(store, chat_id, smollm, wider)
    assert len(notices) == 1 and "another window" in notices[0] and "rebuilt" in notices[0]
    occ = chat2.occupancy()
    assert (occ.sinks, occ.window_capacity, occ.seen) == (4, 64, len(chat.tokens))
    assert chat2.cache.kept()[1] == (occ.seen - occ.window, occ.seen)
    assert say(chat2, QUESTIONS[2])


def test_other_quant_never_uses_foreign_kv(smollm, smollm_f32):
    store = Store()
    chat_id, chat = saved_chat(smollm, store)
    saved_k = chat.cache.state()[0]["0.k"]
    chat2, notices = reopen(store, chat_id, smollm_f32)
    assert len(notices) == 1 and "quant" in notices[0] and "rebuilt" in notices[0]
    assert chat2.occupancy() == chat.occupancy()
    k2 = chat2.cache.state()[0]["0.k"]
    assert k2.shape == saved_k.shape and not torch.equal(k2, saved_k)


def test_other_model_rebuilds_on_mistral(smollm, tiny_models):
    from sinkchat.model import load

    store = Store()
    chat_id, chat = saved_chat(smollm, store)
    mistral = load(str(tiny_models["mistral"]), quant="none", device="cpu")
    chat2, notices = reopen(store, chat_id, mistral)
    assert len(notices) == 1 and "model" in notices[0] and "rebuilt" in notices[0]
    assert chat2.tokens == chat.tokens and chat2.occupancy() == chat.occupancy()


def test_export_round_trip(smollm, tmp_path):
    store = Store(tmp_path)
    chat_id, chat = saved_chat(smollm, store)
    store.rename(chat_id, "Three cities")
    t = store.transcript(chat_id)
    data = json.loads(to_json(t))
    assert data["title"] == "Three cities"
    assert [(m["role"], m["content"], m["start"], m["end"]) for m in data["messages"]] == [
        (m.role, m.content, m.start, m.end) for m in chat.messages]
    assert data["tokens"] == chat.tokens
    assert data["evicted"] == [list(s) for s in merge_spans(chat.cache.evictions)]
    for m, out in zip(chat.messages, data["messages"]):
        held = {p for a, b in out["evicted"] for p in range(a, b)}
        assert held == {p for a, b in chat.cache.evictions for p in range(a, b) if m.start <= p < m.end}
        if m.role == "user":
            assert m.content in smollm.tokenizer.decode(data["tokens"][m.start:m.end])
    md = to_markdown(t)
    headers = [line for line in md.splitlines() if line.startswith("## ")]
    for i, (m, out) in enumerate(zip(chat.messages, data["messages"])):
        assert m.content in md and out["number"] == i + 1
        assert headers[i].startswith(f"## #{i + 1} {ROLE_NAME[m.role]}")
        assert ("forgotten" in headers[i]) == bool(out["evicted"])  # each cut message is marked, as on screen
    out = run_cli("chats", "export", "-f", "md", "-o", str(tmp_path / "c.md"), "--data-dir", str(tmp_path))
    assert out.returncode == 0 and (tmp_path / "c.md").read_text() == md  # CLI defaults to the latest chat


def test_chats_cli_rename_delete_and_bad_input(smollm, tmp_path):
    store = Store(tmp_path)
    chat_id, _ = saved_chat(smollm, store, turns=QUESTIONS[:1])
    store.close()
    d = ["--data-dir", str(tmp_path)]
    assert run_cli("chats", "rename", str(chat_id), "Paris notes", *d).returncode == 0
    assert "Paris notes" in run_cli("chats", "list", "-q", "Paris", *d).stdout
    assert Store(tmp_path).list("zanzibar") == []
    for args, msg in [
        (["chats", "show", "99"], "no chat 99"),
        (["chats", "export", "-f", "pdf"], "--format must be md or json"),
        (["--plain", "--resume", "abc"], "--resume takes a chat number"),
        (["chats", "delete", str(chat_id)], "needs --yes"),
    ]:
        out = run_cli(*args, *d, input="")
        assert out.returncode == 2 and msg in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert run_cli("chats", "delete", str(chat_id), "--yes", *d).returncode == 0
    assert not store.state_path(chat_id).exists()
    assert run_cli("chats", "show", *d).stderr.startswith("sinkchat: error: no saved chats")


def test_resume_bench_figures(smollm):
    from sinkchat.bench.resume import format_table, run_resume_bench

    r = run_resume_bench(smollm, Settings(sinks=4, window=60, kv_dtype="float32"), repeats=2)
    assert r["held_tokens"] == 64 and r["window"] == 60
    assert r["restore_s"] < r["rebuild_s"]
    assert r["mistral_7b_mb_per_1000"] == pytest.approx(131.072)
    # SmolLM2-135M: 30 layers x 3 KV heads x 64 dims x K+V x 4 bytes (a float32 cache)
    assert r["kv_mb_per_1000"] == pytest.approx(46.08)
    half = run_resume_bench(smollm, Settings(sinks=4, window=60, kv_dtype="bfloat16"), repeats=1)
    assert half["kv_mb_per_1000"] == pytest.approx(23.04)  # a bf16 cache (auto on a CPU with native bf16)
    assert r["kv_mb_per_1000"] <= r["state_mb_per_1000"] < r["kv_mb_per_1000"] * 1.2
    assert "restore speed-up" in format_table(r)


def test_a_pin_over_the_new_windows_budget_is_dropped_with_a_notice(smollm):
    """A chat resumed in a window whose --pin-max its pins exceed is rebuilt without the pins that do
    not fit, and the user is told which message is no longer pinned."""
    store = Store()
    settings = SMALL.replace(window=96, pin_max=48)
    chat = Chat(smollm, settings)
    say(chat, "Remember this: the pass key is 71432, and the door code is 5521.")
    user = next(i for i, m in enumerate(chat.messages) if m.role == "user")
    chat.pin(user)
    pinned = chat.messages[user].end - chat.messages[user].start
    chat_id = store.create(chat, settings)
    narrower = SMALL.replace(window=40)  # --pin-max 10
    assert pinned > narrower.pin_budget
    chat2, notices = reopen(store, chat_id, smollm, narrower)
    assert chat2.pinned_messages() == []
    assert len(notices) == 2 and "another window" in notices[0], notices
    assert notices[1].startswith(f"unpinned #{user + 1} you: the pins held more than --pin-max 10 tokens"), notices
