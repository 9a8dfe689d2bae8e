"""A randomly initialised Llama-shaped model written as a GGUF file, for benchmarks at sizes the bundled
135M model cannot show (per-op overheads dominate a small model's decode step; a large one is bound by
the bytes its weights take): ``sinkchat bench peer --model OUT.gguf`` runs sinkchat and llama.cpp on it.

    PYTHONPATH=. python scripts/random_gguf.py llama-3.2-1b-random.gguf --shape llama-3.2-1b

Shapes follow the named model's config (heads of 64 dims); every projection is ``--type`` (Q4_0 by
default, quantized by gguf-py), the tied embeddings Q8_0; the vocabulary is a byte-level one padded to
the model's size, so the output head has its real shape (the text a random model writes is noise).
The GGUF writer is the tests' (``tests/_tinygguf.py``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _tinygguf import tiny_llama  # noqa: E402

# name -> (layers, hidden, intermediate, query heads, key/value heads, vocabulary, RoPE theta)
SHAPES = {
    "llama-3.2-1b": (16, 2048, 8192, 32, 8, 128256, 500000.0),
    "llama-3.2-3b": (28, 3072, 8192, 24, 8, 128256, 500000.0),
    "smollm2-360m": (32, 960, 2560, 15, 5, 49152, 100000.0),
}
PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    parser.add_argument("--type", default="Q4_0", choices=["Q4_0", "Q4_1", "Q8_0"])
    args = parser.parse_args()
    layers, hidden, inter, heads, kv_heads, vocab, theta = SHAPES[args.shape]
    types = [dict.fromkeys(PROJECTIONS, args.type)] * layers
    file_type = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7}[args.type]
    tiny_llama(args.out, types, "Q8_0", file_type, hidden, inter, heads, kv_heads, vocab, theta, context=8192)
    print(f"{args.out}: {args.shape}-shaped, {args.type}, {args.out.stat().st_size / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
