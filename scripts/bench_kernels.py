"""Which CPU kernel to run each GGUF block type on: every candidate timed on the file's own tensors.

For each block type in the file, all its matrices are run one after another with one token (a decode
step's worth of that type), on each candidate kernel: int4 g32 from the file's codes (4-bit types),
the int8 planes (5 and 8 bits, :class:`sinkchat.model.blockkernels.Int8Planes`), a float16 and a
bfloat16 copy of the file's values, and int4 re-quantization (what ``--quant 4bit`` does) for reference;
for the output head also the decode step's candidate head (:mod:`sinkchat.model.head`: int4 scores,
the best 64 or 400 computed again in float16, whose logits are the float16 head's).
Rounds alternate between candidates; the medians are printed with each candidate's weight error
against the file's values (relative Frobenius norm). The output head (tied embeddings) is its own row.

    PYTHONPATH=. python scripts/bench_kernels.py ~/models/gemma-3-270m-q4_k_m.gguf --rounds 15
    PYTHONPATH=. python scripts/bench_kernels.py FILE.gguf --threads 1 --cpu-time   # on a shared machine
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from sinkchat.model import blockkernels, quant
from sinkchat.model.gguf import EIGHT, FOUR, GGUFFile, int4_fits
from sinkchat.model.head import CandidateHead


def candidates(file: GGUFFile, name: str, head: bool = False) -> dict[str, nn.Module]:
    stored = file.tensors[name]
    weight = torch.from_numpy(file.dequantized(name).copy())
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data = weight
    out = {}
    if int4_fits(*stored.shape):
        if stored.type in FOUR:
            out["int4 g32"] = blockkernels.module_for("int4", file, name, linear)
        if stored.type in EIGHT:
            out["int8 g32"] = blockkernels.module_for("int8", file, name, linear)
        if stored.type not in FOUR:
            out["int4 re-quantized"] = quant.Int4Linear(*quant.quantize_int4(weight), None, weight.shape[1])
    out["fp16"] = quant.HalfLinear(weight, torch.float16)
    out["bf16"] = quant.HalfLinear(weight, torch.bfloat16)
    if head and int4_fits(*stored.shape):
        for count in (64, 400):  # greedy; top_k 50
            out[f"int4 + exact {count}"] = functools.partial(CandidateHead(out["fp16"]), candidates=count)
    return out


def alternate(runs: dict[str, Callable[[], object]], rounds: int, clock=time.perf_counter,
              repeat: int = 1) -> dict[str, float]:
    """Median milliseconds of one call of each of ``runs``, timed in ``rounds`` that alternate between
    them (each round calls each one ``repeat`` times), after one warm-up call each: on a shared or
    throttling machine every candidate sees the same load."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for kernel, run in runs.items():
            t0 = clock()
            for _ in range(repeat):
                run()
            times[kernel].append(1000 * (clock() - t0) / repeat)
    return {k: statistics.median(v) for k, v in times.items()}


def error(module: nn.Module, weight: torch.Tensor) -> float:
    if isinstance(module, functools.partial):  # the candidate head: its logits are the float16 head's
        module = module.func.exact
    return ((blockkernels.float_weight(module) - weight).norm() / weight.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch threads [default: torch's]")
    parser.add_argument("--cpu-time", action="store_true", help="time by this thread's CPU time (with --threads 1, "
                        "time other processes take from the cores does not count: for a shared machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    file = GGUFFile(args.gguf)
    groups: dict[str, list[str]] = {}
    head = file.head()
    for name, stored in file.tensors.items():
        if len(stored.shape) == 2 and (name != "token_embd.weight" or name == head):
            groups.setdefault("head " + stored.type if name == head else stored.type, []).append(name)
    print(f"{args.gguf}: {file.file_type}, {torch.get_num_threads()} threads, {args.rounds} rounds, "
          f"{torch.backends.cpu.get_cpu_capability()}, {'CPU' if args.cpu_time else 'wall'} time")
    print(f"{'block type':<12} {'tensors':>7}  {'kernel':<18} {'ms a token':>10} {'x fastest':>9} {'weight error':>12}")
    with torch.inference_mode():
        for group, names in groups.items():
            mods = [candidates(file, n, n == head) for n in names]
            weights = [torch.from_numpy(file.dequantized(n).copy()) for n in names]
            xs = [torch.randn(1, w.shape[1]) for w in weights]
            runs = {k: (lambda k=k: [m[k](x) for m, x in zip(mods, xs)]) for k in mods[0]}
            medians = alternate(runs, args.rounds, clock)
            fastest = min(medians.values())
            for kernel, ms in medians.items():
                err = max(error(m[kernel], w) for m, w in zip(mods, weights))
                print(f"{group:<12} {len(names):>7}  {kernel:<18} {ms:>10.2f} {ms / fastest:>9.2f} {err:>12.2e}")


if __name__ == "__main__":
    main()
