"""Next-token choice: greedy at temperature 0, else temperature, top-k, top-p; repetition penalty."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.1
    seed: int | None = None


class Sampler:
    """Stateful only in its random generator, so a fixed seed replays the same reply."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor, recent: list[int]) -> int:
        p = self.params
        logits = logits.detach().float().cpu().clone()
        if p.repetition_penalty != 1.0 and recent:
            idx = torch.tensor(sorted(set(recent)), dtype=torch.long)
            picked = logits[idx]
            logits[idx] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
        if p.temperature <= 0:
            return int(logits.argmax())
        logits = logits / p.temperature
        if 0 < p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits[logits < kth] = float("-inf")
        if 0 < p.top_p < 1:
            sorted_logits, order = torch.sort(logits, descending=True)
            probs = sorted_logits.softmax(-1)
            cut = probs.cumsum(-1) - probs > p.top_p  # keep the smallest set whose mass reaches top_p
            sorted_logits[cut] = float("-inf")
            logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
        return int(torch.multinomial(logits.softmax(-1), 1, generator=self.generator))
