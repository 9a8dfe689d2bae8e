"""The quick start (sinkchat.model.quickload, sinkchat.model.tokenizer): a Llama-family model in 4-bit on the CPU
loads without transformers' model classes and tokenizer, and computes exactly what the transformers
load does: the same ids, renders, logits and fingerprints."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _helpers import GREEDY, say
from sinkchat.engine import Chat
from sinkchat.kv import SinkCache
from sinkchat.model import bundled_gguf, forward, gguf_target, load, quickload
from sinkchat.model.tokenizer import Tokenizer, serves

pytestmark = pytest.mark.model

TEXT = st.text(st.characters(codec="utf-8"), max_size=60) | st.lists(
    st.sampled_from(["<|im_start|>", "<|im_end|>", "<|endoftext|>", "user", "\n", " ", "  ", "é", "🙂", "{{", "%}"]),
    max_size=12).map("".join)


def logits_of(loaded, ids: list[int]) -> list[torch.Tensor]:
    """Logits of a prefill chunk and then of single tokens past an eviction, on a fresh sink cache."""
    cache, out = SinkCache.for_model(loaded.model, 4, 32, 8), []
    with torch.inference_mode():
        for chunk in [ids[:24]] + [[t] for t in ids[24:]]:
            positions, _ = cache.reserve(len(chunk))
            out.append(forward(loaded.model, cache, chunk, positions))
    assert cache.evictions
    return out


def test_the_bundled_model_loads_quick_and_computes_what_transformers_does(smollm, smollm_hf):
    assert isinstance(smollm.model, quickload.Skeleton) and isinstance(smollm.tokenizer, Tokenizer)
    assert not isinstance(smollm_hf.model, quickload.Skeleton)
    assert smollm.fingerprint == smollm_hf.fingerprint  # a chat saved by either resumes on the other
    ids = smollm_hf.tokenizer("The quick brown fox jumps over the lazy dog, " * 6)["input_ids"][:60]
    assert all(torch.equal(a, b) for a, b in zip(logits_of(smollm, ids), logits_of(smollm_hf, ids)))
    replies = []
    for loaded in (smollm, smollm_hf):
        chat = Chat(loaded, GREEDY.replace(sinks=4, window=48, max_new_tokens=16))
        replies.append([say(chat, "What is the capital of France?"), say(chat, "And of Italy?"), chat.tokens])
    assert replies[0] == replies[1]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT, split=st.booleans(), ids=st.lists(st.integers(0, 49151), max_size=30))
def test_the_tokenizer_reads_and_writes_text_as_transformers_does(smollm, smollm_hf, text, split, ids):
    quick, hf = smollm.tokenizer, smollm_hf.tokenizer
    kwargs = dict(add_special_tokens=False, split_special_tokens=split)
    assert quick(text, **kwargs)["input_ids"] == hf(text, **kwargs)["input_ids"]
    assert quick.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(contents=st.lists(TEXT, min_size=1, max_size=4), system=st.booleans(), gen=st.booleans())
def test_the_chat_template_renders_as_transformers_renders_it(smollm, smollm_hf, contents, system, gen):
    roles = ["user", "assistant"] * 2
    messages = [{"role": "system", "content": "Be brief."}] * system + [
        {"role": role, "content": c} for role, c in zip(roles, contents)]
    render = lambda tok: tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)  # noqa: E731
    assert render(smollm.tokenizer) == render(smollm_hf.tokenizer)


def test_the_tokenizer_knows_the_same_tokens(smollm, smollm_hf):
    quick, hf = smollm.tokenizer, smollm_hf.tokenizer
    assert quick.get_vocab() == hf.get_vocab() and len(quick) == len(hf)
    assert quick.eos_token_id == hf.eos_token_id and quick.special_tokens_map == hf.special_tokens_map
    assert quick.chat_template == hf.chat_template
    added = lambda tok: {i: (t.content, t.special) for i, t in tok.added_tokens_decoder.items()}  # noqa: E731
    assert added(quick) == added(hf)


def test_a_chat_starts_without_importing_transformers(tmp_path):
    """What makes the start quick: loading the model and opening a chat import neither transformers
    nor torch._dynamo (1.6 s on its own), with the decode step to be compiled (``--compile auto``, as
    users run it, not the suite's eager default); the first reply imports dynamo to compile, and
    still not transformers. (A private cache dir: a compiled layer a chat on this machine kept would
    be read instead of compiled; the converted model and its packed weights are the shared ones.)"""
    from sinkchat import config

    shared, private = config.cache_dir(), tmp_path / "cache"
    for name in ("models", "packed"):
        (shared / name).mkdir(parents=True, exist_ok=True)
        (private / name).parent.mkdir(exist_ok=True)
        (private / name).symlink_to(shared / name, target_is_directory=True)
    code = ("import sys; from sinkchat.model import bundled_gguf, forward, gguf_target, load; from sinkchat.engine import Chat; "
            "from sinkchat.settings import Settings; chat = Chat(load('smollm2-135m', device='cpu'), "
            "Settings(temperature=0, max_new_tokens=4)); "
            "print(sorted(m for m in ('transformers', 'torch._dynamo') if m in sys.modules)); "
            "assert chat.loaded.fast.step_kind == 'compiled on its first step', chat.loaded.fast.step_kind; "
            "list(chat.submit('Hi')); print(sorted(m for m in ('transformers', 'torch._dynamo') if m in sys.modules))")
    env = {k: v for k, v in os.environ.items() if k != "TORCH_COMPILE_DISABLE"}
    env |= {"SINKCHAT_CACHE_DIR": str(private), "TORCHINDUCTOR_CACHE_DIR": str(shared / "inductor")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True, env=env)
    assert out.stdout.split("\n")[:2] == ["[]", "['torch._dynamo']"], out.stdout + out.stderr[-2000:]


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_other_family_members_load_quick_with_the_same_logits(tiny_models, arch, tmp_path):
    quick = load(str(tiny_models[arch]), quant="4bit", device="cpu")
    full = load(str(tiny_models[arch]), quant="4bit", device="cpu", quick=False)
    assert isinstance(quick.model, quickload.Skeleton) and quick.fingerprint == full.fingerprint
    ids = list(range(100, 160))
    assert all(torch.equal(a, b) for a, b in zip(logits_of(quick, ids), logits_of(full, ids)))
    # a config in the older layout (rope_theta at the top, no rope_parameters, as on the Hub) reads the same
    old = shutil.copytree(tiny_models[arch], tmp_path / "old")
    config = json.loads((old / "config.json").read_text())
    config["rope_theta"] = int(config.pop("rope_parameters")["rope_theta"])  # as some Hub configs write it
    (old / "config.json").write_text(json.dumps(config))
    again = load(str(old), quant="4bit", device="cpu")
    full = load(str(old), quant="4bit", device="cpu", quick=False)
    assert isinstance(again.model, quickload.Skeleton) and again.fingerprint["rope"] == full.fingerprint["rope"]


@pytest.mark.parametrize("change", [
    {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
    {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}},
    {"rope_scaling": {"rope_type": "linear", "factor": 4.0}},  # transformers lets it win over rope_parameters
    {"rope_scaling": "linear"}, {"rope_parameters": "default"},
    {"sliding_window": 64}, {"sliding_window": "drop"},  # no key: Mistral's default window of 4096
    {"hidden_act": "gelu"}, {"model_type": "gemma"},
    {"num_hidden_layers": 2.0}, {"num_attention_heads": 0}, {"num_key_value_heads": 3}, {"layer_types": 5},
    {"max_position_embeddings": "drop"}, {"rms_norm_eps": None}, {"vocab_size": True},
    {"rope_parameters": {"type": "linear", "factor": 4.0, "rope_theta": 1e4}},  # the older key
    {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
    {"rope_parameters": {"rope_type": "default", "rope_theta": float("nan")}},
    {"get_text_config": 1}, {"layer_types": ["full_attention"]}, {"head_dim": 0}, {"tie_word_embeddings": "false"},
])
def test_what_the_quick_start_cannot_serve_exactly_loads_through_transformers(tiny_models, tmp_path, change):
    folder = shutil.copytree(tiny_models["mistral"], tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config = {k: v for k, v in {**config, **change}.items() if v != "drop"}
    (folder / "config.json").write_text(json.dumps(config))
    assert quickload.read_config(folder) is None


def test_weights_that_do_not_fit_the_config_load_through_transformers(tiny_models, tmp_path):
    folder = shutil.copytree(tiny_models["qwen2"], tmp_path / "q")
    config = json.loads((folder / "config.json").read_text())
    more = {"num_hidden_layers": 3, "layer_types": ["full_attention"] * 3}  # one layer more than saved
    (folder / "config.json").write_text(json.dumps({**config, **more}))
    with pytest.raises(quickload.NotQuick):
        quickload.load_model(folder, quickload.read_config(folder))
    # a bias the config does not ask for (transformers drops it), or a head beside tied embeddings (it keeps it)
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(quickload.NotQuick):
        quickload.load_model(folder, quickload.read_config(folder))
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    assert isinstance(quickload.load_model(folder, quickload.read_config(folder)), quickload.Skeleton)
    shard = folder / "model.safetensors.index.json"
    shard.write_text(json.dumps({"weight_map": {"x": "model-00001-of-00002.safetensors"}}))
    assert quickload._weight_files(folder) == [folder / "model.safetensors"]  # transformers' choice too
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    assert quickload._weight_files(folder) == [folder / "model-00001-of-00002.safetensors"]
    shard.write_text(json.dumps({"weight_map": {"x": 1}}))
    assert quickload.read_config(folder) is None
    (folder / "generation_config.json").write_text("[1]")  # transformers refuses it, and says why
    (folder / "model-00001-of-00002.safetensors").rename(folder / "model.safetensors")
    with pytest.raises(quickload.NotQuick):
        quickload.load_model(folder, quickload.read_config(folder))


def test_without_a_generation_config_the_eos_ids_come_from_the_config(tiny_models, tmp_path):
    folder = shutil.copytree(tiny_models["mistral"], tmp_path / "g")
    (folder / "generation_config.json").unlink()
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "eos_token_id": [2, 0]}))
    model = quickload.load_model(folder, quickload.read_config(folder))
    assert model.generation_config.eos_token_id == [2, 0]


def test_the_tokenizer_serves_plain_llama_tokenizers_only(smollm, tmp_path):
    folder = shutil.copytree(gguf_target(bundled_gguf()), tmp_path / "t",
                             ignore=shutil.ignore_patterns("*.safetensors"))
    assert serves(folder, "llama") and not serves(folder, "qwen2") and not serves(folder, "mistral")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    for change in ({"tokenizer_class": "LlamaTokenizer"}, {"tokenizer_class": None}, {"extra_special_tokens": {
            "image_token": "<image>"}}, {"added_tokens_decoder": {"49152": {"content": "<x>", "special": True}}}):
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, **change}))
        assert not serves(folder, "llama")
    for eos in ("<|not-in-the-vocab|>", "hello"):  # transformers adds it, or makes a word special
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": eos}))
        assert not isinstance(quickload.load_tokenizer(folder, "llama"), Tokenizer)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "added_tokens.json").write_text(json.dumps({"<|new|>": 49152}))
    assert not serves(folder, "llama")
    (folder / "added_tokens.json").unlink()
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["truncation"] = {"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    text = "Hello world, this is a longer text"
    assert Tokenizer(folder)(text, add_special_tokens=False)["input_ids"] == smollm.tokenizer(text)["input_ids"]


@pytest.mark.parametrize("quick", [True, False])
def test_a_dangling_link_or_a_folder_among_the_weights_is_not_read(tiny_models, tmp_path, quick):
    """The fingerprint and the packed weights' key both list the folder's files: neither stats a
    link to nothing (``extra.bin``) or a folder named like a config (``sub.json``)."""
    folder = shutil.copytree(tiny_models["mistral"], tmp_path / "d")
    clean = load(str(folder), quant="4bit", device="cpu", quick=quick).fingerprint["files"]
    (folder / "extra.bin").symlink_to(tmp_path / "nowhere")
    (folder / "sub.json").mkdir()
    assert load(str(folder), quant="4bit", device="cpu", quick=quick).fingerprint["files"] == clean
