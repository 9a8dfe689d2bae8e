"""How long the fsync of a block memory's file takes at a save: a memory of ``--tokens`` random K/V in
SmolLM2-135M's geometry (30 global layers, 3 KV heads of 64, float32 as on the CPU, blocks of 64),
then ``--turns`` turns that each evict ``--turn`` tokens, each followed by the fsync a save makes.
No model is loaded; the file is made in ``--dir`` (the disk the data dir is on) and removed.

    python scripts/memory_fsync.py --tokens 20480 --turn 256 --turns 7 --dir ~/.local/share/sinkchat
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sinkchat.kv.memory import BlockMemory

LAYERS, KV_HEADS, HEAD_DIM, BLOCK = 30, 3, 64, 64


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=20480)
    p.add_argument("--turn", type=int, default=256)
    p.add_argument("--turns", type=int, default=7)
    p.add_argument("--dir", type=Path, default=None)
    args = p.parse_args()
    inv = [1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM))] * LAYERS
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        memory = BlockMemory(BLOCK, 4, inv, directory=Path(folder))
        at = 0

        def evict(n: int) -> None:
            nonlocal at
            kv = [torch.randn(1, KV_HEADS, n, HEAD_DIM) for _ in range(LAYERS)]
            memory.add([(at, at + n, at)], list(range(at, at + n)), kv, kv)
            at += n

        def fsync() -> float:
            t0 = time.perf_counter()
            os.fsync(memory.fd)
            return (time.perf_counter() - t0) * 1e3

        evict(args.tokens)
        first = fsync()
        size = os.fstat(memory.fd).st_size / 2**20
        print(f"memory: {memory.blocks} blocks, {size:.0f} MiB; fsync with all of it new: {first:.0f} ms")
        times = []
        for _ in range(args.turns):
            evict(args.turn)
            times.append(fsync())
        print(
            f"fsync after a turn that evicted {args.turn} tokens: median {statistics.median(times):.1f} ms "
            f"(min {min(times):.1f}, max {max(times):.1f}, {args.turns} turns)"
        )
        memory.close()


if __name__ == "__main__":
    main()
