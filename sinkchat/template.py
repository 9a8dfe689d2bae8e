"""Chat turns to text through the model's own chat template, one turn at a time.

An endless chat cannot re-render and re-tokenize its whole history every turn, so each turn's
text is found as the difference between the template rendered over a tiny fixed dummy history
with and without the new message. Templates that rewrite earlier text when a message is added
(Mistral's puts the system prompt into the *last* user turn) are retried without the system
message in the dummy history.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import SinkchatError

_U, _A = "\x00user\x00", "\x00assistant\x00"  # dummy contents that no real text contains


@dataclass(frozen=True)
class Turns:
    """Renders the text of the first turn, and of each later turn, for one tokenizer."""

    tokenizer: object
    system: str | None

    def render(self, messages: list[dict], gen: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)

    def _sys(self) -> list[dict]:
        return [{"role": "system", "content": self.system}] if self.system else []

    def first(self, user: str) -> tuple[str, str]:
        """``(system_part, rest)``: the opening text up to the first user turn, and that turn."""
        try:
            full = self.render(self._sys() + [{"role": "user", "content": user}], gen=True)
            probe = self.render(self._sys() + [{"role": "user", "content": _U}], gen=True)
        except Exception as exc:
            raise SinkchatError(f"the model's chat template failed: {exc}".splitlines()[0]) from None
        cut = probe.index(_U)
        head = probe[:cut]
        system_part = _system_prefix(self, head)
        return full[: len(system_part)], full[len(system_part) :]

    def next(self, user: str) -> str:
        """Text that closes the previous assistant reply and opens a new user turn + reply prompt."""
        for with_sys in (True, False):
            base = (self._sys() if with_sys else []) + [
                {"role": "user", "content": _U},
                {"role": "assistant", "content": _A},
            ]
            try:
                before = self.render(base[:-1], gen=True)
                after = self.render(base + [{"role": "user", "content": user}], gen=True)
            except Exception:
                continue
            added = after[len(before) :]
            if after.startswith(before) and _A in added and not added[: added.index(_A)].strip():
                # whitespace before the reply (Mistral's " ") is something the model generates itself
                return added[added.index(_A) + len(_A) :]
        raise SinkchatError("the model's chat template cannot be rendered one turn at a time")


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
