"""What is refused before any weights load: a model the cache cannot serve, a geometry that does not fit
its context, a CUDA device that is not there. Configs are read as plain JSON where that is enough
(importing transformers costs seconds before the screen opens)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import SinkchatError
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
    else:  # a GGUF file not yet converted is read (and checked) while the screen shows progress
        folder = str(gguf_target(Path(source.ref)))
        if not (Path(folder) / "config.json").is_file():
            return
    try:  # plain JSON: importing transformers here would cost seconds before the screen opens
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # read (and reported) while the screen shows progress
    if isinstance(config, dict):
        check_context(config, settings.model, settings.sinks, settings.window)


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


def _limits(config) -> tuple[int | None, int | None, list]:
    """``(max_position_embeddings, sliding_window, layer_types)`` of a transformers config or of
    its ``config.json`` as a dict (a multimodal model's text part where it has one)."""
    if isinstance(config, dict):
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
        get = text.get
    else:
        text = config.get_text_config(decoder=True)
        get = lambda key: getattr(text, key, None)  # noqa: E731
    return get("max_position_embeddings"), get("sliding_window"), get("layer_types") or []


def check_context(config, name: str, sinks: int, window: int) -> None:
    """``sinks + window`` must fit the model's positions and any native sliding window.

    ``config``: a transformers config or its ``config.json`` as a dict. Pinned messages
    (``--keep-system`` too) take room inside the window, so they never change this.
    """
    limit, native, layer_types = _limits(config)
    context = sinks + window
    if isinstance(limit, int) and context > limit:
        raise SinkchatError(
            f"sinks ({sinks}) + window ({window}) = {context} tokens exceeds {name}'s context of {limit} tokens; "
            "use a smaller window"
        )
    if isinstance(native, int) and context > native and (not layer_types or "sliding_attention" in layer_types):
        raise SinkchatError(
            f"{name} attends only to its last {native} tokens (native sliding window); sinks ({sinks}) + "
            f"window ({window}) = {context} must be at most {native}"
        )


