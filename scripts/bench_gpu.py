"""Decode speed of a Mistral-7B-shaped model on a GPU: transformers, the fast path eager, and the
fast path's static step in CUDA graphs, against the memory-bandwidth ceiling, in one run.

The model has Mistral-7B-Instruct-v0.3's real shape (32 layers, width 4096, 32 query and 8 key/value
heads of 128, MLP 14336, vocabulary 32768) with random weights, quantized to bitsandbytes NF4 (bf16
compute) in memory as the loader's ``--quant 4bit`` does on a GPU; then ``kernels.prepare`` builds
the fast path over it exactly as for a downloaded model. Each mode streams the same random tokens
through a sink cache of ``--sinks`` + ``--window`` to ``--position`` and times ``--steps`` single
decode steps there (evictions included). The ceiling is the bytes one token reads (the 4-bit
weights with their absmax, the 16-bit output head, the K/V cache) over the device-to-device copy
bandwidth measured in the same run. The fast path's step is timed eager, recorded as a CUDA
graph, and compiled by inductor then recorded; each is also run beside the eager step on a second
cache, through evictions, and their logits compared.

    python scripts/bench_gpu.py --json docs/bench-gpu.json          # needs CUDA and bitsandbytes
    python scripts/bench_gpu.py --tiny --device cpu --compile off    # a dry run of the script itself
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import bitsandbytes
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sinkchat.engine import prefill_chunk  # noqa: E402
from sinkchat.kv import SinkCache  # noqa: E402
from sinkchat.model import (  # noqa: E402
    LoadedModel,
    Source,
    forward,
    kernels,  # noqa: E402
)
from sinkchat.model.fast import FastModel  # noqa: E402
from sinkchat.model.quant import NF4Linear  # noqa: E402

MISTRAL_7B = dict(vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768,
                  rms_norm_eps=1e-5, sliding_window=None, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})
TINY = dict(MISTRAL_7B, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, vocab_size=1024)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def nf4_model(shape: dict, device: str):
    """A random model of ``shape`` whose decoder linears are bitsandbytes NF4 (bf16 compute)."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, MistralConfig

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(MistralConfig(**shape), dtype=torch.bfloat16).eval()
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if isinstance(lin, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16,
                                          quant_type="nf4", device="meta")
                    q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4",
                                                 module=q).to(device)
                    setattr(parent, name, q)
    if device == "cuda":
        torch.cuda.empty_cache()
    return model


def bytes_per_token(loaded, sinks: int, window: int) -> dict:
    """What one decode step must read from memory at a full cache, by part."""
    weights = sum(m.data.numel() + m.absmax.numel() * 4 for layer in loaded.fast.layers
                  for m in (layer.qkv, layer.o, layer.gate_up, layer.down) if isinstance(m, NF4Linear))
    head = loaded.model.get_output_embeddings().weight
    config = loaded.model.config
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * (sinks + window) * 2
    return {"weights_4bit": weights, "head": head.numel() * head.element_size(), "kv_cache": kv}


