"""The attention-sink + rolling-window KV cache (StreamingLLM, Xiao et al., ICLR 2024).

:mod:`.cache` (:class:`SinkCache`: what is held where, eviction, pins, rebase, persistence),
:mod:`.layer` (one layer's buffers and the tensor work on them, RoPE re-rotation),
:mod:`.layout` (where tokens sit, as plain data, and what an eviction does to it), :mod:`.rewind`
(going back to the start of a turn exactly). The cache knows nothing of chats or models' code: it
sees a stream of tokens and reads a model's RoPE frequencies.
"""

__all__ = ["SinkCache", "default_block", "max_positions", "rope_inv_freqs"]


def __getattr__(name: str):
    """The cache's API, imported on first use: :mod:`.cache` imports torch, while the store reads only
    :mod:`.layout` (plain data), and ``sinkchat chats list`` must not pay for torch."""
    if name in __all__:
        from . import cache

        return getattr(cache, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
