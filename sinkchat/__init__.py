"""sinkchat: endless chats with a local language model on a StreamingLLM sink + window KV cache."""

import os

# OpenMP's wait policy is left at its default (GNU OpenMP: each worker spins for a short while after a
# parallel region, then sleeps): one decode thread makes every model call (sinkchat/decoder.py), so
# one team of workers runs and its brief spin bridges the many small parallel regions of a decode
# step. Sleeping at once (OMP_WAIT_POLICY=PASSIVE, once set here for a model loaded on one thread and
# run on another) made decode 1.5x slower on 2 cores (README, "Against llama.cpp").

# tqdm reads TQDM_DISABLE when it is imported, so this must come before transformers loads: library
# progress bars (GGUF conversion) would otherwise spill onto the TUI or a script's stderr.
os.environ.setdefault("TQDM_DISABLE", "1")

__version__ = "0.1.0"

__all__ = ["__version__"]
