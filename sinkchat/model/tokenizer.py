"""The part of transformers' tokenizer API sinkchat uses, over the ``tokenizers`` library and jinja2,
for the quick start (:mod:`sinkchat.model.quickload`): importing transformers costs about 0.7 s of a start.

It serves only folders whose tokenizer transformers would run as its generic ``TokenizersBackend``
(everything in ``tokenizer.json``, no class-specific rules, no space clean-up on decode) and whose
chat template needs none of transformers' template extensions (:func:`serves`); the chat template is
rendered in the same sandbox with the same options and helpers as transformers 5
(``transformers.utils.chat_template_utils``). ``tests/test_quickload.py`` checks ids, text and
renders against transformers' own tokenizer.
"""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime
from pathlib import Path

SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
GENERIC = ("TokenizersBackend", "PreTrainedTokenizerFast")  # None would mean: the model type's own class


def _config(folder: Path) -> dict | None:
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def _template(folder: Path, config: dict) -> str | None:
    path = folder / "chat_template.jinja"
    try:
        return path.read_text(encoding="utf-8") if path.is_file() else config.get("chat_template")
    except (OSError, UnicodeDecodeError):
        return None


def serves(folder: Path, model_type: str) -> bool:
    """Whether :class:`Tokenizer` reads ``folder`` exactly as transformers would: a Llama model
    (transformers replaces the tokenizer class of some others, Qwen2 among them, and has Mistral
    rules of its own) whose ``tokenizer_config.json`` names the generic class and adds no tokens,
    with a chat template that needs none of transformers' template extensions. (:class:`Tokenizer`
    refuses special tokens that ``tokenizer.json`` does not hold as special tokens.)"""
    config = _config(folder)
    if model_type != "llama" or config is None or config.get("tokenizer_class") not in GENERIC:
        return False
    if any(config.get(key) for key in ("clean_up_tokenization_spaces", "added_tokens_decoder",
                                         "extra_special_tokens", "additional_special_tokens", "fix_mistral_regex")):
        return False
    if any((folder / name).exists() for name in ("special_tokens_map.json", "added_tokens.json")):
        return False
    if not (folder / "tokenizer.json").is_file():
        return False
    if not all(v is None or isinstance(v, str) or isinstance(v, dict) and isinstance(v.get("content"), str)
               for v in (config.get(key) for key in SPECIAL)):
        return False
    template = _template(folder, config)
    return isinstance(template, str) and not re.search(r"\{%-?\s*generation\s*-?%\}", template)


class _Dict:
    """``dict(...)`` and ``dict.fromkeys(...)`` in templates, and nothing else of the type."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class Tokenizer:
    """``tokenizer.json`` with transformers' calling conventions: ``tokenizer(text,
    add_special_tokens=False, split_special_tokens=...)["input_ids"]``, ``decode``, ``get_vocab``,
    ``added_tokens_decoder``, ``eos_token_id``, ``chat_template`` and ``apply_chat_template(...,
    tokenize=False)``. Build only for a folder :func:`serves` accepts; ValueError where a special
    token of ``tokenizer_config.json`` is not a special added token of ``tokenizer.json``."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer as Backend

        config = _config(folder) or {}
        self.backend = Backend.from_file(str(folder / "tokenizer.json"))
        self.backend.no_truncation()  # transformers switches both off when it encodes
        self.backend.no_padding()
        self.chat_template = _template(folder, config)
        tokens = {key: config.get(key) for key in SPECIAL}
        tokens = {key: value.get("content") if isinstance(value, dict) else value for key, value in tokens.items()}
        self.special_tokens_map = {key: value for key, value in tokens.items() if isinstance(value, str)}
        special = {t.content for t in self.backend.get_added_tokens_decoder().values() if t.special}
        if not special.issuperset(self.special_tokens_map.values()):  # transformers would add or mark it
            raise ValueError("a special token of tokenizer_config.json is not one in tokenizer.json")
        eos, bos = self.special_tokens_map.get("eos_token"), self.special_tokens_map.get("bos_token")
        self.eos_token_id = None if eos is None else self.backend.token_to_id(eos)
        self.bos_token_id = None if bos is None else self.backend.token_to_id(bos)

    def __call__(self, text: str, add_special_tokens: bool = True, split_special_tokens: bool = False) -> dict:
        self.backend.encode_special_tokens = split_special_tokens
        return {"input_ids": self.backend.encode(text, add_special_tokens=add_special_tokens).ids}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def added_tokens_decoder(self) -> dict:
        return self.backend.get_added_tokens_decoder()

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False,
                            add_generation_prompt: bool = False) -> str:
        """The chat as text (``tokenize`` must be False: sinkchat tokenizes the pieces itself)."""
        if tokenize:
            raise ValueError("sinkchat's tokenizer renders chat templates as text only")
        return _compile(self.chat_template).render(messages=messages, tools=None, documents=None,
                                                   add_generation_prompt=add_generation_prompt,
                                                   **self.special_tokens_map)


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    """The template in transformers' sandbox: ``trim_blocks``, ``lstrip_blocks``, loop controls, a
    ``tojson`` that keeps non-ASCII text, ``raise_exception``, ``strftime_now``, and a
    ``namespace`` that refuses underscore names."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class Namespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot store {name!r} on a namespace")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = _Dict()
    env.globals["namespace"] = Namespace
    return env.from_string(template)
