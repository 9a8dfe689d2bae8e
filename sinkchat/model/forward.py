"""The one place that calls a model: the fast path (:mod:`.fast`) where the loader attached one and the
cache is a sink cache, else transformers' own forward over the same cache layers."""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

@functools.cache
def _cache_kwarg(forward_type: type) -> str:
    """transformers 5.24 renamed ``past_key_values`` to ``cache``; older 5.x ignore an unknown ``cache``."""
    return "cache" if "cache" in inspect.signature(forward_type.forward).parameters else "past_key_values"


def forward(model, cache, ids: list[int], positions: torch.Tensor, keep: int = 1, candidates: int = 0):
    """One forward pass of ``ids`` at RoPE ``positions`` through ``cache``; logits of the last ``keep``
    positions (0: all). The one place that calls the model, for the engine, the store and the bench:
    the fast path where the loader attached one and the cache is a sink cache, else transformers.
    ``candidates``: a decode step (one token) whose sampler picks only among that many most likely
    tokens; the fast path may then give -inf for all others (:mod:`.head`). 0: every logit exact."""
    from .quant import prefill_scratch

    fast = getattr(model, "sinkchat_fast", None)
    with prefill_scratch():  # a prefill chunk's dequantized weights reuse buffers
        if fast is not None and hasattr(cache, "reserve"):
            return fast(ids, positions, cache, keep, candidates)
        if getattr(cache, "recalling", False):  # only the fast path recalls from the block memory
            cache.cancel_recall()
        return forward_outputs(model, cache, ids, positions, keep).logits[0]


def forward_outputs(model, cache, ids: list[int], positions: torch.Tensor, keep: int = 1, **extra):
    """:func:`forward`'s whole model output (``extra``: e.g. ``output_attentions=True``), for measurements."""
    import torch

    from ..kv.layer import transformers_cache

    device = model.get_input_embeddings().weight.device  # the first GPU under a device map
    if hasattr(cache, "reserve"):  # a SinkCache
        cache = transformers_cache(cache.layers)
    return model(
        input_ids=torch.tensor([ids], device=device),
        position_ids=positions.to(device),
        use_cache=True,
        logits_to_keep=keep,
        **{_cache_kwarg(type(model)): cache},
        **extra,
    )


