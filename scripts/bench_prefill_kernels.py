"""One prefill chunk's matmul on a packed int4 weight, by route: the int4 kernel itself (bf16
activations), the weight dequantized to float32 and a float32 matmul (a prefill chunk's route on CPUs
without native bf16), or dequantized to bf16 for a bf16 matmul (the route with native bf16); and the
dequantization alone. Random weights of Llama-3.2-1B's MLP shapes and the bundled model's gate/up,
512 rows, medians of 5.

    PYTHONPATH=. python scripts/bench_prefill_kernels.py [THREADS]
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F

from sinkchat.model.quant import GROUP, Int4Linear, dequantize, quantize_int4

SHAPES = ((8192, 2048), (2048, 8192), (3072, 576))  # [out, in]


def median_ms(fn, rounds: int = 5) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
    for n, k in SHAPES:
        packed, scales = quantize_int4(torch.randn(n, k) * 0.02)
        layout = Int4Linear(packed, scales, None, k).layout
        x = torch.randn(512, k)
        routes = {
            "int4 kernel": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, GROUP,
                                                                              scales),
            "float32 (CPUs without native bf16)": lambda: F.linear(x, dequantize(packed, scales, k, layout)),
            "bf16 (with native bf16)": lambda: F.linear(x.to(torch.bfloat16),
                                                        dequantize(packed, scales, k, layout, torch.bfloat16)),
            "dequantize alone": lambda: dequantize(packed, scales, k, layout),
        }
        print(f"{n} x {k}: " + ", ".join(f"{name} {median_ms(fn):.1f} ms" for name, fn in routes.items()))


if __name__ == "__main__":
    main()
