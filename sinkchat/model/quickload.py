"""The quick start: a Llama-family model read straight from its folder for the fast path, without
transformers' model and config classes.

On a 2-core CPU, importing those classes costs about 2 s of a start (transformers walks its own
package to build the lazy table behind ``AutoConfig``, and its model modules import
``torch._dynamo``), while the fast path (:mod:`sinkchat.model.fast`) uses none of their code: it needs
the weights, a few config numbers and the RoPE frequencies. So where a model qualifies
(:func:`read_config`) :func:`load` builds a :class:`Skeleton`, the same module tree as transformers'
``LlamaForCausalLM`` without its forward, on meta tensors filled from the safetensors files. The
tokenizer is :mod:`sinkchat.model.tokenizer` where that reads the folder exactly as transformers would,
else transformers' own; ``tests/test_quickload.py`` checks logits, ids, renders and fingerprints
against a transformers load.

Anything else (bitsandbytes on a GPU, other architectures, dynamic RoPE, a sliding window, ``.bin``
weights, the benchmarks' transformers forward) loads through transformers as before.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from .families import family_of


class Config(SimpleNamespace):
    """``config.json``'s fields as attributes, with what transformers' config classes would fill in
    for the fields sinkchat reads (``rope_parameters``, ``head_dim``, ``layer_types``, ...)."""

    def get_text_config(self, decoder: bool = True) -> "Config":
        return self


def read_config(folder: Path) -> Config | None:
    """The config of a model in ``folder`` the quick start can serve exactly, or None (transformers
    then loads it, and reports what is wrong with it): a Llama, Mistral or Qwen2 decoder with SiLU
    gating, plain RoPE (``default``, its theta given, no ``rope_scaling``), its sizes and positions
    given as positive integers, no sliding window in use, safetensors weights and a ``tokenizer.json``."""
    try:
        raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        return _read(raw) if _weight_files(folder) and (folder / "tokenizer.json").is_file() else None
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        return None


def _positive(value) -> bool:
    return type(value) is int and value > 0


def _read(raw: dict) -> Config | None:
    family = family_of(raw.get("model_type"))
    if family is None or not family.quick or raw.get("hidden_act", "silu") != family.block.act \
            or raw.get("rope_scaling") is not None:
        return None
    if any(hasattr(Config, key) for key in raw):
        return None  # a key that would hide one of Config's own attributes
    rope = raw.get("rope_parameters")
    if rope is None:
        rope = {"rope_type": "default", "rope_theta": raw.get("rope_theta")}
    if not isinstance(rope, dict) or set(rope) != {"rope_type", "rope_theta"} or rope["rope_type"] != "default":
        return None  # anything else (scaling factors, partial rotary, the older "type" key) is transformers'
    theta = rope["rope_theta"]
    if type(theta) not in (int, float) or not math.isfinite(theta) or theta <= 0:
        return None
    if raw.get("partial_rotary_factor", 1.0) != 1.0 or raw.get("pretraining_tp", 1) != 1:
        return None
    layer_types = raw.get("layer_types")
    if layer_types is not None and layer_types != ["full_attention"] * raw.get("num_hidden_layers", -1):
        return None
    if not isinstance(raw.get("tie_word_embeddings", False), bool):
        return None
    windowed = family.sliding(raw)
    sizes = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
             "max_position_embeddings")
    if windowed or not all(_positive(raw.get(k)) for k in sizes) or type(raw.get("rms_norm_eps")) is not float:
        return None
    heads = raw["num_attention_heads"]
    head_dim = raw["head_dim"] if "head_dim" in raw else raw["hidden_size"] // heads
    kv_heads = raw["num_key_value_heads"] if "num_key_value_heads" in raw else heads
    if not (_positive(head_dim) and _positive(kv_heads) and heads % kv_heads == 0):
        return None
    return Config(**{
        **raw,
        "rope_parameters": {"rope_theta": theta, "rope_type": "default"},
        "head_dim": head_dim,
        "num_key_value_heads": kv_heads,
        "layer_types": ["full_attention"] * raw["num_hidden_layers"],
        "sliding_window": None,
        "tie_word_embeddings": raw.get("tie_word_embeddings", False),  # a bool, checked above
        "is_encoder_decoder": False,
        # the projections with a bias, as transformers builds them (a checkpoint's other biases are dropped there)
        "biases": family.biases(raw),
    })


def _weight_files(folder: Path) -> list[Path]:
    """The folder's safetensors files: ``model.safetensors`` where there is one (transformers' choice
    too), else the shards its index names; none if a shard is missing or the index names a path."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():  # transformers' choice too when both are there
        return [single]
    if index.is_file():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        files = [folder / n for n in names if isinstance(n, str) and "/" not in n]
        if len(files) != len(names):
            return []
        return files if all(f.is_file() for f in files) else []
    return []


