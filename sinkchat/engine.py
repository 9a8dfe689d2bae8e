"""A chat session over the sink cache: turns in, streamed events out.

``Chat.submit(text)`` tokenizes only the new turn, prefills it in chunks of at most a quarter of
the window (so a pasted book streams through without memory growing past sinks + window + one
chunk), then decodes token by token until an end-of-turn token, ``max_new_tokens`` or ``stop()``.
It yields events a UI can show; it never touches the screen or the disk.

Every token the chat produced is in ``Chat.tokens`` and was fed to the cache, so the cache's kept
ranges plus its eviction ledger account for the whole conversation. :meth:`Chat.state` and
:meth:`Chat.restore` hand that to a store and back; the engine alone owns the tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import torch

from .errors import SinkchatError
from .kv import SinkCache
from .kv.cache import learned_sinks
from .kv.memory import SUFFIX as MEMORY_SUFFIX
from .kv.memory import BlockMemory
from .ledger import ChatState, Message, Occupancy, Span, partial
from .model import LoadedModel, check_context, forward
from .model.kernels import kv_dtype
from .sampling import REPEAT_LAST_N, Sampler
from .settings import KV_DTYPES, Settings
from .steering import Steering
from .template import Turns
from .text import valid

END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")


def prefill_chunk(window: int) -> int:
    """Tokens per prefill forward: a quarter window, so a chunk always fits the window, and at most
    512: on the CPU each chunk dequantizes every 4-bit weight once (a quarter of a 256-token chunk's
    time), so larger chunks read a prompt faster (689 against 548 tokens/s for 512 tokens of the
    bundled model on 2 AVX512 cores), while a stop still lands within a second there."""
    return max(1, min(512, window // 4))


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
class Notice:
    """A line for the user about the turn (a message sent pinned, or a pin that could not be made)."""

    text: str
    refused: bool = False


@dataclass(frozen=True)
class Done:
    reply: str
    reason: str  # "end" (end-of-turn token), "length" (max_new_tokens) or "stopped"
    generated: int
    seconds: float


Event = TokenText | Evicted | Stats | Notice | Done


class Chat(Steering):
    """One conversation with a loaded model; ``submit`` is a generator of events. Pins, taking
    back the last turn and rebuilding the cache come from :class:`~sinkchat.steering.Steering`.

    Raises :class:`SinkchatError` when the cache geometry does not fit the model, when the system
    prompt alone does not fit the cache, or when ``keep_system`` would pin more of the system
    prompt than ``--pin-max`` allows.
    """

    def __init__(self, loaded: LoadedModel, settings: Settings = Settings()):
        settings = settings.replace(sinks=settings.sinks_for(learned_sinks(loaded.model)))
        self.loaded, self.settings = loaded, settings
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.turns = Turns(self.tokenizer, settings.system)
        self.system_tokens = len(self.turns.encode(self.turns.first("")[0]))
        if self.system_tokens > settings.sinks + settings.window:  # it would evict itself before a word is said
            needed = self.system_tokens - settings.sinks
            raise SinkchatError(
                f"--window {settings.window} is too small: the system prompt alone is {self.system_tokens} tokens, "
                f"more than {settings.sinks} sinks + {settings.window} hold; give --window {2 * needed} or more, "
                "so a turn fits beside it"
            )
        over = self.system_tokens - settings.sinks - settings.pin_budget
        if settings.keep_system and over > 0:
            raise SinkchatError(
                f"--keep-system: the system prompt is {self.system_tokens} tokens; past the {settings.sinks} sinks "
                f"that is {over} more than --pin-max {settings.pin_budget} lets pinned messages keep"
            )
        check_context(self.model.config, loaded.name, settings.sinks, settings.window)
        if settings.recall:  # recalled tokens sit between the sinks and the window, at positions of their own
            try:
                check_context(self.model.config, loaded.name, settings.sinks, settings.window + settings.recall)
            except SinkchatError:
                raise SinkchatError(f"--recall {settings.recall} + sinks + window exceeds {loaded.name}'s context; "
                                    "use a smaller --recall or --window") from None
        self.cache = self._new_cache(settings.sinks, settings.window, settings.block, settings.pin_budget,
                                     kv_dtype(settings.kv_dtype, loaded))
        self._recalling = False  # a user message is being read: each chunk recalls from the block memory
        self.chunk = prefill_chunk(settings.window)
        self.sampler = Sampler(settings)
        self.stop_ids = stop_token_ids(self.tokenizer, self.model)
        self.tokens: list[int] = []
        self.messages: list[Message] = []
        self.revision = 0  # bumped by pins and rollbacks, so a save knows there is something new
        self.cuts: list[tuple[int, int]] = []  # (revision, token) of each rollback (see ChatState.cuts)
        self.taken_back = False  # a pinned user message was taken back: the next one sent is pinned again
        self._stop = threading.Event()
        self.busy = False  # a submit is between its start and its Done (the chat may not be copied then)
        self._logits: torch.Tensor | None = None
        self.device = next(self.model.parameters()).device

    def _new_cache(self, sinks: int, window: int, block: int | None, pin_max: int, dtype,
                   memory: BlockMemory | None = None) -> SinkCache:
        """The chat's cache; with ``--recall`` its block memory (``memory``: one to keep) records each evicted
        token's id from the ledger."""
        s = self.settings
        cache = SinkCache.for_model(self.model, sinks, window, block, pin_max=pin_max, dtype=dtype, recall=s.recall,
                                    recall_block=s.recall_block, memory=memory,
                                    memory_key=memory_key(self.loaded.fingerprint, dtype))
        cache.token_ids = lambda a, b: self.tokens[a:b]
        return cache

    # -- chatting -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask a running ``submit`` to end after the token in flight; the partial reply is kept."""
        self._stop.set()

    def submit(self, text: str, pin: bool = False) -> Iterator[Event]:
        """Send a user message and stream the reply as events, ending with :class:`Done`; ``pin``:
        pin the message as soon as it is read, before its reply can evict it (a :class:`Notice`
        says it was, or why not).

        The turn is tokenized before anything reaches the cache, so a failure there changes
        nothing. At every event the chat is whole (each token fed is recorded and belongs to a
        message), so a consumer that stops iterating, or fails, leaves a chat that can be saved:
        the reply so far is kept and marked ``stopped``. Text that is not valid Unicode (lone
        surrogates from undecodable input) is replaced with U+FFFD.

        A :meth:`stop` from the moment this returns stops the turn, one that comes before its first
        event too (Esc pressed as Enter was, while the turn waits for its thread): the request is
        cleared here, not when the turn starts running.
        """
        self._stop.clear()
        return self._turn(text, pin)

    def _turn(self, text: str, pin: bool) -> Iterator[Event]:
        text, _ = valid(text)
        system_ids, user_ids = self._turn_ids(text)
        self.busy = True
        try:
            if system_ids:
                yield from self.prefill(system_ids, "system", self.settings.system or "")
                if self.settings.keep_system:
                    self.cache.pin(0, len(self.tokens))
            self.cache.mark()  # the state to come back to if this turn is taken back (rollback)
            yield from self.prefill(user_ids, "user", text)
            if said := self.pin_sent(pin):
                yield Notice(*said)
            yield from self._generate()
        finally:
            self.busy = False

    def prefill(self, ids: list[int], role: str, content: str) -> Iterator[Event]:
        """Feed ``ids`` as one message, chunk by chunk (a generator of :class:`Evicted` events).

        A stop request (:meth:`stop`) is honoured between chunks: the message keeps its whole text
        and the tokens read, marked :func:`~sinkchat.ledger.partial` (how many it has), so Esc or
        Ctrl+C does not wait for a long paste to be read whole, and nothing claims the model read it."""
        self.messages.append(Message(role, content, len(self.tokens), len(self.tokens), note=partial(len(ids))))
        self._recalling = role == "user" and self.cache.memory is not None
        try:
            for i in range(0, len(ids), self.chunk):
                if self._stop.is_set():
                    return
                yield from self._forward(ids[i : i + self.chunk])
        finally:
            self._recalling = False
        self._update(note="")  # until here the model had read only part of it

    def _turn_ids(self, text: str) -> tuple[list[int], list[int]]:
        """The token ids a turn of ``text`` feeds: the system prompt's (on the first turn), then the
        user message's, both through the chat template."""
        system_ids: list[int] = []
        if all(m.role == "system" for m in self.messages):  # the first turn (or the first taken back)
            system, turn = self.turns.first(text)
            system_ids = [] if self.messages else self.turns.encode(system)
        else:
            turn = self.turns.next(text)
        return system_ids, self.turns.encode(turn)

    def check_pin(self, text: str) -> None:
        """:class:`SinkchatError` (one line) when a message of ``text`` sent now could not be pinned:
        its tokens over what ``--pin-max`` has left (checked before it is sent pinned)."""
        system_ids, user_ids = self._turn_ids(valid(text)[0])
        new = len(user_ids) - max(0, self.cache.sinks - len(self.tokens) - len(system_ids))
        total = self.cache.pinned_count() + new
        if total > self.cache.pin_max:
            raise SinkchatError(f"this message is {new} tokens: pinned it would make {total}, over the budget of "
                                f"{self.cache.pin_max} (--pin-max); unpin something first, or send it unpinned")

    def occupancy(self) -> Occupancy:
        return self.cache.occupancy()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` as a message's content: literal text, never a control token (for
        counting what the user types against the window)."""
        return self.turns.encode([(text, True)]) if text else []

    # -- text for a UI --------------------------------------------------------------------------

    def system_text(self) -> str:
        """The system prompt as the model reads it: the user's, or the template's default one."""
        if self.settings.system:
            return self.settings.system
        text = self.tokenizer.decode(self.turns.encode(self.turns.first("")[0]), skip_special_tokens=True)
        text = text.strip().removeprefix("system").strip()
        return f"(the model's default) {text}" if text else "(the model's default system prompt)"

    def kept_from(self, message: Message, token: int, words: int = 6) -> tuple[str, int] | None:
        """Where conversation token ``token`` falls in ``message``'s own text: the first ``words``
        words from there and the paragraph (1-based, blank-line separated) they are in.

        A message's tokens also hold its chat-template scaffolding; None when ``token`` lies past
        the message's text (only closing scaffolding) or the text cannot be located.
        """
        content = message.content
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        at = decode(self.tokens[message.start : message.end]).find(content) if content else -1
        if at < 0:
            return None
        offset = max(0, len(decode(self.tokens[message.start : token])) - at)
        if offset >= len(content.rstrip()):
            return None
        return " ".join(content[offset:].split()[:words]), content[:offset].count("\n\n") + 1

    # -- saving and restoring -------------------------------------------------------------------

    def fingerprint(self) -> dict:
        """What the KV depends on: the loaded model (files, quant, dtype, RoPE), its vocabulary,
        and the cache geometry."""
        return {
            **self.loaded.fingerprint,
            "tokenizer": vocab_hash(self.tokenizer),
            "kv_dtype": str(self.cache.dtype).removeprefix("torch."),
            "sinks": self.cache.sinks,
            "window": self.cache.window,
            "block": self.cache.block,
        }

    def state(self) -> tuple[ChatState, dict[str, torch.Tensor]]:
        """The chat as a :class:`ChatState` and the cache's held K/V tensors: copies (messages are
        values, shared)."""
        tensors, meta = self.cache.state()
        meta["revision"] = self.revision
        state = ChatState(list(self.tokens), list(self.messages), meta, self.fingerprint(), cuts=list(self.cuts))
        return state, tensors

    @property
    def recalls(self) -> bool:
        """Whether this chat keeps a block memory of what left the window (``--recall``)."""
        return self.cache.memory is not None

    def keep_memory(self, directory: Path, chat_id: int | None) -> int | None:
        """With ``--recall``: keep the block memory's file in ``directory`` (a store's state folder), named
        ``<chat_id>.memory`` once the chat has an id. Returns a descriptor of the file of its own (None:
        no file yet), which the caller fsyncs before a save counts the blocks, and closes."""
        memory = self.cache.memory
        if memory is None:
            return None
        memory.keep_in(directory)
        if memory.fd is None:
            return None
        if chat_id is not None and memory.path is not None and memory.path.name != f"{chat_id}{MEMORY_SUFFIX}":
            target = directory / f"{chat_id}{MEMORY_SUFFIX}"
            try:  # the store's first save may have given it the chat's name already
                named = os.path.samestat(os.fstat(memory.fd), os.stat(target, follow_symlinks=False))
            except FileNotFoundError:
                named = False
            if named:
                with suppress(FileNotFoundError):
                    os.unlink(memory.path)
            else:
                os.replace(memory.path, target)
            memory.adopt(target)
        return os.dup(memory.fd)

    def open_memory(self, directory: Path, chat_id: int, state: ChatState, tensors: dict | None,
                    writable: bool = True) -> list[str]:
        """Continue the saved chat's block memory from its file in ``directory``, before :meth:`restore`
        (a cache rebuilt in another geometry then keeps every token it evicts in the memory); notices
        when part of it cannot be used (the chat itself is never lost)."""
        saved = state.meta.get("memory") or {}
        name = saved.get("file") or f"{chat_id}{MEMORY_SUFFIX}"
        if "/" in name or name.startswith(".."):
            name = f"{chat_id}{MEMORY_SUFFIX}"
        return self.cache.open_memory(directory / name, state.meta, tensors, list(state.tokens), writable)

    def restore(self, state: ChatState, tensors: dict[str, torch.Tensor] | None) -> list[str]:
        """Continue a saved chat in this fresh one: transcript, ledger, cache counters and KV.

        With ``tensors`` from a save of the same model and geometry the KV is loaded as saved, so
        greedy decoding continues token for token as the uninterrupted chat would; otherwise it
        is rebuilt from the ledger (:meth:`rebuild`). Returns notices for the user. Raises
        :class:`SinkchatError` for a chat made with another tokenizer (its ids mean other words).
        """
        now = self.fingerprint()
        if state.fingerprint.get("tokenizer") != now["tokenizer"]:
            raise SinkchatError(
                f"this chat was made with {state.fingerprint.get('model')}, whose tokenizer differs from "
                f"{now['model']}'s; resume it with --model {state.fingerprint.get('model')}"
            )
        if max(state.tokens, default=-1) >= len(self.tokenizer):
            raise SinkchatError("this chat's ledger holds token ids the model's vocabulary lacks; it cannot be resumed")
        self.tokens = list(state.tokens)
        self.messages = list(state.messages)
        self.revision = state.meta.get("revision", 0)
        if not self.tokens:
            return []
        return self._restore_cache(state, tensors, now) + self.fit_pins()

    def _restore_cache(self, state: ChatState, tensors: dict[str, torch.Tensor] | None, now: dict) -> list[str]:
        """Load the saved K/V, or rebuild it from the ledger; ``now``: this chat's fingerprint. With
        ``--kv-dtype auto`` a save that differs only in its KV dtype (made before auto chose another
        one here) is loaded in its own dtype, so the chat goes on as it would have."""
        differs = [k for k in now if k != "block" and now[k] != state.fingerprint.get(k)]
        saved = state.fingerprint.get("kv_dtype")  # a dtype's name ("auto" is never saved)
        if tensors is not None and differs == ["kv_dtype"] and self.settings.kv_dtype == "auto" and saved in KV_DTYPES:
            cache = self.cache
            self.cache = self._new_cache(cache.sinks, cache.window, cache.block, cache.pin_max, getattr(torch, saved))
            differs = []
        if tensors is not None and not differs:
            try:
                self.cache.load_state(tensors, state.meta, device=self.device)
            except (KeyError, ValueError, RuntimeError) as exc:  # tensors that do not fit the counters
                cache = self.cache
                self.cache = self._new_cache(cache.sinks, cache.window, cache.block, cache.pin_max, cache.dtype,
                                             cache.memory)
                return [f"the saved KV cache does not fit its ledger ({exc}); rebuilt it from the ledger",
                        *self.rebuild(state.meta)]
            if now["block"] != state.meta["block"]:  # the KV does not depend on it: keep it, say so
                self.cache.block = now["block"]
                return [f"eviction block changed from {state.meta['block']} to {now['block']}; it applies from now on"]
            return []
        unpinned = self.rebuild(state.meta)
        if tensors is not None:
            return [f"the saved KV cache was made with another {', '.join(differs)}; rebuilt it from the ledger",
                    *unpinned]
        return unpinned

    # -- internals ------------------------------------------------------------------------------

    @torch.inference_mode()
    def _forward(self, ids: list[int], candidates: int = 0) -> Iterator[Event]:
        """One step of the last message: reserve cache room, run the model, record the tokens. A failing
        model call gives the room back, so the cache never holds more than the recorded tokens; the
        evictions are announced only once the step is recorded. ``candidates``: see
        :func:`~sinkchat.model.forward` (a decode step's, from the sampler)."""
        positions, spans = self.cache.reserve(len(ids), self._cut if self.settings.evict == "turns" else None,
                                              recall=self._recalling)
        try:
            logits = forward(self.model, self.cache, ids, positions, candidates=candidates)
        except BaseException:
            self.cache.cancel(len(ids))
            raise
        self.tokens.extend(ids)
        self._update(end=len(self.tokens))
        self._logits = logits[-1]
        for span in spans:
            yield Evicted(span)
        for text in self.cache.take_notices():  # a damaged block of the memory: it can no longer be recalled
            yield Notice(text)

    def _update(self, **changes) -> Message:
        """Replace the message being written with one carrying ``changes`` (messages are values)."""
        self.messages[-1] = replace(self.messages[-1], **changes)
        return self.messages[-1]

    def _generate(self) -> Iterator[Event]:
        start = len(self.tokens)
        self.messages.append(Message("assistant", "", start, start, note="stopped"))
        stream = _Detokenizer(self.tokenizer)
        t0, reason, generated = time.perf_counter(), "length", 0
        # the decode steps' exact logits: those the sampler says it picks among; a sampler that does not
        # say (a scorer that reads every logit, a wrapped one) gets them all
        candidates = getattr(self.sampler, "candidates", lambda: 0)()
        fast = getattr(self.model, "sinkchat_fast", None)  # a decode step compiled at its first call:
        compiling = fast is not None and fast.compiled is not None and fast.compiled_s is None  # not speed
        try:
            while generated < self.settings.max_new_tokens:
                if self._stop.is_set():
                    reason = "stopped"
                    break
                tok = self.sampler(self._logits, self.tokens[start:][-REPEAT_LAST_N:])  # the reply's own
                if tok in self.stop_ids:
                    reason = "end"
                    break
                yield from self._forward([tok], candidates)
                if compiling and fast.compiled_s is not None:  # this step compiled: its seconds are not decoding
                    t0, compiling = t0 + fast.compiled_s, False
                generated += 1
                delta = stream.push(tok)
                self._update(content=stream.emitted)
                if delta:
                    yield TokenText(delta)
                elapsed = time.perf_counter() - t0
                yield Stats(self.cache.occupancy(), generated / elapsed if elapsed > 0 else 0.0, generated)
            tail = stream.flush()
            if tail:
                yield TokenText(tail)
        finally:  # also when the consumer stopped early or failed: the reply so far stays, marked stopped
            message = self.messages[-1]
            self._update(content=stream._decode(self.tokens[message.start : message.end]))  # what was recorded
        message = self._update(note="" if reason == "end" else reason)
        self.busy = False  # the turn is whole from here on
        yield Done(message.content, reason, generated, time.perf_counter() - t0)


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


def memory_key(fingerprint: dict, dtype) -> str:
    """What the block memory's K/V depend on (model files, quantization, dtype, RoPE; not the geometry)."""
    what = {k: v for k, v in fingerprint.items() if k not in ("sinks", "window", "block")}
    what["kv_dtype"] = str(dtype)
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:32]


@lru_cache(maxsize=4)
def vocab_hash(tokenizer) -> str:
    """Token ids mean something only to their tokenizer: a saved ledger needs the same vocabulary."""
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[:32]
