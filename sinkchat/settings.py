"""Every setting of a chat in one typed, frozen :class:`Settings`: its defaults, its checks, its help.

Values come in layers, later ones winning: the defaults here < ``config.toml`` < a resumed chat's
saved settings < command-line flags. :meth:`Settings.resolve` checks each value of each layer for
type and range, so a bad one fails with one line naming where it came from
(``~/.config/sinkchat/config.toml: window must be an integer (got "64")``,
``--temperature must be a finite number (got nan)``), before any model loads.

Why a frozen dataclass and not pydantic: the checks are a handful of ranges and choices, the error
lines must name the source in sinkchat's own words, and a dataclass adds no dependency. Frozen,
because the engine, the loader, the TUI and the store all read one object that nobody may change
under them; ``dataclasses.replace`` makes a checked copy.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .config import toml_text
from .errors import SinkchatError
from .text import valid

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_SINKS = 4  # StreamingLLM's choice: enough for the models it measured, a rounding error of the window
QUANTS = ("auto", "4bit", "int4", "nf4", "8bit", "none")
DEVICES = ("auto", "cuda", "cpu")
DTYPES = ("auto", "float32", "bfloat16", "float16")
EVICTS = ("tokens", "turns")
KV_DTYPES = DTYPES
COMPILE = ("auto", "on", "off")
LIMIT = 10_000_000  # upper bound of any count setting: beyond it a value is a typo, not a wish


class SettingError(SinkchatError, ValueError):
    """A value of the wrong type or out of range; the message is one line naming where it came from."""


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> Callable:
    def check(v) -> str | None:
        if lo_open and (v <= lo or v > hi):
            return f"must be in ({lo}, {hi}]"
        if lo is not None and v < lo:
            return f"must be {lo} or more"
        if hi is not None and v > hi:
            return f"must be at most {hi}"
        return None

    return check


def setting(default, help: str, *, check=None, choices: tuple[str, ...] | None = None, saved: bool = True,
            flag: str | None = None):
    """A :class:`Settings` field: its default, help text, range check or choices, and whether a chat saves it."""
    meta = {"help": help, "check": check, "choices": choices, "saved": saved, "flag": flag}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Settings:
    """One chat's settings, checked on construction (a bad value raises :class:`SettingError`)."""

    model: str = setting(DEFAULT_MODEL, "Alias (see `sinkchat models`), Hugging Face id, folder or .gguf file.",
                         check=lambda v: None if v.strip() else "must not be empty")
    sinks: int | None = setting(None, "Attention-sink tokens kept forever (0 = plain window attention) [default: "
                                f"{DEFAULT_SINKS}; 0 for a model that learned its own sink, such as gpt-oss].",
                                check=_range(0, LIMIT))
    window: int = setting(2000, "Most recent tokens kept in the KV cache.", check=_range(1, LIMIT))
    block: int | None = setting(None, "Tokens evicted at once when the window is full [default: window/16, max 256].",
                                check=_range(1, LIMIT))
    evict: str = setting("tokens", "What eviction removes: tokens (the oldest, anywhere) or turns (whole "
                         "turns, so the window starts where a user turn opens).", choices=EVICTS)
    pin_max: int | None = setting(None, "Most tokens pinned messages may keep, out of the window "
                                  "[default: a quarter of the window].", check=_range(0, LIMIT))
    recall: int = setting(0, "Slots for tokens recalled from the memory of what left the window (InfLLM-style "
                          "block retrieval; each user message brings back the blocks that best answer it; at most the "
                          "window); 0 = off: what leaves the window is forgotten.", check=_range(0, LIMIT))
    recall_block: int = setting(64, "Tokens per block of that memory (a block is recalled whole).",
                                check=_range(1, LIMIT))
    keep_system: bool = setting(False, "Pin the whole system prompt: never evicted (counts against --pin-max).")
    system: str | None = setting(None, "System prompt [default: the chat template's].")
    quant: str = setting("auto", "Weights: auto (a GGUF file at its own precision per tensor, anything else "
                         "4bit), 4bit (the fastest 4-bit kernel here: on a GPU PyTorch's int4 tinygemm, torchao's "
                         "or bitsandbytes NF4, timed at load; PyTorch's packed int4 on the CPU), int4 (PyTorch's "
                         "int4 kernel), nf4 (bitsandbytes NF4), 8bit or none.", choices=QUANTS)
    device: str = setting("auto", "auto (a GPU if there is one), cuda or cpu.", choices=DEVICES)
    dtype: str = setting("auto", "Compute dtype: auto (float32 on the CPU; bfloat16 on a GPU that has it, else "
                         "float16), float32, bfloat16 or float16.", choices=DTYPES)
    kv_dtype: str = setting("auto", "KV cache dtype: auto (bfloat16 for a 4-bit fast-path model on a CPU with "
                            "AVX512-BF16 or AMX, else the compute dtype), float32, bfloat16 or float16.",
                            choices=KV_DTYPES)
    compile: str = setting("auto", "Compile the decode step with inductor (recorded as a CUDA graph on a GPU; on "
                           "the CPU one layer ahead of time, kept on disk): auto (on a GPU; on the CPU where a C++ "
                           "compiler is found; not under TORCH_COMPILE_DISABLE=1), on or off; a failed compile "
                           "falls back to eager.",
                           choices=COMPILE, saved=False)
    temperature: float = setting(0.7, "Sampling temperature; 0 = greedy.", check=_range(0, 100))
    top_p: float = setting(0.9, "Nucleus sampling: smallest set of tokens with this much probability.",
                           check=_range(0, 1, lo_open=True))
    top_k: int = setting(50, "Sample from the k most likely tokens; 0 = off.", check=_range(0, LIMIT))
    repetition_penalty: float = setting(1.1, "Penalty on tokens the reply itself generated (its last 256), "
                                        "never the prompt; 1 = off; none at temperature 0 (greedy).",
                                        check=_range(0, 100, lo_open=True))
    seed: int | None = setting(None, "Random seed, for replies that can be replayed [default: random].",
                               check=_range(0, 2**63 - 1))
    max_new_tokens: int = setting(512, "Longest reply, in tokens.", check=_range(1, LIMIT))
    theme: str = setting("sinkchat-dark", "TUI theme (see `themes/`).", saved=False,
                         check=lambda v: None if v.strip() else "must not be empty")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            problem = _problem(f, getattr(self, f.name))
            if problem:
                raise SettingError(f"{f.name} {problem}")
        problem = _combined(vars(self))
        if problem:
            raise SettingError(f"{problem[0]} {problem[1]}")

    def sinks_for(self, learned: bool = False) -> int:
        """``sinks``, or its default for a model: none where the model learned a sink logit per head
        (gpt-oss: the sink is in its weights), else :data:`DEFAULT_SINKS`."""
        return self.sinks if self.sinks is not None else 0 if learned else DEFAULT_SINKS

    @property
    def pin_budget(self) -> int:
        """Tokens pins may hold: ``pin_max``, or a quarter of the window when it is not set."""
        return self.window // 4 if self.pin_max is None else self.pin_max

    # -- layers --------------------------------------------------------------------------------

    @classmethod
    def resolve(
        cls,
        flags: Mapping[str, object] | None = None,
        *,
        config: Mapping[str, object] | None = None,
        config_source: str = "config.toml",
        saved: Mapping[str, object] | None = None,
        saved_source: str = "the saved chat",
    ) -> tuple["Settings", list[str]]:
        """Defaults < ``config`` < ``saved`` < ``flags`` (a None value means "not given").

        Returns the settings and warnings (unknown keys in the config file). Raises
        :class:`SettingError` naming the first bad value's source: ``--window ...`` for a flag,
        ``<config_source>: window ...``, ``<saved_source>: window ...``.
        """
        names = {f.name: f for f in dataclasses.fields(cls)}
        warnings = [f"{config_source}: unknown setting {k!r} (ignored)" for k in (config or {}) if k not in names]
        merged: dict[str, object] = {}
        source: dict[str, str] = {}
        layer_of: dict[str, int] = {}  # which of the layers below gave each value
        layers = [(config, lambda n: f"{config_source}: {n}"), (saved, lambda n: f"{saved_source}: {n}"),
                  (flags, lambda n: names[n].metadata["flag"] or "--" + n.replace("_", "-"))]
        for layer, (values, name_of) in enumerate(layers):
            for key, value in (values or {}).items():
                if key not in names or value is None:  # None: not given (a flag left out, an old save's null)
                    continue
                problem = _problem(names[key], value)
                if problem:
                    raise SettingError(f"{name_of(key)} {problem}")
                merged[key], source[key], layer_of[key] = value, name_of(key), layer
        problem = _combined({"window": Settings.window, **merged})
        if problem:
            name, text = problem
            flag = names[name].metadata["flag"] or "--" + name.replace("_", "-")
            if source[name] != flag and layer_of.get("window", layer_of[name]) != layer_of[name]:
                text += f" for {source['window']}; give {flag} too"  # e.g. --window on a resumed chat
            raise SettingError(f"{source[name]} {text}")
        return cls(**merged), warnings

    def saved(self) -> dict[str, object]:
        """What a chat records of its settings (everything but presentation, such as the theme)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["saved"]}

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **changes)


def help_for(name: str) -> str:
    """A flag's help text with its default, from the one place both are written."""
    f = next(f for f in dataclasses.fields(Settings) if f.name == name)
    text = f.metadata["help"]
    if "[default:" not in text and f.default is not None:
        default = str(f.default).lower() if isinstance(f.default, bool) else f.default
        text += f" [default: {default}]"
    return text