def copy_bandwidth(device: str) -> float:
    """Bytes read plus written per second by a device-to-device copy of 2 GiB (the ceiling's bandwidth)."""
    if device != "cuda":
        return None
    a = torch.empty(2**30, dtype=torch.float16, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    sync(device)
    bw = 10 * 2 * a.numel() * 2 / (time.perf_counter() - t0)
    del a, b
    torch.cuda.empty_cache()
    return bw


def stream_to(model, cache, ids: list[int], window: int) -> None:
    chunk = prefill_chunk(window)
    with torch.inference_mode():
        for at in range(0, len(ids), chunk):
            part = ids[at : at + chunk]
            positions, _ = cache.reserve(len(part))
            forward(model, cache, part, positions)


def decode_ms(model, cache, ids: list[int], device: str) -> list[float]:
    """Milliseconds per single-token decode step for each of ``ids`` (GPU work included)."""
    out = []
    with torch.inference_mode():
        for t in ids:
            sync(device)
            t0 = time.perf_counter()
            positions, _ = cache.reserve(1)
            forward(model, cache, [t], positions)
            sync(device)
            out.append((time.perf_counter() - t0) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--window", type=int, default=2000)
    ap.add_argument("--position", type=int, default=2100, help="decode timed from here (past a full cache)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--compile", choices=("on", "off"), default="on")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model of the same family (a dry run)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    dev, S, W = args.device, args.sinks, args.window
    shape = TINY if args.tiny else MISTRAL_7B
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shape["vocab_size"], (args.position + args.steps + 64,), generator=gen).tolist()
    report: dict = {"model": "Mistral-7B-shaped" if not args.tiny else "tiny Mistral", "shape": shape,
                    "sinks": S, "window": W, "position": args.position, "steps": args.steps,
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "bitsandbytes": bitsandbytes.__version__}
    if dev == "cuda":
        report["gpu"] = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth(dev)
    report["copy_bandwidth_GBps"] = bandwidth and bandwidth / 1e9
    log(f"copy bandwidth {bandwidth and round(bandwidth / 1e9)} GB/s; building the model")
    t0 = time.perf_counter()
    model = nf4_model(shape, dev)
    report["build_s"] = time.perf_counter() - t0
    loaded = LoadedModel(model, None, Source("dir", "random", report["model"]), "4bit", dev,
                                torch.bfloat16)
    model.sinkchat_kv_dtype = torch.bfloat16
    results = {}

    def run(mode: str) -> None:
        cache = SinkCache.for_model(model, S, W)
        t0 = time.perf_counter()
        stream_to(model, cache, ids[: args.position], W)
        sync(dev)
        prefill_s = time.perf_counter() - t0
        warm = decode_ms(model, cache, ids[args.position : args.position + 3], dev)  # compiles, records graphs
        ms = decode_ms(model, cache, ids[args.position + 3 : args.position + 3 + args.steps], dev)
        results[mode] = {"median_ms": statistics.median(ms), "mean_ms": statistics.fmean(ms),
                         "tokens_per_s": 1000 / statistics.median(ms), "first_steps_ms": warm,
                         "prefill_tokens_per_s": args.position / prefill_s,
                         "evicted": sum(b - a for a, b in cache.evictions)}
        log(f"{mode}: {results[mode]['median_ms']:.2f} ms/token median, {results[mode]['tokens_per_s']:.1f} tok/s, "
            f"first steps {[round(w) for w in warm]} ms")

    run("transformers")
    if dev == "cuda":
        kernels.prepare(loaded, "auto", "off")
    else:  # the dry run: on the CPU, prepare would re-quantize to packed int4; build the GPU's NF4 fast path
        loaded.fast = model.sinkchat_fast = FastModel.build(model, int4=False)
        loaded.weights = "bnb-nf4"
    report["weights"] = loaded.weights
    report["bytes_per_token"] = parts = bytes_per_token(loaded, S, W)
    total = sum(parts.values())
    report["ceiling_tokens_per_s"] = bandwidth and bandwidth / total
    log(f"bytes per token {total / 1e9:.2f} GB {parts}; ceiling {report['ceiling_tokens_per_s']} tok/s")
    run("fast eager")
    variants = [("CUDA graph", False, True), ("compiled + CUDA graph", True, True)] if dev == "cuda" else []
    if args.compile == "off":
        variants = variants[:1]
    elif dev != "cuda":
        variants = [("compiled", True, False)]  # the dry run: inductor on the CPU
    for name, inductor, graph in variants:
        loaded.fast.compile(inductor=inductor, cuda_graph=graph)
        t0 = time.perf_counter()
        run(name)
        results[name]["run_s_with_compile"] = time.perf_counter() - t0
        # this step against the eager one: the same tokens on two caches, through evictions
        caches = [SinkCache.for_model(model, S, W) for _ in range(2)]
        for c in caches:
            stream_to(model, c, ids[: args.position], W)
        step, worst = loaded.fast.compiled, 0.0
        with torch.inference_mode():
            for t in ids[args.position : args.position + 40]:
                (p1, _), (p2, _) = (c.reserve(1) for c in caches)
                loaded.fast.compiled = None
                a = forward(model, caches[0], [t], p1).float()
                loaded.fast.compiled = step
                b = forward(model, caches[1], [t], p2).float()
                worst = max(worst, ((a - b).abs().max() / a.abs().max()).item())
        results[name]["vs_eager_max_rel_diff"] = worst
        results[name]["notices"] = notes = loaded.take_notices()
        results[name]["fell_back"] = loaded.fast.compiled is None
        log(f"{name} against eager: logits differ by at most {worst:.2e} (relative) over 40 steps; notices {notes}")
        del caches
    if dev == "cuda":
        report["max_allocated_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    report["results"] = results
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
