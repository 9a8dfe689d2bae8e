"""`sinkchat bench memory` beyond the pass key: the built-in tasks hold their answer where they say,
a task of the user's own JSONL file is found with the whole history and with recall but not by
sinks alone (the bundled model, greedy or by candidates), a bad task file is one clear line, and the
CLI's JSON and plot are what users get."""

from __future__ import annotations

import json

import pytest

from _helpers import run_cli
from sinkchat.bench import memory
from sinkchat.bench.taskfile import UserTask, read_tasks
from sinkchat.cli.bench_output import print_memory
from sinkchat.errors import SinkchatError

PNG = b"\x89PNG\r\n\x1a\n"
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
KEY_TASK = {
    "context": FILLER * 2 + "The pass key is 52871. Remember it. 52871 is the pass key. " + FILLER * 10,
    "question": "What is the pass key? The pass key is",
    "answer": "52871",
    "candidates": ["52871", "71825", "38264", "90413"],
}


def write_tasks(path, *lines: str):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


@pytest.mark.parametrize("name", memory.TASKS)
def test_built_in_tasks_hold_their_answer_where_they_say(smollm_hf, name):
    tok = smollm_hf.tokenizer
    task = memory.BUILDERS[name](tok, 512, 0.25, seed=1)
    fact = tok.decode(task.ids[task.span[0] : task.span[1]])
    assert task.answer in fact and task.answer not in tok.decode(task.ids[task.ask :])
    assert 0 < task.span[0] < task.span[1] <= task.ask < len(task.ids)
    assert 400 < len(task.ids) < 640  # about the length asked for
    assert (task.choices is None) == (name in ("passkey", "lines"))  # exact answers, or free-form among candidates
    if task.choices:
        assert task.answer in task.choices and len(task.choice_ids) == len(task.choices)
    if name == "chat":  # turns through the model's chat template, the question the last user turn
        assert tok.decode(task.ids).count("<|im_start|>user") > 3
        assert "<|im_start|>user\nWhere do I keep my spare key?" in tok.decode(task.ids[task.ask :])


def test_own_task_is_found_with_dense_and_recall_not_sinks(smollm_hf, tmp_path):
    """A key told 60 tokens in, asked 250 tokens later, at window 64: evicted for sinks, recalled with recall;
    scored among candidates (the 135M model's greedy reply misses it at this small recall)."""
    (task,) = read_tasks(write_tasks(tmp_path / "mine.jsonl", json.dumps(KEY_TASK)))
    built = memory.user_task(smollm_hf.tokenizer, task)
    got = {
        mode: memory.run_task(smollm_hf.model, smollm_hf.tokenizer, built, mode, 4, 64, recall=32, recall_block=16)
        for mode in memory.MODES
    }
    assert {m: (r.found, r.where) for m, r in got.items()} == {
        "dense": (True, "window"),
        "sinks": (False, "evicted"),
        "recall": (True, "recalled"),
    }, got
    assert got["recall"].got == "52871" and got["sinks"].got != "52871"
    assert got["dense"].depth_tokens == built.span[0] and built.span[0] > 40


def test_an_evicted_one_token_answer_is_evicted_not_recalled_without_recall(smollm_hf):
    """A one-digit answer (one token) that left the window: sinks mode has no recall, so it is "evicted"."""
    task = {"context": FILLER * 2 + "The door code is 7. " + FILLER * 6, "question": "The door code is",
            "answer": "7", "candidates": ("7", "3")}
    built = memory.user_task(smollm_hf.tokenizer, UserTask("mine.jsonl:1", **task))
    assert built.span[1] - built.span[0] == 1
    got = memory.run_task(smollm_hf.model, smollm_hf.tokenizer, built, "sinks", 4, 32)
    assert got.where == "evicted", got


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"context": "a", "question": "b", "answer": "c"}\nnot json', "bad.jsonl:2: not JSON"),
        ('{"context": "a", "answer": "c"}', "bad.jsonl:1: missing question"),
        ('{"context": "a", "question": "b", "answer": 5}', "bad.jsonl:1: answer must be a string"),
        ('\n\n{"context": "a", "question": "b", "answer": " "}', "bad.jsonl:3: answer is empty"),
        ('{"context": "", "question": "b", "answer": "c"}', "bad.jsonl:1: context is empty"),
        (
            '{"context": "a", "question": "b", "answer": "c", "candidates": ["d", "e"]}',
            "bad.jsonl:1: the answer is not",
        ),
        ('{"context": "a", "question": "b", "answer": "c", "chat": "yes"}', "bad.jsonl:1: chat must be true or false"),
        ('["context", "question", "answer"]', "bad.jsonl:1: not a JSON object"),
        (b"\x89PNG\r\n\x1a\n\x00\xff", "bad.jsonl: not UTF-8 text"),
        ('{"context": "a", "question": "b", "answer": "\\ud800"}', "bad.jsonl:1: answer holds a lone surrogate"),
        ('{"context": "a", "question": "b", "answer": "c", "candidates": ["c", "\\udfff"]}',
         "bad.jsonl:1: candidates holds a lone surrogate"),
        (None, "bad.jsonl: no such file"),
        ("dir", "bad.jsonl: not a regular file"),
    ],
)
def test_a_bad_task_file_is_one_line_naming_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    with pytest.raises(SinkchatError) as err:
        read_tasks(str(path))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_line_ends_at_newline_alone(tmp_path):
    """JSON keeps U+2028, U+0085 and a form feed raw inside a string (``ensure_ascii=False``): each is text of
    its task, not the end of a line."""
    task = {"context": "Line\u2028separator, next\x85line, form\x0cfeed.", "question": "Which?", "answer": "this"}
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps(task, ensure_ascii=False) + "\r\n" + json.dumps(task) + "\n", encoding="utf-8")
    got = read_tasks(str(path))
    assert [t.context for t in got] == [task["context"]] * 2 and got[1].source == f"{path}:2"


