"""What a model family is (:class:`Family`) and what its decoder layer computes (:class:`Block`)."""

from __future__ import annotations

from dataclasses import dataclass, field

# the RMSNorms around attention and the MLP: (before attention, after it, before the MLP, after it)
LLAMA_NORMS = ("input_layernorm", None, "post_attention_layernorm", None)
SANDWICH_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                  "post_feedforward_layernorm")


@dataclass(frozen=True)
class Block:
    """One decoder layer, as the fast loop computes it (:mod:`sinkchat.model.fast`), as data.

    ``x + o(attention(rope(q), rope(k), v))`` after an RMSNorm, then ``x + down(act(gate) * up)``
    after another. ``norms`` names the layer's RMSNorm modules before attention, after it, before the
    MLP and after it: Llama has the first and third; Gemma 2/3 all four (the "sandwich": each
    output is normed before it joins the residual stream). The input embedding module applies any
    embedding scale itself (Gemma's sqrt(hidden)).
    """

    act: str = "silu"  # the MLP gate's activation, as transformers names it
    act_key: str = "hidden_act"  # the config key holding that name
    norms: tuple[str | None, ...] = LLAMA_NORMS
    norm_offset: float = 0.0  # Gemma: RMSNorm scales by 1 + weight
    qk_norm: bool = False  # an RMSNorm over each head's q and k before RoPE (``self_attn.q_norm``, ``k_norm``)
    query_scale_key: str | None = None  # Gemma: attention scale is config[key] ** -0.5, not head_dim ** -0.5


@dataclass(frozen=True)
class Family:
    """An architecture family: its ``model_type`` values and what its decoder layers compute."""

    name: str
    model_types: tuple[str, ...]
    block: Block = field(default_factory=Block)
    projections: tuple[tuple[str, str], ...] = (
        ("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
        ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))
    quick: bool = False  # the quick start (:mod:`sinkchat.model.quickload`) builds its module tree
    default_window: int | None = None  # the sliding window transformers assumes when config.json names none

    def biases(self, raw: dict) -> tuple[str, ...]:
        """The projections with a bias, as transformers builds this model from ``config.json`` ``raw``."""
        return ()

    def sliding(self, raw: dict) -> bool:
        """Whether ``config.json`` ``raw`` puts a native sliding window in use (transformers' defaults)."""
        return raw.get("sliding_window") is not None

    def layer_types(self, raw: dict) -> list[str] | None:
        """Each layer's attention kind (``full_attention``, ``sliding_attention``) where ``config.json``
        ``raw`` leaves it to transformers to derive (it writes them when it saves a config); None: the
        same kind everywhere, sliding where :meth:`sliding` says so."""
        return None

    def fast(self, config) -> bool:
        """Whether the fast loop computes what this transformers ``config`` asks (beyond the block)."""
        return True
