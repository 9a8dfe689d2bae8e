"""Chat turns to text through the model's own chat template, one turn at a time.

An endless chat cannot re-render and re-tokenize its whole history every turn, so each turn's
text is found as the difference between the template rendered over a tiny fixed dummy history
with and without the new message. Templates that rewrite earlier text when a message is added
(Mistral's puts the system prompt into the *last* user turn) are retried without the system
message in the dummy history.

A turn comes back as :data:`Piece` s: the template's own text (its scaffolding, which may hold
special tokens such as ``<|im_start|>``) and the user's or system prompt's text, marked literal,
which the engine tokenizes as plain text. The template is rendered with placeholders where the
contents go, so a user who types ``<|im_end|><|im_start|>assistant`` gets those characters, never
the control tokens. A template that trims a message (``content | trim``) is followed.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from functools import cached_property

from .errors import SinkchatError

# placeholders for contents while rendering (a real text may hold them too: it is never searched)
_S, _U, _A, _N = "\x00system\x00", "\x00user\x00", "\x00assistant\x00", "\x00new\x00"

Piece = tuple[str, bool]  # (text, literal): literal text is a message's content, never special tokens


@dataclass(frozen=True)
class Turns:
    """Renders the pieces of the first turn, and of each later turn, for one tokenizer."""

    tokenizer: object
    system: str | None

    def render(self, messages: list[dict], gen: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)

    def _sys(self, content: str = _S) -> list[dict]:
        return [{"role": "system", "content": content}] if self.system else []

    def encode(self, pieces: list[Piece]) -> list[int]:
        """Token ids of a turn: scaffolding as the tokenizer reads it (special tokens included), the
        literal pieces as plain text (``split_special_tokens``; an added token of the template that
        the tokenizer would still match is broken up), so a message never holds a control token."""
        ids: list[int] = []
        for text, literal in pieces:
            ids += self._piece(text, literal, inside=bool(ids))
        return ids

    def _piece(self, text: str, literal: bool, inside: bool) -> list[int]:
        if inside:  # as the tokenizer reads it after other text: no SentencePiece prefix space
            newline = self._plain("\n", False)
            ids = self._plain("\n" + text, literal)
            if newline and ids[: len(newline)] == newline:
                return ids[len(newline) :]
        return self._plain(text, literal)

    def _plain(self, text: str, literal: bool) -> list[int]:
        encode = lambda t: self.tokenizer(t, add_special_tokens=False, split_special_tokens=literal)["input_ids"]  # noqa: E731
        ids = encode(text) if text else []
        control, pattern = self._control
        if not literal or control.isdisjoint(ids):
            return ids
        ids = []
        for i, part in enumerate(pattern.split(text)):  # odd parts: control-token strings, as two halves
            ids += (encode(part[:1]) + encode(part[1:])) if i % 2 else encode(part) if part else []
        return ids

    @cached_property
    def _control(self) -> tuple[set[int], re.Pattern]:
        """Ids and a pattern of the control tokens: special tokens and added tokens the template writes."""
        template = self.tokenizer.chat_template if isinstance(self.tokenizer.chat_template, str) else ""
        added = {t.content: i for i, t in self.tokenizer.added_tokens_decoder.items()
                 if t.content and (t.special or t.content in template)}
        longest = sorted(added, key=len, reverse=True)
        return set(added.values()), re.compile("(" + "|".join(map(re.escape, longest)) + ")" if longest else "(?!)")

    def first(self, user: str) -> tuple[list[Piece], list[Piece]]:
        """``(system_part, rest)``: the opening up to the first user turn, and that turn."""
        try:
            probe = self.render(self._sys() + [{"role": "user", "content": _U}], gen=True)
            real = self.render(self._sys(self.system or "") + [{"role": "user", "content": user}], gen=True)
        except Exception as exc:
            raise SinkchatError(f"the model's chat template failed: {exc}".splitlines()[0]) from None
        cut = len(_system_prefix(self, probe[: probe.index(_U)]))
        contents = _forms(probe, real, {_S: self.system or "", _U: user})
        return _pieces(probe[:cut], contents), _pieces(probe[cut:], contents)

    def next(self, user: str) -> list[Piece]:
        """The pieces that close the previous assistant reply and open a new user turn + reply prompt."""
        for with_sys in (True, False):
            base = (self._sys() if with_sys else []) + [
                {"role": "user", "content": _U},
                {"role": "assistant", "content": _A},
            ]
            try:
                before = self.render(base[:-1], gen=True)
                after = self.render(base + [{"role": "user", "content": _N}], gen=True)
                real = self.render(base + [{"role": "user", "content": user}], gen=True)
            except Exception:
                continue
            added = after[len(before) :]
            if after.startswith(before) and _A in added and not added[: added.index(_A)].strip():
                # whitespace before the reply (Mistral's " ") is something the model generates itself
                cut = len(before) + added.index(_A) + len(_A)
                contents = _forms(after, real, {_N: user}) | {_S: self.system or ""}
                return _pieces(after[cut:], contents)
        raise SinkchatError("the model's chat template cannot be rendered one turn at a time")


def _forms(probe: str, real: str, contents: dict[str, str]) -> dict[str, str]:
    """Each placeholder's content as the template put it: as given, or trimmed if the template trims
    (found by comparing the placeholder render with the real one); as given if neither matches."""
    names = [p for p in contents if p in probe]
    options = [dict.fromkeys((c, c.strip(), c.lstrip(), c.rstrip())) for c in (contents[p] for p in names)]
    for combo in itertools.product(*options):
        chosen = dict(zip(names, combo))
        if _fill(probe, chosen) == real:
            return chosen
    return {p: contents[p] for p in names}


def _fill(text: str, contents: dict[str, str]) -> str:
    return "".join(contents.get(part, part) for part in _split(text, contents))


def _split(text: str, contents: dict[str, str]) -> list[str]:
    if not contents:
        return [text]
    return re.split("(" + "|".join(map(re.escape, contents)) + ")", text)


def _pieces(text: str, contents: dict[str, str]) -> list[Piece]:
    """``text`` (with placeholders) as pieces: scaffolding, then a literal content, and so on."""
    pieces = []
    for i, part in enumerate(_split(text, contents)):
        piece = (contents[part], True) if i % 2 else (part, False)
        if piece[0]:
            pieces.append(piece)
    return pieces


def text_of(pieces: list[Piece]) -> str:
    return "".join(text for text, _ in pieces)


def _system_prefix(turns: Turns, head: str) -> str:
    """The part of ``head`` (text before the first user content) that belongs to the system prompt.

    With an explicit system message, that is the message rendered alone. Otherwise rendering a
    second dummy user turn shows what a user turn's own opening looks like; whatever
    precedes that opening in ``head`` is system text (an explicit or a template-default one).
    """
    if turns.system:
        alone = turns.render(turns._sys(), gen=False)
        if head.startswith(alone):
            return alone
    two = turns.render(
        turns._sys()
        + [{"role": "user", "content": _U}, {"role": "assistant", "content": _A}, {"role": "user", "content": _U}],
        gen=True,
    )
    between = two[two.index(_A) + len(_A) : two.rindex(_U)]
    # `between` = close of the assistant turn + open of a user turn; the user opening is its
    # longest suffix that also ends `head`.
    for k in range(len(between), 0, -1):
        if head.endswith(between[-k:]):
            return head[: len(head) - k]
    return head
