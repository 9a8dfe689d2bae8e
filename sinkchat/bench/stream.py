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
        self.ids: list[int] = []  # what was fed: the token ids a SinkCache's block memory records
        if isinstance(cache, SinkCache) and cache.token_ids is None:
            cache.token_ids = lambda a, b: self.ids[a:b]

    @torch.inference_mode()
    def forward(self, ids: list[int], keep: int = 0, recall: bool = False, candidates: int = 0) -> torch.Tensor:
        """Logits ``[n or keep, vocab]`` for the new tokens; ``keep=0`` keeps every position; ``recall``:
        this forward recalls blocks from a SinkCache's memory, as a chunk of a user message does;
        ``candidates``: a decode step's, as the chat's sampler asks (:func:`~sinkchat.model.forward`)."""
        self.ids.extend(ids)
        if isinstance(self.cache, SinkCache):
            positions, _ = self.cache.reserve(len(ids), recall=recall)
        else:
            positions = torch.arange(self.seen, self.seen + len(ids), device=self.device).unsqueeze(0)
        logits = forward(self.model, self.cache, ids, positions, keep, candidates)
        self.seen += len(ids)
        return logits

    def mark(self) -> None:
        """Remember this moment; :meth:`back` returns to it exactly (a SinkCache's rewind, a DynamicCache's crop)."""
        self.marked = self.seen
        if isinstance(self.cache, SinkCache):
            self.cache.mark()

    def back(self) -> None:
        if isinstance(self.cache, SinkCache):
            self.cache.rewind()
        elif self.seen > self.marked:
            self.cache.crop(self.marked - self.seen)  # transformers 5: a negative count removes that many
        self.seen = self.marked
        del self.ids[self.marked :]


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
