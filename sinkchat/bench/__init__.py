"""Measurements behind ``sinkchat bench``, through the chat's own cache: :mod:`.ppl` (streaming
perplexity), :mod:`.speed` (decode speed and memory), :mod:`.resume` (restore vs re-prefill),
:mod:`.plot` (PNG figures). This module holds the text they read (no torch, so flag errors are quick);
:mod:`.stream` the forwards they share.

Every mode that streams (``sinks``, ``window``) feeds tokens through :class:`~sinkchat.cache.SinkCache`
exactly as :class:`~sinkchat.engine.Chat` does: ``reserve`` before each forward, its position ids to
the model. ``dense`` is transformers' ``DynamicCache`` (an ever-growing reference); ``recompute``
rebuilds each token's context (the first ``sinks`` tokens plus the last ``window``) from scratch.

Results are appended while they are measured, so an interrupted run still has everything done so far.
"""

from __future__ import annotations

from ..errors import SinkchatError

PPL_MODES = ("dense", "window", "sinks", "recompute")
SPEED_MODES = ("sinks", "dense", "recompute")


def default_text() -> str:
    """Python's own documentation (``pydoc_data.topics``): a long real text every Python install ships."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def parse_modes(text: str, allowed: tuple[str, ...]) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in allowed]
    if bad or not modes:
        raise SinkchatError(f"--modes takes a comma list of {', '.join(allowed)} (got {text!r})")
    return list(dict.fromkeys(modes))


def text_ids(tokenizer, text: str, tokens: int) -> list[int]:
    """The first ``tokens`` tokens of ``text`` (only a generous prefix is tokenized, so long files stay quick);
    special-token strings in it are text, as in a chat message."""
    ids: list[int] = []
    size = max(4096, tokens * 8)
    while True:
        ids = tokenizer(text[:size], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        if len(ids) > tokens or size >= len(text):
            return ids[:tokens]
        size *= 2
