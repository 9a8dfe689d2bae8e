"""One layer of the cache: preallocated K/V buffers and the tensor work the cache asks of them.

:class:`SinkLayer` (a layer with global attention: sinks, parked pinned tokens, the rolling window)
and :class:`LocalLayer` (a layer the model trained with a sliding window: a rolling buffer of its
native window) share :class:`Buffers`. Rotating keys to new positions (:func:`rotate`) happens in
float32. All bookkeeping (which conversation token sits in which slot) is the cache's.
"""

from __future__ import annotations

import functools

import torch


def rotate(x: torch.Tensor, delta: torch.Tensor | float, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate already-RoPE'd keys by ``delta`` positions (rotate-half convention), in float32.

    Only the first ``2 * len(inv_freq)`` dims rotate (partial rotary models keep the rest).
    ``delta`` is a scalar or one value per token (dim -2). The model's ``attention_scaling`` is
    already baked into ``x`` and a pure rotation preserves it.
    """
    rot = 2 * inv_freq.shape[-1]
    xf = x.float()
    head, tail = xf[..., :rot], xf[..., rot:]
    delta = torch.as_tensor(delta, dtype=torch.float64, device=x.device)
    angles = (delta.reshape(-1, 1) * inv_freq.to(device=x.device, dtype=torch.float64)).float()
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1)
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1)
    half = rot // 2
    rotated_half = torch.cat([-head[..., half:], head[..., :half]], dim=-1)
    out = head * cos + rotated_half * sin
    if tail.shape[-1]:
        out = torch.cat([out, tail], dim=-1)
    return out.to(x.dtype)


class Buffers:
    """One layer's preallocated ``[batch, kv_heads, capacity, head_dim]`` keys and values, written in
    place (a decode step costs the same at any point of the stream), and the methods transformers
    calls on a cache layer (``update``, ``get_mask_sizes``, ``get_seq_length``, ...: those of its
    ``CacheLayerMixin``, which these classes do not import, see :mod:`sinkchat.kv.cache`)."""

    is_sliding = False
    is_compileable = False

    def __init__(self, capacity: int, inv_freq: torch.Tensor, dtype: torch.dtype | None = None):
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.is_initialized = False
        self.capacity = capacity
        self.inv_freq = inv_freq
        self.kv_dtype = dtype  # the buffers' dtype; None: the first keys' own (the model's compute dtype)
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.dtype, self.device = self.kv_dtype or key_states.dtype, key_states.device
        self.keys = key_states.new_zeros((b, h, self.capacity, d), dtype=self.dtype)
        self.values = value_states.new_zeros((b, h, self.capacity, value_states.shape[-1]), dtype=self.dtype)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """transformers' side: :meth:`write`, then the held K/V in the model's compute dtype (no copy when
        the cache holds that dtype, the default)."""
        keys, values = self.write(key_states, value_states)
        return keys.to(key_states.dtype), values.to(value_states.dtype)

    def write(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``[b, h, n, d]`` keys and values (RoPE already applied) after the held tokens; return
        views of everything held, ``[b, h, length, d]`` in the cache's dtype."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        start, end = self.length, self.length + n
        if end > self.capacity:
            raise RuntimeError("SinkCache.reserve() must be called before each forward pass")
        self.keys[:, :, start:end] = key_states
        self.values[:, :, start:end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity

    def reset(self) -> None:
        self.length = 0
        if self.is_initialized:
            self.keys.zero_()
            self.values.zero_()

    def shift_window(self, first: int, delta: int) -> None:
        """Rotate the keys of slots ``first..length`` by ``delta`` positions (a rebase)."""
        if self.is_initialized and self.length > first:
            w = self.keys[:, :, first : self.length]
            self.keys[:, :, first : self.length] = rotate(w, delta, self.inv_freq)


class SinkLayer(Buffers):
    """A layer that keeps the attention sinks, the parked (pinned) tokens, the recalled tokens and the
    rolling window, in that slot order: ``sinks + recall + window`` slots, plus the float32 keys of
    the sinks, of the parked tokens and of the recalled tokens as they were computed, and the
    operations :class:`~sinkchat.kv.cache.SinkCache` drives: relaying slots after an eviction,
    placing the sinks, parked and recalled keys at new positions by rotating those pristine copies
    (:func:`rotate`). All bookkeeping (which token sits in which slot) is the cache's."""

    def __init__(self, capacity: int, sink_capacity: int, inv_freq: torch.Tensor, dtype: torch.dtype | None = None):
        super().__init__(capacity, inv_freq, dtype)
        self.sink_capacity = sink_capacity
        self.sink_orig: torch.Tensor | None = None  # float32 keys of the sinks as first computed
        self.pin_orig: torch.Tensor | None = None  # float32 keys of the parked tokens as first computed
        self.rec_orig: torch.Tensor | None = None  # float32 keys of the recalled tokens as first computed
        self.n_rec = 0  # recall slots, right after the parked ones

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        b, h, _, d = key_states.shape
        self.sink_orig = key_states.new_zeros((b, h, self.sink_capacity, d), dtype=torch.float32)

    def write(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`Buffers.write`; the first ``sink_capacity`` keys are also kept in float32 as computed
        (before any rounding to the cache's dtype)."""
        start = self.length
        out = super().write(key_states, value_states)
        if start < self.sink_capacity:  # the very first tokens: remember the sinks as computed
            k = min(self.length, self.sink_capacity)
            self.sink_orig[:, :, start:k] = key_states[:, :, : k - start].float()
        return out

    # -- operations driven by SinkCache --------------------------------------------------------

    def pin_room(self, n: int) -> None:
        """Make the float32 store of parked keys hold at least ``n`` tokens (allocated on first use)."""
        have = 0 if self.pin_orig is None else self.pin_orig.shape[-2]
        if self.is_initialized and n > have:
            b, h, _, d = self.keys.shape
            grown = self.keys.new_zeros((b, h, max(n, 2 * have), d), dtype=torch.float32)
            if have:
                grown[:, :, :have] = self.pin_orig
            self.pin_orig = grown

    def evict(self, n_sink: int, n_pin: int, keep: torch.Tensor | None, moved: torch.Tensor | None, tail: int) -> None:
        """Relay the slots after the sinks: the parked slots ``keep`` (indices into the parked
        region of ``n_pin``), then the window slots ``moved`` (they join the parked region, their
        keys saved in float32), then the :attr:`n_rec` recall slots (their values; the keys are
        placed by :meth:`place`), then the window from slot ``tail`` on (one copy of the tail)."""
        if not self.is_initialized:
            return
        parts = []
        if keep is not None and len(keep):
            parts.append((self.pin_orig[:, :, keep], self.values[:, :, n_sink + keep]))
        if moved is not None and len(moved):
            parts.append((self.keys[:, :, moved].float(), self.values[:, :, moved]))
        m = sum(k.shape[-2] for k, _ in parts)
        rec = self.values[:, :, n_sink + n_pin : n_sink + n_pin + self.n_rec].clone() if m != n_pin else None
        if m:
            orig, vals = torch.cat([k for k, _ in parts], dim=-2), torch.cat([v for _, v in parts], dim=-2)
            self.pin_room(m)
            self.pin_orig[:, :, :m] = orig
            self.values[:, :, n_sink : n_sink + m] = vals
        if rec is not None and self.n_rec:
            self.values[:, :, n_sink + m : n_sink + m + self.n_rec] = rec
        first, moved_len = n_sink + m + self.n_rec, self.length - tail
        if first != tail:
            for buf in (self.keys, self.values):
                buf[:, :, first : first + moved_len] = buf[:, :, tail : self.length].clone()
        self.length = first + moved_len

    def place(self, n_sink: int, sink_delta: int, n_pin: int, pin_delta: torch.Tensor | None,
              rec_delta: torch.Tensor | None = None) -> None:
        """Write the sinks rotated ``sink_delta`` positions, the parked keys ``pin_delta`` and the
        recalled keys ``rec_delta`` (one per token), from where they were first computed: always from
        the float32 copies, so no drift."""
        if not self.is_initialized:
            return
        if n_sink:
            self.keys[:, :, :n_sink] = rotate(self.sink_orig[:, :, :n_sink], sink_delta, self.inv_freq).to(self.dtype)
        if n_pin:
            placed = rotate(self.pin_orig[:, :, :n_pin], pin_delta, self.inv_freq)
            self.keys[:, :, n_sink : n_sink + n_pin] = placed.to(self.dtype)
        if self.n_rec and rec_delta is not None:
            at = n_sink + n_pin
            self.keys[:, :, at : at + self.n_rec] = rotate(self.rec_orig[:, :, : self.n_rec], rec_delta,
                                                           self.inv_freq).to(self.dtype)

    # -- the recall slots (see :mod:`sinkchat.kv.memory`) ----------------------------------------

    def resize_recall(self, first: int, n: int) -> None:
        """Make the recall region, from slot ``first`` (after the sinks and parked tokens), ``n`` slots
        long: the window moves along in one copy (the new slots are filled by :meth:`fill_recall`)."""
        if n == self.n_rec:
            return
        if self.is_initialized and self.length > first + self.n_rec:
            old, new = first + self.n_rec, first + n
            count = self.length - old
            for buf in (self.keys, self.values):
                buf[:, :, new : new + count] = buf[:, :, old : self.length].clone()
        self.length += n - self.n_rec
        self.n_rec = n

    def fill_recall(self, first: int, keys: torch.Tensor, values: torch.Tensor, delta: torch.Tensor) -> None:
        """Write recalled ``keys`` (float32, ``[1, KV, n, D]`` as computed) moved ``delta`` positions
        (one per token) and ``values`` into the ``n`` recall slots from ``first``; the keys are kept
        for :meth:`place`."""
        n = keys.shape[-2]
        if n != self.n_rec:
            raise ValueError(f"{n} recalled tokens for {self.n_rec} recall slots")
        if not n or not self.is_initialized:
            return
        if self.rec_orig is None or self.rec_orig.shape[-2] < n:
            self.rec_orig = self.keys.new_zeros((*self.keys.shape[:2], n, self.keys.shape[-1]), dtype=torch.float32)
        self.rec_orig[:, :, :n] = keys.to(self.rec_orig.device)
        self.values[:, :, first : first + n] = values.to(device=self.values.device, dtype=self.dtype)
        self.keys[:, :, first : first + n] = rotate(self.rec_orig[:, :, :n], delta, self.inv_freq).to(self.dtype)


class LocalLayer(Buffers):
    """A sliding-window layer's cache (Gemma 3's local layers, gpt-oss's banded ones): the model was
    trained to attend here only to the last ``window`` tokens, so the cache is a rolling buffer of
    them: no sinks, nothing parked, exactly what the model does natively however long the stream.

    It holds up to ``window - 1 + room`` tokens at contiguous positions ending at the newest (the
    same positions as the sink layers' window: all layers share the cache's ``base``); attention
    masks the keys ``window`` or more positions back. :meth:`make_room` drops the oldest tokens in one
    copy when ``n`` more would not fit, keeping the last ``window - 1``, so the copy is amortised over
    ``room`` tokens as the sink layers' evictions are over a block.
    """

    is_sliding = True

    def __init__(self, window: int, room: int, inv_freq: torch.Tensor, dtype: torch.dtype | None = None):
        super().__init__(window - 1 + room, inv_freq, dtype)
        self.window = window

    def to_drop(self, n: int) -> int:
        """How many of the oldest held tokens :meth:`make_room` ``(n)`` drops."""
        return 0 if self.length + n <= self.capacity else self.length - min(self.length, self.window - 1)

    def make_room(self, n: int) -> int:
        """Drop the oldest held tokens so that ``n`` more fit; returns how many were dropped.
        Grows the buffers instead when ``n`` alone passes ``room`` (a chunk longer than planned)."""
        drop = self.to_drop(n)
        if self.length - drop + n > self.capacity:
            self._grow(self.length - drop + n)
        self.keep_last(self.length - drop)
        return drop

    def keep_last(self, count: int) -> None:
        """Keep only the newest ``count`` held tokens (one copy to the front)."""
        drop = self.length - count
        if self.is_initialized and drop > 0 and count > 0:
            for buf in (self.keys, self.values):
                buf[:, :, :count] = buf[:, :, drop : self.length].clone()
        self.length = min(self.length, count)

    def _grow(self, capacity: int) -> None:
        self.capacity = capacity
        if self.is_initialized:
            for name in ("keys", "values"):
                old = getattr(self, name)
                new = old.new_zeros((*old.shape[:2], capacity, old.shape[-1]))
                new[:, :, : self.length] = old[:, :, : self.length]
                setattr(self, name, new)


@functools.cache
def _transformers_layer(cls: type) -> type:
    from transformers.cache_utils import CacheLayerMixin

    return type(f"Transformers{cls.__name__}", (cls, CacheLayerMixin), {
        "__doc__": f":class:`{cls.__name__}` as transformers' cache code expects it (an instance of its mixin); "
                   "every method is still its own."})


def transformers_cache(layers: list[Buffers]):
    """A transformers ``Cache`` over these layers, for transformers' own forward (it checks that
    layers are its ``CacheLayerMixin``: the layers take such a class in place, once)."""
    from transformers.cache_utils import Cache, CacheLayerMixin

    for layer in layers:
        if not isinstance(layer, CacheLayerMixin):
            layer.__class__ = _transformers_layer(type(layer))
    return Cache(layers=layers)
