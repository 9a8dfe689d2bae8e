"""Where attention goes: the share of attention mass that later queries put on the first tokens of a
text, per layer and per head (StreamingLLM, Xiao et al., ICLR 2024, Section 3.1 and Figure 2).

The idea the sink cache rests on is that language models put a large share of attention on the
first few tokens whatever those tokens say, more so above the first layers; this measures it on the
model a user runs. The text streams through transformers' growing ``DynamicCache`` (nothing is
evicted) with eager attention, the one implementation that returns attention weights, asked for with
``output_attentions=True``. Each forward's weights are folded into running sums and dropped, and a
forward takes only as many queries as fit :data:`BUDGET` bytes of weights for all layers, so memory
stays bounded however long the text (1024 tokens x 30 layers x 9 heads, all at once, would be 1.1 GB).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress

import torch

from ..errors import SinkchatError
from ..model import forward_outputs
from . import ATTENTION_FROM
from .stream import Tick, dense_cache

FIRSTS = (1, 4, 16)  # the front spans measured: the first token, the default 4 sinks, 16
SINK_FIRST = 4  # a layer or head is sink-dominated when its share on the first 4 tokens ...
SINK_SHARE = 0.5  # ... is above one half
START = ATTENTION_FROM  # only queries at 0-based positions 64 and after count: each sees 64 tokens or more
MAP_SIZE = 16  # the heat maps: queries and keys 0..15, as in StreamingLLM's Figure 2
BUDGET = 256 << 20  # bytes of attention weights one forward may return (all layers together)


@contextmanager
def eager_attention(model) -> Iterator[None]:
    """Eager attention while the block runs (SDPA and flash kernels never form the weights); restored after."""
    before = model.config._attn_implementation
    if before != "eager":
        try:
            model.set_attn_implementation("eager")
        except (ValueError, ImportError, NotImplementedError) as exc:
            raise SinkchatError(f"{model.config.model_type} cannot switch to eager attention: {exc}".splitlines()[0]) \
                from None
    try:
        yield
    finally:
        if model.config._attn_implementation != before:
            with suppress(ValueError, ImportError, NotImplementedError):
                model.set_attn_implementation(before)


def map_layers(layers: int) -> list[int]:
    """The layers drawn as heat maps: the first three (where sinks appear) and the middle and last."""
    return sorted({i for i in (0, 1, 2, layers // 2, layers - 1) if 0 <= i < layers})


class Shares:
    """Running sums of the attention mass on the first tokens, per layer and head, one forward at a time.

    ``add(attentions, offset)`` takes one forward's ``output_attentions``: a tuple of one tensor
    ``[1, heads, q, keys]`` per layer for queries at positions ``offset .. offset+q-1``.
    """

    def __init__(self, layers: int, start: int = START, firsts: tuple[int, ...] = FIRSTS, map_size: int = MAP_SIZE):
        self.layers, self.start, self.firsts, self.map_size = layers, start, firsts, map_size
        self.mass: torch.Tensor | None = None  # [layers, heads, len(firsts)], float64
        self.maps = torch.zeros(layers, map_size, map_size, dtype=torch.float64)
        self.queries = 0  # queries at START or after, summed so far
        self.end = 0  # tokens seen

    def add(self, attentions, offset: int, n: int, model_type: str = "the model") -> None:
        """Fold one forward of ``n`` queries into the sums. Raises :class:`SinkchatError` when the model gave
        no weights, or not one ``[1, heads, n, offset + n]`` tensor per layer."""
        maps = [w for w in (attentions or ()) if w is not None]
        if not maps:
            raise SinkchatError(f"{model_type} gives no attention weights, even with eager attention; "
                                "bench attention needs a model whose layers return them")
        if len(maps) != self.layers:
            raise SinkchatError(f"{model_type} gives attention weights for {len(maps)} of its {self.layers} layers "
                                "(layers without attention?); bench attention needs every layer's")
        if self.mass is None:
            self.mass = torch.zeros(self.layers, maps[0].shape[1], len(self.firsts), dtype=torch.float64)
        cols = [k - 1 for k in self.firsts]
        skip = max(0, self.start - offset)  # rows before START
        for layer, w in enumerate(maps):
            if w.dim() != 4 or tuple(w.shape[-2:]) != (n, offset + n):
                raise SinkchatError(f"{model_type} gives attention weights of shape {tuple(w.shape)} for {n} "
                                    f"queries over {offset + n} keys; bench attention cannot read them")
            w = w[0].float()
            if skip < n:
                front = w[:, skip:, : max(self.firsts)].cumsum(-1)[..., cols]  # [heads, rows, len(firsts)]
                self.mass[layer] += front.sum(1).double()
            if offset < self.map_size:
                rows, keys = min(self.map_size - offset, n), min(self.map_size, offset + n)
                self.maps[layer, offset : offset + rows, :keys] += w[:, :rows, :keys].mean(0).double()
        self.queries += max(0, n - skip)
        self.end = offset + n

    def uniform(self) -> list[float]:
        """The share a uniform attention would give the first k tokens: the mean of ``k / (q + 1)`` over the queries."""
        qs = torch.arange(self.start, max(self.start, self.end), dtype=torch.float64) + 1
        if not len(qs):
            return [0.0 for _ in self.firsts]
        return [float((torch.clamp(qs, max=k) / qs).mean()) for k in self.firsts]

    def report(self, maps_of: list[int] | None = None) -> dict:
        """The JSON document (shares are fractions 0..1, in the order of ``firsts``).

        ``layers``: per layer ``share`` (mean over heads), ``heads`` (per head), ``max_head``
        ``[head, share on the first 4]``, ``sink_heads`` and ``sink_dominated`` (share on the first 4
        above one half); ``share`` and ``uniform`` over all layers; ``maps``: layer -> 16 x 16 mean
        attention over heads (rows: queries, columns: keys).
        """
        if self.mass is None or not self.queries:
            raise SinkchatError(f"no query after position {self.start} was measured")
        heads = self.mass / self.queries  # [layers, heads, firsts]
        sink = self.firsts.index(SINK_FIRST)
        rows = []
        for layer in range(self.layers):
            per_head = heads[layer]
            best = int(per_head[:, sink].argmax())
            rows.append({
                "layer": layer,
                "share": per_head.mean(0).tolist(),
                "heads": per_head.tolist(),
                "max_head": [best, float(per_head[best, sink])],
                "sink_heads": [h for h in range(per_head.shape[0]) if per_head[h, sink] > SINK_SHARE],
                "sink_dominated": bool(per_head[:, sink].mean() > SINK_SHARE),
            })
        shown = map_layers(self.layers) if maps_of is None else maps_of
        rows_seen = min(self.map_size, self.end)
        return {
            "firsts": list(self.firsts), "from": self.start, "tokens": self.end, "queries": self.queries,
            "heads": int(heads.shape[1]), "share": heads.mean((0, 1)).tolist(), "uniform": self.uniform(),
            "sink_layers": [r["layer"] for r in rows if r["sink_dominated"]],
            "sink_heads": sum(len(r["sink_heads"]) for r in rows),
            "layers": rows,
            "maps": {str(i): self.maps[i, :rows_seen, :rows_seen].tolist() for i in shown},
        }


def query_chunk(model, tokens: int, budget: int = BUDGET) -> int:
    """Queries per forward so that one forward's weights, for every layer, fit ``budget`` bytes (at least 1)."""
    config = model.config.get_text_config(decoder=True)
    per_query = config.num_hidden_layers * config.num_attention_heads * tokens * 4  # float32 weights
    return max(1, min(tokens, budget // per_query))


@torch.inference_mode()
def measure(model, ids: list[int], tick: Tick, shares: Shares, budget: int = BUDGET) -> None:
    """Stream ``ids`` through a growing cache with eager attention, folding every forward's weights into
    ``shares`` (so Ctrl+C keeps what was measured). Raises :class:`SinkchatError` when the model gives
    no attention weights for every layer."""
    chunk = query_chunk(model, len(ids), budget)
    cache = dense_cache(model)
    device = model.get_input_embeddings().weight.device
    with eager_attention(model):
        for a in range(0, len(ids), chunk):
            part = ids[a : a + chunk]
            positions = torch.arange(a, a + len(part), device=device).unsqueeze(0)
            out = forward_outputs(model, cache, part, positions, 1, output_attentions=True)
            shares.add(out.attentions, a, len(part), model.config.model_type)
            del out
            tick(len(part))


def layers_of(model) -> int:
    return model.config.get_text_config(decoder=True).num_hidden_layers
