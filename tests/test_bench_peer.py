"""`sinkchat bench peer` against llama.cpp's llama-bench. llama.cpp is not installed here, so a stand-in
script prints llama-bench's JSON (fields as llama-bench writes them) for the arguments it was given:
the one stand-in in the suite. It checks the command line sinkchat builds and how the JSON is read."""

from __future__ import annotations

import json
import os

import pytest

from _helpers import run_cli, stand_in
from sinkchat.model.gguf import native_bf16

FAKE = '''#!{python}
# A stand-in for llama.cpp's llama-bench: prints its JSON for the tests asked for on the command line.
import json, sys
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
if args.get("-m", "").endswith("fail"):
    sys.exit("error: failed to load model")
prompt, gen, threads = int(args["-p"]), int(args["-n"]), int(args["-t"])
rows = []
for depth in map(int, args["-d"].split(",")):
    for n_prompt, n_gen, ts in ((prompt, 0, 400.0 + depth), (0, gen, 90.0 - depth / 100)):
        rows.append({{"model_filename": args["-m"], "n_threads": threads, "n_prompt": n_prompt, "n_gen": n_gen,
                     "n_depth": depth, "avg_ts": ts, "stddev_ts": 1.0, "type_k": "f16"}})
print(json.dumps(rows, indent=2))
with open(sys.argv[0] + ".runs", "a") as log:  # one line a run, for the tests that count them
    log.write("run\\n")
'''


@pytest.fixture
def fake_llama_bench(tmp_path):
    return stand_in(tmp_path / "llama-bench", FAKE)


def test_without_a_llama_bench_it_says_how_to_get_one(tmp_path):
    r = run_cli("bench", "peer", env={"PATH": str(tmp_path)})
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1
    assert r.stderr.startswith("sinkchat: error: no llama-bench binary found; build it from llama.cpp")
    r = run_cli("bench", "peer", "--llama-bench", str(tmp_path / "nope"))
    assert r.returncode == 2 and "not an executable file" in r.stderr


@pytest.mark.model
def test_both_run_on_the_same_file_threads_and_depth_in_one_table(fake_llama_bench):
    r = run_cli("bench", "peer", "--llama-bench", str(fake_llama_bench), "--window", "60", "--steps", "4",
                "--repetitions", "1", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["depth"] == 64 and doc["gguf"].endswith(".gguf")
    theirs = doc["llama.cpp"]
    assert (theirs["pp"], theirs["tg"]) == (400.0, 90.0 - 64 / 100)  # pp at depth 0, tg at the full cache
    raw = doc["llama_bench_raw"]
    assert {row["model_filename"] for row in raw} == {doc["gguf"]}
    assert {row["n_threads"] for row in raw} == {doc["threads"]} == {doc["machine"]["threads"]}
    assert doc["machine"]["prefill_gemm"] == ("bfloat16" if native_bf16() else "float32")  # this CPU's choice
    for key in ("pp", "tg"):
        assert doc["sinkchat"][key] > 0
        assert doc["ratio"][key] == pytest.approx(doc["sinkchat"][key] / theirs[key])


@pytest.mark.model
def test_a_failing_llama_bench_is_one_line(tmp_path, fake_llama_bench):
    broken = tmp_path / "broken"
    broken.write_text("#!/bin/sh\necho 'not json'\n")
    broken.chmod(0o755)
    r = run_cli("bench", "peer", "--llama-bench", str(broken), "--window", "60", "--steps", "2", "--repetitions", "1")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "llama-bench printed no JSON with the expected pp and tg rows" in r.stderr
    r = run_cli("bench", "peer", "--llama-bench", str(fake_llama_bench), "--model", "./some.gguf")
    assert r.returncode == 2 and "no such GGUF file" in r.stderr
    assert os.access(fake_llama_bench, os.X_OK)


@pytest.mark.model
def test_rounds_alternate_and_the_medians_are_compared(fake_llama_bench):
    r = run_cli("bench", "peer", "--llama-bench", str(fake_llama_bench), "--window", "60", "--steps", "4",
                "--repetitions", "1", "--rounds", "2", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert (fake_llama_bench.parent / "llama-bench.runs").read_text().count("run") == 2
    rounds = doc["rounds"]
    assert len(rounds) == 2 and all(set(r) == {"sinkchat", "llama.cpp"} for r in rounds)
    for key in ("pp", "tg"):
        ours = sorted(r["sinkchat"][key] for r in rounds)
        assert doc["sinkchat"][key] == pytest.approx((ours[0] + ours[1]) / 2)  # the median of two
        assert doc["ratio"][key] == pytest.approx(doc["sinkchat"][key] / doc["llama.cpp"][key])
    assert len(doc["llama_bench_raw"]) == 2 * 4  # both rounds' rows: pp and tg at depths 0 and 64
    assert doc["candidates"] == 400  # decoded as the chat samples by default (top_k 50)
    r = run_cli("bench", "peer", "--llama-bench", str(fake_llama_bench), "--rounds", "0")
    assert r.returncode == 2 and r.stderr == "sinkchat: error: --rounds must be 1 or more (got 0)\n"
