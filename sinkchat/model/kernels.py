"""Which kernels, forward and KV dtype a freshly loaded model runs with (see the README's "Which kernel
runs where"): PyTorch's packed int4 on the CPU (:mod:`.quant`), the Llama-family fast path
(:mod:`.fast`), bitsandbytes on a GPU, transformers for everything else."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .. import config as _config

if TYPE_CHECKING:
    import torch

    from .loaded import LoadedModel


def prepare(loaded: LoadedModel, kv_dtype: str = "auto", compile: str = "auto", folder: str | None = None,
            progress=lambda msg: None) -> None:
    """Pick the kernels, the fast path and the KV dtype for a freshly loaded model.

    On the CPU, a GGUF file's tensors run at their own precision per block type with ``auto``
    (:mod:`.blockkernels`: int4 for its 4-bit blocks, int8 planes for 5- and 8-bit ones, float16 for
    the rest) and at 4 bits with ``4bit``/``int4``; any other model's ``auto`` means ``4bit``: PyTorch's
    packed int4 kernel (bitsandbytes' CPU path is 12x slower without AVX512-BF16, see :mod:`.quant`).
    On a GPU, ``4bit`` (and a float checkpoint's ``auto``) is the fastest 4-bit kernel of :mod:`.gpu`
    that runs there (a model loaded in 16 bits on the CPU and quantized onto the GPU), or bitsandbytes
    NF4 for a model transformers quantized; a GGUF's ``auto`` is its values in the compute dtype. A
    fast-path model (:mod:`.fast`) runs in float32 or on those kernels on the CPU and in 4 bits on one
    GPU; ``compile`` ``auto`` compiles its decode step (on a GPU recorded as one CUDA graph; on the CPU
    one layer ahead of time, :mod:`.aot`, where inductor finds a C++ compiler).
    Everything else runs through transformers. Re-quantizing a GGUF below its own precision is said
    once (:attr:`~.loaded.LoadedModel.notices`).
    """
    import torch

    from . import fast, quant

    model = loaded.model
    file = _gguf(loaded)
    want = "4bit" if loaded.quant == "int4" and loaded.device == "cpu" else loaded.quant  # one int4 kernel there
    gpu4 = want in ("4bit", "int4") or want == "auto" and file is None
    if gpu4 and loaded.device == "cuda" and next(model.parameters()).is_cpu:
        from . import gpu  # loaded in 16 bits on the CPU: quantized onto the GPU weight by weight

        if fast.supported(model):
            gpu.build(loaded, "int4" if want == "int4" else "4bit", torch.device("cuda"), progress=progress)
            loaded.runs = loaded.weights
        else:  # the GPU kernels serve the fast path only
            model.to("cuda")
            loaded.weights = loaded.runs = "dense"
            loaded.notices.append(f"--quant {want}: this model is not on the fast path; it runs in 16 bits")
    elif want in ("4bit", "auto") and loaded.device == "cpu":
        loaded.weights, loaded.runs = "int4pack-g32", "4bit"
        packs = quant.Packs(_packs_path(folder))
        if file is not None:
            from .blockkernels import apply

            report = apply(model, file, want, packs)
            loaded.runs, loaded.kernels = report.label(), report.kernels
            # what a saved cache depends on: 4bit on a GGUF computes what it did before unless the file has
            # Q4_0 or Q4_K blocks, now taken from their codes instead of re-quantized
            if want == "auto" or {"Q4_0", "Q4_K"} & set(report.kernels):
                loaded.weights = f"{want}: {loaded.runs}"
            loaded.notices += [n for n in [report.notice()] if n]
        int4 = file is None or want == "4bit"  # auto on a GGUF: what is left (F32) stays as it is
        if fast.supported(model):
            loaded.fast = fast.FastModel.build(model, int4=int4, packs=packs)
        elif int4:
            quant.int4_modules(model, packs)
        packs.save()
    else:
        loaded.weights = {"4bit": "bnb-nf4", "int4": "bnb-nf4", "nf4": "bnb-nf4", "auto": "bnb-nf4",
                          "8bit": "bnb-int8"}.get(want, "dense")
        if file is not None and want == "auto":
            loaded.weights = "dense"
        loaded.runs = "4bit" if want == "auto" else want
        if file is not None:
            kernel = {"bnb-nf4": "nf4", "bnb-int8": "int8 (bitsandbytes)"}.get(loaded.weights, _name(loaded.dtype))
            loaded.runs = f"gguf {file.file_type} -> {kernel}"
            loaded.notices += [n for n in [_lower(file, want, loaded.runs)] if n]
        dense_cpu = loaded.quant == "none" and loaded.device == "cpu" and loaded.dtype == torch.float32
        one_device = len({p.device for p in model.parameters()}) == 1  # not spread over several GPUs
        if fast.supported(model) and (dense_cpu or loaded.weights == "bnb-nf4" and one_device
                                       and fast.nf4_fits(model)):
            loaded.fast = fast.FastModel.build(model, int4=False)
    if compile != "off" and _compile_disabled():  # TORCH_COMPILE_DISABLE=1: PyTorch's own switch
        if compile == "on":
            loaded.notices.append("--compile on: TORCH_COMPILE_DISABLE=1 is set, the decode step runs eagerly")
        compile = "off"
    if compile == "on" or (compile == "auto" and (loaded.device == "cuda" or _cpp_compiler())):
        if loaded.fast is not None:
            gpu = loaded.device == "cuda"
            loaded.fast.compile(inductor=True, cuda_graph=gpu, setup=_inductor_cache)
            loaded.notices.append("the first reply compiles the decode step (" + ("a minute or more" if gpu else
                                  "seconds") + " the first time)")
        elif compile == "on":
            loaded.notices.append("--compile on: only the fast path (Llama-family models: 4-bit, or float32 "
                                  "on the CPU) is compiled; this model runs eagerly")
    loaded.kv_dtype = pick_kv_dtype(loaded) if kv_dtype == "auto" else getattr(torch, kv_dtype)
    if loaded.device == "cpu":
        quant.keep_heap_pages()
    model.sinkchat_kv_dtype = loaded.kv_dtype
    model.sinkchat_fast = loaded.fast


def _gguf(loaded: LoadedModel):
    """The GGUF file the model was converted from, opened (:class:`~.gguf.GGUFFile`), or None."""
    source = loaded.source
    if source is None or source.kind != "gguf":
        return None
    from .gguf import GGUFFile

    return GGUFFile(source.ref)


def _name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _lower(file, quant: str, runs: str) -> str | None:
    """The notice for bitsandbytes' 4 or 8 bits (a GPU, or ``8bit``) below what a GGUF file's tensors
    hold (their movement is not measured on that path), or None."""
    bits = {"4bit": 4, "int4": 4, "nf4": 4, "8bit": 8}.get(quant)
    if bits is None:
        return None
    more: dict[str, int] = {}
    for t in file.tensors.values():  # the layers' matrices: bitsandbytes leaves embeddings and head alone
        if len(t.shape) == 2 and t.name not in ("token_embd.weight", "output.weight") and file.bits(t.type) > bits:
            more[t.type] = more.get(t.type, 0) + 1
    if not more:
        return None
    return (f"--quant {quant} re-quantizes {sum(more.values())} {'/'.join(more)} tensors of this {file.file_type} "
            f"file to {runs.rpartition(' -> ')[2]} (they move, and so do the logits); --quant auto runs them at "
            "the file's own precision")


def _cpp_compiler() -> bool:
    """Whether inductor can build the CPU's compiled layer here: the C++ compiler it needs is on the
    PATH (``CXX``, else g++ or clang++), looked up without importing inductor (that imports dynamo:
    1.6 s of a quick start). AOTInductor's code does not include ``Python.h``, so Python's headers
    are not needed (the regional ``torch.compile`` before it failed without them, after seconds)."""
    import os
    import shutil

    wanted = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "clang++"]
    return any(shutil.which(c) for c in wanted)


def _compile_disabled() -> bool:
    """PyTorch's ``TORCH_COMPILE_DISABLE=1``: dynamo's own flag where it is imported, else the variable
    it is read from (not imported here, for the same reason)."""
    import os
    import sys

    dynamo = sys.modules.get("torch._dynamo")
    return bool(dynamo.config.disable) if dynamo is not None else os.environ.get("TORCH_COMPILE_DISABLE") == "1"


def _inductor_cache() -> None:
    """Keep inductor's compiled kernels in sinkchat's cache dir (they outlive a reboot there), unless
    the user chose a place or that dir cannot be written (a read-only cache of converted models: torch's
    default then, as an error there would end the chat). Importing transformers already wrote torch's
    default (under /tmp) into ``TORCHINDUCTOR_CACHE_DIR``, so that default counts as not chosen."""
    import os

    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default_cache_dir()):
        folder = _config.cache_dir() / "inductor"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if not os.access(folder, os.W_OK | os.X_OK):
                return
        except OSError:  # a read-only cache dir, a file in the way: torch's own default, kept till a reboot
            return
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)


def _packs_path(folder: str | None) -> Path | None:
    """Where the packed 4-bit weights of the model in ``folder`` are kept (:class:`~.quant.Packs`)."""
    if folder is None:
        return None
    from .quant import Packs
    from .sources import model_files

    files = model_files(folder, (".safetensors", ".bin"))
    return _config.cache_dir() / "packed" / f"{Packs.key(files)}.safetensors"


def pick_kv_dtype(loaded: LoadedModel) -> torch.dtype:
    """What ``--kv-dtype auto`` means for this model: bfloat16 for a quantized fast-path model on a CPU
    with native bf16 (:func:`.gguf.native_bf16`), whose attention then reads half the bytes as two bf16
    matmuls (:func:`.fast.matmul_attention`; its 4-bit kernels already take bf16 activations); else the
    compute dtype (so transformers' attention reads the cache without a copy, and ``--quant none``
    stays float32 throughout)."""
    import torch

    from .gguf import native_bf16

    quantized = loaded.weights != "dense"
    if loaded.device == "cpu" and loaded.fast is not None and quantized and native_bf16():
        return torch.bfloat16
    return loaded.dtype


def kv_dtype(name: str, loaded: LoadedModel) -> torch.dtype:
    """``--kv-dtype``: ``auto`` is the loader's choice (:func:`pick_kv_dtype`), else the named dtype."""
    import torch

    return loaded.kv_dtype or loaded.dtype if name == "auto" else getattr(torch, name)
