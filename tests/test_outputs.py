"""Where sinkchat writes and what it is pointed at: exports, stdout on a full disk, chat ids,
plot paths, data and config paths of the wrong kind, damaged rows. Each refusal is one line and
changes nothing; no model is loaded (the chats are stored through the store's API)."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from _helpers import ROOT, one_line_error, run_cli, stored_chat

FULL = Path("/dev/full")
needs_full = pytest.mark.skipif(not (FULL.exists() and FULL.is_char_device()), reason="no /dev/full here")


def data(tmp_path) -> Path:
    return tmp_path / "data"  # the private_dirs fixture points SINKCHAT_DATA_DIR here


def test_export_never_replaces_a_fifo_or_a_device(tmp_path):
    stored_chat(data(tmp_path))
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    one_line_error(run_cli("chats", "export", "-o", str(fifo), "--force"), "not a regular file")
    assert stat.S_ISFIFO(fifo.lstat().st_mode)  # still a FIFO, never renamed over
    one_line_error(run_cli("chats", "export", "-o", str(tmp_path), "--force"), "not a regular file")
    if FULL.exists():
        one_line_error(run_cli("chats", "export", "-o", str(FULL), "--force"), "not a regular file")
        assert FULL.is_char_device()


def test_export_to_dash_writes_stdout(tmp_path):
    stored_chat(data(tmp_path), user="Tell me about Paris.")
    out = run_cli("chats", "export", "-o", "-", "--format", "json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["messages"][0]["content"] == "Tell me about Paris."
    assert not (ROOT / "-").exists()  # run_cli runs in the checkout: no file named "-" was made


@pytest.mark.parametrize("args", [["chats", "show", "99999999999999999999"], ["chats", "export", "0"],
                                  ["chats", "rename", "18446744073709551616", "x"],
                                  ["chats", "delete", "99999999999999999999", "--yes"],
                                  ["--plain", "--resume", "99999999999999999999"]])
def test_chat_ids_out_of_range_are_usage_errors(tmp_path, args):
    stored_chat(data(tmp_path))
    one_line_error(run_cli(*args))


@pytest.mark.parametrize("where", ["missing/x.png", "dir", "plot.txt", "plot.svg"])
def test_an_unwritable_plot_path_is_refused_before_the_run(tmp_path, where):
    (tmp_path / "dir").mkdir()
    out = run_cli("bench", "ppl", "--tokens", "20", "--plot", str(tmp_path / where), timeout=60)
    one_line_error(out, "--plot")


@needs_full
def test_stdout_on_a_full_disk_is_one_line_and_exit_1(tmp_path):
    stored_chat(data(tmp_path))
    for args in (["chats", "list"], ["chats", "show"], ["chats", "export"], ["models"]):
        with FULL.open("w") as full:
            proc = subprocess.run([sys.executable, "-m", "sinkchat", *args], stdout=full, stderr=subprocess.PIPE,
                                  text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, timeout=60)
        assert proc.returncode == 1, (args, proc.stderr)
        assert proc.stderr.count("\n") == 1 and "No space left on device" in proc.stderr, (args, proc.stderr)


def test_a_data_dir_or_config_file_of_the_wrong_kind_is_refused(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    for args, env in ((["--plain", "--data-dir", str(not_a_dir)], {}),
                      (["--plain", "--no-save"], {"SINKCHAT_DATA_DIR": str(not_a_dir)}),
                      (["chats", "list"], {"SINKCHAT_DATA_DIR": str(not_a_dir)})):
        one_line_error(run_cli(*args, input="hi\n", env=env, timeout=60), "not a directory")
    assert not_a_dir.read_text() == "x"
    (tmp_path / "config" / "config.toml").mkdir(parents=True)
    one_line_error(run_cli("--plain", input="hi\n", timeout=60), "config.toml", "not a regular file")


def test_an_unknown_theme_is_refused_in_plain_mode_too():
    one_line_error(run_cli("--plain", "--theme", "nosuch", input="hi\n", timeout=60), "unknown theme")


def test_a_bench_text_that_is_a_directory_is_named(tmp_path):
    one_line_error(run_cli("bench", "ppl", "--text", str(tmp_path), timeout=60), "not a regular file")


def test_damaged_row_values_still_list_and_show(tmp_path):
    chat_id = stored_chat(data(tmp_path), title="fine")
    with sqlite3.connect(data(tmp_path) / "chats.db") as db:
        db.execute("UPDATE chats SET title=?, updated=?, created=? WHERE id=?", (b"\xff\x00\xfe", "x", 1e300, chat_id))
    listed = run_cli("chats", "list")
    assert listed.returncode == 0 and "\ufffd" in listed.stdout, listed.stderr
    shown = run_cli("chats", "show", str(chat_id))
    assert shown.returncode == 0 and "b'" not in shown.stdout and "\ufffd" in shown.stdout, shown.stderr


def test_show_and_export_label_messages_as_the_screen_does(tmp_path):
    """`chats show` names and marks each message as the transcript does (#N, you/model, pinned,
    forgotten, partly forgotten, a paste read in part, a stopped reply) and lists the forgotten spans
    as the gauge does; JSON carries the same facts as fields."""
    from sinkchat.ledger import ChatState, Message
    from sinkchat.settings import Settings
    from sinkchat.store import Store

    meta = {"sinks": 4, "window": 20, "block": 4, "n_sink": 4, "n_win": 14, "seen": 40, "base": 0,
            "evictions": [[4, 6], [16, 26]], "parked": [[6, 16, 6]], "pins": [[6, 16]]}
    state = ChatState(list(range(100, 140)), [
        Message("system", "Be brief.", 0, 6), Message("user", "My name is Ada.", 6, 16),
        Message("assistant", "Hello Ada.", 16, 26), Message("user", "A long paste", 26, 30, note="partial:50"),
        Message("assistant", "Once upon", 30, 40, note="stopped")], meta, {"model": "m", "tokenizer": "t"})
    store = Store(data(tmp_path))
    try:
        chat_id = store.create_state(state, {}, Settings(), None)
    finally:
        store.close()
    shown = run_cli("chats", "show", str(chat_id))
    lines = shown.stdout.splitlines()
    assert [line for line in lines if line.startswith("## ")] == [
        "## #1 system  ✂ 2 of 6 tokens forgotten, its first 4 stay as attention sinks",
        "## #2 you  ▒ pinned: the model keeps it",
        "## #3 model  ⊘ forgotten: the model no longer holds any of its 10 tokens",
        "## #4 you  [stopped: the model read 4 of its 50 tokens]",
        "## #5 model  [stopped]",
    ], shown.stdout
    assert "  - ✂ forgot tokens 4–5 (2): #1 system 2 of 6" in lines
    assert "  - ✂ forgot tokens 16–25 (10): #3 model whole" in lines
    exported = json.loads(run_cli("chats", "export", str(chat_id), "--format", "json").stdout)
    assert [(m["number"], m["pinned"], m["note"]) for m in exported["messages"]] == [
        (1, False, ""), (2, True, ""), (3, False, ""), (4, False, "partial:50"), (5, False, "stopped")]
    assert exported["pins"] == [[6, 16]]


@pytest.mark.model
@needs_full
def test_plain_mode_on_a_full_disk_saves_the_turn_and_says_why(tmp_path):
    with FULL.open("w") as full:
        proc = subprocess.run([sys.executable, "-m", "sinkchat", "--plain", "--max-new-tokens", "4", "-t", "0"],
                              input="Hello\nAnd again\n", stdout=full, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, timeout=300)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "No space left on device" in proc.stderr
    listed = run_cli("chats", "export", "--format", "json")
    assert [m["content"] for m in json.loads(listed.stdout)["messages"] if m["role"] == "user"] == ["Hello"]
