"""CPU decode kernels at batch 1 on a model's own shapes: which int4/int8/16-bit kernel and which KV dtype.

Each projection of one decode step (default: SmolLM2-135M, the bundled model; its fused q/k/v and
gate/up as the fast path runs them, and the 49152 x 576 output head) on random weights, one token,
on each kernel this torch (and torchao, where installed with its CPU kernels) offers:

- ``int4 g32 bf16-act``: today's kernel, ``torch.ops.aten._weight_int4pack_mm_for_cpu``
  (:class:`sinkchat.model.quant.Int4Linear`);
- ``int8 row bf16-act``: ``torch._weight_int8pack_mm`` (int8 weights, one scale per row, bf16
  activations; with float32 activations it was 8-13x slower);
- ``int8 x int8 _int_mm``: activations quantized per token to int8 and ``torch._int_mm`` (an int8
  GEMM with int32 accumulation; VNNI where oneDNN has it), int8 weights;
- ``torchao da8w4``: torchao's int8-dynamic-activation int4-weight CPU kernel, if its CPU op is built;
- ``bf16`` / ``fp16``: a dense 16-bit copy (:class:`sinkchat.model.quant.HalfLinear`).

Then one decode token's attention over a ``--depth`` token KV cache per layer, as
:class:`sinkchat.model.fast.FastModel` runs it: float32 (``_attend``) against bf16 and float16
(``_attend_slots``, the path a 16-bit cache takes: every slot, masked; for bf16 on the CPU two plain
matmuls around a float32 softmax, :func:`sinkchat.model.fast.matmul_attention`), and for comparison
bf16 through SDPA over every slot, masked (the 16-bit path before), and over the filled slots without a
mask (``_attend``), and float32 with the query heads folded per key/value head instead of SDPA's
``enable_gqa``.

Each matmul runs on as many distinct weights as a token uses (30 qkv weights for SmolLM2's 30 layers),
so they come from memory as in a real step, not from a cache that one small weight would stay in.
Rounds alternate between the candidates of a row group (:func:`bench_kernels.alternate`); medians are
printed with each kernel's output error against float32 (relative norm, on the dequantized weight's
float32 product), and a per-token total: the layers' projections and attention times the layer count,
plus the head.

    PYTHONPATH=. python scripts/bench_cpu_kernels.py --rounds 21
    PYTHONPATH=. python scripts/bench_cpu_kernels.py --threads 1 --cpu-time   # on a shared machine
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from bench_kernels import alternate
from torch import nn

from sinkchat.model import quant
from sinkchat.model.fast import FastModel

# SmolLM2-135M: hidden 576, 9 query heads and 3 key/value heads of 64, MLP 1536, 30 layers, vocab 49152
SMOLLM2 = dict(hidden=576, heads=9, kv_heads=3, head_dim=64, inter=1536, layers=30, vocab=49152)


def projections(c: dict) -> list[tuple[str, int, int, int]]:
    """(name, out, in, times per token) of one decode step's matmuls, as the fast path fuses them."""
    qkv = (c["heads"] + 2 * c["kv_heads"]) * c["head_dim"]
    return [("qkv", qkv, c["hidden"], c["layers"]), ("o", c["hidden"], c["heads"] * c["head_dim"], c["layers"]),
            ("gate_up", 2 * c["inter"], c["hidden"], c["layers"]), ("down", c["hidden"], c["inter"], c["layers"]),
            ("head", c["vocab"], c["hidden"], 1)]


class Int8Row(nn.Module):
    """``torch._weight_int8pack_mm``: int8 weight, one symmetric scale per output row."""

    def __init__(self, weight: torch.Tensor, act: torch.dtype):
        super().__init__()
        self.scale = weight.abs().amax(1).clamp(min=1e-8) / 127
        self.q = (weight / self.scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        self.act, self.scale = act, self.scale.to(act)

    def dequantized(self) -> torch.Tensor:
        return self.q.float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x.to(self.act), self.q, self.scale).float()


