"""A loaded model: the network, its tokenizer, and what it was loaded as (what the engine, the store's
fingerprint check and the screen's header read)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from .sources import Source


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
    weights: str = ""  # the kernel the weights run on: int4pack-g32, bnb-nf4, bnb-int8, dense or runs
    runs: str = ""  # what runs, for people: the header, bench tables (``gguf Q4_K_M -> int4 g32 + int8 g32``)
    kernels: dict = field(default_factory=dict)  # a GGUF's block types -> kernel -> tensors (blockkernels.apply)
    fast: object | None = None  # the fast path (sinkchat.model.fast.FastModel) when it serves this model
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
