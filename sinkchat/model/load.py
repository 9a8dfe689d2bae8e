"""Loading a model: weights from a source (:mod:`.sources`), quantized as asked, on a device, with the
kernels and fast path :mod:`.kernels` picks, and a fingerprint of what was loaded (a saved cache
depends on it). torch and transformers are imported only when a model loads."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SinkchatError
from .checks import check_context, check_gguf, pick_device, read_config
from .loaded import LoadedModel
from .sources import gguf_folder, gguf_target, hub_folder, model_files, quiet, resolve

if TYPE_CHECKING:
    import torch

# A base model's "chat": BOS, then each message's text, a blank line between (replies continue the text).
PLAIN_TEMPLATE = ("{{ bos_token or '' }}{% for message in messages %}{% if not loop.first %}\n\n{% endif %}"
                  "{{ message['content'] }}{% endfor %}{% if add_generation_prompt %}\n\n{% endif %}")

def pick_dtype(dtype: str, device: str) -> torch.dtype:
    """Compute dtype: float32 on the CPU (bf16 matmuls are slow there), bf16 on GPUs that have it."""
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load(
    name: str,
    quant: str = "4bit",
    device: str = "auto",
    dtype: str = "auto",
    progress=lambda msg: None,
    context: tuple[int | None, int] | None = None,
    kv_dtype: str = "auto",
    compile: str = "auto",
    quick: bool = True,
) -> LoadedModel:
    """Load ``name`` (alias, folder, .gguf or HF id), quantized as asked (``4bit``, ``8bit``, ``none``),
    on ``device`` (``auto``, ``cuda``, ``cpu``) with compute ``dtype``.

    ``context`` ``(sinks, window)`` is checked against the model's positions before weights load; the
    engine checks again on the loaded model's own config. ``quick``: a Llama-family model in 4-bit on
    the CPU skips transformers' model classes (:mod:`.quickload`); callers that run
    transformers' own forward (the benchmarks' baselines) pass False. Raises :class:`SinkchatError`.
    """
    source = resolve(name)
    device = pick_device(device)
    compute = pick_dtype(dtype, device)
    quiet()
    if source.kind == "gguf":
        if not (gguf_target(Path(source.ref)) / "config.json").is_file():
            check_gguf(Path(source.ref), name, context)  # before converting: what would be refused after
        folder = str(gguf_folder(Path(source.ref), progress))
    elif source.kind == "dir":
        folder = source.ref
    else:
        progress(f"looking up {source.ref} ...")
        folder = hub_folder(source.ref)
    progress(f"loading {name} ({quant}, {device}) ...")
    cpu_int4 = quant == "4bit" and device == "cpu"  # PyTorch's packed int4 kernel, after loading (.quant)
    loaded = _load_quick(name, folder, context) if quick and cpu_int4 else None
    if loaded is None:
        loaded = _load_transformers(name, folder, context, quant, device, compute)
    if getattr(loaded.tokenizer, "chat_template", None) is None:  # a base model: it continues text
        loaded.tokenizer.chat_template = PLAIN_TEMPLATE
        loaded.notices.append(f"{name} has no chat template (a base model): messages are sent as plain text, "
                              "one after another, and each reply continues the text")
    loaded.source = source
    from .kernels import prepare

    prepare(loaded, kv_dtype, compile, folder)
    loaded.fingerprint = fingerprint(loaded, folder)
    return loaded


def _load_quick(name: str, folder: str, context: tuple[int | None, int] | None) -> LoadedModel | None:
    """The model as a :class:`~.quickload.Skeleton` for the CPU fast path, or None where
    it does not qualify (then transformers loads it)."""
    import torch

    from . import quickload

    config = quickload.read_config(Path(folder))
    if config is None:
        return None
    if context is not None:
        check_context(config, name, *context)
    try:
        model = quickload.load_model(Path(folder), config)
        tokenizer = quickload.load_tokenizer(Path(folder), config.model_type)
    except quickload.NotQuick:
        return None
    except Exception as exc:
        raise SinkchatError(f"cannot load {name}: {exc}".splitlines()[0]) from None
    from .fast import supported

    if not supported(model):  # only the fast path runs a skeleton
        return None
    return LoadedModel(model, tokenizer, None, "4bit", "cpu", torch.float32)


def _load_transformers(name: str, folder: str, context: tuple[int | None, int] | None, quant: str, device: str,
                       compute: torch.dtype) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    quiet()  # now that transformers is imported
    config = read_config(folder, name)
    if context is not None:
        check_context(config, name, *context)
    kwargs: dict = {"dtype": compute}
    if quant == "4bit" and device == "cpu":  # PyTorch's packed int4 kernel, after loading (.quant)
        kwargs["dtype"] = compute = torch.float32
    elif quant == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute
        )
    elif quant == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if device == "cuda":
        kwargs["device_map"] = "auto"  # spreads a model too large for one GPU over all visible GPUs
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    except SinkchatError:
        raise
    except Exception as exc:
        raise SinkchatError(f"cannot load {name}: {exc}".splitlines()[0]) from None
    return LoadedModel(model, tokenizer, None, quant, device, compute)


def fingerprint(loaded: LoadedModel, folder: str) -> dict:
    """What a saved cache depends on: weights' identity, quantization, dtype, RoPE parameters."""
    digest = hashlib.sha256()
    for p in model_files(folder, (".safetensors", ".bin", ".json")):
        st = p.stat()
        digest.update(f"{p.name}|{st.st_size}".encode())
        if p.suffix == ".json" and st.st_size < 1 << 20:
            digest.update(p.read_bytes())
    config = loaded.model.config.get_text_config(decoder=True)
    return {
        "model": loaded.source.name,
        "source": loaded.source.ref,
        "files": digest.hexdigest()[:32],
        "quant": loaded.quant,
        "weights": loaded.weights,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "rope": json.dumps(getattr(config, "rope_parameters", None), sort_keys=True, default=str),
        "layers": config.num_hidden_layers,
    }


def load_for(settings, progress=lambda msg: None, quick: bool = True) -> LoadedModel:
    """:func:`load` with a :class:`~sinkchat.settings.Settings`' model, quant, device, dtype and geometry."""
    return load(settings.model, settings.quant, settings.device, settings.dtype, progress=progress,
                context=(settings.sinks, settings.window), kv_dtype=settings.kv_dtype, compile=settings.compile,
                quick=quick)
