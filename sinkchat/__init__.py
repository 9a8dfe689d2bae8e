"""sinkchat: endless chats with a local language model on a StreamingLLM sink + window KV cache."""

__version__ = "0.1.0"

__all__ = ["__version__"]
