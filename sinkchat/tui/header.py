"""One line at the top: what is running (model, device, quantization, dtype) and how fast."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static

from ..text import clean


class ChatHeader(Static):
    model: reactive[str] = reactive("loading model…")
    tokens_per_s: reactive[float | None] = reactive(None)

    def render(self) -> Text:
        speed = f"{self.tokens_per_s:.1f} tok/s" if self.tokens_per_s is not None else "– tok/s"
        return Text(clean(f"sinkchat │ {self.model} │ {speed}", one_line=True))  # a model path is not markup

    def describe(self, loaded) -> None:
        dtype = str(loaded.dtype).removeprefix("torch.")
        self.model = f"{loaded.name} │ {loaded.device} │ {loaded.runs or loaded.quant} │ {dtype}"
