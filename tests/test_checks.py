"""What is refused before any weights load or any GGUF is converted, and what no longer is: a
hybrid model's window may pass its sliding layers' native window."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _helpers import run_cli
from sinkchat.errors import SinkchatError
from sinkchat.model import check_context
from sinkchat.model import header as gguf_header
from sinkchat.model.checks import check_gguf


def write_gguf(path, arch: str, context: int | str = 4096, vocab: int = 1000) -> None:
    """A small GGUF file: the metadata a model has (a vocabulary array included) and one tensor."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    if isinstance(context, str):  # a damaged value: text where a count belongs
        writer.add_string(f"{arch}.context_length", context)
    else:
        writer.add_context_length(context)
    writer.add_block_count(2)
    writer.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(vocab)])
    writer.add_array("tokenizer.ggml.scores", [0.0] * vocab)
    writer.add_tensor("token_embd.weight", np.zeros((vocab, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("config", [
    {"model_type": "gemma3_text", "sliding_window": 512, "num_hidden_layers": 18, "max_position_embeddings": 32768},
    {"model_type": "gemma3_text", "sliding_window": 512, "max_position_embeddings": 32768,
     "layer_types": ["sliding_attention", "full_attention"]},
    {"model_type": "gpt_oss", "sliding_window": 128, "max_position_embeddings": 131072,
     "layer_types": ["sliding_attention", "full_attention"] * 12},
    {"model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": False, "max_position_embeddings": 32768},
])
def test_a_hybrid_model_may_stream_past_its_sliding_window(config):
    check_context(config, "m", 4, 8000)


def test_a_raw_config_transformers_alone_can_read_is_left_to_the_load():
    """Gemma 2 or gpt-oss without ``layer_types`` in config.json: only transformers knows which layers
    slide, so the check before loading does not guess (it refused what plain mode then streamed)."""
    for kind in ("gemma2", "gpt_oss"):
        check_context({"model_type": kind, "sliding_window": 8, "max_position_embeddings": 4096}, "m", 4, 2000)


@pytest.mark.parametrize("window", [0, -5, "512", None, True])
def test_a_hybrid_models_sliding_window_must_be_a_positive_integer(window):
    config = {"model_type": "gemma3_text", "sliding_window": window, "max_position_embeddings": 32768,
              "layer_types": ["sliding_attention", "full_attention"]}
    with pytest.raises(SinkchatError, match="must be a positive integer"):
        check_context(config, "m", 4, 100)


def test_learned_sinks_are_counted_before_the_model_loads():
    """gpt-oss learned its sink: --sinks defaults to 0 for it, so a window of its whole context fits."""
    check_context({"model_type": "gpt_oss", "max_position_embeddings": 64}, "m", None, 64)
    with pytest.raises(SinkchatError, match="sinks \\(4\\) \\+ window \\(64\\)"):
        check_context({"model_type": "llama", "max_position_embeddings": 64}, "m", None, 64)


@pytest.mark.parametrize("config", [
    {"model_type": "mistral", "sliding_window": 4096, "max_position_embeddings": 32768},  # every layer slides
    {"model_type": "mistral", "max_position_embeddings": 32768},  # transformers' default window: 4096
    {"model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": True, "max_window_layers": 0,
     "num_hidden_layers": 4, "max_position_embeddings": 32768},
    {"model_type": "gemma3_text", "sliding_window": 512, "max_position_embeddings": 32768,
     "layer_types": ["sliding_attention"] * 4},
])
def test_a_model_that_slides_everywhere_keeps_its_window(config):
    with pytest.raises(SinkchatError, match="native sliding window"):
        check_context(config, "m", 4, 8000)


def test_the_header_is_read_without_the_tensors(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, "llama", context=1234, vocab=50_000)
    meta = gguf_header.read(path)
    assert meta["general.architecture"] == "llama" and meta["llama.context_length"] == 1234
    assert meta["tokenizer.ggml.tokens"] is None  # an array: skipped, not decoded


@settings(max_examples=60, deadline=None)
@given(cut=st.integers(min_value=0, max_value=400), flip=st.integers(min_value=0, max_value=399))
def test_a_damaged_header_is_one_clear_error(tmp_path_factory, cut, flip):
    """Any prefix of a GGUF file, or one with a byte changed, reads or fails with HeaderError, never
    another exception (no traceback reaches the user)."""
    path = tmp_path_factory.mktemp("h") / "m.gguf"
    write_gguf(path, "llama", vocab=20)
    data = bytearray(path.read_bytes())
    data[flip] ^= 0xFF
    for damaged in (bytes(data[:cut]), bytes(data)):
        path.write_bytes(damaged)
        try:
            gguf_header.read(path)
        except gguf_header.HeaderError:
            pass


@pytest.mark.parametrize("arch,context,message", [
    ("gpt2", 4096, "learned absolute position embeddings, not RoPE"),
    ("bloom", 4096, "ALiBi"),
    ("t5", 4096, "encoder model"),
    ("llama", 256, "context of 256 tokens"),
    ("llama", "long", "context length is not a positive integer"),
])
def test_a_refused_gguf_is_refused_from_its_header_before_any_conversion(tmp_path, monkeypatch, arch, context,
                                                                        message):
    """Through the real command line: one line, exit 2, and nothing written to the model cache (the
    conversion would write the whole model dequantized)."""
    path = tmp_path / "m.gguf"
    write_gguf(path, arch, context=context)
    cache = tmp_path / "cache"
    with pytest.raises(SinkchatError, match=message):
        check_gguf(path, "m.gguf", (4, 2000))
    commands = [["--plain", "--no-save"], ["--no-save"]]  # the TUI's check runs before its screen opens
    if arch != "llama":  # bench attention checks no geometry, but the rest before converting all the same
        commands.append(["bench", "attention", "--json"])
    for command in commands:
        args = ["--model", str(path), *command] if command[0] != "bench" else [*command, "--model", str(path)]
        out = run_cli(*args, input="hi\n", env={"SINKCHAT_CACHE_DIR": str(cache)}, timeout=120)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and message in out.stderr, out.stderr
    assert not (cache / "models").exists() or not any((cache / "models").iterdir())


def test_a_file_that_is_not_gguf_is_one_line(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"PK\x03\x04 a zip file")
    out = run_cli("--model", str(path), "--plain", "--no-save", input="hi\n",
                  env={"SINKCHAT_CACHE_DIR": str(tmp_path / "cache")}, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "not a GGUF file" in out.stderr, out.stderr
