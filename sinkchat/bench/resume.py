"""Resume speed: opening a saved chat with its KV restored from disk vs rebuilt by re-prefilling.

Both sides go through :meth:`Store.open` on the same saved chat (a window filled to the brim with
Python's own documentation text), so they pay the same database read, checksum and ``Chat`` set-up;
the only difference is whether the KV comes from the state file or from re-running the model over
the ledger's sink and window tokens. Also reports the state file's size per 1000 held tokens, and
computes it for Mistral-7B (32 layers, 8 KV heads, head dim 128, 2 bytes per value in bf16/fp16).
"""

from __future__ import annotations

import os
import tempfile
import time

from ..engine import Chat
from ..settings import Settings
from ..store import Store
from . import default_text, text_ids

MISTRAL_7B = {"layers": 32, "kv_heads": 8, "head_dim": 128, "bytes": 2}


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, bytes: int) -> int:
    """Keys + values of one cached token across all layers."""
    return 2 * layers * kv_heads * head_dim * bytes


def run_resume_bench(loaded, settings: Settings, repeats: int = 3, rebuild_repeats: int = 1) -> dict:
    """Time restore (best of ``repeats``) vs rebuild (best of ``rebuild_repeats``: it is slow, so its
    noise is small) for a chat holding ``settings.sinks + settings.window`` tokens of ``loaded``."""
    sinks, window = settings.sinks, settings.window
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(tmp)
        chat = Chat(loaded, settings)
        ids = text_ids(loaded.tokenizer, default_text(), sinks + window)
        if len(ids) < sinks + window:
            raise ValueError(f"filler text has only {len(ids)} tokens")
        for _ in chat.prefill(ids, "user", loaded.tokenizer.decode(ids)):  # the engine's own chunked prefill
            pass
        occ = chat.occupancy()
        chat_id = store.create(chat, settings, title="resume bench")
        store.unlock(chat_id)
        path = store.state_path(chat_id)
        state_bytes = path.stat().st_size

        def timed(n: int) -> float:
            best = float("inf")
            for _ in range(n):
                t0 = time.perf_counter()
                opened = Chat(loaded, settings)
                store.open(chat_id, opened, read_only=True)
                best = min(best, time.perf_counter() - t0)
                assert opened.occupancy() == occ, "the reopened chat holds other tokens"
            return best

        restore_s = timed(repeats)
        aside = path.with_suffix(".aside")
        os.replace(path, aside)
        try:
            rebuild_s = timed(rebuild_repeats)
        finally:
            os.replace(aside, path)
        store.close()
    _, tensors = chat.state()
    k = tensors["0.k"]
    held = occ.held
    return {
        "model": loaded.fingerprint.get("model", settings.model),
        "quant": loaded.quant,
        "dtype": str(k.dtype).removeprefix("torch."),
        "sinks": occ.sinks,
        "window": occ.window,
        "held_tokens": held,
        "restore_s": restore_s,
        "rebuild_s": rebuild_s,
        "speedup": rebuild_s / restore_s,
        "state_bytes": state_bytes,
        "state_mb_per_1000": state_bytes / held * 1000 / 1e6,
        "kv_mb_per_1000": kv_bytes_per_token(len(chat.cache.layers), k.shape[1], k.shape[-1], k.element_size())
        * 1000 / 1e6,
        "mistral_7b_mb_per_1000": kv_bytes_per_token(**MISTRAL_7B) * 1000 / 1e6,
    }


def format_table(r: dict) -> str:
    """The figures as a table a user can paste into an issue."""
    rows = [
        ("model", f"{r['model']} ({r['quant']}, KV {r['dtype']})"),
        ("held tokens", f"{r['sinks']} sinks + {r['window']} window = {r['held_tokens']}"),
        ("restore from disk", f"{r['restore_s'] * 1000:.0f} ms"),
        ("rebuild (re-prefill)", f"{r['rebuild_s'] * 1000:.0f} ms"),
        ("restore speed-up", f"{r['speedup']:.1f}x"),
        ("state file", f"{r['state_bytes'] / 1e6:.1f} MB = {r['state_mb_per_1000']:.1f} MB per 1000 tokens "
                       f"(K/V alone {r['kv_mb_per_1000']:.1f} MB)"),
        ("Mistral-7B (computed)", f"{r['mistral_7b_mb_per_1000']:.1f} MB per 1000 tokens "
                                  "(32 layers x 8 KV heads x 128 x K+V x 2 bytes)"),
    ]
    width = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{width}}  {b}" for a, b in rows)
