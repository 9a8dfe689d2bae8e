"""Decode steps of the bundled model over a float32 and a bfloat16 KV cache, alternating in one process.

Both caches are filled to ``--window`` + 4 tokens of the default text by prefill, then each round
decodes one token on each (the fast path's own step: a float32 cache through SDPA, a bf16 one through
:func:`sinkchat.model.fast.matmul_attention`), so on a shared machine both see the same load; the
printed figures are medians of ``--rounds`` steps and their ratio.

    PYTHONPATH=. python scripts/bench_kv_dtype.py --window 2000 --rounds 200 --threads 1
"""

from __future__ import annotations

import argparse

import torch
from bench_kernels import alternate

from sinkchat.bench import default_text, text_ids
from sinkchat.kv import SinkCache
from sinkchat.model import load
from sinkchat.model.gguf import native_bf16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None, help="torch threads [default: torch's]")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load("smollm2-135m", quant="auto", device="cpu", kv_dtype="float32")
    held = args.window + 4
    ids = text_ids(loaded.tokenizer, default_text(), held + args.rounds + 1)
    steps = {}
    with torch.inference_mode():
        for kv in (torch.float32, torch.bfloat16):
            cache = SinkCache.for_model(loaded.model, 4, args.window, dtype=kv)
            for at in range(0, held, 500):
                chunk = ids[at : min(at + 500, held)]
                positions, _ = cache.reserve(len(chunk))
                loaded.fast(chunk, positions, cache)
            stream = iter(ids[held:])

            def step(cache=cache, stream=stream):
                positions, _ = cache.reserve(1)
                loaded.fast([next(stream)], positions, cache)

            steps[str(kv).removeprefix("torch.")] = step
        ms = alternate(steps, args.rounds)
    print(
        f"SmolLM2-135M ({loaded.runs}), {held} cached tokens, {torch.get_num_threads()} threads, "
        f"{args.rounds} rounds, torch {torch.__version__}, native bf16: {native_bf16()}"
    )
    for kv, t in ms.items():
        print(f"  {kv:<9} cache: {t:6.2f} ms a token ({1000 / t:5.1f} tok/s)")
    print(f"  bfloat16 / float32: {ms['bfloat16'] / ms['float32']:.3f}")


if __name__ == "__main__":
    main()
