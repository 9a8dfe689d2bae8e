"""Decode speed of a Mistral-7B-shaped model on a GPU, every 4-bit kernel x eager / CUDA graph / compiled,
against the memory-bandwidth ceiling and the bf16 model's logits, in one run.

The model has Mistral-7B-Instruct-v0.3's real shape (32 layers, width 4096, 32 query and 8 key/value
heads of 128, MLP 14336, vocabulary 32768) with random bf16 weights, held on the CPU; for each kernel
of :mod:`sinkchat.model.gpu` (tinygemm, NF4, torchao where installed) :func:`gpu.build` quantizes it
onto the GPU exactly as ``--quant 4bit`` does for a downloaded model. Each step (eager, its static
step recorded as a CUDA graph, inductor + graph as ``--compile auto`` runs it) streams the same
random tokens through a sink cache of ``--sinks`` + ``--window`` to ``--position`` and times
``--steps`` decode steps there (evictions included). Printed per run: ms/token, tokens/s, bytes per
token, the copy bandwidth measured in the same run, the ceiling and the share of it reached; the
logits' largest difference from the bf16 model (the issue's bound: 2e-2 of the largest logit) and
from the eager step of the same kernel.

    python scripts/bench_gpu.py --json docs/bench-gpu.json       # needs CUDA (bitsandbytes for NF4)
    python scripts/bench_gpu.py --tiny --device cpu              # a dry run of the script itself
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sinkchat.bench.ceiling import bytes_per_token, ceiling, copy_bandwidth  # noqa: E402
from sinkchat.engine import prefill_chunk  # noqa: E402
from sinkchat.kv import SinkCache  # noqa: E402
from sinkchat.model import LoadedModel, Source  # noqa: E402
from sinkchat.model import gpu as kernels  # noqa: E402
from sinkchat.model.fast import FastModel  # noqa: E402

MISTRAL_7B = dict(vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768,
                  rms_norm_eps=1e-5, sliding_window=None, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})
TINY = dict(MISTRAL_7B, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, vocab_size=1024)
STEPS = {"eager": (False, False), "CUDA graph": (False, True), "compiled + CUDA graph": (True, True)}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def weights(shape: dict, device: str) -> dict[str, torch.Tensor]:
    """Random bf16 weights of ``shape``, made on ``device`` (fast) and kept on the CPU."""
    from transformers import AutoModelForCausalLM, MistralConfig

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(MistralConfig(**shape), dtype=torch.bfloat16)
    return {k: v.to("cpu") for k, v in model.state_dict().items()}


def fresh(shape: dict, state: dict):
    """A model of ``shape`` over ``state``'s tensors (no copy; :func:`gpu.build` leaves them as they are)."""
    from transformers import AutoModelForCausalLM, MistralConfig

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(MistralConfig(**shape), dtype=torch.bfloat16)
    model.load_state_dict(state, assign=True)
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=model.config)  # its inv_freq is no weight: made here, on the CPU
    model.sinkchat_kv_dtype = torch.bfloat16
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def stream(fast, cache, ids: list[int], window: int) -> None:
    chunk = prefill_chunk(window)
    with torch.inference_mode():
        for at in range(0, len(ids), chunk):
            part = ids[at : at + chunk]
            positions, _ = cache.reserve(len(part))
            fast(part, positions, cache)


def decode(fast, cache, ids: list[int], device) -> tuple[list[float], list[torch.Tensor]]:
    """Milliseconds and logits of single-token steps for each of ``ids`` (GPU work included)."""
    ms, logits = [], []
    with torch.inference_mode():
        for t in ids:
            sync(device)
            t0 = time.perf_counter()
            positions, _ = cache.reserve(1)
            out = fast([t], positions, cache)
            sync(device)
            ms.append((time.perf_counter() - t0) * 1000)
            logits.append(out[0].float().cpu())
    return ms, logits


