"""A chat session over the sink cache: turns in, streamed events out.

``Chat.submit(text)`` tokenizes only the new turn, prefills it in chunks no larger than a quarter
of the window (so a pasted book streams through without memory growing past sinks + window + one
chunk), then decodes token by token until an end-of-turn token, ``max_new_tokens`` or ``stop()``.
It yields events a UI can show; it never touches the screen or the disk.

Every token the chat produced is in ``Chat.tokens`` and was fed to the cache, so the cache's kept
ranges plus its eviction ledger account for the whole conversation.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .cache import Occupancy, SinkCache, Span
from .models import LoadedModel, forward
from .sampling import Sampler, SamplingParams
from .template import Turns

END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")


@dataclass
class Message:
    """One message and the conversation-token range ``[start, end)`` its turn occupies."""

    role: str
    content: str
    start: int
    end: int


@dataclass(frozen=True)
class TokenText:
    text: str


@dataclass(frozen=True)
class Evicted:
    span: Span


@dataclass(frozen=True)
class Stats:
    occupancy: Occupancy
    tokens_per_s: float
    generated: int


@dataclass(frozen=True)
class Done:
    reply: str
    reason: str  # "end" (end-of-turn token), "length" (max_new_tokens) or "stopped"
    generated: int
    seconds: float


Event = TokenText | Evicted | Stats | Done


@dataclass(frozen=True)
class ChatSettings:
    sinks: int = 4
    window: int = 2000
    block: int | None = None
    max_new_tokens: int = 512
    system: str | None = None
    keep_system: bool = False
    sampling: SamplingParams = field(default_factory=SamplingParams)


class Chat:
    """One conversation with a loaded model; ``submit`` is a generator of events."""

    def __init__(self, loaded: LoadedModel, settings: ChatSettings = ChatSettings()):
        self.loaded, self.settings = loaded, settings
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.turns = Turns(self.tokenizer, settings.system)
        self.system_tokens = len(self.encode(self.turns.first("")[0]))
        sinks = max(settings.sinks, self.system_tokens) if settings.keep_system else settings.sinks
        self.cache = SinkCache.for_model(self.model, sinks, settings.window, settings.block)
        self.chunk = max(1, min(256, settings.window // 4))
        self.sampler = Sampler(settings.sampling)
        self.stop_ids = stop_token_ids(self.tokenizer, self.model)
        self.tokens: list[int] = []
        self.messages: list[Message] = []
        self._stop = threading.Event()
        self._device = next(self.model.parameters()).device

    # -- public ---------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask a running ``submit`` to end after the token in flight; the partial reply is kept."""
        self._stop.set()

    def submit(self, text: str) -> Iterator[Event]:
        """Send a user message and stream the reply as events, ending with :class:`Done`."""
        self._stop.clear()
        if not self.messages:
            system_text, turn_text = self.turns.first(text)
            if system_text:
                yield from self._feed(self.encode(system_text), "system", self.settings.system or "")
        else:
            turn_text = self.turns.next(text)
        yield from self._feed(self.encode(turn_text), "user", text)
        yield from self._generate()

    def occupancy(self) -> Occupancy:
        return self.cache.occupancy()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    # -- internals ------------------------------------------------------------------------------

    def _feed(self, ids: list[int], role: str, content: str) -> Iterator[Event]:
        """Prefill ``ids`` as one message, chunk by chunk; leaves the last logits in ``_logits``."""
        start = len(self.tokens)
        for i in range(0, len(ids), self.chunk):
            yield from self._forward(ids[i : i + self.chunk])
        self.messages.append(Message(role, content, start, len(self.tokens)))

    @torch.inference_mode()
    def _forward(self, ids: list[int]) -> Iterator[Event]:
        positions, span = self.cache.reserve(len(ids))
        if span is not None:
            yield Evicted(span)
        logits = forward(self.model, self.cache, ids, positions)
        self.tokens.extend(ids)
        self._logits = logits[-1]

    def _generate(self) -> Iterator[Event]:
        start = len(self.tokens)
        message = Message("assistant", "", start, start)
        self.messages.append(message)
        reply: list[int] = []
        stream = _Detokenizer(self.tokenizer)
        t0, reason = time.perf_counter(), "length"
        while len(reply) < self.settings.max_new_tokens:
            if self._stop.is_set():
                reason = "stopped"
                break
            tok = self.sampler(self._logits, self.tokens[-256:])
            if tok in self.stop_ids:
                reason = "end"
                break
            reply.append(tok)
            delta = stream.push(tok)
            if delta:
                yield TokenText(delta)
            yield from self._forward([tok])
            message.end = len(self.tokens)
            elapsed = time.perf_counter() - t0
            yield Stats(self.cache.occupancy(), len(reply) / elapsed if elapsed > 0 else 0.0, len(reply))
        tail = stream.flush()
        if tail:
            yield TokenText(tail)
        message.content = stream.text
        yield Done(message.content, reason, len(reply), time.perf_counter() - t0)


class _Detokenizer:
    """Streams text for a growing list of ids without cutting multi-byte characters in half."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.emitted = tokenizer, [], ""
        self.prefix = self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, tok: int) -> str:
        self.ids.append(tok)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            delta = after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
            self.emitted += delta
            return delta
        return ""

    def flush(self) -> str:
        full = self.text
        tail = full[len(self.emitted) :] if full.startswith(self.emitted) else ""
        self.emitted += tail
        return tail

    @property
    def text(self) -> str:
        return self._decode(self.ids)


def stop_token_ids(tokenizer, model) -> set[int]:
    """End-of-turn ids: the generation config's EOS ids, the tokenizer's EOS, and known turn-end tokens."""
    ids: set[int] = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN if t in vocab)
    return ids
