"""Gemma 3 (``gemma3_text``, and the text part of ``gemma3``): five sliding-window layers to one
global, each with its own RoPE theta; norms around attention and the MLP (the "sandwich"), RMSNorm
scaling by ``1 + weight``, q/k norms, GELU (tanh) gating, embeddings scaled by sqrt(hidden), and an
attention scale of ``query_pre_attn_scalar ** -0.5``. Gemma 2's logit soft-capping is not served
(transformers runs such a config)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import SANDWICH_NORMS, Block, Family


@dataclass(frozen=True)
class Gemma3(Family):
    def layer_types(self, raw: dict) -> list[str] | None:
        """Every ``sliding_window_pattern``-th layer global (6: five sliding to one), as transformers derives it."""
        n, pattern = raw.get("num_hidden_layers"), raw.get("sliding_window_pattern", 6)
        if not isinstance(n, int) or not isinstance(pattern, int) or pattern < 1:
            return None
        return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]

    def fast(self, config) -> bool:
        return (getattr(config, "attn_logit_softcapping", None) is None
                and getattr(config, "final_logit_softcapping", None) is None
                and not getattr(config, "use_bidirectional_attention", False))


GEMMA3 = Gemma3("gemma3", ("gemma3_text", "gemma3"), Block(
    act="gelu_pytorch_tanh", act_key="hidden_activation", norms=SANDWICH_NORMS, norm_offset=1.0, qk_norm=True,
    query_scale_key="query_pre_attn_scalar"), default_window=4096)
