"""The memory-bandwidth ceiling of a decode step: the bytes one token must read (every decoder weight
as stored, the output head, the K/V the cache holds) over the copy bandwidth measured on the same
device, and the share of it a measured speed reaches (``bench speed``, ``scripts/bench_gpu.py``).

A decode step at batch 1 reads each weight once and does two flops per weight: memory-bound on a
GPU and on a CPU alike, so ``bandwidth / bytes`` is the fastest any kernel could go (the roofline
gpt-fast reports as "memory bandwidth achieved").
"""

from __future__ import annotations

import time

import torch


def union_bytes(tensors) -> int:
    """Bytes the ``tensors`` occupy, each byte counted once (views of one weight, fused modules and
    the row views the model's own modules keep, weights that share a memory-mapped file)."""
    spans = sorted({(t.data_ptr(), t.data_ptr() + _extent(t)) for t in tensors if t.numel()})
    total, end = 0, -1
    for a, b in spans:
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def _extent(t: torch.Tensor) -> int:
    """Bytes from a tensor's first element to its last (a strided view spans more than its elements)."""
    return (sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1) * t.element_size()


def bytes_per_token(model, cache, candidates: int = 0) -> dict[str, int]:
    """What one decode step at ``cache``'s fill reads, by part: ``weights`` (every decoder weight the
    step calls, as stored: packed 4-bit codes with their scales, or 16/32-bit; on the fast path its
    fused modules and norms), ``head`` (the output projection: with ``candidates``, where a candidate
    head takes them, its int4 copy and the candidates' float16 rows) and ``kv_cache`` (keys and values
    held in every layer)."""
    fast = getattr(model, "sinkchat_fast", None)
    if fast is not None:
        modules = [m for layer in fast.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        norms = [t for layer in fast.layers for t in (*layer.norms, layer.q_norm, layer.k_norm) if t is not None]
    else:
        modules, norms = list(model.model.layers), []
    weights = union_bytes([t for m in modules for t in (*m.parameters(), *m.buffers())] + norms)
    head = model.get_output_embeddings()
    shortlist = getattr(fast, "candidate_head", None) if candidates else None
    if shortlist is not None:
        rows = candidates * shortlist.exact.weight[0].numel() * shortlist.exact.weight.element_size()
        head_bytes = union_bytes([*shortlist.scores.parameters(), *shortlist.scores.buffers()]) + rows
    else:
        head_bytes = union_bytes([*head.parameters(), *head.buffers()])
    kv = sum(2 * layer.keys[:, :, : layer.length].numel() * layer.keys.element_size()
             for layer in cache.layers if layer.is_initialized)
    return {"weights": weights, "head": head_bytes, "kv_cache": kv}


def copy_bandwidth(device: torch.device, mib: int | None = None, reps: int = 10) -> float:
    """Bytes read plus written per second by a copy of ``mib`` MiB on ``device`` (2 GiB on a GPU, 256
    MiB on the CPU: past the caches), the best of ``reps``."""
    mib = mib or (2048 if device.type == "cuda" else 256)
    a = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    b.copy_(a)
    best = float("inf")
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        b.copy_(a)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * 4 / best


def ceiling(parts: dict[str, int], bandwidth: float, tokens_per_s: float | None) -> dict:
    """The report's fields: bytes per token (total and parts), bandwidth, ceiling and measured share."""
    total = sum(parts.values())
    top = bandwidth / total
    return {"bytes_per_token": total, "bytes_parts": parts, "copy_bandwidth_GBps": bandwidth / 1e9,
            "ceiling_tokens_per_s": top, "ceiling_share": tokens_per_s / top if tokens_per_s else None}
