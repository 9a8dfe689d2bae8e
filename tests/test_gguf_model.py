"""GGUF models at their own precision, end to end: a tiny Llama written as a GGUF with every block type
mixed (tests/_tinygguf.py) against its own values (``--quant none``), the notice when fewer bits are
forced, the bundled Q4_1 model bit for bit as before, and perplexity scored as llama.cpp's
``llama-perplexity`` scores it (a stand-in binary here: llama.cpp is not installed in the suite)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from _helpers import one_line_error, run_cli, stand_in
from sinkchat.bench.ppl import llama_chunks
from sinkchat.bench.stream import Stream, dense_cache
from sinkchat.kv import SinkCache
from sinkchat.model import blockkernels, bundled_gguf, gguf_folder, load
from sinkchat.model.gguf import LABEL, eight_bit_kernel
from sinkchat.model.quant import HalfLinear, Int4Linear

TEXT = "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 3


def logits(loaded, cache, ids: list[int], chunk: int = 40) -> torch.Tensor:
    """A prefill chunk, then one token at a time, as a chat runs them."""
    stream = Stream(loaded.model, cache)
    return torch.cat([stream.forward(ids[:chunk])] + [stream.forward([t]) for t in ids[chunk:]])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_a_mixed_gguf_runs_each_block_type_on_its_kernel_and_matches_its_own_values(tiny_gguf):
    none = load(str(tiny_gguf), quant="none", device="cpu", quick=False)
    auto = load(str(tiny_gguf), quant="auto", device="cpu")
    auto_hf = load(str(tiny_gguf), quant="auto", device="cpu", quick=False)
    forced = load(str(tiny_gguf), quant="4bit", device="cpu", quick=False)
    eight = eight_bit_kernel()  # int8 planes with AVX-512, float16 elsewhere (forced both ways in test_gguf.py)
    assert auto.runs == f"gguf Q4_K_M -> int4 g32{' + int8 g32' * (eight == 'int8')} + fp16" and not auto.notices
    assert auto.kernels["Q4_K"] == {"int4": 2} and auto.kernels["Q6_K"] == {"fp16": 2} and auto.fast is not None
    assert auto.kernels["Q8_0"] == ({"int8": 2, "fp16": 1} if eight == "int8" else {"fp16": 3})  # v, o, the head
    first = auto.model.model.layers[0]
    kinds = [type(m) for m in (first.self_attn.q_proj, first.self_attn.k_proj, first.self_attn.v_proj,
                               first.self_attn.o_proj, first.mlp.gate_proj, first.mlp.up_proj, first.mlp.down_proj)]
    planes = blockkernels.Int8Planes if eight == "int8" else HalfLinear
    assert kinds == [Int4Linear, planes, planes, Int4Linear, planes, Int4Linear, HalfLinear]  # Q4_K Q5_0 Q8_0 Q4_0 Q5_K Q4_1 Q6_K
    assert isinstance(auto.fast.layers[0].qkv, blockkernels.Stack)  # q, k, v on different kernels
    assert isinstance(auto.model.get_output_embeddings(), HalfLinear)
    ids = auto.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    ref = logits(none, SinkCache.for_model(none.model, 4, 60), ids)
    on_fast = rel(logits(auto, SinkCache.for_model(auto.model, 4, 60), ids), ref)  # evictions included
    on_transformers = rel(logits(auto_hf, dense_cache(auto_hf.model), ids), logits(none, dense_cache(none.model), ids))
    requantized = rel(logits(forced, SinkCache.for_model(forced.model, 4, 60), ids), ref)
    # bf16 scales and activations move these logits ~1e-3; int4 re-quantization of the 5-16-bit tensors ~10x more
    assert on_fast < 1e-2 and on_transformers < 1e-2 and requantized > 3 * max(on_fast, on_transformers), \
        (on_fast, on_transformers, requantized)


def test_fewer_bits_than_the_file_has_are_said_once_with_what_they_cost(tiny_gguf):
    forced = load(str(tiny_gguf), quant="4bit", device="cpu")
    assert forced.runs == "gguf Q4_K_M -> int4 g32 + fp16"
    assert forced.weights == "4bit: gguf Q4_K_M -> int4 g32 + fp16"  # its Q4_0/Q4_K blocks: not what 4bit gave
    [notice] = forced.take_notices()
    assert notice.startswith("--quant 4bit re-quantizes 9 Q5_0/Q8_0/Q5_K/Q6_K/Q5_1/F16 tensors of this Q4_K_M file "
                             "to int4 g32; they move ") and "--quant auto runs them at the file's own precision" in notice
    moved = float(notice.split("they move ")[1].split("%")[0])
    assert 3 < moved < 15  # int4 steps on these weights: several percent, not a rounding
    assert forced.take_notices() == []
    r = run_cli("--plain", "--model", str(tiny_gguf), "--quant", "4bit", "--no-save", "-t", "0",
                "--max-new-tokens", "2", input="hi\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("re-quantizes 9 Q5_0/Q8_0/Q5_K/Q6_K/Q5_1/F16 tensors") == 1, r.stderr


def test_the_bundled_q4_1_model_is_bit_for_bit_what_it_was(smollm):
    """Its Q4_1 blocks read from the file pack exactly as re-quantizing their values did (every group
    spans its 16 codes), and its Q8_0 head is the same float16 copy: the same logits, bit for bit, as
    loading the converted folder the old way (min/max re-quantization), with --quant auto and 4bit."""
    old = load(str(gguf_folder(bundled_gguf())), quant="4bit", device="cpu")
    forced = load("smollm2-135m", quant="4bit", device="cpu")
    assert old.runs == "4bit" and forced.runs == smollm.runs == "gguf Q4_1 -> int4 g32 + fp16"
    ids = smollm.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    expected = logits(old, SinkCache.for_model(old.model, 4, 40), ids)
    for loaded in (smollm, forced):
        assert torch.equal(logits(loaded, SinkCache.for_model(loaded.model, 4, 40), ids), expected)
    assert forced.fingerprint["weights"] == old.fingerprint["weights"] == "int4pack-g32"  # old 4bit chats resume


def test_packed_blocks_are_kept_for_the_next_start(tiny_gguf, tmp_path, monkeypatch):
    """A GGUF's blocks packed from their codes are kept in the cache dir (as re-quantized weights always
    were), so a later start reads them instead of the codes; both starts compute the same."""
    from safetensors.torch import load_file

    monkeypatch.setenv("SINKCHAT_CACHE_DIR", str(tmp_path))
    first = load(str(tiny_gguf), quant="auto", device="cpu")
    [kept] = (tmp_path / "packed").glob("*.safetensors")
    names = set(load_file(kept))
    assert "gguf.model.layers.0.self_attn.q_proj.int4.packed" in names  # Q4_K: its codes, packed
    assert any(n.endswith(".int8.packed") for n in names) == (eight_bit_kernel() == "int8")
    stamp = kept.stat().st_mtime_ns
    second = load(str(tiny_gguf), quant="auto", device="cpu")
    assert kept.stat().st_mtime_ns == stamp  # nothing new to keep: all of it was read back
    ids = first.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert torch.equal(logits(first, SinkCache.for_model(first.model, 4, 60), ids),
                       logits(second, SinkCache.for_model(second.model, 4, 60), ids))


def test_llama_perplexity_chunks():
    """llama.cpp's chunks: the text's tokens (BOS first where the model adds one) cut in whole chunks
    of ctx, each chunk's first token BOS; a model without BOS keeps its tokens as they are."""
    assert llama_chunks([1, *range(10, 20)], 4, 1) == [[1, 10, 11, 12], [1, 14, 15, 16]]
    assert llama_chunks(list(range(10, 20)), 4, None) == [[10, 11, 12, 13], [14, 15, 16, 17]]
    assert llama_chunks([5, 6], 4, None) == []


