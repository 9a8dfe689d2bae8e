"""Model families: what each architecture sinkchat's fast path serves looks like, one module each.

A family module defines one :class:`Family`: the ``model_type`` values of ``config.json`` it serves,
its :class:`Block` (what one decoder layer computes, as data the fast loop reads), and the few rules
that differ between its members (which projections carry a bias, when a native sliding window is in
use, what config values the fast loop does not serve). :func:`family_of` is the one registry;
:func:`sinkchat.model.fast.supported` is the one gate that decides fast path or transformers from it.

Adding a family is a new module here, listed in :data:`FAMILIES`, and its tests: a tiny random model
of it, built in the test, whose fast-path logits equal transformers' forward (``tests/test_fast.py``).
No torch here: the quick start reads a family before anything heavy is imported.
"""

from __future__ import annotations

from .base import Block, Family
from .gemma3 import GEMMA3
from .llama import LLAMA, MISTRAL, QWEN2
from .qwen3 import QWEN3

FAMILIES: tuple[Family, ...] = (LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA3)

__all__ = ["Block", "FAMILIES", "Family", "family_of"]


def family_of(model_type: str | None) -> Family | None:
    """The family serving ``model_type``, or None (transformers' forward runs it)."""
    return next((f for f in FAMILIES if model_type in f.model_types), None)
