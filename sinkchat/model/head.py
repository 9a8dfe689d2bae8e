"""The output head of a decode step whose sampler needs only the most likely tokens: an int4 copy of
the float16 head scores the whole vocabulary, and the best ``C`` candidates get their logits computed
exactly from the float16 rows; every other logit is -inf. The sampler then runs unchanged on logits
that are exact wherever it can pick (greedy, or top-k with ``k`` well below ``C``).

Why: on the CPU the float16 head (49152 x 576 for SmolLM2-135M) is the largest single matmul of a
decode step, and the int4 kernel the layers use reads a quarter of its bytes, but re-quantizing the
bundled model's tied embeddings to int4 moves them 9% (relative norm), too far for its logits to be
used as they are. The candidates' rows computed again in float16 give the same values, bit for bit,
as the whole float16 head gives at those rows. (Approximate scores, then an exact re-ranking of a
shortlist: the idea of FAISS's ``IndexRefineFlat`` for nearest-neighbour search.)

Used only where the int4 kernel runs with AVX-512 (elsewhere it is twice as slow, as slow as float16:
README, "Which kernel runs where"); prefill, perplexity and every logit shown or scored take the
whole float16 head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .gguf import int4_fits, int4_is_fast
from .quant import HalfLinear, Int4Linear, Packs


class CandidateHead(nn.Module):
    """``head`` (a bias-free float16 :class:`~.quant.HalfLinear` ``[V, hidden]``) with an int4 g32 copy
    that picks the candidates (taken from ``packs`` where an earlier start kept it)."""

    def __init__(self, head: HalfLinear, packs: Packs | None = None):
        super().__init__()
        self.exact = head
        self.scores = Int4Linear.from_weight(head.weight, None, packs, "head.candidates")

    @staticmethod
    def fits(head: nn.Module) -> bool:
        """Whether ``head`` is a float16 CPU head the int4 kernel can copy, on a CPU where it is fast."""
        return (
            type(head) is HalfLinear
            and head.bias is None
            and head.weight.dtype == torch.float16
            and head.weight.device.type == "cpu"
            and int4_fits(*head.weight.shape)
            and int4_is_fast()
        )

    def forward(self, x: torch.Tensor, candidates: int) -> torch.Tensor:
        """Logits ``[1, V]`` float32 for one normed hidden state ``x`` ``[1, hidden]``: the exact float16
        head's values at the ``candidates`` best int4 scores, -inf elsewhere."""
        best = self.scores(x).topk(candidates).indices[0]  # [C]
        exact = F.linear(x.to(torch.float16), self.exact.weight.index_select(0, best)).float()
        return torch.full((1, self.exact.out_features), float("-inf"), device=x.device).index_copy_(1, best, exact)
