"""What is refused before any weights load: a model the cache cannot serve, a geometry that does not fit
its context, a CUDA device that is not there. Configs are read as plain JSON where that is enough
(importing transformers costs seconds before the screen opens)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import SinkchatError
from ..settings import Settings
from .families import family_of
from .sources import gguf_target, hub_folder, resolve


def pick_device(device: str) -> str:
    """``auto``: a CUDA GPU if torch sees one, else the CPU."""
    if device == "cpu":
        return device
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise SinkchatError("--device cuda asked for, but no CUDA GPU is visible to torch")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def read_config(folder: str, name: str):
    """The model's config from ``folder``, checked for what the cache needs (:func:`check_model`)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as exc:
        raise SinkchatError(f"cannot read the model config in {folder}: {exc}".splitlines()[0]) from None
    check_model(config, name)
    return config


def preflight(settings) -> None:
    """What can be checked before the chat screen opens, without loading weights: ``--model``
    resolves, a CUDA device exists if asked for, and the model's config (in a folder, a converted
    GGUF, or the Hugging Face cache; fetched alone where the hub is reachable) fits the cache's
    context. Raises :class:`SinkchatError`."""
    source = resolve(settings.model)
    if settings.device == "cuda":
        pick_device("cuda")
    if source.kind == "dir":
        folder = source.ref
    elif source.kind == "hub":
        folder = hub_folder(source.ref, ["config.json"])
    else:  # a GGUF file not yet converted: its header says what would be refused after the conversion
        folder = str(gguf_target(Path(source.ref)))
        if not (Path(folder) / "config.json").is_file():
            check_gguf(Path(source.ref), settings.model, (settings.sinks, settings.window))
            return
    try:  # plain JSON: importing transformers here would cost seconds before the screen opens
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # read (and reported) while the screen shows progress
    if isinstance(config, dict):
        check_context(config, settings.model, settings.sinks, settings.window)


# model types that learned a sink logit per head (checked before loading; loaded, the weights say it)
LEARNED_SINKS = ("gpt_oss",)
# GGUF architectures without RoPE (learned positions, ALiBi, none at all) or with an encoder
NO_ROPE = {"gpt2": "learned absolute position embeddings", "starcoder": "learned absolute position embeddings",
           "bloom": "ALiBi position biases", "mpt": "ALiBi position biases", "refact": "ALiBi position biases",
           "mamba": "no attention (a state-space model)", "mamba2": "no attention (a state-space model)",
           "rwkv6": "no attention (a recurrent model)", "rwkv7": "no attention (a recurrent model)"}
ENCODERS = ("t5", "t5encoder", "umt5", "bert", "nomic-bert", "jina-bert-v2")


def check_gguf(path: Path, name: str, context: tuple[int | None, int] | None = None) -> None:
    """What the GGUF header already says will be refused, before anything is converted (a conversion
    writes the whole model dequantized, gigabytes for a 7B): a model without RoPE, an encoder, a
    damaged context length, and a geometry ``(sinks, window)`` over its context. Raises
    :class:`SinkchatError`."""
    from .header import HeaderError, read

    try:
        meta = read(path)
    except HeaderError as exc:
        raise SinkchatError(f"cannot read GGUF file {path}: {exc}") from None
    except OSError as exc:
        raise SinkchatError(f"cannot read GGUF file {path}: {exc.strerror or exc}") from None
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise SinkchatError(f"cannot read GGUF file {path}: it names no architecture")
    if arch in NO_ROPE:
        raise SinkchatError(f"{name} ({arch}) uses {NO_ROPE[arch]}, not RoPE; sinkchat's sink cache can only shift "
                            "RoPE models (Llama, Mistral, Qwen, Gemma, ...)")
    if arch in ENCODERS:
        raise SinkchatError(f"{name} ({arch}) is an encoder model; sinkchat needs a decoder-only chat model")
    limit = meta.get(f"{arch}.context_length")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise SinkchatError(f"cannot read GGUF file {path}: its context length is not a positive integer "
                            f"(got {limit!r})")
    if context is not None:
        check_context({"model_type": arch.replace("-", "_"), "max_position_embeddings": limit}, name, *context)


def check_model(config, name: str) -> None:
    """Refuse models the cache cannot serve (no RoPE, encoder-decoder), before any weights are read."""
    config = config.get_text_config(decoder=True)
    if getattr(config, "rope_parameters", None) is None:
        raise SinkchatError(
            f"{name} ({config.model_type}) uses learned absolute position embeddings, not RoPE; "
            "sinkchat's sink cache can only shift RoPE models (Llama, Mistral, Qwen2, ...)"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise SinkchatError(f"{name} is an encoder-decoder model; sinkchat needs a decoder-only chat model")


def _limits(config) -> tuple[object, object, bool, bool]:
    """``(max_position_embeddings, sliding_window, whether some layer slides, whether every one does)``
    of a transformers config or of its ``config.json`` as a dict (a multimodal model's text part where
    it has one). A hybrid model (Gemma 3, gpt-oss) slides in some layers only: the cache gives those
    their native window and the others sinks + window, so no window bounds the geometry there. A raw
    config of a model type sinkchat has no family for, without ``layer_types``, is left to the check
    on transformers' config at load (only transformers knows which of its layers slide)."""
    if isinstance(config, dict):
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
        family = family_of(text.get("model_type"))
        types = text.get("layer_types") or (family.layer_types(text) if family else None)
        in_use = family.sliding(text) if family else False
        native = text.get("sliding_window", family.default_window if family else None)
        get = text.get
    else:
        text = config.get_text_config(decoder=True)
        get = lambda key: getattr(text, key, None)  # noqa: E731
        types, native = get("layer_types"), get("sliding_window")
        in_use = native is not None
    if isinstance(types, list) and types:
        some, every = "sliding_attention" in types, "full_attention" not in types and "sliding_attention" in types
    else:
        some = every = bool(in_use)
    return get("max_position_embeddings"), native, some, every


def check_context(config, name: str, sinks: int | None, window: int) -> None:
    """``sinks + window`` must fit the model's positions, and its native sliding window where every
    layer has one.

    ``config``: a transformers config or its ``config.json`` as a dict. ``sinks`` None: the default
    for this model (none for a model that learned its own sink, see :data:`LEARNED_SINKS`). Pinned
    messages (``--keep-system`` too) take room inside the window, so they never change this.
    """
    limit, native, some, every = _limits(config)
    if sinks is None:
        text = config.get_text_config(decoder=True) if not isinstance(config, dict) else config
        kind = text.get("model_type") if isinstance(text, dict) else getattr(text, "model_type", None)
        sinks = Settings(sinks=None).sinks_for(kind in LEARNED_SINKS)
    if some and (isinstance(native, bool) or not isinstance(native, int) or native < 1):
        raise SinkchatError(f"{name}'s config gives its sliding-window layers a window of {native!r} tokens; "
                            "it must be a positive integer")
    native = native if every else None
    context = sinks + window
    if isinstance(limit, int) and context > limit:
        raise SinkchatError(
            f"sinks ({sinks}) + window ({window}) = {context} tokens exceeds {name}'s context of {limit} tokens; "
            "use a smaller window"
        )
    if native is not None and context > native:
        raise SinkchatError(
            f"{name} attends only to its last {native} tokens (native sliding window); sinks ({sinks}) + "
            f"window ({window}) = {context} must be at most {native}"
        )


