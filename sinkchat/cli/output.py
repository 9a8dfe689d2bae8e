"""Tables on stdout: as wide as a terminal is, and never wrapped or cut when stdout is a pipe or a
file (a script reading ``sinkchat models`` or ``sinkchat chats list`` gets whole ids and titles)."""

from __future__ import annotations

import sys


def console():
    from rich.console import Console

    if sys.stdout.isatty():
        return Console(highlight=False, markup=False)  # titles and paths are never read as markup
    return Console(width=100_000, highlight=False, markup=False)
