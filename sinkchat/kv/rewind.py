"""Going back to the start of a turn exactly: a checkpoint of the sink cache and what left it since.

Regenerating or editing the last turn must continue from the cache as it was before that turn.
If nothing the cache held then has left it since, that is a truncation. Otherwise the turn's
evictions took tokens the earlier state needs: recomputing them would not give the same K/V (each
was computed attending to context that is gone), so a :class:`Checkpoint` keeps a copy of every
token that leaves the cache after it was taken (the *stash*: at most what the cache held, usually
about one turn) and rebuilds the earlier layout from the held slots, the parked keys and the stash.
Keys are restored at the positions they had, so greedy decoding then repeats itself token for token.
The sliding layers of a hybrid model (:class:`~.layer.LocalLayer`) roll on their own: the tokens they
drop after the checkpoint that it still needs are kept the same way (the *local stash*).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..ledger import Span, subtract
from .layer import LocalLayer, rotate
from .layout import Eviction, Run, run_positions, run_tokens


def _rotated(keys: torch.Tensor, delta: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """``keys`` moved ``delta`` positions (unchanged, no copy, when ``delta`` is 0)."""
    return rotate(keys, delta, inv_freq) if delta else keys


def run_members(runs: list[Run]) -> list[int]:
    return [t for t0, t1, _ in runs for t in range(t0, t1)]


@dataclass
class Checkpoint:
    """The cache's counters at :meth:`SinkCache.mark`, and copies of the tokens that left since."""

    n_sink: int
    n_win: int
    seen: int
    base: int
    parked: list[Run]
    evictions: list[Span]
    stash: list[Run] = field(default_factory=list)  # tokens that left, with the positions of their stashed keys
    stash_k: list[list[torch.Tensor]] = field(default_factory=list)  # per layer, blocks in stash order
    stash_v: list[list[torch.Tensor]] = field(default_factory=list)
    local_from: int = 0  # the oldest token the sliding layers need at the checkpoint (their window less one)
    lstash: list[Run] = field(default_factory=list)  # tokens the sliding layers dropped since, that it needs
    lstash_k: list[list[torch.Tensor]] = field(default_factory=list)  # per layer (sliding ones), in order
    lstash_v: list[list[torch.Tensor]] = field(default_factory=list)
    memory: tuple[int, int] | None = None  # the block memory's mark (blocks, pending tokens), with recall

    @classmethod
    def of(cls, cache) -> "Checkpoint":
        empty = lambda: [[] for _ in cache.layers]  # noqa: E731
        memory = cache.memory.mark() if cache.memory is not None else None
        return cls(cache.n_sink, cache.n_win, cache.seen, cache.base, list(cache.parked), list(cache.evictions),
                   stash_k=empty(), stash_v=empty(), local_from=cache.seen - cache.local_needed(),
                   lstash_k=empty(), lstash_v=empty(), memory=memory)

    # -- while the turn runs ---------------------------------------------------------------------

    def keep(self, cache, plan: Eviction, first: int) -> None:
        """Copy what ``plan`` is about to evict of the tokens held at the checkpoint (called
        before the slots change; ``first``: the slot of the window's first token)."""
        start = cache.seen - cache.n_win
        leaving = []  # (tokens t0..t1 at positions p0.., their first slot, whether they are parked)
        at = 0
        for t0, t1, p0 in plan.dropped:
            leaving.append((t0, t1, p0, plan.dropped_slots[at], True))
            at += t1 - t0
        leaving += [(a, b, a - cache.base, first + a - start, False)
                    for a, b in plan.window_evicted]
        for t0, t1, p0, slot, parked in leaving:
            t1 = min(t1, self.seen)  # tokens of the turn itself are rolled back, not restored
            if t1 <= t0:
                continue
            n = t1 - t0
            self.stash.append((t0, t1, p0))
            for i, layer in enumerate(cache.layers):
                if not layer.is_initialized or isinstance(layer, LocalLayer):
                    continue
                if parked:  # the pristine key (an exact copy of the model's) and its value
                    k = layer.pin_orig[:, :, slot : slot + n].clone()
                    v = layer.values[:, :, cache.n_sink + slot : cache.n_sink + slot + n].clone()
                else:  # keys kept in float32 whatever the KV dtype, so a parked one comes back exact
                    k = layer.keys[:, :, slot : slot + n].to(torch.float32, copy=True)
                    v = layer.values[:, :, slot : slot + n].clone()
                self.stash_k[i].append(k)
                self.stash_v[i].append(v)

    def keep_local(self, cache, first: int, drop: int) -> None:
        """Copy what the sliding layers are about to drop (their ``drop`` oldest tokens, from token
        ``first`` on) of the tokens the checkpoint needs (from :attr:`local_from` on)."""
        start, end = max(first, self.local_from), min(first + drop, self.seen)
        if end <= start:
            return
        self.lstash.append((start, end, start - cache.base))
        for i, layer in enumerate(cache.layers):
            if isinstance(layer, LocalLayer) and layer.is_initialized:
                self.lstash_k[i].append(layer.keys[:, :, start - first : end - first].clone())
                self.lstash_v[i].append(layer.values[:, :, start - first : end - first].clone())

    # -- going back ------------------------------------------------------------------------------

    def restore(self, cache) -> None:
        """Put ``cache`` back as it was at the checkpoint (the caller re-places sinks and parked keys).

        Raises LookupError, changing nothing, when a token the checkpoint needs was not kept (a
        checkpoint loaded without its stash).
        """
        first = cache.seen - cache.local_length  # the oldest token the sliding layers hold now
        if cache.local_layers and min(first, self.seen) > (self.lstash[-1][1] if self.lstash else self.local_from):
            raise LookupError(f"tokens before {first} were not kept since the checkpoint")
        unchanged = (self.base, self.parked, self.evictions) == (cache.base, cache.parked, cache.evictions)
        if unchanged:  # nothing held at the checkpoint has left: the turn's tokens are cut off the end
            for layer in cache.sink_layers:
                layer.length = min(layer.length, self.n_sink + run_tokens(self.parked) + self.n_win)
        else:
            self._gather(cache)
        self._gather_local(cache)
        if cache.memory is not None and self.memory is not None:  # what the turn evicted is in the window again
            cache.memory.truncate(*self.memory)
        cache.n_sink, cache.n_win, cache.seen, cache.base = self.n_sink, self.n_win, self.seen, self.base
        cache.parked, cache.evictions = list(self.parked), list(self.evictions)
        cache.pins = subtract(cache.pins, self.seen, max(self.seen, max((b for _, b in cache.pins), default=0)) + 1)
        empty = lambda: [[] for _ in cache.layers]  # noqa: E731
        self.stash, self.stash_k, self.stash_v = [], empty(), empty()
        self.lstash, self.lstash_k, self.lstash_v = [], empty(), empty()

    def _gather_local(self, cache) -> None:
        """The sliding layers as they were: the tokens dropped since (the local stash), then those still
        held up to the checkpoint, each piece rotated back to the checkpoint's positions."""
        keep = max(0, self.seen - (cache.seen - cache.local_length))  # held rows that were there at the checkpoint
        for i, layer in enumerate(cache.layers):
            if not isinstance(layer, LocalLayer) or not layer.is_initialized:
                continue
            stash_k = torch.cat(self.lstash_k[i], dim=-2) if self.lstash else None
            ks, at = [], 0
            for t0, t1, p0 in self.lstash:  # each piece was stored at positions p0, p0 + 1, ...
                ks.append(_rotated(stash_k[:, :, at : at + t1 - t0], t0 - self.base - p0, layer.inv_freq))
                at += t1 - t0
            ks.append(_rotated(layer.keys[:, :, :keep], cache.base - self.base, layer.inv_freq))
            k = torch.cat(ks, dim=-2)
            v = torch.cat(self.lstash_v[i] + [layer.values[:, :, :keep]], dim=-2)
            if k.shape[-2] > layer.capacity:
                layer._grow(k.shape[-2])
            layer.keys[:, :, : k.shape[-2]] = k
            layer.values[:, :, : v.shape[-2]] = v
            layer.length = k.shape[-2]

    def _gather(self, cache) -> None:
        n_sink, n_pin, start = cache.n_sink, cache.n_pin, cache.seen - cache.n_win
        held = n_sink + n_pin + cache.n_win
        source: dict[int, tuple[int, int]] = {}  # token -> (row of the pool, RoPE position of its key there)
        for t in range(start, min(cache.seen, self.seen)):
            source[t] = (n_sink + n_pin + t - start, t - cache.base)
        for j, (t, p) in enumerate(zip(run_members(cache.parked), run_positions(cache.parked))):
            source[t] = (held + j, p)
        for j, (t, p) in enumerate(zip(run_members(self.stash), run_positions(self.stash))):
            source[t] = (held + n_pin + j, p)
        m = run_tokens(self.parked)
        targets = run_members(self.parked) + list(range(self.seen - self.n_win, self.seen))
        missing = [t for t in targets if t not in source]
        if missing:
            raise LookupError(f"token {missing[0]} was not kept since the checkpoint")
        rows = [source[t][0] for t in targets]
        delta = [t - self.base - source[t][1] for t in targets[m:]]  # window keys back at t - base
        for i, layer in enumerate(cache.layers):
            if not layer.is_initialized or isinstance(layer, LocalLayer):
                continue
            keys = [layer.keys[:, :, :held].float()] + ([layer.pin_orig[:, :, :n_pin]] if n_pin else [])
            values = [layer.values[:, :, :held]] + ([layer.values[:, :, n_sink : n_sink + n_pin]] if n_pin else [])
            index = torch.tensor(rows, dtype=torch.long, device=layer.device)
            k = torch.cat(keys + self.stash_k[i], dim=-2)[:, :, index]
            v = torch.cat(values + self.stash_v[i], dim=-2)[:, :, index]
            if m:
                layer.pin_room(m)
                layer.pin_orig[:, :, :m] = k[:, :, :m]
            if any(delta):  # only after a rebase since the checkpoint
                k[:, :, m:] = rotate(k[:, :, m:], torch.tensor(delta, dtype=torch.float64), layer.inv_freq)
            layer.keys[:, :, self.n_sink : self.n_sink + len(rows)] = k.to(layer.dtype)
            layer.values[:, :, self.n_sink : self.n_sink + len(rows)] = v
            layer.length = self.n_sink + len(rows)

    # -- saving ----------------------------------------------------------------------------------

    def save(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Add the checkpoint to a cache state: counters in ``meta``, the stash in ``tensors``."""
        meta["checkpoint"] = {
            "n_sink": self.n_sink, "n_win": self.n_win, "seen": self.seen, "base": self.base,
            "parked": [list(r) for r in self.parked], "evictions": [list(s) for s in self.evictions],
            "stash": [list(r) for r in self.stash],
            "local_from": self.local_from, "lstash": [list(r) for r in self.lstash],
        }
        if self.memory is not None:
            meta["checkpoint"]["memory"] = list(self.memory)
        for name, lists in (("stash", (self.stash_k, self.stash_v)), ("lstash", (self.lstash_k, self.lstash_v))):
            for i, (ks, vs) in enumerate(zip(*lists)):
                if ks:
                    tensors[f"{i}.{name}_k"] = torch.cat(ks, dim=-2).contiguous()
                    tensors[f"{i}.{name}_v"] = torch.cat(vs, dim=-2).contiguous()

    @classmethod
    def load(cls, tensors: dict[str, torch.Tensor], meta: dict, moved, cache) -> "Checkpoint | None":
        """The checkpoint :meth:`save` wrote for ``cache``'s layers, or None if there is none (or a
        stash is incomplete)."""
        cp = meta.get("checkpoint")
        if not cp:
            return None
        stash, lstash = [tuple(r) for r in cp["stash"]], [tuple(r) for r in cp.get("lstash", [])]
        found: dict[str, list[list[torch.Tensor]]] = {}
        for name, runs, kind in (("stash", stash, False), ("lstash", lstash, True)):
            n = run_tokens(runs)
            for part in ("k", "v"):
                found[f"{name}_{part}"] = []
                for i, layer in enumerate(cache.layers):
                    t = tensors.get(f"{i}.{name}_{part}")
                    if not n or isinstance(layer, LocalLayer) != kind:
                        found[f"{name}_{part}"].append([])
                    elif t is None or t.shape[-2] != n:
                        return None
                    else:
                        found[f"{name}_{part}"].append([moved(t).float() if part == "k" and not kind else moved(t)])
        memory = tuple(cp["memory"]) if cp.get("memory") is not None else None
        return cls(cp["n_sink"], cp["n_win"], cp["seen"], cp["base"], [tuple(r) for r in cp["parked"]],
                   [tuple(s) for s in cp["evictions"]], stash, found["stash_k"], found["stash_v"],
                   cp.get("local_from", cp["seen"]), lstash, found["lstash_k"], found["lstash_v"], memory)
