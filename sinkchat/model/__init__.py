"""Which model to run and how to run it.

:mod:`.sources` (aliases, the bundled GGUF, folders, GGUF files, Hugging Face ids), :mod:`.checks`
(refusals before any weights load), :mod:`.load` (loading, quantization, device, fingerprint) into a
:class:`~.loaded.LoadedModel`, :mod:`.kernels` (which kernels and forward a loaded model runs with),
:mod:`.quant` (the 4-bit linears), :mod:`.families` (what each architecture the fast path serves looks
like), :mod:`.fast` (the fast path's forward), :mod:`.quickload` and :mod:`.tokenizer` (a start without
transformers), :mod:`.forward` (the one place that calls a model).

Importing this package imports no torch: ``sinkchat models`` and the checks before the TUI opens stay quick.
"""

from .checks import check_context, preflight
from .forward import forward, forward_outputs
from .load import load, load_for
from .loaded import LoadedModel
from .sources import ALIASES, Source, available, bundled_gguf, gguf_folder, gguf_target, resolve

__all__ = ["ALIASES", "LoadedModel", "Source", "available", "bundled_gguf", "check_context", "forward",
           "forward_outputs", "gguf_folder", "gguf_target", "load", "load_for", "preflight", "resolve"]
