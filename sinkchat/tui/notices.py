"""sinkchat's notifications: plain text, never markup, for the app and every screen.

They carry titles, paths and chat text, so they are never read as markup (``[b]`` in a title stays
``[b]``) and control characters are shown as symbols. Textual's own notifications (``Press
[b]ctrl+q[/b] to quit``) keep their markup: sinkchat calls :meth:`Say.say`, never replaces ``notify``.
"""

from __future__ import annotations

from ..text import clean


class Say:
    """Mixed into the app and the screens (anything with ``app``)."""

    def say(self, message: str, *, title: str = "", severity: str = "information",
            timeout: float | None = None) -> None:
        extra = {} if timeout is None else {"timeout": timeout}
        self.app.notify(clean(message), title=clean(title, one_line=True), severity=severity, markup=False, **extra)
