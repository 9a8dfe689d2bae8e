"""What the user typed while sinkchat started, before the chat screen took the terminal.

Keys typed during the first second (Python starting, imports) wait in the terminal's input
buffer; the screen's input thread then reads them before the message box has the focus, and they
were dropped. :func:`typed_ahead` reads them first, without waiting, so the screen puts them in
the box (and sends them if Enter was among them).
"""

from __future__ import annotations

import os
import re
import select
import sys

_SEQUENCE = re.compile(r"\x1b(?:\[[0-9;?]*[ -/]*[@-~]|O.|.)?")  # arrow keys and the like: not text


def typed_ahead(fd: int | None = None) -> tuple[str, bool]:
    """The text waiting on terminal ``fd`` (stdin by default), and whether Enter ended it; ``("",
    False)`` when it is not a terminal. Key sequences and control characters are dropped."""
    try:
        import termios
    except ImportError:  # pragma: no cover - no termios on Windows
        return "", False
    fd = sys.stdin.fileno() if fd is None else fd
    try:
        before = termios.tcgetattr(fd)
    except (termios.error, OSError, ValueError):
        return "", False
    now = list(before)
    now[3] &= ~(termios.ICANON | termios.ECHO)  # a line not yet ended becomes readable, and is not echoed
    now[6] = list(before[6])
    now[6][termios.VMIN], now[6][termios.VTIME] = 0, 0
    data = b""
    try:
        termios.tcsetattr(fd, termios.TCSANOW, now)
        while select.select([fd], [], [], 0)[0]:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, before)
    text = _SEQUENCE.sub("", data.decode("utf-8", "replace").replace("\r", "\n"))
    text = "".join(c for c in text if c in "\n\t" or c.isprintable())
    return text.strip("\n"), text.endswith("\n") and bool(text.strip())
