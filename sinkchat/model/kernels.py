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

    On the CPU, ``4bit`` means PyTorch's packed int4 kernel (bitsandbytes' CPU path is 12x slower
    without AVX512-BF16, see :mod:`.quant`); on a GPU, the fastest 4-bit kernel of :mod:`.gpu` that
    runs there (a model loaded in 16 bits on the CPU and quantized onto the GPU), or bitsandbytes
    NF4 for a model transformers quantized. A fast-path model (:mod:`.fast`) runs in float32 or int4
    on the CPU and in 4 bits on one GPU, where ``compile`` ``auto`` also compiles its decode step and
    records it as one CUDA graph. Everything else runs through transformers.
    """
    import torch

    from . import fast, quant

    model = loaded.model
    if loaded.quant in ("4bit", "int4") and loaded.device == "cuda" and next(model.parameters()).is_cpu:
        from . import gpu  # loaded in 16 bits on the CPU: quantized onto the GPU weight by weight

        if fast.supported(model):
            gpu.build(loaded, loaded.quant, torch.device("cuda"), progress=progress)
        else:  # the GPU kernels serve the fast path only
            model.to("cuda")
            loaded.weights = "dense"
            loaded.notices.append(f"--quant {loaded.quant}: this model is not on the fast path; it runs in 16 bits")
    elif loaded.quant in ("4bit", "int4") and loaded.device == "cpu":
        loaded.weights = "int4pack-g32"
        packs = quant.Packs(_packs_path(folder))
        if fast.supported(model):
            loaded.fast = fast.FastModel.build(model, int4=True, packs=packs)
        else:
            quant.int4_modules(model, packs)
        packs.save()
    else:
        loaded.weights = {"4bit": "bnb-nf4", "int4": "bnb-nf4", "nf4": "bnb-nf4", "8bit": "bnb-int8"}.get(
            loaded.quant, "dense")
        dense_cpu = loaded.quant == "none" and loaded.device == "cpu" and loaded.dtype == torch.float32
        one_device = len({p.device for p in model.parameters()}) == 1  # not spread over several GPUs
        if fast.supported(model) and (dense_cpu or loaded.weights == "bnb-nf4" and one_device
                                       and fast.nf4_fits(model)):
            loaded.fast = fast.FastModel.build(model, int4=False)
    if compile == "on" or (compile == "auto" and loaded.device == "cuda"):
        if loaded.fast is not None:
            _inductor_cache()
            loaded.fast.compile(inductor=True, cuda_graph=loaded.device == "cuda")
            loaded.notices.append("the first reply compiles the decode step (a minute or more the first time)")
        elif compile == "on":
            loaded.notices.append("--compile on: only the fast path (Llama-family models: 4-bit, or float32 "
                                  "on the CPU) is compiled; this model runs eagerly")
    loaded.kv_dtype = pick_kv_dtype(loaded) if kv_dtype == "auto" else getattr(torch, kv_dtype)
    model.sinkchat_kv_dtype = loaded.kv_dtype
    model.sinkchat_fast = loaded.fast


def _inductor_cache() -> None:
    """Keep inductor's compiled kernels in sinkchat's cache dir (they outlive a reboot there), unless
    the user chose a place. Importing transformers already wrote torch's default (under /tmp) into
    ``TORCHINDUCTOR_CACHE_DIR``, so that default counts as not chosen."""
    import os

    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(_config.cache_dir() / "inductor")


def _packs_path(folder: str | None) -> Path | None:
    """Where the packed 4-bit weights of the model in ``folder`` are kept (:class:`~.quant.Packs`)."""
    if folder is None:
        return None
    from .quant import Packs
    from .sources import model_files

    files = model_files(folder, (".safetensors", ".bin"))
    return _config.cache_dir() / "packed" / f"{Packs.key(files)}.safetensors"


def pick_kv_dtype(loaded: LoadedModel) -> torch.dtype:
    """What ``--kv-dtype auto`` means for this model: the compute dtype (so transformers' attention
    reads the cache without a copy)."""
    return loaded.dtype


def kv_dtype(name: str, loaded: LoadedModel) -> torch.dtype:
    """``--kv-dtype``: ``auto`` is the loader's choice (:func:`pick_kv_dtype`), else the named dtype."""
    import torch

    return loaded.kv_dtype or loaded.dtype if name == "auto" else getattr(torch, name)
