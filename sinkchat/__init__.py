"""sinkchat: endless chats with a local language model on a StreamingLLM sink + window KV cache."""

import os

# OpenMP threads that busy-wait after each parallel region starve the thread that runs the model
# when the TUI loads it in one thread and generates in another (measured on 2 CPU cores: 1-5 tok/s
# instead of 18). Set before torch loads libgomp; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# tqdm reads TQDM_DISABLE when it is imported, so this must come before transformers loads: library
# progress bars (GGUF conversion) would otherwise spill onto the TUI or a script's stderr.
os.environ.setdefault("TQDM_DISABLE", "1")

__version__ = "0.1.0"

__all__ = ["__version__"]
