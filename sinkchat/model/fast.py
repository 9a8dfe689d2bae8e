"""The fast path: a hand-written forward for the model families of :mod:`.families` (Llama/SmolLM2,
Mistral, Qwen2, Qwen3, Gemma 3) over the sink cache's own buffers.

transformers' module stack costs about 19 ms per decode token over a plain loop with the same
kernels on a 2-core CPU (56.8 vs 37.9 ms, SmolLM2-135M at a 2004-token cache), a third of the step.
:class:`FastModel` is that loop, gpt-fast style: per layer an RMSNorm, one fused q/k/v projection,
the family's q/k norms, RoPE (per layer type where the model has several), the new keys and values
written into the cache's preallocated buffers through its ``write`` (so eviction, sink re-rotation,
rebase, ``state()`` and resume are the cache's), SDPA (masked to the native window in a sliding
layer; one token over a bf16 cache on the CPU: two bf16 matmuls, :func:`matmul_attention`), one fused
gate/up projection, the family's activation, the down projection, with the family's norms around
each (:class:`~.families.Block`); a float32 residual stream. It takes chunks of any length (prefill)
and single tokens (decode) and returns the same logits as :func:`sinkchat.model.forward.forward` on
the transformers path.

The projections are whatever modules the model holds (``nn.Linear`` in float32,
:class:`~sinkchat.model.quant.Int4Linear` on the CPU, :class:`~sinkchat.model.quant.NF4Linear` over
bitsandbytes' weights on a GPU); fusing q/k/v and gate/up builds one module each and points the
transformers modules at row slices of it, so both paths share one copy of the weights
(:meth:`FastModel.build`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..kv.cache import local_windows
from . import blockkernels
from .families import Family, family_of
from .head import CandidateHead
from .quant import HalfLinear, Int4Linear, NF4Linear, cat_bias, int4_fits

STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # inv_freq and attention_scaling fixed at load
LAYER_TYPES = ("full_attention", "sliding_attention")
ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def supported(model) -> bool:
    """The one gate: whether :class:`FastModel` computes exactly what ``model`` does. Its family
    (:func:`~sinkchat.model.families.family_of`) must be one the fast path knows, with the family's
    activation and norms, global or sliding-window attention on each layer, and RoPE whose
    frequencies are fixed at load."""
    config = model.config
    family = family_of(getattr(config, "model_type", None))
    layers = getattr(getattr(model, "model", None), "layers", None)
    if family is None or layers is None or not family.fast(config):
        return False
    block = family.block
    if getattr(config, block.act_key, block.act) != block.act or block.act not in ACTIVATIONS:
        return False
    if not set(_layer_types(config)) <= set(LAYER_TYPES):
        return False
    if any(rope.get("rope_type", "default") not in STATIC_ROPE for rope in _rope_parameters(config)):
        return False  # dynamic RoPE changes inv_freq as it runs
    first = layers[0]
    parts = [(part, name) for part, name in family.projections]
    parts += [("", name) for name in block.norms if name]
    parts += [("self_attn", "q_norm"), ("self_attn", "k_norm")] if block.qk_norm else []
    return (getattr(model.model, "rotary_emb", None) is not None
            and all(hasattr(getattr(first, part) if part else first, name) for part, name in parts))


def nf4_fits(model) -> bool:
    """Whether every projection of ``model``'s decoder layers is a bitsandbytes 4-bit linear that
    :class:`~sinkchat.model.quant.NF4Linear` takes as it is (else the model stays on transformers)."""
    projections = family_of(model.config.model_type).projections
    return all(NF4Linear.fits(getattr(getattr(block, part), name))
               for block in model.model.layers for part, name in projections)


def _layer_types(config) -> list[str]:
    return getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers


def _rope_parameters(config) -> list[dict]:
    """The RoPE parameters of each layer type (Gemma 3 keeps one dict per type, others one for all)."""
    rope = getattr(config, "rope_parameters", None) or {}
    if set(rope) & set(LAYER_TYPES):
        return [rope.get(t) or {} for t in sorted(set(_layer_types(config)))]
    return [rope]


@dataclass(frozen=True)
class Dims:
    """What every layer of a model shares: ``H`` query heads and ``KV`` key/value heads of ``D`` dims,
    the RMSNorm epsilon, the attention scale (None: SDPA's ``1 / sqrt(D)``), the activation and the
    MLP's intermediate width."""

    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    scale: float | None
    act: Callable[[torch.Tensor], torch.Tensor]
    inter: int

    @property
    def q_size(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.kv_heads * self.head_dim

    def norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm of ``x`` over its last dimension with this model's epsilon (the residual stream, and
        each head's query and key where the family norms them)."""
        return F.rms_norm(x, x.shape[-1:], weight, self.eps)


class Layer(nn.Module):
    """One decoder layer as the fast path runs it (its projections are modules shared with the model;
    its norms float32, any offset folded in, see :class:`~.families.Block`).

    Its :meth:`forward` is the static-shape decode step of this layer, the unit ``torch.compile``
    compiles: every layer of a model has the same code and shapes, so one graph serves them all
    (PyTorch's "regional compilation": compiling a whole step took 112 s on 2 cores, a layer 8 s)."""

    def __init__(self, dims: Dims, norms: list[torch.Tensor | None], qkv: nn.Module, o: nn.Module,
                 gate_up: nn.Module, down: nn.Module, q_norm: torch.Tensor | None = None,
                 k_norm: torch.Tensor | None = None, rope: int = 0, window: int | None = None):
        super().__init__()
        self.dims = dims
        self.qkv, self.o, self.gate_up, self.down = qkv, o, gate_up, down  # hidden -> (H + 2 KV) D, ...
        for i, norm in enumerate(norms):  # pre-attention, post-attention, pre-MLP, post-MLP
            self.register_buffer(f"norm{i}", norm, persistent=False)
        self.register_buffer("q_norm", q_norm, persistent=False)  # [D] over each head's query and key
        self.register_buffer("k_norm", k_norm, persistent=False)
        self.rope = rope  # which of the model's RoPE tables (one per layer type)
        self.window = window  # a sliding layer's native window (its cache is a LocalLayer)

    @property
    def norms(self) -> list[torch.Tensor | None]:
        return [self.norm0, self.norm1, self.norm2, self.norm3]

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """The layer's queries ``[n, H, D]`` and keys ``[n, KV, D]`` (normed where the family norms them,
        rotated) and values ``[n, KV, D]`` for the residual stream ``x`` ``[n, hidden]``."""
        d = self.dims
        n, H, KV, D = x.shape[0], d.heads, d.kv_heads, d.head_dim
        qkv = self.qkv(d.norm(x, self.norm0))  # [n, (H + 2 KV) D]
        q = qkv[:, : d.q_size].view(n, H, D)
        k = qkv[:, d.q_size : d.q_size + d.kv_size].view(n, KV, D)
        v = qkv[:, d.q_size + d.kv_size :].view(n, KV, D)
        if self.q_norm is not None:
            q, k = d.norm(q, self.q_norm), d.norm(k, self.k_norm)
        return _rotate(q, cos, sin), _rotate(k, cos, sin), v

    def finish(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """The rest of the layer after attention's output ``a`` ``[n, H D]``: output projection and MLP,
        each joining the residual stream ``x`` (normed first where the family norms it)."""
        d = self.dims
        y = self.o(a)
        x = x + (d.norm(y, self.norm1) if self.norm1 is not None else y)
        gu = self.gate_up(d.norm(x, self.norm2))
        y = self.down(d.act(gu[:, : d.inter]) * gu[:, d.inter :])
        return x + (d.norm(y, self.norm3) if self.norm3 is not None else y)

    def attend_slots(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
        """One query ``q`` ``[1, H, D]`` against the layer's whole ``[1, KV, capacity, D]`` buffers, the
        slots ``mask`` (:func:`_slot_mask`) drops left out -> ``[1, H D]``, in the cache's dtype, query
        heads folded per key/value head: SDPA, or for a bf16 cache on the CPU :func:`matmul_attention`.
        The static step's attention, and the eager step's for one token in a 16-bit cache: a bf16 SDPA
        over the filled slots alone runs another kernel (flash on a GPU, an unmasked CPU path) whose
        rounding differs, which the two steps' logits showed (1.4e-2 of the largest logit on
        SmolLM2-135M in bf16 on the CPU; up to 4.3e-2 on a GPU)."""
        if keys.dtype == torch.bfloat16 and keys.is_cpu:
            return matmul_attention(q, keys, values, mask, self.dims.scale)
        H, KV, D = self.dims.heads, self.dims.kv_heads, self.dims.head_dim
        a = F.scaled_dot_product_attention(q.view(1, KV, H // KV, D).to(keys.dtype), keys, values,
                                           attn_mask=mask.view(1, 1, 1, -1), scale=self.dims.scale)
        return a.reshape(1, H * D).float()

    def forward(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor,
                mask: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """One token's residual stream ``x`` ``[1, hidden]`` through this layer with static shapes: its key
        and value go into ``slot`` (a ``[1]`` tensor) of the whole ``[1, KV, capacity, D]`` buffers, and
        attention runs over the slots ``mask`` keeps. ``cos``/``sin``: ``[1, 1, D]``."""
        KV, D = self.dims.kv_heads, self.dims.head_dim
        q, k, v = self.project(x, cos, sin)
        keys[:, :, slot] = k.view(1, KV, 1, D).to(keys.dtype)  # index_put_: in place, also when compiled
        values[:, :, slot] = v.view(1, KV, 1, D).to(values.dtype)
        return self.finish(x, self.attend_slots(q, keys, values, mask))


class FastModel:
    """A model's forward on a :class:`~sinkchat.kv.cache.SinkCache`; build with :meth:`build`.

    Shapes: ``hidden`` = model width, ``H`` query heads and ``KV`` key/value heads of ``D`` dims;
    the cache holds ``[1, KV, capacity, D]`` keys and values per layer in its own dtype.
    """

    def __init__(self, model, layers: list[Layer], packs=None):
        self.layers = layers
        self.dims = layers[0].dims
        self.embed = model.get_input_embeddings()  # applies the family's embedding scale itself
        self.norm = model.model.norm.weight.float() + family_of(model.config.model_type).block.norm_offset
        self.head = model.get_output_embeddings()
        # a decode step whose sampler needs only the best tokens: int4 picks them, float16 scores them
        self.candidate_head = CandidateHead(self.head, packs) if CandidateHead.fits(self.head) else None
        rotary = model.model.rotary_emb
        self.ropes = []  # (inv_freq, attention_scaling) per layer type
        for t in sorted(set(_layer_types(model.config))):
            inv = getattr(rotary, f"{t}_inv_freq", None)
            scaling = getattr(rotary, f"{t}_attention_scaling", None) if inv is not None else None
            inv = rotary.inv_freq if inv is None else inv
            scaling = getattr(rotary, "attention_scaling", 1.0) if scaling is None else scaling
            self.ropes.append((inv.detach().float(), float(scaling)))
        self.layer_step = Layer.forward  # one layer of the static step; compile() compiles it once for all
        self.compiled = None  # the static step, once compile() was asked for
        self.notice: str | None = None  # how long compiling took, or why it failed, for the user
        self.compiled_s: float | None = None  # seconds the first compiled step took (compiling, recording)

    @staticmethod
    def _dims(config, family: Family, inter: int) -> Dims:
        heads = config.num_attention_heads
        key = family.block.query_scale_key
        return Dims(heads, config.num_key_value_heads, getattr(config, "head_dim", None) or config.hidden_size // heads,
                    config.rms_norm_eps, getattr(config, key) ** -0.5 if key else None,
                    ACTIVATIONS[family.block.act], inter)

    @classmethod
    def build(cls, model, int4: bool = False, packs=None, make=None) -> "FastModel":
        """Fuse each layer's q/k/v and gate/up (quantizing to 4 bits with ``int4``), point the model's
        own modules at row slices of the fused ones, and return the fast forward over them. With
        ``int4`` the output head becomes a float16 copy (with an int4 one for decode steps, see
        :mod:`.head`) and every projection an
        :class:`~sinkchat.model.quant.Int4Linear`, on both paths; bitsandbytes 4-bit projections (a GPU)
        become :class:`~sinkchat.model.quant.NF4Linear` on the same packed bytes, and a 16-bit head is
        called in its own dtype. ``make(weight, bias, key)``: the module for each (fused) dense weight
        instead (a GPU kernel of :mod:`.gpu`; it has ``rows``)."""
        config = model.config
        family = family_of(config.model_type)
        block_spec, offset = family.block, family.block.norm_offset
        types = _layer_types(config)
        rope_index = {t: i for i, t in enumerate(sorted(set(types)))}
        windows = local_windows(config) or [None] * len(types)
        weight = lambda module: module.weight.float() + offset  # noqa: E731
        layers = []
        dims = cls._dims(config, family, model.model.layers[0].mlp.down_proj.in_features)
        for i, block in enumerate(model.model.layers):
            attn, mlp = block.self_attn, block.mlp
            qkv = _fuse(attn, ("q_proj", "k_proj", "v_proj"), int4, packs, f"{i}.qkv", make)
            gate_up = _fuse(mlp, ("gate_proj", "up_proj"), int4, packs, f"{i}.gate_up", make)
            o, down = attn.o_proj, mlp.down_proj
            if make is not None:
                o, down = make(o.weight, o.bias, f"{i}.o"), make(down.weight, down.bias, f"{i}.down")
            elif int4:
                o, down = _int4(o, packs, f"{i}.o"), _int4(down, packs, f"{i}.down")
            elif NF4Linear.fits(o) and NF4Linear.fits(down):
                o, down = NF4Linear.fuse([o]), NF4Linear.fuse([down])
            attn.o_proj, mlp.down_proj = o, down
            norms = [weight(getattr(block, name)) if name else None for name in block_spec.norms]
            q_norm, k_norm = (weight(attn.q_norm), weight(attn.k_norm)) if block_spec.qk_norm else (None, None)
            layers.append(Layer(dims, norms, qkv, o, gate_up, down, q_norm, k_norm, rope_index[types[i]], windows[i]))
        head = model.get_output_embeddings()
        if type(head) is nn.Linear and head.bias is None and (int4 or head.weight.dtype != torch.float32):
            model.set_output_embeddings(HalfLinear(head.weight, torch.float16 if int4 else head.weight.dtype))
        return cls(model, layers, packs)

    # -- the forward ----------------------------------------------------------------------------------

    def __call__(self, ids: list[int], positions: torch.Tensor, cache, keep: int = 1,
                 candidates: int = 0) -> torch.Tensor:
        """Logits ``[keep or n, vocab]`` (float32) for ``n`` new tokens at RoPE ``positions`` ``[1, n]``,
        written into ``cache`` (whose ``reserve(n)`` made room for them). ``candidates``: for one token,
        only the logits of that many most likely tokens are needed, the rest may be -inf (:meth:`logits`)."""
        recalling = getattr(cache, "recalling", False)  # a user message's chunk: recall from the block memory
        if self.compiled is not None and len(ids) == 1 and _window_slot(cache) and not recalling:
            return self._compiled_step(ids[0], positions, cache, candidates)
        device = self.norm.device
        x = self.embed(torch.tensor(ids, device=device)).float()  # [n, hidden], the residual stream
        ropes = [self._rope(positions.reshape(-1).to(device), r) for r in range(len(self.ropes))]
        masks: dict[tuple, torch.Tensor] = {}  # one token into a 16-bit cache: the static step's attention
        for i, (layer, cl) in enumerate(zip(self.layers, cache.layers)):
            q, k, v = layer.project(x, *ropes[layer.rope])
            if recalling:  # this layer's queries choose the blocks it sees (sinkchat.kv.memory)
                cache.recall_layer(i, q, positions)
            keys, values = cl.write(k.transpose(0, 1)[None], v.transpose(0, 1)[None])  # [1, KV, L, D]
            if len(ids) == 1 and keys.dtype != torch.float32:
                key = (cl.keys.shape[2], cl.length, layer.window)
                mask = masks.get(key)
                if mask is None:
                    slot = torch.tensor([cl.length - 1], device=device)
                    mask = masks[key] = _slot_mask(cl.keys.shape[2], slot, layer.window)
                a = layer.attend_slots(q, cl.keys, cl.values, mask)
            else:
                a = self._attend(q, keys, values, layer.window)
            x = layer.finish(x, a)
        if keep:
            x = x[-keep:]
        return self.logits(x, candidates if len(ids) == 1 else 0)

    def logits(self, x: torch.Tensor, candidates: int = 0) -> torch.Tensor:
        """The final norm and output head: float32 logits ``[n, vocab]`` for the residual stream ``x``
        ``[n, hidden]``. With ``candidates`` (one row, a :class:`~.head.CandidateHead` here, and fewer
        than an eighth of the vocabulary) only those best tokens get their exact logits, the others -inf."""
        x = self.dims.norm(x, self.norm)
        if candidates and self.candidate_head is not None and x.shape[0] == 1 \
                and 8 * candidates <= self.head.out_features:
            return self.candidate_head(x, candidates)
        return self.head(x).float()

    # -- the static-shape decode step (torch.compile, CUDA graphs) ----------------------------------

    def compile(self, inductor: bool = True, cuda_graph: bool = False, setup=None) -> None:
        """Decode single tokens through :meth:`static_step`, compiled by inductor and/or recorded as a
        CUDA graph (:class:`CudaGraphStep`). Without a graph (the CPU) AOTInductor compiles one layer
        (:class:`Layer`) into a package every layer of its kind runs and the next start reads from disk
        (:class:`~.aot.CompiledLayers`): seconds, where compiling the whole step took minutes on 2 cores;
        with one ``torch.compile`` compiles the whole step, as measured on a GPU. Both happen on the
        first step (``setup()`` first, where anything compiles); if either fails, the step stays eager
        and :attr:`notice` says why (once)."""
        self.compiled_s = None
        if not inductor:
            self.compiled = CudaGraphStep(self.static_step) if cuda_graph else self.static_step
            return

        def first(*args):
            step = self.static_step
            if cuda_graph:
                if setup is not None:
                    setup()
                step = torch.compile(step, dynamic=False)
            else:
                from .aot import CompiledLayers

                self.layer_step = CompiledLayers(setup=setup)
            self.compiled = CudaGraphStep(step) if cuda_graph else step
            return self.compiled(*args)

        first.pending = True
        self.compiled = first

    @property
    def step_kind(self) -> str:
        """How single tokens decode now, for the benchmarks: ``eager``, ``compiled layers`` (the CPU),
        ``compiled + CUDA graph`` or ``CUDA graph``; a compile that failed reads ``eager``."""
        if self.compiled is None:
            return "eager"
        if getattr(self.compiled, "pending", False):
            return "compiled on its first step"
        graph = isinstance(self.compiled, CudaGraphStep)
        compiled = self.layer_step is not Layer.forward or graph and self.compiled.step is not self.static_step
        return {(True, True): "compiled + CUDA graph", (False, True): "CUDA graph",
                (True, False): "compiled layers", (False, False): "static (eager)"}[compiled, graph]

    def static_step(self, token: torch.Tensor, position: torch.Tensor, slots: torch.Tensor,
                    buffers: list[tuple[torch.Tensor, torch.Tensor]], candidates: int = 0) -> torch.Tensor:
        """One token with static shapes: ``token`` and ``position`` are ``[1]`` tensors, ``slots`` ``[2]``
        the slot the new key/value takes in the sink layers' and in the sliding layers' whole
        ``[1, KV, capacity, D]`` buffers; attention runs over every slot with the ones past it (and, in
        a sliding layer, those ``window`` or more back) masked. Logits ``[1, vocab]`` (``candidates``:
        :meth:`logits`; a constant, so a compiled step is specialized on it)."""
        x = self.embed(token).float()
        ropes = [self._rope(position, r) for r in range(len(self.ropes))]
        masks: dict[tuple, torch.Tensor] = {}  # one per kind of layer
        for layer, (keys, values) in zip(self.layers, buffers):
            j = int(layer.window is not None)
            slot = slots[j : j + 1]
            key = (keys.shape[2], j, layer.window)
            if key not in masks:
                masks[key] = _slot_mask(keys.shape[2], slot, layer.window)
            x = self.layer_step(layer, x, keys, values, slot, masks[key], *ropes[layer.rope])
        return self.logits(x, candidates)

    def _compiled_step(self, token: int, positions: torch.Tensor, cache, candidates: int = 0) -> torch.Tensor:
        device = self.norm.device
        candidates = candidates if self.candidate_head is not None else 0  # no new graph for a head that ignores it
        slots = [cache.sink_layers[0].length, cache.local_length]
        args = (torch.tensor([token], device=device), positions.reshape(1).to(device),
                torch.tensor(slots, device=device), [(cl.keys, cl.values) for cl in cache.layers])
        first = self.compiled_s is None
        t0 = time.perf_counter()
        try:
            logits = self.compiled(*args, candidates)
            if first:
                self.compiled_s = time.perf_counter() - t0
                built = getattr(self.layer_step, "compiled", 1)
                if built:  # not when the CPU's layer was read from disk
                    kept = getattr(self.layer_step, "kept", built) == built
                    self.notice = (f"compiled the decode step in {self.compiled_s:.1f} s " + (
                        "(kept on disk for the next start)" if kept else
                        "(not kept: the cache dir cannot be written; the next start compiles again)"))
        except Exception as exc:  # inductor, a missing compiler, CUDA graphs: all fall back the same way
            self.compiled, self.layer_step = None, Layer.forward
            self.notice = f"compiling the decode step failed ({type(exc).__name__}); decoding eagerly"
            logits = self.static_step(*args, candidates)
        for cl in cache.layers:
            cl.length += 1
        return logits

    def _rope(self, positions: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq, scale = self.ropes[index]
        angles = positions.float()[:, None] * inv_freq.to(positions.device)
        angles = torch.cat([angles, angles], dim=-1)
        return (angles.cos() * scale)[:, None], (angles.sin() * scale)[:, None]

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, window: int | None) -> torch.Tensor:
        """``q`` ``[n, H, D]`` (the last ``n`` of the ``L`` cached tokens) -> ``[n, H D]``; in a sliding
        layer each query sees only the keys less than ``window`` positions back.

        One token: its query heads are folded per key/value head (``[1, KV, H/KV, D]`` against
        ``[1, KV, L, D]``), no mask, in the cache's dtype (the fast layout for a bf16 cache on a CPU
        without native bf16 math). Several: a causal mask over the new tokens, in float32.
        """
        n, H, D = q.shape
        KV, L = keys.shape[1], keys.shape[2]
        if n == 1:
            if window is not None and L > window:
                keys, values = keys[:, :, L - window :], values[:, :, L - window :]
            if keys.dtype == torch.float32:
                out = F.scaled_dot_product_attention(q.view(1, H, 1, D), keys, values, enable_gqa=True,
                                                     scale=self.dims.scale)
            else:
                out = F.scaled_dot_product_attention(q.view(1, KV, H // KV, D).to(keys.dtype), keys, values,
                                                     scale=self.dims.scale)
            return out.reshape(1, H * D).float()
        qpos = torch.arange(L - n, L, device=q.device)[:, None]
        kpos = torch.arange(L, device=q.device)[None, :]
        mask = kpos <= qpos  # [n, L]
        if window is not None:
            mask = mask & (kpos > qpos - window)
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys.float(), values.float(), attn_mask=mask,
                                             enable_gqa=True, scale=self.dims.scale)  # [1, H, n, D]
        return out[0].transpose(0, 1).reshape(n, H * D)


class CudaGraphStep:
    """``step`` (:meth:`FastModel.static_step`, eager or compiled) recorded once as a CUDA graph and
    replayed for every token: one launch instead of a few hundred kernel launches per token, which
    is most of a 7B decode step's time in eager PyTorch.

    The graph holds the addresses of the cache's buffers, so it is recorded again when the buffers
    change (another chat); evictions move data inside the same buffers. The token, position and slot
    are copied into the graph's own input tensors. Recorded here rather than by ``torch.compile``'s
    ``reduce-overhead`` mode because that mode's CUDA graph trees assert when called from another
    thread (pytorch/pytorch#123177), and the TUI decodes each reply on a new worker thread.
    """

    def __init__(self, step):
        self.step, self.graph, self.key = step, None, None

    def __call__(self, token: torch.Tensor, position: torch.Tensor, slot: torch.Tensor,
                 buffers: list[tuple[torch.Tensor, torch.Tensor]], candidates: int = 0) -> torch.Tensor:
        key = (tuple((t.data_ptr(), t.shape, t.dtype) for pair in buffers for t in pair), candidates)  # baked in
        with torch.cuda.device(token.device):
            if key != self.key:
                self._record(token, position, slot, buffers, candidates)
                self.key = key
            self.inputs[0].copy_(token)
            self.inputs[1].copy_(position)
            self.inputs[2].copy_(slot)
            self.graph.replay()
            return self.logits.clone()

    def _record(self, token, position, slot, buffers, candidates) -> None:
        self.graph = self.key = None
        self.inputs = (token.clone(), position.clone(), slot.clone())
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up off the main stream (compiles, allocates workspaces)
            for _ in range(2):
                self.step(*self.inputs, buffers, candidates)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.logits = self.step(*self.inputs, buffers, candidates)
        self.graph = graph


def matmul_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    """One query ``q`` ``[1, H, D]`` against a 16-bit cache's ``[1, KV, capacity, D]`` buffers as two
    plain matmuls in the cache's dtype, query heads folded per key/value head (``[KV, H/KV, D]``),
    around a float32 softmax over the slots ``mask`` (``[capacity]`` bools) keeps -> ``[1, H D]``
    (float32); ``scale`` defaults to ``1 / sqrt(D)``. What a bf16 cache runs on the CPU: 0.63x the time
    of float32 SDPA over a float32 cache with AVX512-BF16, where bf16 SDPA is no faster than float32
    (README, "Where a decode step's time goes on this CPU")."""
    H, KV, D = q.shape[1], keys.shape[1], keys.shape[3]
    scale = D**-0.5 if scale is None else scale
    scores = torch.matmul((q.view(KV, H // KV, D) * scale).to(keys.dtype), keys[0].transpose(1, 2))
    scores = torch.where(mask, scores.float(), float("-inf"))  # [KV, H/KV, capacity]
    out = torch.matmul(torch.softmax(scores, -1).to(values.dtype), values[0])  # [KV, H/KV, D]
    return out.reshape(1, H * D).float()


def _slot_mask(capacity: int, slot: torch.Tensor, window: int | None) -> torch.Tensor:
    """The ``[capacity]`` slots one token at ``slot`` (a ``[1]`` tensor) attends: none past it, and in a
    sliding layer none ``window`` or more back."""
    at = torch.arange(capacity, device=slot.device)
    mask = at <= slot
    return mask & (at > slot - window) if window is not None else mask


def _window_slot(cache) -> bool:
    """Whether the next token lands in the window of an initialized cache (not among the sinks,
    whose float32 first copy only the eager path records)."""
    layer = cache.sink_layers[0]
    return layer.is_initialized and layer.length >= layer.sink_capacity


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE, rotate-half convention: ``x`` ``[n, heads, D]``, ``cos``/``sin`` ``[n, 1, D]``."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def _int4(module: nn.Module, packs, key: str) -> nn.Module:
    if type(module) is not nn.Linear or not int4_fits(module.out_features, module.in_features):  # a kernel already
        return module
    return Int4Linear.from_weight(module.weight, module.bias, packs, key)


def _fuse(parent: nn.Module, names: tuple[str, ...], int4: bool, packs=None, key: str = "",
          make=None) -> nn.Module:
    """One linear for ``parent``'s ``names`` (same input), whose row slices replace them in ``parent``."""
    parts = [getattr(parent, name) for name in names]
    sizes = [p.out_features for p in parts]
    if make is not None:
        weight = torch.cat([p.weight.detach() for p in parts])
        fused = make(weight, cat_bias(parts, weight.dtype, weight.device), key)
    elif all(NF4Linear.fits(p) for p in parts):  # bitsandbytes 4-bit: concatenated as packed, never re-quantized
        fused = NF4Linear.fuse(parts)
    elif any(type(p) is not nn.Linear for p in parts):  # kernels built from a GGUF's own blocks
        fused = blockkernels.fuse(parts)
    else:
        weight = torch.cat([p.weight.detach() for p in parts])
        bias = cat_bias(parts, weight.dtype, weight.device)
        if not (int4 and all(int4_fits(s, weight.shape[1]) for s in sizes)):
            return _share(parts, weight, bias)
        fused = Int4Linear.from_weight(weight, bias, packs, key)
    for name, a, s in zip(names, _starts(sizes), sizes):
        setattr(parent, name, fused.rows(a, a + s))
    return fused


def _share(parts: list[nn.Module], weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A dense linear of the concatenated ``weight`` whose row slices become ``parts``' own weights
    (views: one copy of the weights for both paths)."""
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        fused.bias = nn.Parameter(bias, requires_grad=False)
    for p, a in zip(parts, _starts([p.out_features for p in parts])):
        p.weight = nn.Parameter(fused.weight[a : a + p.out_features], requires_grad=False)
        if p.bias is not None:
            p.bias = nn.Parameter(fused.bias[a : a + p.out_features], requires_grad=False)
    return fused


def _starts(sizes: list[int]) -> list[int]:
    out, at = [], 0
    for s in sizes:
        out.append(at)
        at += s
    return out
