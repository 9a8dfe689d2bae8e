"""GGUF files written in the tests: tensors of each block type (quantized with gguf-py's own quantizers
where it has one, synthetic blocks for the K-quants it can only dequantize) and a tiny Llama model with
mixed block types and a byte-level tokenizer, small enough to convert in seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np

QUANTIZED_BY_GGUF = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")  # gguf-py has quantizers for these
SYNTHETIC = ("Q4_K", "Q5_K", "Q6_K")  # gguf-py only dequantizes these: random codes, sensible scales


def blocks(block_type: str, rows: int, cols: int, seed: int = 0, scale: float = 0.05) -> np.ndarray:
    """A ``[rows, cols]`` weight of ``block_type`` as the file stores it, uint8 ``[rows, bytes]`` (F32
    and F16: their float values)."""
    import gguf

    rng = np.random.default_rng(seed)
    if block_type in ("F32", "F16"):
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float32 if block_type == "F32" else np.float16)
    qtype = gguf.GGMLQuantizationType[block_type]
    if block_type in QUANTIZED_BY_GGUF:
        return gguf.quants.quantize((rng.standard_normal((rows, cols)) * scale).astype(np.float32), qtype)
    n = rows * cols // 256  # super-blocks of 256 weights
    f16 = lambda size: (rng.uniform(0.5, 1.0, (n, 1)) * size).astype(np.float16).view(np.uint8)  # noqa: E731
    raw = lambda size: rng.integers(0, 256, (n, size), dtype=np.uint8)  # noqa: E731
    if block_type == "Q4_K":  # d, dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles
        parts = [f16(scale / 500), f16(scale / 60), raw(12), raw(128)]
    elif block_type == "Q5_K":  # as Q4_K, plus 32 bytes of fifth bits
        parts = [f16(scale / 1000), f16(scale / 60), raw(12), raw(32), raw(128)]
    else:  # Q6_K: 128 bytes of low nibbles, 64 of high bits, 16 int8 scales, d
        parts = [raw(128), raw(64), rng.integers(-64, 64, (n, 16), dtype=np.int8).view(np.uint8), f16(scale / 2000)]
    return np.concatenate(parts, 1).reshape(rows, -1)


def write_tensors(path: Path, tensors: dict[str, tuple[str, int, int]], arch: str = "llama", **fields) -> Path:
    """A GGUF file holding ``name -> (block type, rows, columns)`` tensors (seeded by their order) and
    integer metadata ``fields`` (``head_count=4`` becomes ``{arch}.attention.head_count``)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in fields.items():
        writer.add_uint32(f"{arch}.attention.{key}", value)
    for seed, (name, (block_type, rows, cols)) in enumerate(tensors.items()):
        add(writer, name, block_type, blocks(block_type, rows, cols, seed))
    _finish(writer)
    return path


def add(writer, name: str, block_type: str, data: np.ndarray) -> None:
    import gguf

    if block_type in ("F32", "F16"):
        writer.add_tensor(name, data)
    else:
        writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[block_type])


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# The tiny model: 2 layers, hidden 256 (K-quants need inputs in whole 256-weight super-blocks), MLP 512,
# 4 query heads and 2 key/value heads of 64. Every block type sinkchat maps appears, q/k/v mixed.
HIDDEN, INTER, HEADS, KV_HEADS = 256, 512, 4, 2
TYPES = [
    {"attn_q": "Q4_K", "attn_k": "Q5_0", "attn_v": "Q8_0", "attn_output": "Q4_0",
     "ffn_gate": "Q5_K", "ffn_up": "Q4_1", "ffn_down": "Q6_K"},
    {"attn_q": "Q5_1", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q8_0",
     "ffn_gate": "Q4_0", "ffn_up": "Q5_0", "ffn_down": "F16"},
]
EMBEDDINGS = "Q8_0"  # tied: the output head reads them too


def byte_vocab() -> list[str]:
    """A byte-level BPE vocabulary without merges: GPT-2's 256 byte symbols, the chat specials, padding
    to a multiple of 16 rows."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *bytes_to_unicode().values()]
    return tokens + [f"<pad{i}>" for i in range(-len(tokens) % 16)]


TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_llama(path: Path, types: list[dict[str, str]] = TYPES, embeddings: str = EMBEDDINGS,
               file_type: int = 15, hidden: int = HIDDEN, inter: int = INTER, heads: int = HEADS,
               kv_heads: int = KV_HEADS, vocab_size: int = 0, rope_theta: float = 10000.0,
               context: int = 2048) -> Path:
    """The tiny mixed-type Llama as a GGUF file (``file_type`` 15: "Q4_K_M", as llama.cpp labels a mix),
    one layer per entry of ``types``; the other arguments give a model of another shape (heads of 64
    dims; ``vocab_size``: the byte vocabulary padded to that many tokens)."""
    import gguf

    vocab = byte_vocab()
    merges = ["a b"] if vocab_size else []  # llama.cpp refuses a byte-level vocabulary without any merge
    vocab += ["ab"] * bool(merges) + [f"<pad{i}>" for i in range(len(vocab) + len(merges), vocab_size)]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(len(types))
    w.add_context_length(context)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(rope_theta)
    w.add_rope_dimension_count(64)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(vocab))
    w.add_file_type(file_type)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab)
    w.add_token_types([3, 3, 3] + [1] * (len(vocab) - 3))
    w.add_token_scores([0.0] * len(vocab))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)
    seed = 0
    rng = np.random.default_rng(99)
    add(w, "token_embd.weight", embeddings, blocks(embeddings, len(vocab), hidden, seed, scale=0.5))
    for i, kinds in enumerate(types):
        shapes = {"attn_q": (heads * 64, hidden), "attn_k": (kv_heads * 64, hidden), "attn_v": (kv_heads * 64, hidden),
                  "attn_output": (hidden, heads * 64), "ffn_gate": (inter, hidden), "ffn_up": (inter, hidden),
                  "ffn_down": (hidden, inter)}
        for name, (rows, cols) in shapes.items():
            seed += 1
            add(w, f"blk.{i}.{name}.weight", kinds[name], blocks(kinds[name], rows, cols, seed))
        for norm in ("attn_norm", "ffn_norm"):
            add(w, f"blk.{i}.{norm}.weight", "F32", (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
    add(w, "output_norm.weight", "F32", np.ones(hidden, dtype=np.float32))
    _finish(w)
    return path
