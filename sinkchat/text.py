"""Chat text at the edges: what comes in is made valid text, what goes out can never drive a terminal.

Chat text (what a user typed or pasted, what the model said, a title) reaches terminals and files
in many places: plain mode, the TUI, ``chats list | show | export``, notices. A terminal acts on
control characters (``ESC ] 52 ;`` writes the clipboard, ``ESC ] 0 ;`` the window title, ``CR``
overwrites a line), so every one of those places shows text through :func:`clean`: control
characters other than newline and tab become visible symbols (``␛`` for ESC), and so on.

Input that is not valid UTF-8 arrives as lone surrogates (Python's ``surrogateescape``); those
become U+FFFD here, so nothing downstream (tokenizer, SQLite, a file) meets a string it cannot encode.
"""

from __future__ import annotations

import re

# C0 controls except tab and newline, DEL, C1 controls, and lone surrogates (undecodable input bytes)
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _symbol(match: re.Match) -> str:
    c = ord(match.group())
    if c < 0x20:
        return chr(0x2400 + c)  # the Unicode control pictures: ␀ ␁ ... ␛ ... ␟
    if c == 0x7F:
        return "\u2421"  # ␡
    return "\ufffd"  # C1 controls and undecodable bytes


def clean(text: str, *, one_line: bool = False) -> str:
    """``text`` safe to print: control characters shown as symbols, CR LF as LF; with ``one_line``
    newlines and tabs become spaces too (for error lines and labels)."""
    text = _UNSAFE.sub(_symbol, text.replace("\r\n", "\n"))
    return text.replace("\n", " ").replace("\t", " ") if one_line else text


def valid(text: str) -> tuple[str, bool]:
    """``text`` with undecodable bytes (lone surrogates) replaced by U+FFFD, and whether any were."""
    fixed = _SURROGATE.sub("\ufffd", text)
    return fixed, fixed != text


def escape_json(dumped: str) -> str:
    """A ``json.dumps(..., ensure_ascii=False)`` result with DEL, C1 controls and lone surrogates
    escaped as well (JSON escapes C0 itself), so the file never holds a raw control character and
    still loads as the very same text."""
    return re.sub("[\x7f-\x9f\ud800-\udfff]", lambda m: f"\\u{ord(m.group()):04x}", dumped)
