"""The Llama family: Llama 2 and SmolLM (``llama``), Mistral (``mistral``), Qwen2/2.5 (``qwen2``).

The same block (RMSNorm, SiLU-gated MLP, RoPE on every layer); they differ in which projections carry
biases and in when a native sliding window is in use.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Family
from .qwen3 import windowed_from


@dataclass(frozen=True)
class Llama(Family):
    def biases(self, raw: dict) -> tuple[str, ...]:
        attention = ("q_proj", "k_proj", "v_proj", "o_proj") if raw.get("attention_bias") else ()
        return attention + (("gate_proj", "up_proj", "down_proj") if raw.get("mlp_bias") else ())

    def sliding(self, raw: dict) -> bool:
        return False


@dataclass(frozen=True)
class Mistral(Family):
    def sliding(self, raw: dict) -> bool:
        return raw.get("sliding_window", 4096) is not None  # transformers' default window is 4096


@dataclass(frozen=True)
class Qwen2(Family):
    def biases(self, raw: dict) -> tuple[str, ...]:
        return ("q_proj", "k_proj", "v_proj")  # always, whatever the config says

    def sliding(self, raw: dict) -> bool:
        return bool(raw.get("use_sliding_window", False))

    def layer_types(self, raw: dict) -> list[str] | None:
        return windowed_from(raw)


LLAMA = Llama("llama", ("llama",), quick=True)
MISTRAL = Mistral("mistral", ("mistral",), quick=True, default_window=4096)
QWEN2 = Qwen2("qwen2", ("qwen2",), quick=True, default_window=4096)
