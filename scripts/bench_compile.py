"""The bundled model's decode step eager against compiled (``--compile auto`` on the CPU), rounds
alternating in one process, 4 sinks + 2000 window full, the candidate head as a chat's default sampler
uses it; medians of 20 steps per round, then of 7 rounds.

    PYTHONPATH=. python scripts/bench_compile.py [THREADS] [--profile]

Variants: the eager step; the static step (whole buffers, masked) with eager layers; with each layer
through ``torch.compile`` (inductor's C++ wrapper: how the CPU's step was compiled before AOTInductor);
with the AOTInductor package of :mod:`sinkchat.model.aot` (what ``--compile auto`` runs). ``--profile``
then prints ``torch.profiler``'s table of 20 more steps of the last (where their time goes).
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
from sinkchat.model.aot import CompiledLayers
from sinkchat.model.fast import Layer

WINDOW, CANDIDATES, ROUNDS, STEPS = 2000, 400, 7, 20


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--profile"]
    torch.set_num_threads(int(args[0]) if args else 2)
    loaded = load("smollm2-135m", quant="auto", device="cpu", compile="off")
    fm = loaded.fast
    ids = text_ids(loaded.tokenizer, default_text(), WINDOW + 4 + (4 * ROUNDS + 3) * STEPS + 10)
    stream = Stream(loaded.model, SinkCache.for_model(loaded.model, 4, WINDOW, dtype=loaded.kv_dtype))
    while stream.seen < WINDOW + 4:
        stream.forward(ids[stream.seen : min(stream.seen + 500, WINDOW + 4)], keep=1)
    variants = {"eager step": (None, Layer.forward), "static step, eager layers": (fm.static_step, Layer.forward),
                "static step, torch.compile layers": (fm.static_step, torch.compile(Layer.forward,
                                                                                    options={"cpp_wrapper": True})),
                "static step, AOTInductor layers": (fm.static_step, CompiledLayers())}
    for name, (step, layer) in variants.items():  # compile (or read from disk), untimed
        fm.compiled, fm.layer_step = step, layer
        t0 = time.perf_counter()
        stream.forward([ids[stream.seen]], keep=1, candidates=CANDIDATES)
        print(f"{name}: first step {time.perf_counter() - t0:.1f} s", flush=True)
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

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(STEPS):
                stream.forward([ids[stream.seen]], keep=1, candidates=CANDIDATES)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
