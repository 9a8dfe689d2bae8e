"""`sinkchat bench` on a few hundred tokens of the real bundled model: modes agree while nothing is
evicted, the paper's effect shows once it is, a sink-count sweep's runs are plain runs, and the CLI's
JSON, plots and errors are what users get."""

from __future__ import annotations

import json

import pytest

from _helpers import run_cli
from sinkchat import bench
from sinkchat.bench import ppl
from sinkchat.bench.plot import rolling

PNG = b"\x89PNG\r\n\x1a\n"


def no_progress(description, total):
    return lambda n: None


@pytest.fixture(scope="module")
def ids(smollm_hf):
    return bench.text_ids(smollm_hf.tokenizer, bench.default_text(), 96)


def test_modes_agree_before_any_eviction(smollm_hf, ids):
    """Text shorter than sinks + window: every mode sees the whole history, so perplexity is the same."""
    runs: list[ppl.PplRun] = []
    ppl.ppl_runs(smollm_hf, ids, ["dense", "sinks", "recompute"], 4, 256, None, 1, 4, no_progress, runs)
    ppl.ppl_runs(smollm_hf, ids, ["window"], 4, 256, None, 1, 4, no_progress, runs, feed=8)
    by_mode = {run.mode: run.ppl() for run in runs}
    assert all(len(run.scored) == len(ids) - 1 for run in runs)
    for mode in ("sinks", "recompute", "window"):
        assert by_mode[mode] == pytest.approx(by_mode["dense"], rel=5e-3), by_mode
    assert 2 < by_mode["dense"] < 200  # a real model on real text, not noise


def test_after_eviction_window_explodes_and_recompute_batches_exactly(smollm_hf, ids):
    """Window 16 on 64 tokens: without sinks perplexity explodes; recompute's batched contexts equal one by one."""
    text = ids[:64]
    runs: list[ppl.PplRun] = []
    ppl.ppl_runs(smollm_hf, text, ["window", "sinks"], 4, 16, None, 1, 4, no_progress, runs, feed=4)
    by_mode = {run.mode: run.ppl() for run in runs}
    assert by_mode["window"] > 3 * by_mode["sinks"], by_mode
    batched, single = ppl.PplRun("recompute"), ppl.PplRun("recompute")
    ppl.ppl_recompute(batched, smollm_hf.model, text, 4, 16, stride=7, batch=4, tick=lambda n: None)
    ppl.ppl_recompute(single, smollm_hf.model, text, 4, 16, stride=7, batch=1, tick=lambda n: None)
    assert [p for p, _ in batched.scored] == list(range(1, 64, 7))
    assert [v for _, v in batched.scored] == pytest.approx([v for _, v in single.scored], rel=1e-2, abs=1e-2)


@pytest.mark.model  # a subprocess loads the bundled model
def test_ppl_cli_json_and_png(tmp_path):
    plot = tmp_path / "ppl.png"
    r = run_cli("bench", "ppl", "--tokens", "48", "--window", "16", "--feed", "4", "--stride", "4",
                "--chunk", "24", "--json", "--plot", str(plot))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)  # stdout is only the JSON
    assert [res["mode"] for res in doc["results"]] == ["dense", "window", "sinks", "recompute"]
    for res in doc["results"]:
        assert {"mode", "ppl", "tokens", "chunks"} <= res.keys()
        assert res["ppl"] > 1 and res["chunks"] and {"start", "end", "ppl"} <= res["chunks"][0].keys()
    assert doc["results"][0]["tokens"] == 47 and doc["results"][3]["tokens"] == 12
    assert doc["tokens"] == 48 and doc["sinks"] == 4 and doc["window"] == 16 and not doc["interrupted"]
    assert plot.read_bytes()[:8] == PNG


@pytest.mark.model  # a subprocess loads the bundled model
def test_speed_cli_json_and_png(tmp_path):
    plot = tmp_path / "speed.png"
    r = run_cli("bench", "speed", "--tokens", "40", "--window", "16", "--points", "2", "--steps", "3",
                "--recompute-steps", "2", "--json", "--plot", str(plot))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    by_mode = {res["mode"]: res for res in doc["results"]}
    assert list(by_mode) == ["sinks", "dense", "recompute"]
    for res in by_mode.values():
        assert res["tokens_per_s"] > 0 and res["peak_mem_mb"] > 0
        assert all(ms > 0 for _, ms in res["ms_per_token"])
    assert [p for p, _ in by_mode["sinks"]["ms_per_token"]] == [20, 40]
    ratio = by_mode["recompute"]["median_ms"] / by_mode["sinks"]["median_ms"]
    assert doc["speedup_vs_recompute"] == pytest.approx(ratio)
    assert 0 <= doc["upkeep_share"] < 1
    # the ceiling: what a step reads at 4 + 16 held tokens (30 layers x 3 KV heads x 64 dims x K and V, in
    # the KV dtype auto picked: bfloat16 with native bf16, else float32)
    parts, itemsize = doc["bytes_parts"], {"float32": 4, "bfloat16": 2}[doc["machine"]["kv_dtype"]]
    assert parts["kv_cache"] == 30 * 3 * 64 * 2 * itemsize * 20 and doc["bytes_per_token"] == sum(parts.values())
    assert doc["copy_bandwidth_GBps"] > 0
    assert doc["ceiling_tokens_per_s"] == pytest.approx(doc["copy_bandwidth_GBps"] * 1e9 / doc["bytes_per_token"])
    assert doc["ceiling_share"] == pytest.approx(by_mode["sinks"]["tokens_per_s"] / doc["ceiling_tokens_per_s"])
    assert plot.read_bytes()[:8] == PNG


