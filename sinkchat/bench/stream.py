"""What every measurement shares: a stream of forwards through one cache, NLL, recomputed contexts."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..kv import SinkCache
from ..model import forward

Tick = Callable[[int], None]


class Stream:
    """Feeds tokens to ``model`` through one cache, the way the chat does (``reserve`` first for a SinkCache)."""

    def __init__(self, model, cache):
        self.model, self.cache, self.seen = model, cache, 0
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def forward(self, ids: list[int], keep: int = 0, candidates: int = 0) -> torch.Tensor:
        """Logits ``[n or keep, vocab]`` for the new tokens; ``keep=0`` keeps every position;
        ``candidates``: a decode step's, as the chat's sampler asks (:func:`~sinkchat.model.forward`)."""
        if isinstance(self.cache, SinkCache):
            positions, _ = self.cache.reserve(len(ids))
        else:
            positions = torch.arange(self.seen, self.seen + len(ids), device=self.device).unsqueeze(0)
        logits = forward(self.model, self.cache, ids, positions, keep, candidates)
        self.seen += len(ids)
        return logits


def dense_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def nll(logits: torch.Tensor, targets: list[int]) -> list[float]:
    """Negative log-likelihood of each target under the matching row of logits."""
    logits = logits.float()
    tgt = torch.tensor(targets, device=logits.device)
    return (torch.logsumexp(logits, -1) - logits.gather(-1, tgt[:, None])[:, 0]).tolist()


@torch.inference_mode()
def recompute_logits(model, contexts: list[list[int]]) -> torch.Tensor:
    """Last-position logits ``[B, vocab]`` of equal-length contexts, each computed from scratch in one batch."""
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor(contexts, device=device), use_cache=False, logits_to_keep=1)
    return out.logits[:, -1]
