"""What a model family is (:class:`Family`) and what its decoder layer computes (:class:`Block`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Block:
    """One decoder layer, as the fast loop computes it: RMSNorm, q/k/v projection, RoPE, attention,
    output projection, residual; RMSNorm, gated MLP (``act(gate) * up``), down projection, residual."""

    act: str = "silu"  # the MLP's gate activation, as config.json's ``hidden_act`` names it


@dataclass(frozen=True)
class Family:
    """An architecture family: its ``model_type`` values and what its decoder layers compute."""

    name: str
    model_types: tuple[str, ...]
    block: Block = field(default_factory=Block)
    projections: tuple[tuple[str, str], ...] = (
        ("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
        ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))

    def biases(self, raw: dict) -> tuple[str, ...]:
        """The projections with a bias, as transformers builds this model from ``config.json`` ``raw``."""
        return ()

    def sliding(self, raw: dict) -> bool:
        """Whether ``config.json`` ``raw`` puts a native sliding window in use (transformers' defaults)."""
        return raw.get("sliding_window") is not None