def test_bench_ppl_ctx_scores_the_second_half_of_each_chunk(tiny_gguf):
    """``bench ppl --ctx`` against the same chunks scored here with transformers' own forward."""
    r = run_cli("bench", "ppl", "--model", str(tiny_gguf), "--quant", "none", "--modes", "dense", "--ctx", "32",
                "--tokens", "100", "--text", str(write_text(tiny_gguf.parent)), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    [result] = doc["results"]
    assert result["tokens"] == 3 * 15 and doc["ctx"] == 32  # 3 whole chunks of 32, tokens 16..30 of each
    loaded = load(str(tiny_gguf), quant="none", device="cpu", quick=False)
    ids = loaded.tokenizer(TEXT * 3)["input_ids"][:100]  # as llama.cpp tokenizes it: BOS first where the model adds one
    bos = loaded.tokenizer.bos_token_id if ids[0] == loaded.tokenizer.bos_token_id else None
    nll = []
    for a in range(0, 3 * 32, 32):  # llama.cpp's chunks: each one's first token BOS where the model has one
        chunk = ids[a : a + 32] if bos is None else [bos, *ids[a + 1 : a + 32]]
        with torch.inference_mode():
            out = loaded.model(input_ids=torch.tensor([chunk])).logits[0].float()
        nll += [(torch.logsumexp(out[j], -1) - out[j, chunk[j + 1]]).item() for j in range(16, 31)]
    assert result["ppl"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-4)
    bad = run_cli("bench", "ppl", "--model", str(tiny_gguf), "--modes", "dense,sinks", "--ctx", "32")
    one_line_error(bad, "--ctx scores dense in llama.cpp's chunks")


def write_text(folder):
    path = folder / "peer-text.txt"
    path.write_text(TEXT * 3, encoding="utf-8")
    return path


FAKE_PERPLEXITY = '''#!{python}
# A stand-in for llama.cpp's llama-perplexity: its output lines, for the arguments it was given.
import json, sys
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
text = open(args["-f"], encoding="utf-8").read()
open(sys.argv[0] + ".args", "w").write(json.dumps(args))
if "fail" in text:
    sys.exit("error: failed to tokenize")
print("[1]5.0000,[2]6.0000,")
print("Final estimate: PPL = 6.0000 +/- 0.10000", file=sys.stderr)
'''


@pytest.fixture
def fake_perplexity(tmp_path):
    return stand_in(tmp_path / "llama-perplexity", FAKE_PERPLEXITY)


def test_bench_peer_ppl_prints_both_and_their_ratio(tiny_gguf, fake_perplexity, tmp_path):
    text = write_text(tmp_path)
    r = run_cli("bench", "peer", "--ppl", "--llama-perplexity", str(fake_perplexity), "--model", str(tiny_gguf),
                "--ctx", "32", "--chunks", "2", "--text", str(text), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["llama.cpp"] == {"ppl": 6.0, "chunks": [5.0, 6.0]} and (doc["ctx"], doc["chunks"]) == (32, 2)
    ours = doc["sinkchat"]
    assert len(ours["chunks"]) == 2 and ours["chunks"][-1] == pytest.approx(ours["ppl"]) and ours["bos"] is False
    assert doc["ratio"]["ppl"] == pytest.approx(ours["ppl"] / 6.0)
    assert doc["machine"]["runs"].startswith("gguf Q4_K_M -> int4 g32 + ")
    args = json.loads((tmp_path / "llama-perplexity.args").read_text())
    assert (args["-m"], args["-f"], args["-c"], args["--chunks"]) == (str(tiny_gguf), str(text), "32", "2")
    table = run_cli("bench", "peer", "--ppl", "--llama-perplexity", str(fake_perplexity), "--model", str(tiny_gguf),
                    "--ctx", "32", "--chunks", "2", "--text", str(text), env={"COLUMNS": "200"})
    assert table.returncode == 0 and "sinkchat / llama.cpp" in table.stdout
    assert f"Q5_0 -> {LABEL[eight_bit_kernel()]} (2)" in table.stdout  # which kernel each block type ran on


def test_bench_speed_says_which_kernel_each_block_type_ran_on(tiny_gguf):
    common = ("bench", "speed", "--model", str(tiny_gguf), "--window", "60", "--tokens", "64", "--points", "1",
              "--steps", "2", "--modes", "sinks")
    doc = json.loads(run_cli(*common, "--json").stdout)
    assert doc["machine"]["kernels"]["Q4_K"] == {"int4": 2} and doc["machine"]["runs"].startswith("gguf Q4_K_M")
    table = run_cli(*common, env={"COLUMNS": "200"})
    assert table.returncode == 0, table.stderr
    assert "sinkchat ran gguf Q4_K_M -> int4 g32" in table.stdout and "Q4_K -> int4 g32 (2)" in table.stdout


def test_bench_peer_ppl_refusals_are_one_line(tiny_gguf, fake_perplexity, tmp_path):
    failing = tmp_path / "fail.txt"
    failing.write_text("fail " * 100)
    one_line_error(run_cli("bench", "peer", "--ppl", "--llama-perplexity", str(fake_perplexity), "--model",
                           str(tiny_gguf), "--text", str(failing), "--json"), "llama-perplexity failed (exit 1)")
    one_line_error(run_cli("bench", "peer", "--ppl", "--llama-perplexity", str(tmp_path / "none")),
                   "--llama-perplexity", "not an executable file")
    one_line_error(run_cli("bench", "peer", "--ppl", "--llama-perplexity", str(fake_perplexity), "--model",
                           str(tiny_gguf), "--ctx", "64", "--chunks", "50", "--text", str(write_text(tmp_path)),
                           "--json"),
                   "chunks of 64 tokens, not 50")
