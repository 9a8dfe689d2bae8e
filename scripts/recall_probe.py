"""Recall's cost, measured in one process with alternating runs: decode ms/token at a full window
with and without recall slots, and streaming perplexity (teacher-forced in chunks, each chunk
recalling as a user message does) with and without recall.

    python scripts/recall_probe.py --window 2000 --recall 256 --decode 48 --ppl-tokens 2048 --ppl-window 256
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from sinkchat.bench import text_ids
from sinkchat.bench.stream import nll
from sinkchat.kv import SinkCache
from sinkchat.model import forward, load


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--window", type=int, default=2000)
    p.add_argument("--recall", type=int, default=256)
    p.add_argument("--recall-block", type=int, default=64)
    p.add_argument("--decode", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ppl-tokens", type=int, default=2048)
    p.add_argument("--ppl-window", type=int, default=256)
    p.add_argument("--feed", type=int, default=32)
    a = p.parse_args()
    loaded = load("smollm2-135m", quant="4bit", device="cpu")
    model = loaded.model
    import pydoc_data.topics

    text = "\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    ids = text_ids(loaded.tokenizer, text, max(a.window + 1000 + a.decode, a.ppl_tokens))

    def filled(recall: int) -> SinkCache:
        cache = SinkCache.for_model(model, 4, a.window, recall=recall, recall_block=a.recall_block)
        cache.token_ids = lambda x, y: ids[x:y]
        with torch.inference_mode():
            for i in range(0, a.window + 1000, 256):
                part = ids[i : i + 256]
                pos, _ = cache.reserve(len(part), recall=bool(recall))
                forward(model, cache, part, pos)
        return cache

    caches = {"sinks": filled(0), "recall": filled(a.recall)}
    times: dict[str, list[float]] = {m: [] for m in caches}
    with torch.inference_mode():
        for _ in range(a.rounds):
            for mode, cache in caches.items():
                tok = ids[0]
                t0 = time.perf_counter()
                for _ in range(a.decode):
                    pos, _ = cache.reserve(1)
                    tok = int(forward(model, cache, [tok], pos)[-1].argmax())
                times[mode].append((time.perf_counter() - t0) / a.decode * 1000)
    for mode, ts in times.items():
        shown = [round(t, 1) for t in ts]
        print(f"decode {mode}: window {a.window}, recall slots {caches[mode].occupancy().recalled}: "
              f"median {statistics.median(ts):.1f} ms/token over {a.rounds} alternating rounds {shown}")
    ratio = statistics.median(times["sinks"]) / statistics.median(times["recall"])
    print(f"decode recall/sinks speed ratio: {ratio:.3f}")

    if a.ppl_tokens < 2:  # decode only
        return
    scored = {}
    for mode, recall in (("sinks", 0), ("recall", a.recall)):
        cache = SinkCache.for_model(model, 4, a.ppl_window, recall=recall, recall_block=a.recall_block)
        cache.token_ids = lambda x, y: ids[x:y]
        values = []
        t0 = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, a.ppl_tokens - 1, a.feed):
                part = ids[i : min(i + a.feed, a.ppl_tokens - 1)]
                pos, _ = cache.reserve(len(part), recall=bool(recall))
                values += nll(forward(model, cache, part, pos, keep=0), ids[i + 1 : i + 1 + len(part)])
        scored[mode] = (math.exp(statistics.fmean(values)), time.perf_counter() - t0)
        print(f"ppl {mode}: {scored[mode][0]:.3f} over {len(values)} tokens, window {a.ppl_window}, feed {a.feed}, "
              f"recall {recall}: {scored[mode][1]:.0f} s")
    print(f"ppl recall/sinks: {scored['recall'][0] / scored['sinks'][0]:.4f}")


if __name__ == "__main__":
    main()