class Rotary(nn.Module):
    """RoPE's inverse frequencies, ``1 / theta^(2i/D)`` for ``i < D/2`` (transformers' ``default``)."""

    def __init__(self, config: Config):
        super().__init__()
        d, theta = config.head_dim, config.rope_parameters["rope_theta"]
        self.register_buffer("inv_freq", 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)),
                             persistent=False)
        self.attention_scaling = 1.0


class _Norm(nn.Module):
    def __init__(self, size: int):
        super().__init__()
        self.weight = _empty(size)


def _empty(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, device="meta"), requires_grad=False)


def _linear(n_in: int, n_out: int, bias: bool) -> nn.Linear:
    """An ``nn.Linear`` with meta tensors and no random init (init functions on meta tensors import
    ``torch._dynamo``, a second of the start)."""
    linear = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(linear)
    linear.in_features, linear.out_features = n_in, n_out
    linear.weight = _empty(n_out, n_in)
    linear.bias = _empty(n_out) if bias else None
    return linear


class Skeleton(nn.Module):
    """transformers' ``*ForCausalLM`` module tree for the Llama family (``model.embed_tokens``,
    ``model.layers[i].self_attn.q_proj``, ..., ``model.norm``, ``model.rotary_emb``, ``lm_head``) with
    the weights and no forward: :class:`~sinkchat.model.fast.FastModel` is its forward."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.generation_config = SimpleNamespace(eos_token_id=None)
        h, inter, q, kv = config.hidden_size, config.intermediate_size, config.num_attention_heads, \
            config.num_key_value_heads
        d = config.head_dim
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab_size, h, _weight=_empty(config.vocab_size, h))
        self.model.layers = nn.ModuleList()
        for i in range(config.num_hidden_layers):
            block = nn.Module()
            block.self_attn = nn.Module()
            for name, n_in, n_out in (("q_proj", h, q * d), ("k_proj", h, kv * d), ("v_proj", h, kv * d),
                                      ("o_proj", q * d, h)):
                setattr(block.self_attn, name, _linear(n_in, n_out, name in config.biases))
            block.mlp = nn.Module()
            for name, n_in, n_out in (("gate_proj", h, inter), ("up_proj", h, inter), ("down_proj", inter, h)):
                setattr(block.mlp, name, _linear(n_in, n_out, name in config.biases))
            block.mlp.act_fn = nn.SiLU()
            block.input_layernorm, block.post_attention_layernorm = _Norm(h), _Norm(h)
            self.model.layers.append(block)
        self.model.norm = _Norm(h)
        self.model.rotary_emb = Rotary(config)
        self.lm_head = _linear(h, config.vocab_size, False)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, head: nn.Module) -> None:
        self.lm_head = head


class NotQuick(Exception):
    """The folder does not fill the skeleton exactly (missing, extra or misshapen tensors, a head beside
    tied embeddings) or has a generation config transformers would refuse: transformers loads it."""


def load_model(folder: Path, config: Config) -> Skeleton:
    """The model in ``folder`` as a :class:`Skeleton` in float32 (the weight files are memory-mapped;
    float32 tensors are used in place). Raises :class:`NotQuick` when the files do not match the
    config, so the caller loads through transformers instead (which reports what is wrong)."""
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    for path in _weight_files(folder):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    model = Skeleton(config)
    if config.tie_word_embeddings:  # a checkpoint with both (transformers then keeps both) is left to transformers
        if "lm_head.weight" in tensors:
            raise NotQuick(folder)
        tensors["lm_head.weight"] = tensors.get("model.embed_tokens.weight")
    wanted = model.state_dict(keep_vars=True)
    if set(wanted) != set(tensors) or any(tensors[k] is None or tensors[k].shape != p.shape for k, p in wanted.items()):
        raise NotQuick(folder)
    model.load_state_dict({k: t.float() for k, t in tensors.items()}, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    for p in model.parameters():
        p.requires_grad_(False)
    model.generation_config.eos_token_id = getattr(config, "eos_token_id", None)  # transformers' fallback
    path = folder / "generation_config.json"
    if path.exists():
        try:
            generation = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            generation = None
        if not isinstance(generation, dict):
            raise NotQuick(folder)  # transformers reports it
        model.generation_config.eos_token_id = generation.get("eos_token_id")
    return model.eval()


def load_tokenizer(folder: Path, model_type: str):
    """The tokenizer of ``folder``: :class:`sinkchat.model.tokenizer.Tokenizer` where it reads the folder
    exactly as transformers would, else transformers' ``AutoTokenizer``."""
    from . import tokenizer

    if tokenizer.serves(folder, model_type):
        try:
            return tokenizer.Tokenizer(folder)
        except ValueError:  # a special token it does not know: transformers adds it
            pass
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))
