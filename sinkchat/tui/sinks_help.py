"""The help screen's few lines on what the gauge's sinks are, with the share of attention the model
puts on them when ``sinkchat bench attention`` measured it (read from the data dir; no torch)."""

from __future__ import annotations

from pathlib import Path

from ..store.attention import load_attention


def sinks_markdown(model: str, data_dir: str | Path | None = None) -> str:
    """Markdown: what sinks are (StreamingLLM, Xiao et al., ICLR 2024) and ``model``'s measured share, if any."""
    doc = load_attention(model, data_dir)
    return "\n\n".join([
        "## The gauge's sinks",
        "**Sinks** are the first tokens of the chat, kept in the cache for good while the window rolls on. "
        "Language models put a large share of their attention on the first few tokens whatever they say; "
        "evict them and the model loses its footing (StreamingLLM, Xiao et al., 2024).",
        (doc and measured(model, doc)) or f"`sinkchat bench attention --model {model}` measures that share on "
        "this model.",
    ])


def measured(model: str, doc: dict) -> str | None:
    """One line on ``model``'s last ``bench attention`` result, or None if it lacks what the line needs."""
    try:
        k = doc["firsts"].index(4)
        share, uniform = 100 * doc["share"][k], 100 * doc["uniform"][k]
        layers, dominated = len(doc["layers"]), len(doc["sink_layers"])
        quant = (doc.get("machine") or {}).get("quant")
        return (
            f"Measured on {model}{f' ({quant})' if quant else ''} by `sinkchat bench attention` over {doc['tokens']} "
            f"tokens: queries after token {doc.get('from', 64)} put **{share:.0f}%** of their attention on the first "
            f"4 tokens (uniform attention would give {uniform:.1f}%); {dominated} of {layers} layers put more than "
            "half there."
        )
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None