def _combined(values: Mapping[str, object]) -> tuple[str, str] | None:
    """``(field, problem)`` when checked values do not go together (pins take room in the window)."""
    pin_max, window = values.get("pin_max"), values["window"]
    if pin_max is not None and pin_max > window // 2:
        return "pin_max", f"must be at most half the window, {window // 2} (got {pin_max})"
    recall, block = values.get("recall") or 0, values.get("recall_block") or 64
    if recall and recall < block:
        return "recall", f"must hold at least one block of --recall-block {block} (got {recall})"
    if recall > window:  # recalled tokens would outnumber the recent ones, and cost more per token than the window
        return "recall", f"must be at most the window, {window} (got {recall})"
    return None


def _problem(f: dataclasses.Field, value) -> str | None:
    """Why ``value`` cannot be field ``f``'s value, or None."""
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    optional = kind.endswith("| None")
    kind = kind.removesuffix(" | None")
    if value is None:
        return None if optional else "must be given"
    shown = toml_text(value)  # as a config file or a saved chat writes it (true, not True); controls escaped
    shown = f"the table {shown}" if isinstance(value, dict) else shown
    got = f"(got {shown if len(shown) <= 60 else shown[:57] + '...'})"
    if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        return f"must be an integer {got}"
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number {got}"
        if not math.isfinite(value):
            return f"must be a finite number {got}"
    if kind == "bool" and not isinstance(value, bool):
        return f"must be true or false {got}"
    if kind == "str" and not isinstance(value, str):
        return f"must be text {got}"
    if f.metadata["choices"] and value not in f.metadata["choices"]:
        return f"must be one of {', '.join(f.metadata['choices'])} {got}"
    if kind == "str" and "\x00" in value:
        return "must not contain NUL characters"
    if kind == "str" and valid(value)[1]:
        return "must be valid UTF-8 text"
    check = f.metadata["check"]
    problem = check(value) if check else None
    return f"{problem} {got}" if problem else None
