"""Measurements behind ``sinkchat bench``, through the chat's own cache: :mod:`.ppl` (streaming
perplexity, and the sink-count sweep), :mod:`.speed` (decode speed and memory), :mod:`.resume`
(restore vs re-prefill), :mod:`.attention` (where attention goes), :mod:`.plot` (PNG figures). This
module holds the text they read and the parsing of list flags (no torch, so flag errors are quick);
:mod:`.stream` the forwards they share.

Every mode that streams (``sinks``, ``window``) feeds tokens through :class:`~sinkchat.kv.cache.SinkCache`
exactly as :class:`~sinkchat.engine.Chat` does: ``reserve`` before each forward, its position ids to
the model. ``dense`` is transformers' ``DynamicCache`` (an ever-growing reference); ``recompute``
rebuilds each token's context (the first ``sinks`` tokens plus the last ``window``) from scratch.

Results are appended while they are measured, so an interrupted run still has everything done so far.
"""

from __future__ import annotations

from ..errors import SinkchatError

PPL_MODES = ("dense", "window", "sinks", "recompute", "recall")
PPL_DEFAULT = PPL_MODES[:4]  # recall is asked for by name: it writes a block memory to a temporary file
SPEED_MODES = ("sinks", "dense", "recompute", "recall")
SWEEP_MODES = ("dense", "sinks")  # what a sink-count sweep runs: sinks once per count, dense as a reference
ATTENTION_FROM = 64  # bench attention counts queries at 0-based positions 64 and after


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


def parse_sinks(text: str | None) -> list[int] | None:
    """``--sinks`` of ``bench ppl``: one count or a comma list (``0,1,2,4,8,16``), duplicates dropped.

    None when not given. Raises :class:`SinkchatError` for anything but integers; ranges are the
    settings' to check.
    """
    if text is None:
        return None
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise SinkchatError(f"--sinks takes a number or a comma list of numbers such as 0,1,2,4,8,16 (got {text!r})") \
            from None
    return list(dict.fromkeys(counts))


def bos_first(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS token first, as every chat with the model starts. On such a
    model BOS is the attention sink: a stream without it measures another model (on Gemma 3, at a
    256-token budget, window and sinks scored 6.42 and 6.41 without BOS, 5.35 and 2.52 with it)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos is not None and bool(ids) and ids[0] == bos


def text_ids(tokenizer, text: str, tokens: int) -> list[int]:
    """The first ``tokens`` tokens of ``text``, after BOS where the model's tokenizer adds one
    (:func:`bos_first`); only a generous prefix is tokenized, so long files stay quick; special-token
    strings in it are text, as in a chat message."""
    ids: list[int] = [tokenizer.bos_token_id] if bos_first(tokenizer) else []
    size = max(4096, tokens * 8)
    while True:
        body = tokenizer(text[:size], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        if len(ids) + len(body) > tokens or size >= len(text):
            return (ids + body)[:tokens]
        size *= 2
