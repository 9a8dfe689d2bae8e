"""Decode speed of several GGUF files of one model in one process, rounds alternating between them, so
their ratio is measured on one machine in one state (a Q4_K_M file against a Q4_0 file of the same
model: the issue's target is at least 0.9x).

Each model is loaded as the chat loads it (``--quant auto`` unless ``--quant``), a text is prefilled
through the sink cache until it is full (``sinks + window``), and ``--steps`` single tokens are
decoded there (``sinkchat.bench.peer.sinkchat_figures``, what ``bench peer`` reports as tg). Prints
the median tokens/s of each file and its ratio to the first, and what each ran on.

    PYTHONPATH=. python scripts/bench_gguf_speed.py Q4_0.gguf Q4_K_M.gguf --window 500 --rounds 5

``FILE@fp16`` or ``FILE@int8`` loads that file with its 5- and 8-bit blocks on that kernel
(``SINKCHAT_EIGHT_BIT``), so ``Q4_K_M.gguf@int8 Q4_K_M.gguf@fp16`` compares the two in one run.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from sinkchat import bench
from sinkchat.bench.peer import sinkchat_figures
from sinkchat.model import load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--window", type=int, default=500)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quant", default="auto")
    args = parser.parse_args()
    models = []
    for f in args.files:
        path, _, eight = f.partition("@")
        os.environ.pop("SINKCHAT_EIGHT_BIT", None)
        if eight:
            os.environ["SINKCHAT_EIGHT_BIT"] = eight
        models.append(load(path, quant=args.quant, device="cpu", quick=False))
    os.environ.pop("SINKCHAT_EIGHT_BIT", None)
    need = args.sinks + args.window + args.steps + 1
    tg: dict[str, list[float]] = {f: [] for f in args.files}
    for r in range(args.rounds):
        for f, loaded in zip(args.files, models):
            ids = bench.text_ids(loaded.tokenizer, bench.default_text(), need)
            figures = sinkchat_figures(loaded, args.sinks, args.window, ids, prompt=64, steps=args.steps, repetitions=1)
            tg[f].append(figures["tg"])
        print(f"round {r + 1}: " + "  ".join(f"{v[-1]:.1f}" for v in tg.values()) + " tok/s", flush=True)
    base = statistics.median(tg[args.files[0]])
    print(f"{torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}, depth "
          f"{args.sinks + args.window}, {args.steps} steps x {args.rounds} rounds (medians):")
    for f, loaded in zip(args.files, models):
        median = statistics.median(tg[f])
        print(f"  {median:6.1f} tok/s  {median / base:5.2f}x  {loaded.runs}  {f}")


if __name__ == "__main__":
    main()
