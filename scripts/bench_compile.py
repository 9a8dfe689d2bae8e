"""The bundled model's decode step eager against compiled layer by layer (``--compile auto`` on the CPU),
rounds alternating in one process, 4 sinks + 2000 window full, the candidate head as a chat's default
sampler uses it; medians of 20 steps per round, then of 7 rounds.

    PYTHONPATH=. python scripts/bench_compile.py [THREADS] [--profile]

``--profile`` then prints ``torch.profiler``'s table of 20 more compiled steps (where their time goes).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from sinkchat.bench import default_text, text_ids
from sinkchat.bench.stream import Stream
from sinkchat.kv import SinkCache
from sinkchat.model import load
from sinkchat.model.fast import CPU_COMPILE, Layer

WINDOW, CANDIDATES, ROUNDS, STEPS = 2000, 400, 7, 20


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--profile"]
    torch.set_num_threads(int(args[0]) if args else 2)
    loaded = load("smollm2-135m", quant="auto", device="cpu", compile="off")
    fm = loaded.fast
    ids = text_ids(loaded.tokenizer, default_text(), WINDOW + 4 + (3 * ROUNDS + 1) * STEPS + 10)
    stream = Stream(loaded.model, SinkCache.for_model(loaded.model, 4, WINDOW))
    while stream.seen < WINDOW + 4:
        stream.forward(ids[stream.seen : min(stream.seen + 500, WINDOW + 4)], keep=1)
    compiled = torch.compile(Layer.forward, options=CPU_COMPILE)
    variants = {"eager step": (None, Layer.forward), "static step, eager layers": (fm.static_step, Layer.forward),
                "static step, compiled layers": (fm.static_step, compiled)}
    fm.compiled, fm.layer_step = fm.static_step, compiled
    stream.forward([ids[stream.seen]], keep=1, candidates=CANDIDATES)  # compiles, untimed
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(ROUNDS):
        for name, (step, layer) in variants.items():
            fm.compiled, fm.layer_step = step, layer
            steps = []
            for _ in range(STEPS):
                t0 = time.perf_counter()
                stream.forward([ids[stream.seen]], keep=1, candidates=CANDIDATES)
                steps.append(time.perf_counter() - t0)
            times[name].append(statistics.median(steps) * 1000)
    for name, ms in times.items():
        print(f"{name}: {statistics.median(ms):.2f} ms (rounds {min(ms):.2f}-{max(ms):.2f})")
    if "--profile" in sys.argv:
        from torch.profiler import ProfilerActivity, profile

        fm.compiled, fm.layer_step = fm.static_step, compiled
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(STEPS):
                stream.forward([ids[stream.seen]], keep=1, candidates=CANDIDATES)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