@pytest.mark.model  # a subprocess loads the bundled model
def test_speed_positions_closer_than_the_steps_are_fewer_points():
    """Each position's decode steps move the stream on: 6 points between 36 and 120 cannot each take 30
    steps where they are asked, so the run measures at positions at least --steps apart (it ran out of
    text before, an IndexError)."""
    r = run_cli("bench", "speed", "--modes", "sinks,recall", "--tokens", "120", "--window", "32", "--recall", "16",
                "--recall-block", "8", "--steps", "30", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["positions"] == [36, 78, 120]
    for res in doc["results"]:
        assert [p for p, _ in res["ms_per_token"]] == [36, 78, 120]


def test_recall_mode_scores_as_sinks_until_a_block_is_recalled(smollm_hf, ids):
    """bench ppl's recall mode: the same stream as sinks while nothing left the window, then recalled
    blocks change what the model predicts (recall really ran), and the memory holds every evicted token."""
    runs: list[ppl.PplRun] = []
    ppl.ppl_runs(smollm_hf, ids, ["sinks", "recall"], 4, 24, None, 1, 4, no_progress, runs, feed=8, recall=(16, 8))
    sinks, recall = ({p: v for p, v in run.scored} for run in runs)
    assert sinks.keys() == recall.keys() == set(range(1, len(ids)))
    before = [p for p in sinks if p <= 28]  # 4 sinks + 24 window: nothing evicted yet
    assert [recall[p] for p in before] == pytest.approx([sinks[p] for p in before], abs=1e-4)
    after = [p for p in sinks if p > 48]
    assert max(abs(recall[p] - sinks[p]) for p in after) > 1e-2
    assert runs[1].note == "+16 recall slots"


@pytest.mark.model  # a subprocess loads the bundled model
def test_speed_cli_times_recall_against_sinks(tmp_path):
    r = run_cli("bench", "speed", "--modes", "sinks,recall", "--tokens", "120", "--window", "32", "--recall", "16",
                "--recall-block", "8", "--points", "2", "--steps", "3", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    by_mode = {res["mode"]: res for res in doc["results"]}
    assert list(by_mode) == ["sinks", "recall"] and doc["recall"] == 16 and doc["recall_block"] == 8
    assert by_mode["recall"]["note"].startswith("16 of 16 recall slots filled, ")  # recalled while prefilling
    ratios = doc["recall_vs_sinks"]
    assert ratios["decode"] == pytest.approx(by_mode["sinks"]["median_ms"] / by_mode["recall"]["median_ms"])
    assert ratios["prefill"] == pytest.approx(by_mode["recall"]["prefill_tokens_per_s"]
                                              / by_mode["sinks"]["prefill_tokens_per_s"])


def test_sink_sweep_row_equals_a_plain_run(tiny_models, tmp_path):
    """StreamingLLM's Table 2 on one budget: --sinks 0,1,4 --window 16 runs 0 + 16, 1 + 15 and 4 + 12, and its
    4 + 12 row is exactly what a plain `bench ppl --sinks 4 --window 12` measures."""
    common = ("--model", str(tiny_models["mistral"]), "--quant", "none", "--tokens", "60", "--feed", "4", "--json")
    plot = tmp_path / "sweep.png"
    sweep = run_cli("bench", "ppl", "--sinks", "0,1,4", "--window", "16", "--modes", "dense,sinks", "--plot",
                    str(plot), *common)
    plain = run_cli("bench", "ppl", "--sinks", "4", "--window", "12", "--modes", "sinks", *common)
    assert sweep.returncode == 0, sweep.stderr
    assert plain.returncode == 0, plain.stderr
    doc = json.loads(sweep.stdout)
    assert doc["budget"] == 16 and doc["sinks"] == [0, 1, 4] and not doc["interrupted"]
    assert [(r["mode"], r["sinks"], r["window"]) for r in doc["results"]] == [
        ("dense", None, None), ("sinks", 0, 16), ("sinks", 1, 15), ("sinks", 4, 12)]
    row = doc["results"][3]
    assert row["tokens"] == 59 and row["tokens_full"] == 43  # tokens 17..59 were predicted from a full cache
    assert row["ppl"] == pytest.approx(json.loads(plain.stdout)["results"][0]["ppl"], rel=1e-6)
    assert plot.read_bytes()[:8] == PNG


def test_rolling_mean_is_the_trailing_mean_over_a_span_of_tokens():
    points = [(p, float(p % 7)) for p in range(1, 200, 3)]  # every 3rd token scored, as with --stride 3
    xs, ys = rolling(list(reversed(points)), 30)
    assert xs == [p for p, _ in points]
    for x, y in zip(xs, ys):
        window = [v for p, v in points if x - 30 < p <= x]
        assert y == pytest.approx(sum(window) / len(window))


@pytest.mark.parametrize(
    "args, message",
    [
        (["bench", "ppl", "--text", "no-such-file.txt"], "--text no-such-file.txt: no such file"),
        (["bench", "ppl", "--modes", "sinks,fast"], "--modes takes a comma list of"),
        (["bench", "speed", "--modes", "window"], "--modes takes a comma list of"),
        (["bench", "speed", "--modes", "recall", "--recall", "8", "--recall-block", "16"],
         "--recall 8 holds no block of --recall-block 16"),
        (["bench", "ppl", "--modes", "recall", "--recall", "0"], "--recall must be 1 or more"),
        (["bench", "attention", "--tokens", "0"], "--tokens must be more than 64"),
        (["bench", "ppl", "--sinks", "0,x"], "--sinks takes a number or a comma list of numbers"),
        (["bench", "ppl", "--sinks", "0,4", "--modes", "window,sinks"], "--modes window,sinks needs a single --sinks"),
        (["bench", "ppl", "--sinks", "0,300", "--window", "256"], "--sinks 300 leaves no window in the budget of 256"),
        (["bench", "ppl", "--sinks", "0,16", "--window", "20", "--feed", "8"], "--feed 8 must be at most the smallest"),
        (["bench", "turns", "--turns", "31"], "--turns must be at most 30"),
        (["bench", "turns", "--modes", "tokens,blocks"], "--modes takes a comma list of tokens, turns"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message):
    r = run_cli(*args)
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("sinkchat: error: ") and message in r.stderr


def test_a_text_file_that_is_not_utf8_is_read_with_replacements(tmp_path, capsys):
    from sinkchat.cli.bench import read_text

    path = tmp_path / "latin1.txt"
    path.write_bytes(b"caf\xe9 au lait\n" * 3)
    text, source = read_text(str(path))
    assert text == "caf\ufffd au lait\n" * 3 and source == str(path)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not UTF-8 were replaced" in err


def test_turns_bench_counts_replies_and_scores_the_transcript(smollm_hf):
    """Both modes run the same scripted chat and score the same reference replies; only
    --evict turns keeps every eviction at the start of a message."""
    from sinkchat.bench import turns

    runs: list = []
    turns.run_turns(smollm_hf, ["tokens", "turns"], 4, 64, 4, 16, no_progress, runs)
    tokens, whole = runs
    assert [r.mode for r in runs] == ["tokens", "turns"] and all(len(r.replies) == 4 for r in runs)
    assert tokens.scored == whole.scored > 4 * 10 and all(1 < r.ppl < 1000 for r in runs)
    assert tokens.evictions and whole.evictions and whole.mid_message == 0 < tokens.mid_message
    row = whole.row()
    assert row["empty"] + row["repeated"] <= 4 and row["tokens_scored"] == whole.scored


@pytest.mark.model  # a subprocess loads the bundled model and drives the headless TUI
def test_endless_with_recall_reports_the_memory_on_disk(tmp_path):
    r = run_cli("bench", "endless", "--turns", "4", "--window", "32", "--recall", "16", "--recall-block", "8",
                "--data-dir", str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["recall"] == 16 and doc["recall_block"] == 8
    memory = sum(f.stat().st_size for f in (tmp_path / "state").glob("*.memory")) / 2**20
    assert memory > 0 and doc["turns"][-1]["memory_mb"] == pytest.approx(memory)


def test_bench_speed_times_no_compile(tiny_models, fresh_compile):
    """A compiled decode step compiles on its first call: that call is not one of the timed steps
    (it took seconds, against milliseconds for a step, and moved the first position's figure, the
    median with few --steps, the flatness ratio and the upkeep share)."""
    from sinkchat.bench.speed import speed_runs
    from sinkchat.model import load

    loaded = load(str(tiny_models["mistral"]), quant="none", device="cpu", compile="on")
    ids = list(range(10, 110))
    runs = []
    speed_runs(loaded, ids, ["sinks", "recall"], 4, 16, 4, [20, 60], 1, 1, lambda label, n: lambda k: None, runs,
               recall=8, recall_block=8)
    fast = loaded.fast
    assert fast.compiled is not None and fast.compiled_s is not None, fast.notice
    for run in runs:
        assert sum(run.step_ms) < 1000 * fast.compiled_s / 2, (run.mode, run.step_ms, fast.compiled_s)
