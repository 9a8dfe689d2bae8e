"""The attention-sink + rolling-window KV cache (StreamingLLM) as a transformers 5 ``Cache``.

Design, and why:

* **Preallocated buffers.** Each layer owns ``[batch, kv_heads, sinks + window, head_dim]`` tensors
  allocated on first use. New keys are written in place and ``update`` returns views, so a decode
  step costs the same at token 10 and at token 10 million (no ``torch.cat`` of the whole cache).
* **Eviction between forward passes.** transformers sizes the attention mask from
  ``get_mask_sizes`` before the layers run, so eviction cannot happen inside ``update``. The engine
  calls :meth:`SinkCache.reserve` before every forward; it evicts, re-positions, and returns the
  RoPE position ids of the incoming tokens.
* **Eviction in blocks.** When the window needs room it drops ``max(needed, block)`` of its oldest
  tokens with one copy per layer, so the copy is amortised over ``block`` tokens; the window then
  breathes between ``window - block`` and ``window`` (``window`` is a hard upper bound, no slack).
  ``block=1`` is the paper's per-token eviction.
* **Sinks move forward, the window stays put.** RoPE scores depend only on the distance between
  query and key, so instead of rotating the whole window back by ``d`` positions (the paper's
  framing) the cache rotates the few sink keys forward to sit right before the window. Window keys
  keep the positions they were computed at and are never touched. Sinks are re-rotated each time
  from a pristine float32 copy of their original keys, so rounding never accumulates, even in bf16.
* **Rebase.** Positions then grow with the stream; before they would pass the model's
  ``max_position_embeddings`` (float32 angle precision, dynamic RoPE variants) every key is
  rotated back once, in float32, so the sinks sit at ``0..S-1`` again. That happens once every
  ``max_positions - sinks - window`` tokens, so each key is re-rotated at most a handful of times.

The cache knows nothing about chats: it sees a stream of tokens and keeps a ledger of the
conversation-token spans it evicted.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .errors import SinkchatError
from .ledger import Occupancy, Span, merge_spans


def default_block(window: int) -> int:
    """Eviction block: 1/16 of the window (at most 256), so upkeep is a tiny share of decode."""
    return max(1, min(256, window // 16))


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


class SinkLayer(CacheLayerMixin):
    """One layer's sink + window buffers; all bookkeeping lives in :class:`SinkCache`."""

    is_sliding = False
    is_compileable = False

    def __init__(self, capacity: int, sink_capacity: int, inv_freq: torch.Tensor, dtype: torch.dtype | None = None):
        super().__init__()
        self.capacity = capacity
        self.sink_capacity = sink_capacity
        self.inv_freq = inv_freq
        self.kv_dtype = dtype  # the buffers' dtype; None: the first keys' own (the model's compute dtype)
        self.length = 0
        self.sink_orig: torch.Tensor | None = None  # float32 keys of the sinks as first computed

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.dtype, self.device = self.kv_dtype or key_states.dtype, key_states.device
        self.keys = key_states.new_zeros((b, h, self.capacity, d), dtype=self.dtype)
        self.values = value_states.new_zeros((b, h, self.capacity, value_states.shape[-1]), dtype=self.dtype)
        self.sink_orig = key_states.new_zeros((b, h, self.sink_capacity, d), dtype=torch.float32)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """transformers' side: :meth:`write`, then the held K/V in the model's compute dtype (no copy when
        the cache holds that dtype, the default)."""
        keys, values = self.write(key_states, value_states)
        return keys.to(key_states.dtype), values.to(value_states.dtype)

    def write(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``[b, h, n, d]`` keys and values (RoPE already applied) after the held tokens; return
        views of everything held, ``[b, h, length, d]`` in the cache's dtype. The first ``sink_capacity``
        keys are also kept in float32 as computed (before any rounding to the cache's dtype)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        start, end = self.length, self.length + n
        if end > self.capacity:
            raise RuntimeError("SinkCache.reserve() must be called before each forward pass")
        self.keys[:, :, start:end] = key_states
        self.values[:, :, start:end] = value_states
        if start < self.sink_capacity:  # the very first tokens: remember the sinks as computed
            k = min(end, self.sink_capacity)
            self.sink_orig[:, :, start:k] = key_states[:, :, : k - start].float()
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
        super().reset()

    # -- operations driven by SinkCache --------------------------------------------------------

    def drop(self, first: int, count: int) -> None:
        """Remove ``count`` slots starting at ``first`` by moving the tail down (one copy)."""
        if not self.is_initialized or count <= 0:
            return
        tail = slice(first + count, self.length)
        moved = self.length - first - count
        for buf in (self.keys, self.values):
            buf[:, :, first : first + moved] = buf[:, :, tail].clone()
        self.length -= count

    def place_sinks(self, n_sink: int, delta: int) -> None:
        """Write the sinks rotated ``delta`` positions from where they were first computed."""
        if self.is_initialized and n_sink:
            self.keys[:, :, :n_sink] = rotate(self.sink_orig[:, :, :n_sink], delta, self.inv_freq).to(self.dtype)

    def shift_window(self, first: int, delta: int) -> None:
        """Rotate the window keys (slots ``first..length``) by ``delta`` positions."""
        if self.is_initialized and self.length > first:
            w = self.keys[:, :, first : self.length]
            self.keys[:, :, first : self.length] = rotate(w, delta, self.inv_freq)


class SinkCache(Cache):
    """Keeps the first ``sinks`` tokens and the last ``window`` tokens of an endless stream.

    Use :meth:`for_model` to build one, call :meth:`reserve` before each forward pass and pass the
    position ids it returns to the model.
    """

    def __init__(
        self,
        inv_freqs: list[torch.Tensor],
        sinks: int,
        window: int,
        block: int | None = None,
        max_positions: int | None = None,
        dtype: torch.dtype | None = None,
    ):
        if sinks < 0 or window < 1 or (max_positions is not None and sinks + window > max_positions):
            raise ValueError(f"no cache of {sinks} sinks + {window} window fits {max_positions} positions")
        self.sinks, self.window = sinks, window
        self.dtype = dtype  # of the K/V buffers; None: the model's compute dtype
        self.block = min(window, block or default_block(window))
        self.max_positions = max_positions
        super().__init__(layers=[SinkLayer(sinks + window, sinks, f, dtype) for f in inv_freqs])
        self.n_sink = 0  # tokens in the sink region
        self.n_win = 0  # tokens in the window
        self.seen = 0  # tokens that entered the cache since the start of the stream
        self.base = 0  # RoPE position of conversation token t in the window is t - base
        self.evictions: list[Span] = []  # evicted conversation-token spans, adjacent blocks merged
        self._reserved = (0, 0)  # (to sinks, to window) of the last reserve, for cancel
        self.upkeep_s = 0.0  # wall time spent evicting and re-rotating (read by `sinkchat bench speed`)

    @classmethod
    def for_model(cls, model, sinks: int, window: int, block: int | None = None,
                  dtype: torch.dtype | None = None) -> "SinkCache":
        """A cache wired to ``model``'s own rotary embedding, per layer where layer types differ, holding
        K/V in ``dtype`` (default: what the loader chose, ``model.sinkchat_kv_dtype``, else the compute dtype)."""
        dtype = dtype or getattr(model, "sinkchat_kv_dtype", None)
        return cls(rope_inv_freqs(model), sinks, window, block, max_positions(model.config), dtype)

    # -- the engine's side ---------------------------------------------------------------------

    def reserve(self, n: int) -> tuple[torch.Tensor, Span | None]:
        """Make room for ``n`` new tokens; return their position ids ``[1, n]`` and any evicted span."""
        to_sink = min(n, self.sinks - self.n_sink) if self.seen < self.sinks else 0
        to_win = n - to_sink
        if to_win > self.window:
            raise ValueError(f"a chunk of {n} tokens does not fit a window of {self.window}")
        span = None
        overflow = self.n_win + to_win - self.window
        if overflow > 0:
            with self._upkeep():
                span = self._evict(min(self.n_win, max(overflow, self.block)))
        if self.max_positions is not None and self.seen + n - self.base > self.max_positions:
            with self._upkeep():
                self._rebase()
        device = self._device()
        positions = torch.arange(self.seen, self.seen + n, device=device) - self.base
        self.n_sink += to_sink
        self.n_win += to_win
        self.seen += n
        self._reserved = (to_sink, to_win)
        return positions.unsqueeze(0), span

    def cancel(self, n: int) -> None:
        """Give back the room of the last ``reserve(n)`` when its forward pass failed, so the cache
        holds exactly the tokens the caller recorded (an eviction it made stays in the ledger)."""
        to_sink, to_win = self._reserved
        self.n_sink -= to_sink
        self.n_win -= to_win
        self.seen -= n
        for layer in self.layers:
            layer.length = min(layer.length, self.n_sink + self.n_win)

    def occupancy(self) -> Occupancy:
        return Occupancy(
            sinks=self.n_sink,
            window=self.n_win,
            window_capacity=self.window,
            sink_capacity=self.sinks,
            seen=self.seen,
            evicted=self.seen - self.n_sink - self.n_win,
            spans=tuple(self.evictions),
        )

    def kept(self) -> tuple[Span, Span]:
        """Conversation-token ranges held: ``(sinks, window)``."""
        return (0, self.n_sink), (self.seen - self.n_win, self.seen)

    def memory_bytes(self) -> int:
        """Bytes of the preallocated K/V buffers (constant once the first token arrived)."""
        return sum(
            layer.keys.numel() * layer.keys.element_size() * 2 for layer in self.layers if layer.is_initialized
        )

    # -- eviction and positions ----------------------------------------------------------------

    def _evict(self, count: int) -> Span:
        first = self.seen - self.n_win
        for layer in self.layers:
            layer.drop(self.n_sink, count)
        self.n_win -= count
        span = (first, first + count)
        if self.evictions and self.evictions[-1][1] == first:  # merged as it goes: O(1) per step, however long
            self.evictions[-1] = (self.evictions[-1][0], first + count)
        else:
            self.evictions.append(span)
        self._place_sinks()
        return span

    def _sink_delta(self) -> int:
        """How far the sinks move from their first positions ``0..S-1`` to sit before the window."""
        return (self.seen - self.n_win - self.base) - self.n_sink

    def _place_sinks(self) -> None:
        for layer in self.layers:
            layer.place_sinks(self.n_sink, self._sink_delta())

    def _rebase(self) -> None:
        new_base = self.seen - self.n_win - self.n_sink
        for layer in self.layers:
            layer.shift_window(self.n_sink, self.base - new_base)
        self.base = new_base
        self._place_sinks()

    @contextmanager
    def _upkeep(self):
        """Add the wall time of an eviction or rebase to ``upkeep_s`` (GPU work included)."""
        cuda = self._device().type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        yield
        if cuda:
            torch.cuda.synchronize()
        self.upkeep_s += time.perf_counter() - t0

    def _device(self) -> torch.device:
        for layer in self.layers:
            if layer.is_initialized:
                return layer.device
        return self.layers[0].inv_freq.device

    # -- persistence (tensors and a small dict; the store decides where they go) ---------------

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Copies of the held K/V (and pristine sink keys) as named tensors, plus the counters."""
        tensors: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            if layer.is_initialized:
                tensors[f"{i}.k"] = layer.keys[:, :, : layer.length].clone(memory_format=torch.contiguous_format)
                tensors[f"{i}.v"] = layer.values[:, :, : layer.length].clone(memory_format=torch.contiguous_format)
                tensors[f"{i}.sink"] = layer.sink_orig[:, :, : self.n_sink].clone(memory_format=torch.contiguous_format)
        meta = {
            "sinks": self.sinks,
            "window": self.window,
            "block": self.block,
            "n_sink": self.n_sink,
            "n_win": self.n_win,
            "seen": self.seen,
            "base": self.base,
            "evictions": [list(s) for s in self.evictions],
        }
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict, device=None) -> None:
        """Restore what :meth:`state` returned (same model, sinks and window: the store checks)."""
        if (meta["sinks"], meta["window"]) != (self.sinks, self.window):
            raise ValueError("saved cache was built with other --sinks/--window")
        held = meta["n_sink"] + meta["n_win"]
        for i, layer in enumerate(self.layers):
            k, v, s = tensors[f"{i}.k"], tensors[f"{i}.v"], tensors[f"{i}.sink"]
            if k.shape[-2] != held or v.shape[-2] != held:
                raise ValueError(f"layer {i} holds {k.shape[-2]} tokens, expected {held}")
            k, v, s = (t.to(device) if device is not None else t for t in (k, v, s))
            if not layer.is_initialized:  # buffers stay where they are (a compiled step holds their addresses)
                layer.lazy_initialization(k, v)
            layer.keys[:, :, :held] = k
            layer.values[:, :, :held] = v
            layer.sink_orig[:, :, : s.shape[-2]] = s.float()
            layer.length = held
        self.block = meta["block"]
        self.n_sink, self.n_win = meta["n_sink"], meta["n_win"]
        self.seen, self.base = meta["seen"], meta["base"]
        self.evictions = merge_spans([tuple(s) for s in meta["evictions"]])


def rope_inv_freqs(model) -> list[torch.Tensor]:
    """Each decoder layer's RoPE inverse frequencies, read from the model's own rotary embedding."""
    config = model.config.get_text_config(decoder=True)
    rotary = getattr(getattr(model, "model", model), "rotary_emb", None)
    if rotary is None or getattr(config, "rope_parameters", None) is None:
        raise SinkchatError(
            f"{config.model_type} does not use rotary position embeddings (RoPE); sinkchat's cache can only "
            "shift RoPE models (Llama, Mistral, Qwen2, ...)"
        )
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    freqs = []
    for layer_type in layer_types:
        inv = getattr(rotary, f"{layer_type}_inv_freq", None)
        freqs.append((inv if inv is not None else rotary.inv_freq).detach().float())
    return freqs


def max_positions(config) -> int | None:
    config = config.get_text_config(decoder=True)
    return getattr(config, "max_position_embeddings", None)
