"""One line at the top: what is running (model, device, quantization, dtype) and how fast. The speed
always shows: where the line is too long for the terminal, the description is cut short (…) instead."""

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
        line = Text(clean(f"sinkchat │ {self.model}", one_line=True))  # a model path is not markup
        tail = Text(f" │ {speed}")
        if self.content_size.width:
            line.truncate(max(1, self.content_size.width - tail.cell_len), overflow="ellipsis")
        return line + tail

    def describe(self, loaded) -> None:
        dtype = str(loaded.dtype).removeprefix("torch.")
        self.model = f"{loaded.name} │ {loaded.device} │ {loaded.runs or loaded.quant} │ {dtype}"