class Int8Dynamic(Int8Row):
    """Activations quantized per token (symmetric int8) and ``torch._int_mm`` against the int8 weight."""

    def __init__(self, weight: torch.Tensor):
        super().__init__(weight, torch.float32)
        self.qt = self.q.t()  # [K, N]: _int_mm's layout (a transposed view: oneDNN reads it as is)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sx = x.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127
        xq = (x / sx).round().to(torch.int8)
        return torch._int_mm(xq, self.qt).float() * sx * self.scale


def torchao_da8w4(weight: torch.Tensor) -> nn.Module | str:
    """torchao's int8-dynamic-activation int4-weight CPU linear, or why there is none here."""
    try:
        from torchao.prototype.quantization.int4.inference_workflow import Int8DynamicActivationInt4WeightConfig
        from torchao.quantization import quantize_
    except ImportError as exc:
        return f"torchao not importable ({exc.name})"
    if "CPU" not in torch._C._dispatch_dump("torchao::da8w4_linear_cpu"):
        return "torchao has no CPU kernel for da8w4_linear_cpu in this build"
    try:
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        linear.weight.data = weight.clone()
        quantize_(linear, Int8DynamicActivationInt4WeightConfig(group_size=32, set_inductor_config=False))
        return linear
    except Exception as exc:  # the config's name and arguments move between torchao versions
        return f"torchao da8w4 failed: {type(exc).__name__}: {exc}"


def kernels(weight: torch.Tensor) -> tuple[dict[str, nn.Module], list[str]]:
    """Every kernel for ``weight`` ``[N, K]`` that runs here, and why the others do not."""
    out: dict[str, nn.Module] = {}
    absent = []
    if quant.int4_fits(*weight.shape):
        out["int4 g32 bf16-act"] = quant.Int4Linear(*quant.quantize_int4(weight), None, weight.shape[1])
    out["int8 row bf16-act"] = Int8Row(weight, torch.bfloat16)
    out["int8 x int8 _int_mm"] = Int8Dynamic(weight)
    ao = torchao_da8w4(weight)
    if isinstance(ao, str):
        absent.append(ao)
    else:
        out["torchao da8w4"] = ao
    out["bf16"] = quant.HalfLinear(weight, torch.bfloat16)
    out["fp16"] = quant.HalfLinear(weight, torch.float16)
    return out, absent


