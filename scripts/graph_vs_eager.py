"""Why the static decode step's logits differed from the eager step's: the same model, weights and
tokens through both, in bf16 and in float32, on the CPU (no GPU needed).

The static step (:meth:`FastModel.static_step`, what a CUDA graph and inductor run) attends over
every slot of the cache with the empty ones masked. The eager step used to attend over the filled
slots only, with no mask: for a 16-bit cache another SDPA kernel, rounding differently. It now runs
the static step's attention for one token; ``filled only`` below is the old eager step, kept here
(a subclass) to show the difference. If the mask were wrong, float32 would show it as plainly as
bf16; the float32 rows and each bf16 path's distance from float32 compute say how much of any
difference is bf16 rounding (the output head is bf16 in every run: one rounding step of the
largest logit is ~4e-3 of it).

    PYTHONPATH=. python scripts/graph_vs_eager.py            # the bundled SmolLM2-135M, window 2000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sinkchat.bench import default_text, text_ids  # noqa: E402
from sinkchat.engine import prefill_chunk  # noqa: E402
from sinkchat.kv import SinkCache  # noqa: E402
from sinkchat.model import load  # noqa: E402
from sinkchat.model.fast import FastModel  # noqa: E402
from sinkchat.model.gpu import DenseLinear  # noqa: E402


class FilledOnly(FastModel):
    """The eager step as it was: one token's bf16 SDPA over the filled slots alone, no mask."""

    def _attend_slots(self, q, keys, values, slot, window):
        filled = int(slot) + 1
        return self._attend(q, keys[:, :, :filled], values[:, :, :filled], window)


def run(fast: FastModel, model, ids: list[int], start: int, steps: int, window: int, dtype, static: bool):
    """Logits of ``steps`` single-token steps after prefilling ``ids[:start]`` (the cache full, evicting)."""
    cache = SinkCache.for_model(model, 4, window, dtype=dtype)
    out = []
    with torch.inference_mode():
        chunk = prefill_chunk(window)
        for a in range(0, start, chunk):
            part = ids[a : min(start, a + chunk)]
            positions, _ = cache.reserve(len(part))
            fast(part, positions, cache)
        fast.compiled = fast.static_step if static else None  # the graph's step, uncompiled: the same math
        for t in ids[start : start + steps]:
            positions, _ = cache.reserve(1)
            out.append(fast([t], positions, cache)[0].float())
        fast.compiled = None
    return out


def worst(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(((x - y).abs().max() / y.abs().max()).item() for x, y in zip(a, b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--window", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    paths = {}
    for name, dtype in (("bf16", torch.bfloat16), ("float32", torch.float32)):
        loaded = load("smollm2-135m", quant="none", device="cpu", dtype="bfloat16", quick=False)
        model = loaded.model  # bf16 weights either way; computed in ``dtype``
        ids = text_ids(loaded.tokenizer, default_text(), args.window + 200 + args.steps)
        start = args.window + 200
        fast = FastModel.build(model, make=lambda w, b, key, dtype=dtype: DenseLinear(w, b, dtype))
        for static in (False, True):
            paths[name, static] = run(fast, model, ids, start, args.steps, args.window, dtype, static)
        if name == "bf16":
            fast.__class__ = FilledOnly
            paths[name, "filled"] = run(fast, model, ids, start, args.steps, args.window, dtype, False)
    print(f"SmolLM2-135M bf16 weights, 4 + {args.window} window, {args.steps} steps from position {start}; "
          "largest |difference| / largest |logit|:")
    rows = [("static vs eager, bf16 compute and KV", ("bf16", True), ("bf16", False)),
            ("static vs eager over the filled slots only (before), bf16", ("bf16", True), ("bf16", "filled")),
            ("static vs eager, float32 compute and KV", ("float32", True), ("float32", False)),
            ("eager bf16 vs eager float32", ("bf16", False), ("float32", False)),
            ("static bf16 vs eager float32", ("bf16", True), ("float32", False)),
            ("filled-only eager bf16 vs eager float32", ("bf16", "filled"), ("float32", False))]
    for label, a, b in rows:
        print(f"  {label + ':':<62} {worst(paths[a], paths[b]):.2e}")


if __name__ == "__main__":
    main()