def worst(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(((x - y).abs().max() / y.abs().max()).item() for x, y in zip(a, b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--window", type=int, default=2000)
    ap.add_argument("--position", type=int, default=2100, help="decode timed from here (past a full cache)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--compare", type=int, default=40, help="steps whose logits are compared")
    ap.add_argument("--kernels", help="comma list [default: every kernel that runs here]")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model of the same family (a dry run)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"bench_gpu: no CUDA device here (torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}): "
              "nothing was measured. Run it on a machine with an NVIDIA GPU, or `--tiny --device cpu` for a dry "
              "run of the script.", file=sys.stderr)
        sys.exit(2)
    device, S, W = torch.device(args.device), args.sinks, args.window
    shape = TINY if args.tiny else MISTRAL_7B
    names = args.kernels.split(",") if args.kernels else kernels.available(device) or ["tinygemm"]
    steps = STEPS if device.type == "cuda" else {"eager": (False, False), "compiled": (True, False)}
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shape["vocab_size"], (args.position + args.steps + 8,), generator=gen).tolist()
    report: dict = {"model": "Mistral-7B-shaped" if not args.tiny else "tiny Mistral", "sinks": S, "window": W,
                    "position": args.position, "steps": args.steps, "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    bandwidth = copy_bandwidth(device)
    report["copy_bandwidth_GBps"] = bandwidth / 1e9
    log(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; making the weights")
    state = weights(shape, args.device)
    head = ids[: args.position]
    timed, compared = ids[args.position + 3 : args.position + 3 + args.steps], ids[args.position :][: args.compare]

    # the bf16 model on the GPU, eager: the reference the 4-bit kernels' logits are held to
    ref = LoadedModel(fresh(shape, state), None, Source("dir", "random", report["model"]), "none", args.device,
                      torch.bfloat16)
    kernels._move_all_but_decoder_linears(ref.model, device)
    ref_fast = FastModel.build(ref.model, make=lambda w, b, k: kernels.DenseLinear(w.to(device), b, torch.bfloat16))
    cache = SinkCache.for_model(ref.model, S, W, dtype=torch.bfloat16)
    stream(ref_fast, cache, head, W)
    _, reference = decode(ref_fast, cache, compared, device)
    del ref, ref_fast, cache
    if device.type == "cuda":
        torch.cuda.empty_cache()

    results = []
    for name in names:
        loaded = LoadedModel(fresh(shape, state), None, Source("dir", "random", report["model"]), "4bit",
                             args.device, torch.bfloat16)
        t0 = time.perf_counter()
        kernels.build(loaded, "4bit", device, kernels=[name])
        sync(device)
        built_s, fast = time.perf_counter() - t0, loaded.fast
        eager = None
        for step, (inductor, graph) in steps.items():
            fast.compiled = None
            if inductor or graph:
                fast.compile(inductor=inductor, cuda_graph=graph)
            cache = SinkCache.for_model(loaded.model, S, W, dtype=torch.bfloat16)
            stream(fast, cache, head, W)
            warm, _ = decode(fast, cache, ids[args.position : args.position + 3], device)  # compiles, records
            ms, _ = decode(fast, cache, timed, device)
            parts = bytes_per_token(loaded.model, cache)
            check = SinkCache.for_model(loaded.model, S, W, dtype=torch.bfloat16)
            stream(fast, check, head, W)
            _, logits = decode(fast, check, compared, device)
            eager = logits if step == "eager" else eager
            median = statistics.median(ms)
            row = {"kernel": name, "weights": loaded.weights, "step": step, "median_ms": median,
                   "tokens_per_s": 1000 / median, "first_steps_ms": warm, "quantize_s": built_s,
                   **ceiling(parts, bandwidth, 1000 / median),
                   "vs_bf16_max_rel_diff": worst(logits, reference),
                   "vs_eager_max_rel_diff": worst(logits, eager),
                   "fell_back": fast.compiled is None and step != "eager",
                   "notices": loaded.take_notices()}
            results.append(row)
            log(f"{name} {step}: {median:.2f} ms/token, {row['tokens_per_s']:.1f} tok/s, "
                f"{row['ceiling_share'] * 100:.1f}% of the {row['ceiling_tokens_per_s']:.0f} tok/s ceiling "
                f"({row['bytes_per_token'] / 1e9:.2f} GB/token); logits vs bf16 {row['vs_bf16_max_rel_diff']:.2e}, "
                f"vs eager {row['vs_eager_max_rel_diff']:.2e}; first steps {[round(w) for w in warm]} ms")
            del cache, check
        del loaded, fast
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if device.type == "cuda":
        report["max_allocated_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    report["results"] = results
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
