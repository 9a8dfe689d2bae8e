"""Qwen3 (``qwen3``): the Llama block with an RMSNorm over each head's q and k before RoPE."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Block, Family


@dataclass(frozen=True)
class Qwen3(Family):
    def biases(self, raw: dict) -> tuple[str, ...]:
        return ("q_proj", "k_proj", "v_proj", "o_proj") if raw.get("attention_bias") else ()

    def sliding(self, raw: dict) -> bool:
        return bool(raw.get("use_sliding_window", False))

    def layer_types(self, raw: dict) -> list[str] | None:
        return windowed_from(raw)


def windowed_from(raw: dict) -> list[str] | None:
    """Qwen2 and Qwen3: with ``use_sliding_window``, the layers from ``max_window_layers`` on slide."""
    if not raw.get("use_sliding_window") or not isinstance(raw.get("num_hidden_layers"), int):
        return None
    first = raw.get("max_window_layers", 28)
    return ["sliding_attention" if i >= first else "full_attention" for i in range(raw["num_hidden_layers"])]


QWEN3 = Qwen3("qwen3", ("qwen3",), Block(qk_norm=True), default_window=4096)