def reference(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """The float32 weight the kernel holds (its quantization), or ``weight`` where it cannot say."""
    if isinstance(module, quant.Int4Linear):
        return quant.dequantize(module.packed, module.scales, module.in_features, module.layout)
    if isinstance(module, Int8Row):
        return module.dequantized()
    if isinstance(module, quant.HalfLinear):
        return module.weight.float()
    return weight


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def attention(c: dict, depth: int, rounds: int, clock) -> dict[str, tuple[float, float]]:
    """Median ms and error (against float32) of one token's attention over ``depth`` cached tokens in
    every layer (each layer its own cache, so they come from memory as in a step), per KV dtype,
    through the fast path's own methods."""
    H, KV, D, n = c["heads"], c["kv_heads"], c["head_dim"], c["layers"]
    fast = SimpleNamespace(heads=H, kv_heads=KV, head_dim=D, scale=None)
    q = torch.randn(1, H, D)
    folded = q.view(1, KV, H // KV, D)
    caches = {"float32": [(torch.randn(1, KV, depth, D), torch.randn(1, KV, depth, D)) for _ in range(n)]}
    for name, dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        caches[name] = [(k.to(dtype), v.to(dtype)) for k, v in caches["float32"]]
    mask = torch.ones(depth, dtype=torch.bool)
    one = {"float32": lambda k, v: FastModel._attend(fast, q, k, v, None),
           "bfloat16": lambda k, v: FastModel._attend_slots(fast, q, k, v, mask),
           "float16": lambda k, v: FastModel._attend_slots(fast, q, k, v, mask),
           "bfloat16 SDPA": lambda k, v: F.scaled_dot_product_attention(  # the 16-bit path before
               folded.to(k.dtype), k, v, attn_mask=mask.view(1, 1, 1, -1)).reshape(1, -1).float(),
           "bfloat16 no mask": lambda k, v: FastModel._attend(fast, q, k, v, None),  # SDPA without the mask
           "float32 folded": lambda k, v: F.scaled_dot_product_attention(folded, k, v).reshape(1, -1)}
    kv = {name: caches[name.split()[0]] for name in one}
    runs = {name: (lambda name=name: [one[name](k, v) for k, v in kv[name]]) for name in one}
    ms = alternate(runs, rounds, clock)
    want = one["float32"](*kv["float32"][0])
    return {name: (ms[name] / n, rel(one[name](*kv[name][0]), want)) for name in one}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--depth", type=int, default=2004, help="cached tokens for attention [default: 2004]")
    parser.add_argument("--threads", type=int, default=None, help="torch threads [default: torch's]")
    parser.add_argument("--cpu-time", action="store_true", help="time by this thread's CPU time (with --threads 1: "
                        "for a shared machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    c, gen = SMOLLM2, torch.Generator().manual_seed(0)
    print(f"SmolLM2-135M shapes, {torch.get_num_threads()} threads, {args.rounds} rounds, torch {torch.__version__}, "
          f"{torch.backends.cpu.get_cpu_capability()}, {'CPU' if args.cpu_time else 'wall'} time")
    print(f"{'matmul':<8} {'out x in':>11} {'x/token':>7}  {'kernel':<20} {'ms a call':>9} {'x int4':>6} "
          f"{'ms a token':>10} {'out error':>9}")
    totals: dict[str, float] = {}
    absent: set[str] = set()
    with torch.inference_mode():
        for name, n, k, per_token in projections(c):
            weights = [torch.randn(n, k, generator=gen) * 0.02 for _ in range(per_token)]
            built = [kernels(w) for w in weights]  # one per layer: weights stream from memory as in a step
            absent.update(built[0][1])
            mods = [b[0] for b in built]
            x = torch.randn(1, k, generator=gen)
            ms = alternate({kn: (lambda kn=kn: [m[kn](x) for m in mods]) for kn in mods[0]}, args.rounds, clock,
                           repeat=max(1, 1_000_000_000 // (n * k * per_token * 100)))
            base = ms.get("int4 g32 bf16-act", min(ms.values()))
            for kn, m in mods[0].items():
                err = rel(m(x), x @ reference(m, weights[0]).t())
                totals[kn] = totals.get(kn, 0.0) + ms[kn]
                print(f"{name:<8} {f'{n}x{k}':>11} {per_token:>7}  {kn:<20} {ms[kn] / per_token:>9.4f} "
                      f"{ms[kn] / base:>6.2f} {ms[kn]:>10.2f} {err:>9.1e}")
        print(f"\n{'sum of the projections':<40} {'ms a token':>10}")
        for kn, total in totals.items():
            print(f"  {kn:<38} {total:>10.2f}")
        for why in sorted(absent):
            print(f"  (not measured: {why})")
        print(f"\nattention, one token over {args.depth} cached tokens ({c['kv_heads']} KV heads of {c['head_dim']}), "
              f"x {c['layers']} layers")
        print(f"{'KV dtype':<16} {'ms a layer':>10} {'ms a token':>10} {'x float32':>9} {'out error':>9}")
        att = attention(c, args.depth, args.rounds, clock)
        for kv, (ms_layer, err) in att.items():
            print(f"{kv:<16} {ms_layer:>10.4f} {ms_layer * c['layers']:>10.2f} {ms_layer / att['float32'][0]:>9.2f} "
                  f"{err:>9.1e}")


if __name__ == "__main__":
    main()
