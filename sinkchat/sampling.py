"""Next-token choice: pure greedy at temperature 0, else repetition penalty, temperature, top-k, top-p.

The repetition penalty (CTRL, Keskar et al. 2019) is applied only to the ids the caller passes: the
engine passes the reply's own last :data:`REPEAT_LAST_N` generated tokens (llama.cpp's
``repeat_last_n`` over generated text), never the prompt, so a reply may repeat what the user said
(a pass key, a name). At temperature 0 nothing changes the logits: greedy is the argmax.
"""

from __future__ import annotations

import torch

from .errors import SinkchatError
from .settings import Settings

REPEAT_LAST_N = 256  # generated tokens the repetition penalty looks back over (llama.cpp's repeat_last_n)
MIN_CANDIDATES = 64  # the fewest most likely tokens a decode step's exact logits cover (sinkchat.model.head)
CANDIDATES_PER_TOP_K = 8  # the bundled model needed up to 145 int4-ranked tokens to hold the exact top 50 (README)


class Sampler:
    """Reads ``temperature``, ``top_p``, ``top_k``, ``repetition_penalty`` and ``seed`` from
    :class:`Settings`; stateful only in its random generator, so a fixed seed replays a reply."""

    def __init__(self, settings: Settings):
        self.params = settings
        self.generator = torch.Generator()
        if settings.seed is not None:
            self.generator.manual_seed(settings.seed)
        else:
            self.generator.seed()

    def candidates(self) -> int:
        """How many of the most likely tokens a decode step must give exact logits for, the rest
        free to be -inf (:mod:`sinkchat.model.head`): :data:`MIN_CANDIDATES` for greedy, else
        :data:`CANDIDATES_PER_TOP_K` times ``top_k`` (at least that); 0 (every logit) without top-k,
        or with a repetition penalty below 1, which can lift a token from anywhere into the top k."""
        p = self.params
        if p.temperature <= 0:
            return MIN_CANDIDATES
        if p.top_k <= 0 or p.repetition_penalty < 1:
            return 0
        return max(MIN_CANDIDATES, CANDIDATES_PER_TOP_K * p.top_k)

    def __call__(self, logits: torch.Tensor, recent: list[int]) -> int:
        """One token id from ``logits`` ``[vocab]``: the argmax at temperature 0, else a draw in which
        ``recent`` ids (the reply's own generated tokens) get the repetition penalty. Raises
        :class:`SinkchatError` for NaN or +inf logits (a broken model): argmax would pick garbage,
        sampling would raise."""
        p = self.params
        logits = logits.detach().double().cpu().clone()
        if torch.isnan(logits).any() or torch.isposinf(logits).any():  # -inf only rules a token out
            raise SinkchatError("the model computed NaN (not a number) or infinity for the next token: its "
                                "weights or config.json are broken")
        if p.temperature <= 0:
            return int(logits.argmax())
        if p.repetition_penalty != 1.0 and recent:
            idx = torch.tensor(sorted(set(recent)), dtype=torch.long)
            picked = logits[idx]
            logits[idx] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
        # Shifting by the maximum first keeps a tiny temperature finite: the best token scores 0 and
        # the others go to -inf, never inf - inf (NaN).
        logits = (logits - logits.max()) / p.temperature
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
