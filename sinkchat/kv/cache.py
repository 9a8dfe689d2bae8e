"""The attention-sink + rolling-window KV cache (StreamingLLM).

Its layers (:class:`~sinkchat.kv.layer.SinkLayer`) speak transformers 5's cache-layer interface, so
:func:`sinkchat.model.forward.forward_outputs` runs transformers' own forward over them inside a plain
transformers ``Cache``; the cache itself imports nothing of transformers (the quick start skips it).

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

* **Pinned tokens.** :meth:`SinkCache.pin` marks conversation tokens the cache holds as never to
  be evicted (at most ``pin_max``; they take room in the window). While the window holds them
  nothing changes; when an eviction passes them they are *parked* right after the sinks, their
  keys saved in float32 as computed, and re-rotated from that copy at every eviction like the
  sinks, so sinks, parked tokens and window always sit at contiguous positions (:mod:`.layout`).
  Unpinned tokens leave at the next eviction.
* **Where the window may start.** ``reserve(n, cut)`` takes a function that moves an eviction's
  end on to the next allowed token (``--evict turns``: where a user turn opens); the cache itself
  never learns what a message is.
* **Rewind.** :meth:`SinkCache.mark` and :meth:`SinkCache.rewind` go back to an earlier moment
  exactly (regenerating a reply), keeping copies of what left the cache in between (:mod:`.rewind`).
* **Recall.** With ``recall`` slots, what leaves the window goes to a :class:`~.memory.BlockMemory`
  (on disk, in blocks) instead of nowhere. ``reserve(n, recall=True)`` (the engine asks it for each
  chunk of a user message) makes room for as many whole blocks as the slots hold, between the
  parked tokens and the window; the fast forward then calls :meth:`SinkCache.recall_layer` in each
  global layer before its attention, which scores the memory against that layer's queries and
  places the best blocks there, at the positions right before the window, rotated from their keys
  as computed (InfLLM's per-layer lookup on StreamingLLM's contiguous positions). They stay for
  the reply and are re-placed at every eviction like the parked tokens; the next user message
  chooses again. Decode shapes never change (the slots are part of the buffers).
* **Per-layer geometry.** A model that mixes global and sliding-window layers (Gemma 3, gpt-oss)
  was trained to see only the last ``W`` tokens in its sliding layers, so those get a rolling
  buffer of their native window (:class:`~.layer.LocalLayer`: exact, no sinks needed) while the
  global layers keep sinks + window; everything above (eviction, pins, the ledger) is the global
  layers'. All layers share one ``base``, so a token sits at the same RoPE position in every layer.

The cache knows nothing about chats: it sees a stream of tokens and keeps a ledger of the
conversation-token spans it evicted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager

import torch

from ..errors import SinkchatError
from ..ledger import Occupancy, Recalled, Span, add_span, clip, covered_by, gaps, merge_spans, subtract
from .layer import LocalLayer, SinkLayer
from .layout import Run, plan_eviction, run_positions, run_spans, run_tokens
from .memory import BlockMemory, MemoryFileError, scoring_query
from .rewind import Checkpoint

LOCAL_ROOM = 512  # slots past a sliding layer's native window: one copy per this many tokens (and a prefill chunk)
RECALL_REPS = 4  # representative keys per memory block and layer (see README, "Recall")


def default_block(window: int) -> int:
    """Eviction block: 1/16 of the window (at most 256), so upkeep is a tiny share of decode."""
    return max(1, min(256, window // 16))


class SinkCache:
    """Keeps the first ``sinks`` tokens, pinned tokens, and the last ``window`` tokens of an endless stream.

    Use :meth:`for_model` to build one, call :meth:`reserve` before each forward pass and pass the
    position ids it returns to the model. Pinned tokens (:meth:`pin`, at most ``pin_max``) take
    room in the window but are never evicted. ``local``: per layer, the native sliding window of a
    layer the model trained with one (it gets a :class:`~.layer.LocalLayer`), or None (a
    :class:`~.layer.SinkLayer`: sinks + window); the counters and the ledger are the sink layers'.
    ``learned``: the model learned its own sink (:func:`learned_sinks`; the gauge says so).
    ``recall``: slots for tokens recalled from the block memory of what left the window (0: none,
    nothing is kept), in blocks of ``recall_block`` tokens; ``memory``: an existing memory to keep
    (a cache rebuilt for the same chat), ``memory_key``: what its K/V depend on.
    """

    def __init__(
        self,
        inv_freqs: list[torch.Tensor],
        sinks: int,
        window: int,
        block: int | None = None,
        max_positions: int | None = None,
        pin_max: int = 0,
        dtype: torch.dtype | None = None,
        local: list[int | None] | None = None,
        learned: bool = False,
        recall: int = 0,
        recall_block: int = 64,
        memory: BlockMemory | None = None,
        memory_key: str = "",
    ):
        if sinks < 0 or window < 1 or recall < 0 or (max_positions is not None
                                                     and sinks + window + recall > max_positions):
            raise ValueError(f"no cache of {sinks} sinks + {window} window + {recall} recall fits "
                             f"{max_positions} positions")
        local = local or [None] * len(inv_freqs)
        if len(local) != len(inv_freqs) or all(w is not None for w in local) or any(w is not None and w < 1
                                                                                   for w in local):
            raise ValueError("local windows: one per layer, at least one global layer, each window positive")
        self.sinks, self.window, self.pin_max = sinks, window, pin_max
        self.dtype = dtype  # of the K/V buffers; None: the model's compute dtype
        self.block = min(window, block or default_block(window))
        self.max_positions = max_positions
        self.learned = learned  # the model learned a sink logit per head (see learned_sinks): for the gauge
        self.recall = recall
        self.layers = [SinkLayer(sinks + window + recall, sinks, f, dtype) if w is None
                       else LocalLayer(w, LOCAL_ROOM, f, dtype) for f, w in zip(inv_freqs, local)]
        self.sink_layers = [layer for layer in self.layers if isinstance(layer, SinkLayer)]
        self.local_layers = [layer for layer in self.layers if isinstance(layer, LocalLayer)]
        self.sink_index = {i: j for j, i in enumerate(i for i, layer in enumerate(self.layers)
                                                     if isinstance(layer, SinkLayer))}
        self.memory = None
        if recall:
            self.memory = memory or BlockMemory(recall_block, min(RECALL_REPS, recall_block),
                                                [layer.inv_freq for layer in self.sink_layers], key=memory_key)
        self.token_ids: Callable[[int, int], list[int]] | None = None  # conversation ids, for the memory's records
        self.score_distance = window  # the query-key distance the memory is scored at (see README, "Recall")
        self.upkeep_s = 0.0  # wall time spent evicting and re-rotating (read by `sinkchat bench speed`)
        self.clear()

    def clear(self) -> None:
        """Forget everything (the buffers stay allocated): the state of a new stream."""
        for layer in self.layers:
            layer.length = 0
        self.n_sink = 0  # tokens in the sink region
        self.n_win = 0  # tokens in the window
        self.seen = 0  # tokens that entered the cache since the start of the stream
        self.base = 0  # RoPE position of conversation token t in the window is t - base
        self.parked: list[Run] = []  # pinned tokens the window moved past, slot by slot after the sinks
        self.pins: list[Span] = []  # pinned conversation tokens (parked or still in the window)
        self.evictions: list[Span] = []  # evicted conversation-token spans, sorted, adjacent ones merged
        self.checkpoint: Checkpoint | None = None
        self._reserved = (0, 0, 0)  # (to sinks, to window, local layers' length) of the last reserve, for cancel
        self.n_rec = 0  # recall slots in use (each global layer holds its own choice of blocks there)
        self.recalled: list[list[int]] = [[] for _ in self.sink_layers]  # per global layer, blocks held there
        self.rec_pos: list[torch.Tensor | None] = [None] * len(self.sink_layers)  # their keys' positions
        self._recall_k: int | None = None  # blocks each global layer is to recall in the forward under way
        for layer in self.sink_layers:
            layer.n_rec = 0

    @classmethod
    def for_model(cls, model, sinks: int, window: int, block: int | None = None, pin_max: int = 0,
                  dtype: torch.dtype | None = None, **recall) -> "SinkCache":
        """A cache wired to ``model``'s own rotary embedding, per layer where layer types differ, holding
        K/V in ``dtype`` (default: what the loader chose, ``model.sinkchat_kv_dtype``, else the compute
        dtype), with a rolling buffer of the native window in each sliding layer of a hybrid model;
        ``recall``: the recall keywords of :class:`SinkCache`."""
        dtype = dtype or getattr(model, "sinkchat_kv_dtype", None)
        return cls(rope_inv_freqs(model), sinks, window, block, max_positions(model.config), pin_max, dtype,
                   local_windows(model.config), learned_sinks(model), **recall)

    # -- the engine's side ---------------------------------------------------------------------

    def reserve(self, n: int, cut: Callable[[int], int | None] | None = None,
                recall: bool = False) -> tuple[torch.Tensor, list[Span]]:
        """Make room for ``n`` new tokens; return their position ids ``[1, n]`` and the evicted spans.

        ``cut(t)``: where the window may start, the first allowed token at or after ``t`` (None: no
        such point yet; the window then starts wherever the eviction ends). ``recall``: the forward
        that follows recalls blocks from the memory (:meth:`recall_layer`; only the fast path does).
        Raises ValueError for a chunk that cannot fit the window beside the pinned tokens.
        """
        self._recall_k = None
        to_sink = min(n, self.sinks - self.n_sink) if self.seen < self.sinks else 0
        to_win = n - to_sink
        if to_win > self.window - self.pinned_count():
            raise ValueError(f"a chunk of {n} tokens does not fit a window of {self.window} "
                             f"with {self.pinned_count()} pinned")
        spans: list[Span] = []
        overflow = self.n_pin + self.n_win + to_win - self.window
        if overflow > 0:
            with self._upkeep():
                spans = self._evict(overflow, max(overflow, self.block), cut)
        if self.local_layers:
            with self._upkeep():
                self._roll_local(n)
        if self.max_positions is not None and self.seen + n - self.base > self.max_positions:
            with self._upkeep():
                self._rebase()
        if recall and self.memory is not None:
            with self._upkeep():
                self._recall_k = min(self.recall // self.memory.block, len(self.memory.valid()))
                self._resize_recall(self._recall_k * self.memory.block)
        device = self._device()
        positions = torch.arange(self.seen, self.seen + n, device=device) - self.base
        self.n_sink += to_sink
        self.n_win += to_win
        self.seen += n
        self._reserved = (to_sink, to_win, self.local_length)
        return positions.unsqueeze(0), spans

    def cancel(self, n: int) -> None:
        """Give back the room of the last ``reserve(n)`` when its forward pass failed, so the cache
        holds exactly the tokens the caller recorded (an eviction it made stays in the ledger)."""
        to_sink, to_win, local_length = self._reserved
        if self._recall_k is not None:  # the forward stopped part-way through the layers' recall
            self.cancel_recall()
        self.n_sink -= to_sink
        self.n_win -= to_win
        self.seen -= n
        for layer in self.sink_layers:
            layer.length = min(layer.length, self.n_sink + self.n_pin + self.n_rec + self.n_win)
        for layer in self.local_layers:
            layer.length = min(layer.length, local_length)

    def occupancy(self) -> Occupancy:
        pinned = self.pinned_count()
        return Occupancy(
            sinks=self.n_sink,
            window=self.n_pin + self.n_win - pinned,
            window_capacity=self.window,
            sink_capacity=self.sinks,
            seen=self.seen,
            evicted=self.seen - self.n_sink - self.n_pin - self.n_win,
            spans=tuple(self.evictions),
            pinned=pinned,
            pin_capacity=self.pin_max,
            window_start=self.seen - self.n_win,
            local_window=self.local_layers[0].window if self.local_layers else None,
            learned_sinks=self.learned,
            recalled=self.n_rec,
            recall_capacity=self.recall,
            recall=self.recall_summary(),
            memory_blocks=self.memory.blocks if self.memory is not None else 0,
            recall_layers=len(self.sink_layers) if self.memory is not None else 0,
        )

    def recall_summary(self) -> tuple[Recalled, ...]:
        """The blocks the global layers hold now, those most layers chose first (then oldest first)."""
        if not self.n_rec or self.memory is None:
            return ()
        counts: dict[int, int] = {}
        for blocks in self.recalled:
            for b in blocks:
                counts[b] = counts.get(b, 0) + 1
        order = sorted(counts, key=lambda b: (-counts[b], b))
        return tuple(Recalled(b, tuple(self.memory.spans(b)), counts[b]) for b in order if b < self.memory.blocks)

    def kept(self) -> tuple[Span, Span]:
        """Conversation-token ranges of the sinks and the window: ``(sinks, window)`` (see :meth:`held`)."""
        return (0, self.n_sink), (self.seen - self.n_win, self.seen)

    def held(self) -> list[Span]:
        """Every conversation-token range the cache holds: sinks, parked pinned tokens, window."""
        return merge_spans([s for s in [(0, self.n_sink), *run_spans(self.parked), self.kept()[1]] if s[1] > s[0]])

    @property
    def local_length(self) -> int:
        """Tokens each sliding layer holds (the newest ones), or 0 without sliding layers."""
        return self.local_layers[0].length if self.local_layers else 0

    def local_needed(self) -> int:
        """Of the tokens each sliding layer holds, how many the next tokens can still see (its window
        less one) or the checkpoint needs to go back to; older ones are only masked out."""
        need = self.local_layers[0].window - 1 if self.local_layers else 0
        if self.checkpoint is not None:
            need = max(need, self.seen - self.checkpoint.local_from)
        return min(self.local_length, need)

    def memory_bytes(self) -> int:
        """Bytes of the preallocated K/V buffers (constant once the first token arrived)."""
        return sum(
            layer.keys.numel() * layer.keys.element_size() * 2 for layer in self.layers if layer.is_initialized
        )

    # -- pins ----------------------------------------------------------------------------------

    @property
    def n_pin(self) -> int:
        """Slots of the parked region."""
        return run_tokens(self.parked)

    def pinned_count(self) -> int:
        return sum(b - a for a, b in self.pins)

    def pin(self, start: int, end: int) -> int:
        """Never evict conversation tokens ``[start, end)`` (those in the sink region are kept anyway).

        Returns how many tokens became pinned. Raises ValueError if the cache no longer holds them
        all, or if ``pin_max`` tokens would not hold them.
        """
        start = max(start, self.sinks)
        if start >= end:
            return 0
        if covered_by(self.held(), start, end) != end - start:
            raise ValueError(f"tokens {start}-{end - 1} are not all in the cache any more")
        new = end - start - covered_by(self.pins, start, end)
        if self.pinned_count() + new > self.pin_max:
            raise ValueError(f"{new} more pinned tokens would pass the budget of {self.pin_max}")
        add_span(self.pins, (start, end))
        return new

    def unpin(self, start: int, end: int) -> int:
        """Let ``[start, end)`` be evicted again (at the next eviction); returns how many were pinned."""
        count = covered_by(self.pins, start, end)
        self.pins = subtract(self.pins, start, end)
        return count

    # -- eviction and positions ----------------------------------------------------------------

    def _evict(self, need: int, want: int, cut=None) -> list[Span]:
        start = self.seen - self.n_win
        plan = plan_eviction(self.parked, self.pins, start, self.seen, self.base, need, want, cut)
        n_pin, first = self.n_pin, self.n_sink + self.n_pin + self.n_rec  # slot of the window's first token
        if self.checkpoint is not None:
            self.checkpoint.keep(self, plan, first)
        if self.memory is not None:
            self._remember(plan, first)
        device = self._device()
        keep = torch.tensor(plan.keep, dtype=torch.long, device=device) if self.parked else None
        moved = [first + t - start for a, b in plan.moved for t in range(a, b)]
        moved_t = torch.tensor(moved, dtype=torch.long, device=device) if moved else None
        tail = first + plan.window_start - start
        for layer in self.sink_layers:
            layer.evict(self.n_sink, n_pin, keep, moved_t, tail)
        self.parked = plan.parked
        self.n_win = self.seen - plan.window_start
        for span in plan.evicted:
            add_span(self.evictions, span)
        self._place()
        return plan.evicted

    def _remember(self, plan, first: int) -> None:
        """Give the memory what ``plan`` evicts (before the slots change; ``first``: the slot of the
        window's first token): the parked tokens that leave, then the window's oldest."""
        start = self.seen - self.n_win
        window = [(a, b, a - self.base) for a, b in plan.window_evicted]
        for runs, slots, parked in ((plan.dropped, plan.dropped_slots, True),
                                    (window, [first + t - start for a, b, _ in window for t in range(a, b)], False)):
            if not slots:
                continue
            index = torch.tensor(slots, dtype=torch.long, device=self._device())
            keys, values = [], []
            for layer in self.sink_layers:
                if parked:
                    keys.append(layer.pin_orig[:, :, index])
                    values.append(layer.values[:, :, self.n_sink + index])
                else:
                    keys.append(layer.keys[:, :, index])
                    values.append(layer.values[:, :, index])
            ids = [i for t0, t1, _ in runs for i in self._ids(t0, t1)]
            self.memory.add(runs, ids, keys, values)

    def _ids(self, start: int, end: int) -> list[int]:
        ids = self.token_ids(start, end) if self.token_ids is not None else []
        return ids if len(ids) == end - start else [-1] * (end - start)

    def _place(self) -> None:
        """Sinks, then parked tokens, then recalled tokens, at the positions right before the window's
        first token."""
        n_pin, n_rec = self.n_pin, self.n_rec
        window_at = self.seen - self.n_win - self.base
        target = window_at - n_rec - n_pin  # position of the first parked slot
        pin_delta = None
        if n_pin:
            orig = torch.tensor(run_positions(self.parked), dtype=torch.float64)
            pin_delta = torch.arange(target, target + n_pin, dtype=torch.float64) - orig
        at = torch.arange(window_at - n_rec, window_at, dtype=torch.float64)
        for layer, pos in zip(self.sink_layers, self.rec_pos):
            rec_delta = at - pos if n_rec and pos is not None else None
            layer.place(self.n_sink, target - self.n_sink, n_pin, pin_delta, rec_delta)

    # -- recall ------------------------------------------------------------------------------------

    @property
    def recalling(self) -> bool:
        """Whether the forward under way recalls (its layers call :meth:`recall_layer`)."""
        return self._recall_k is not None

    def _resize_recall(self, n: int) -> None:
        """``n`` recall slots in every global layer (the window moves if the count changes), the sinks and
        parked tokens re-placed before them; the slots are filled layer by layer in the forward."""
        if n != self.n_rec:
            for layer in self.sink_layers:
                layer.resize_recall(self.n_sink + self.n_pin, n)
            self.n_rec = n
            self.rec_pos = [None] * len(self.sink_layers)
            self._place()

    def cancel_recall(self) -> None:
        """The forward under way will not recall (transformers' forward has no hook for it)."""
        self._recall_k = None
        self.drop_recall()

    def drop_recall(self) -> None:
        """Empty the recall slots (the window moves back next to the parked tokens)."""
        self.recalled = [[] for _ in self.sink_layers]
        self._resize_recall(0)

    def recall_layer(self, index: int, queries: torch.Tensor, positions: torch.Tensor) -> None:
        """In layer ``index`` of the forward under way, before its attention: fill the recall slots with
        the memory's blocks that best answer this layer's ``queries`` ``[n, H, D]`` (RoPE'd at
        ``positions`` ``[1, n]``), oldest first, their keys rotated to the slots' positions."""
        j = self.sink_index.get(index)
        if self._recall_k is None or j is None:
            return
        memory, k, layer = self.memory, self._recall_k, self.sink_layers[j]
        if j == len(self.sink_layers) - 1:
            self._recall_k = None
        if not k or not layer.is_initialized:
            self.recalled[j] = []
            return
        with self._upkeep():
            chosen, parts = [], []
            query = scoring_query(queries, positions, layer.inv_freq, self.score_distance)
            for b in memory.select(j, query, memory.blocks):
                try:
                    parts.append(memory.read(j, b))
                except MemoryFileError:
                    continue
                chosen.append(b)
                if len(chosen) == k:
                    break
            while len(chosen) < k:  # blocks found damaged just now left fewer than were counted: repeat one
                chosen.append(chosen[0] if chosen else None)
                parts.append(parts[0] if parts else None)
            if chosen[0] is None:
                raise RuntimeError("no memory block could be read")
            pairs = sorted(zip(chosen, parts), key=lambda p: p[0])
            chosen = [b for b, _ in pairs]
            keys = torch.cat([kv[0] for _, kv in pairs], dim=-2).float()
            values = torch.cat([kv[1] for _, kv in pairs], dim=-2)
            pos = torch.tensor([p for b in chosen for p in memory.positions(b)], dtype=torch.float64)
            window_at = self.seen - self.n_win - self.base
            delta = torch.arange(window_at - self.n_rec, window_at, dtype=torch.float64) - pos
            layer.fill_recall(self.n_sink + self.n_pin, keys, values, delta)
            self.rec_pos[j], self.recalled[j] = pos, chosen

    def take_notices(self) -> list[str]:
        """Lines for the user from the memory (a damaged block found), once each."""
        return self.memory.take_notices() if self.memory is not None else []

    def _roll_local(self, n: int) -> None:
        """Make room for ``n`` tokens in the sliding layers, keeping a checkpoint's copies of what leaves."""
        drop = self.local_layers[0].to_drop(n)
        if self.checkpoint is not None and drop:
            self.checkpoint.keep_local(self, self.seen - self.local_length, drop)
        for layer in self.local_layers:
            layer.make_room(n)

    def _rebase(self) -> None:
        new_base = self.seen - self.n_win - self.n_sink - self.n_pin - self.n_rec
        for layer in self.sink_layers:
            layer.shift_window(self.n_sink + self.n_pin + self.n_rec, self.base - new_base)
        for layer in self.local_layers:
            layer.shift_window(0, self.base - new_base)
        self.base = new_base
        self._place()

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

    # -- going back to the start of a turn, and rebuilding ----------------------------------------

    def truncate(self, end: int) -> None:
        """Forget conversation tokens from ``end`` on: the newest of the window (the window must
        start at or before ``end``, the sinks and parked tokens lie before it). Pins past it go too."""
        cut = self.seen - end
        if not 0 <= cut <= self.n_win or self.n_sink > end or any(t1 > end for _, t1, _ in self.parked):
            raise ValueError(f"cannot cut the stream back to token {end}")
        self.drop_recall()
        for layer in self.layers:
            layer.length = max(0, layer.length - cut)
        self.n_win -= cut
        self.seen = end
        self.pins = subtract(self.pins, end, max(end, *(b for _, b in self.pins), 0) + 1)
        self.checkpoint = None

    def local_covers(self, end: int) -> bool:
        """Whether the sliding layers, cut back to token ``end``, would hold all they held when the
        stream was there (the last ``window - 1`` tokens before it): :meth:`truncate` is then exact."""
        return not self.local_layers or self.seen - self.local_length <= max(0, end - self.local_layers[0].window + 1)

    def mark(self) -> None:
        """Remember this moment, so :meth:`rewind` can come back to it exactly (see :mod:`.rewind`)."""
        self.checkpoint = Checkpoint.of(self)

    @torch.inference_mode()
    def rewind(self) -> bool:
        """Go back to the last :meth:`mark`: the same K/V, positions and ledger, bit for bit; pins on
        tokens past it are dropped. False (nothing changed) if there is no mark."""
        if self.checkpoint is None:
            return False
        self.drop_recall()
        try:
            with self._upkeep():
                self.checkpoint.restore(self)
        except LookupError:
            return False
        self._place()
        return True

    @torch.inference_mode()
    def adopt(self, n_sink: int, parked: list[Span], seen: int, evictions: list[Span], pins: list[Span]) -> None:
        """Take what was just fed into a cleared cache, in order (``n_sink`` sinks, the ``parked``
        tokens, then the window), as conversation tokens: the window ends at token ``seen``.

        Fed at contiguous positions from 0, the tokens already sit where the cache would put
        them; this sets the counters, saves the parked keys as their pristine copies, and records
        the ledger's ``evictions`` and ``pins``.
        """
        runs, at = [], n_sink
        for a, b in parked:
            runs.append((a, b, at))
            at += b - a
        m = at - n_sink
        for layer in self.sink_layers:
            if layer.is_initialized and m:
                layer.pin_room(m)
                layer.pin_orig[:, :, :m] = layer.keys[:, :, n_sink : n_sink + m].float()
        fed = self.seen
        self.n_sink, self.parked = n_sink, runs
        self.n_win = fed - n_sink - m
        for layer in self.local_layers:  # they hold the newest fed tokens: only the window's are in stream order
            layer.keep_last(self.n_win)
        self.seen = seen
        self.base = seen - self.n_win - n_sink - m
        self.evictions, self.pins, self.checkpoint = merge_spans(list(evictions)), list(pins), None
        if self.memory is not None:  # the window may hold again what the memory held
            self.memory.trim(self.evictions, seen)

    def refill(self, feed: Callable[[list[int], torch.Tensor], None], chunk: int, n_sink: int, parked: list[Span],
               start: int, end: int, evictions: list[Span], pins: list[Span], before: list[Span] | None = None,
               cut: Callable[[int], int | None] | None = None) -> None:
        """Rebuild from the ledger: clear, feed conversation tokens ``[0, n_sink)``, the ``parked`` spans
        and ``[start, end)`` in chunks of ``chunk``, and :meth:`adopt` them. ``feed(tokens, positions)``
        runs the model on those conversation tokens at ``positions`` ``[1, n]`` (room already reserved).

        With a block memory every token the layout evicts must be in it once: what the window holds
        again leaves it, and when it lacks evicted tokens (those the cache held before and a smaller
        window now evicts) the window opens at the first of them and the rest of the stream is fed
        through :meth:`reserve` (with ``cut``), whose eviction gives them to the memory; the window
        then starts where that eviction leaves it. ``before``: the spans evicted before the rebuild
        (default: the ledger now); those the memory lacks are lost for good (a damaged or missing
        file, a read-only one) and are not fed again."""
        last, memory = end, self.memory
        if memory is not None:
            before = self.evictions if before is None else before
            lost = before if not memory.writable else [g for a, b in before for g in gaps(memory.held(), a, b)]
            replay = memory.reconcile(merge_spans(sorted(evictions)), end, merge_spans(sorted(lost)))
            if replay < start:  # the window opens at the first token the memory lacks
                parked, evictions = clip(parked, 0, replay), clip(evictions, 0, replay)
                start, end = replay, min(end, replay + self.window - sum(b - a for a, b in parked))
        self.clear()
        held = [*range(n_sink), *(t for a, b in parked for t in range(a, b)), *range(start, end)]
        for i in range(0, len(held), chunk):
            positions, _ = self.reserve(len(held[i : i + chunk]))
            feed(held[i : i + chunk], positions)
        self.adopt(n_sink, parked, end, evictions, pins)
        for i in range(end, last, chunk):  # the stream on from there, evicting into the memory
            part = list(range(i, min(last, i + chunk)))
            positions, _ = self.reserve(len(part), cut)
            feed(part, positions)

    # -- persistence (tensors and a small dict; the store decides where they go) ---------------

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Copies of the held K/V (pristine sink and pinned keys too) as named tensors, plus the counters
        (with ``local``: the sliding layers' native window, how many tokens they hold, which they are;
        with ``memory``: its counters, and the K/V of the tokens waiting for a block as ``<i>.mk`` /
        ``<i>.mv``). The recall slots are not saved: the next user message chooses its own, and
        :meth:`load_state` places the sinks and parked tokens right before the window."""
        tensors: dict[str, torch.Tensor] = {}
        n_pin, head = self.n_pin, self.n_sink + self.n_pin
        copy = lambda t: t.clone(memory_format=torch.contiguous_format)  # noqa: E731
        local = self.local_needed()
        for i, layer in enumerate(self.layers):
            if layer.is_initialized:
                first = layer.length - local if isinstance(layer, LocalLayer) else 0  # a sliding layer's needed rows
                for name, buf in (("k", layer.keys), ("v", layer.values)):
                    if isinstance(layer, SinkLayer) and layer.n_rec:  # the recall slots are not saved
                        after = buf[:, :, head + layer.n_rec : layer.length]
                        tensors[f"{i}.{name}"] = torch.cat([buf[:, :, :head], after], dim=-2)
                    else:
                        tensors[f"{i}.{name}"] = copy(buf[:, :, first : layer.length])
                if isinstance(layer, SinkLayer):
                    tensors[f"{i}.sink"] = copy(layer.sink_orig[:, :, : self.n_sink])
                    if n_pin:
                        tensors[f"{i}.pin"] = copy(layer.pin_orig[:, :, :n_pin])
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
        if self.parked or self.pins:
            meta.update(parked=[list(r) for r in self.parked], pins=[list(s) for s in self.pins])
        if self.local_layers:
            meta["local"] = {"window": self.local_layers[0].window, "held": local,
                             "layers": [i for i, layer in enumerate(self.layers) if isinstance(layer, LocalLayer)]}
        if self.memory is not None:
            meta["memory"], pending = self.memory.state(list(self.sink_index))
            tensors.update(pending)
        if self.checkpoint is not None:
            self.checkpoint.save(tensors, meta)
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict, device=None) -> None:
        """Restore what :meth:`state` returned (same model, sinks and window: the store checks); the
        memory's blocks are opened apart (:meth:`open_memory`)."""
        if (meta["sinks"], meta["window"]) != (self.sinks, self.window):
            raise ValueError("saved cache was built with other --sinks/--window")
        local = meta.get("local") or {}
        mine = [i for i, layer in enumerate(self.layers) if isinstance(layer, LocalLayer)]
        if local.get("layers", []) != mine or (mine and local.get("window") != self.local_layers[0].window):
            raise ValueError("saved cache has other sliding-window layers")
        parked = [tuple(r) for r in meta.get("parked", [])]
        n_pin = run_tokens(parked)
        held = meta["n_sink"] + n_pin + meta["n_win"]
        moved = (lambda t: t.to(device)) if device is not None else (lambda t: t)
        self.n_rec, self._recall_k = 0, None
        self.recalled, self.rec_pos = [[] for _ in self.sink_layers], [None] * len(self.sink_layers)
        for i, layer in enumerate(self.layers):
            want = local["held"] if isinstance(layer, LocalLayer) else held
            if not want and f"{i}.k" not in tensors:  # a layer that held nothing (a rebuild to an empty window)
                continue
            k, v = (moved(tensors[f"{i}.{name}"]) for name in ("k", "v"))
            if k.shape[-2] != want or v.shape[-2] != want:
                raise ValueError(f"layer {i} holds {k.shape[-2]} tokens, expected {want}")
            if isinstance(layer, LocalLayer) and want > layer.capacity:
                layer._grow(want)
            if not layer.is_initialized:  # buffers stay where they are (a compiled step holds their addresses)
                layer.lazy_initialization(k, v)
            layer.keys[:, :, :want] = k
            layer.values[:, :, :want] = v
            if isinstance(layer, SinkLayer):
                layer.n_rec = 0
                s = moved(tensors[f"{i}.sink"])
                layer.sink_orig[:, :, : s.shape[-2]] = s.float()
                if n_pin:
                    layer.pin_room(n_pin)
                    layer.pin_orig[:, :, :n_pin] = moved(tensors[f"{i}.pin"]).float()
            layer.length = want
        self.block = meta["block"]
        self.n_sink, self.n_win = meta["n_sink"], meta["n_win"]
        self.seen, self.base = meta["seen"], meta["base"]
        self.evictions = merge_spans(sorted(tuple(s) for s in meta["evictions"]))
        self.parked, self.pins = parked, [tuple(s) for s in meta.get("pins", [])]
        self.checkpoint = Checkpoint.load(tensors, meta, moved, self)
        if self.evictions:  # saved with recalled tokens between them and the window, maybe: re-placed
            self._place()

    def open_memory(self, path, meta: dict, tensors: dict[str, torch.Tensor] | None, ledger: list[int],
                    writable: bool = True) -> list[str]:
        """Continue the saved memory (``meta["memory"]``) from its file at ``path`` and the waiting
        tokens in ``tensors``; notices for the user when part of it cannot be used. Nothing without
        recall (a memory the chat had is then said to be dropped); a chat saved before the memory existed
        starts an empty one."""
        saved = meta.get("memory") or {}
        if self.memory is None:
            if not saved.get("blocks"):
                return []
            return [f"this chat's memory of {saved['blocks']} blocks is not used with --recall 0 and is dropped "
                    "at its next save; resume with --recall N to keep recalling from it"]
        if saved.get("block", self.memory.block) != self.memory.block:
            note = (f"--recall-block {self.memory.block} differs from the memory's blocks of {saved['block']}; "
                    "recall starts an empty memory")
            return [note] if saved.get("blocks") else []
        return self.memory.open(path, saved, tensors or {}, list(self.sink_index), ledger, writable)


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


def learned_sinks(model) -> bool:
    """Whether ``model`` learned a sink logit per attention head (gpt-oss; StreamingLLM's section 3.3,
    "a dedicated learnable sink"): its softmax has somewhere to put unneeded attention without any
    sink token, so the window alone streams fluently."""
    layers = getattr(getattr(model, "model", model), "layers", None) or []
    return any(getattr(getattr(layer, "self_attn", None), "sinks", None) is not None for layer in layers)


def local_windows(config) -> list[int | None] | None:
    """Per layer, the native sliding window of a hybrid model's sliding layers (None for its global
    ones), or None when every layer takes the same geometry: no sliding layer, or no global one (a
    model that slides everywhere keeps sinks + window within its window, see
    :func:`sinkchat.model.checks.check_context`)."""
    config = config.get_text_config(decoder=True)
    window, types = getattr(config, "sliding_window", None), getattr(config, "layer_types", None) or []
    if isinstance(getattr(config, "max_position_embeddings", None), int):  # a window past it holds nothing more
        window = min(window, config.max_position_embeddings) if isinstance(window, int) else window
    kinds = [window if t == "sliding_attention" else None for t in types]
    if not isinstance(window, int) or None not in kinds or all(k is None for k in kinds):
        return None
    return kinds


def max_positions(config) -> int | None:
    config = config.get_text_config(decoder=True)
    return getattr(config, "max_position_embeddings", None)