def test_the_cli_says_it_in_one_line_and_exits_non_zero(tmp_path):
    """Before the model loads: one line on stderr, nothing on stdout, no traceback."""
    bad = write_tasks(tmp_path / "bad.jsonl", json.dumps(KEY_TASK), "{not json")
    r = run_cli("bench", "memory", "--tasks", f"passkey,{bad}")
    assert r.returncode == 2 and r.stdout == ""  # a usage error, as for other bad flags
    assert r.stderr == f"sinkchat: error: {bad}:2: not JSON (Expecting property name enclosed in double quotes)\n"
    r = run_cli("bench", "memory", "--tasks", "passkey,haystack", "--tokens", "4y")
    assert r.returncode != 0 and "--tasks takes a comma list of passkey, needle, lines, chat" in r.stderr
    for tokens in ("4y", "infx"):
        r = run_cli("bench", "memory", "--tokens", tokens)
        assert r.returncode == 2 and "--tokens takes a comma list" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.model  # a subprocess loads the bundled model
def test_a_window_too_small_for_recall_runs_the_other_modes():
    """The recall mode's default slots (half the window) are checked only where the recall mode runs."""
    args = ("bench", "memory", "--window", "64", "--tokens", "1x", "--depths", "0.5", "--keys", "1")
    r = run_cli(*args, "--modes", "dense,sinks", "--json")
    assert r.returncode == 0, r.stderr
    assert {x["mode"] for x in json.loads(r.stdout)["results"]} == {"dense", "sinks"}
    r = run_cli(*args, "--modes", "recall")
    assert r.returncode == 2  # the user gave no --recall: the error says where the 32 comes from
    assert "--recall 32 (by default half --window 64) holds no block of --recall-block 64" in r.stderr


@pytest.mark.model  # a subprocess loads the bundled model
def test_cli_json_has_a_record_per_task_and_mode_and_the_plot_is_a_png(tmp_path):
    mine = write_tasks(
        tmp_path / "mine.jsonl",
        json.dumps({k: v for k, v in KEY_TASK.items() if k != "candidates"}),
        json.dumps(
            {"context": "Anna lives in Oslo.", "question": "Where does Anna live?", "answer": "Oslo", "chat": True}
        ),
    )
    plot = tmp_path / "memory.png"
    r = run_cli(
        "bench",
        "memory",
        "--tasks",
        f"passkey,{mine}",
        "--tokens",
        "2x",
        "--depths",
        "0.5",
        "--keys",
        "1",
        "--window",
        "64",
        "--recall",
        "32",
        "--recall-block",
        "16",
        "--modes",
        "sinks,recall",
        "--json",
        "--plot",
        str(plot),
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)  # stdout is only the JSON
    assert [(x["task"], x["mode"]) for x in doc["results"]] == [
        ("passkey", "sinks"),
        ("passkey", "recall"),
        (f"{mine}:1", "sinks"),
        (f"{mine}:2", "sinks"),
        (f"{mine}:1", "recall"),
        (f"{mine}:2", "recall"),
    ]
    for x in doc["results"]:
        assert isinstance(x["found"], bool) and x["where"] in ("window", "recalled", "evicted")
        assert isinstance(x["depth_tokens"], int) and 0 < x["depth_tokens"] < x["tokens"]
    oslo = [x for x in doc["results"] if x["task"] == f"{mine}:2"]
    assert all(x["where"] == "window" for x in oslo)  # a short chat: nothing left the window
    assert [s["task"] for s in doc["summary"]] == ["passkey", "passkey", mine, mine]
    assert doc["window"] == 64 and doc["recall"] == 32 and doc["tasks"] == ["passkey", mine]
    assert plot.read_bytes()[:8] == PNG


def test_memory_report_has_a_record_per_task_and_mode(capsys):
    results = [
        memory.Result("passkey", "sinks", "12345", "a key", False, 1036, 0.15, 160, "evicted"),
        memory.Result("passkey", "recall", "12345", "12345. Remember", True, 1036, 0.15, 160, "recalled"),
    ]
    report = memory.memory_report(results, {"sinks": 4, "window": 256})
    assert [(r["mode"], r["found"], r["where"], r["depth_tokens"]) for r in report["results"]] == [
        ("sinks", False, "evicted", 160),
        ("recall", True, "recalled", 160),
    ]
    assert all(isinstance(r["found"], bool) for r in report["results"])
    assert {s["mode"]: s["found"] for s in report["summary"]} == {"sinks": 0, "recall": 1}
    print_memory(report | {"recall": 128, "recall_block": 64})
    rows = [line for line in capsys.readouterr().out.splitlines() if "passkey" in line]
    assert [[cell.strip() for cell in row.split("│")[1:7]] for row in rows] == [
        ["passkey", "1036", "15%", "160", "sinks", "0/1"],
        ["passkey", "1036", "15%", "160", "recall", "1/1"],
    ], rows


@pytest.mark.parametrize(
    "answer, text, found",
    [
        ("52871", "52871. Remember it.", True),
        ("52871", " 5 2 8 7 1", True),
        ("52871", "line 12: 52871", False),
        ("Oslo", "Anna lives in  oslo.", True),
        ("Oslo", "Bergen", False),
    ],
)
def test_exact_answers(answer, text, found):
    assert memory.matches(answer, text) is found
