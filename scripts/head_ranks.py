"""How many int4-ranked candidates the decode step's candidate head (sinkchat.model.head) needs: the
bundled model replies to a few prompts (greedy, then sampled at the defaults with a seed), and at every
decode step the exact float16 head's top 1, 10 and 50 are looked up in the int4 copy's ranking; the
worst rank each needed is printed.

    PYTHONPATH=. python scripts/head_ranks.py --tokens 120
"""

from __future__ import annotations

import argparse

import torch

from sinkchat.engine import Chat
from sinkchat.model import load
from sinkchat.settings import Settings

PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how a refrigerator works.",
           "List ten fruits and one fact about each."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=120, help="longest reply per prompt")
    args = parser.parse_args()
    loaded = load("smollm2-135m", quant="auto", device="cpu")
    fast = loaded.fast
    if fast.candidate_head is None:
        raise SystemExit("no candidate head on this CPU (the int4 kernel has no AVX-512 here)")
    worst, steps, logits = {1: 0, 10: 0, 50: 0}, [0], fast.logits

    def measured(x: torch.Tensor, candidates: int = 0) -> torch.Tensor:
        if candidates:  # a decode step: where the int4 scores rank the exact head's best tokens
            normed = fast.dims.norm(x, fast.norm)
            exact, order = fast.head(normed).float()[0], fast.candidate_head.scores(normed).float()[0].argsort(
                descending=True, stable=True)
            rank = torch.empty_like(order)
            rank[order] = torch.arange(len(order))
            best = exact.topk(max(worst)).indices
            for k in worst:
                worst[k] = max(worst[k], int(rank[best[:k]].max()) + 1)
            steps[0] += 1
        return logits(x, candidates)

    fast.logits = measured
    for name, settings in (("greedy", Settings(temperature=0)), ("sampled", Settings(seed=1))):
        for prompt in PROMPTS:
            for _ in Chat(loaded, settings.replace(max_new_tokens=args.tokens)).submit(prompt):
                pass
        print(f"after the {name} replies: {steps[0]} decode steps; int4 rank that held the exact top k: "
              + ", ".join(f"top {k}: {r}" for k, r in worst.items()), flush=True)


if __name__ == "__main__":
    main()
