"""Reading what was typed on a terminal before the chat screen took it (a real pseudo-terminal)."""

from __future__ import annotations

import os
import pty

from sinkchat.tui.typeahead import typed_ahead


def test_what_waits_on_the_terminal_is_read_without_waiting():
    main, terminal = pty.openpty()
    try:
        assert typed_ahead(terminal) == ("", False)  # nothing typed: no wait
        os.write(main, "héllo wörld".encode())  # a line not yet ended (the terminal is in line mode)
        assert typed_ahead(terminal) == ("héllo wörld", False)
        os.write(main, b"What is 2+2?\r")  # Enter
        assert typed_ahead(terminal) == ("What is 2+2?", True)
        os.write(main, b"up\x1b[Aleft\x1b[D\x07")  # arrow keys and a bell are not text
        assert typed_ahead(terminal) == ("upleft", False)
    finally:
        os.close(main)
        os.close(terminal)


def test_a_pipe_is_not_a_terminal():
    read, write = os.pipe()
    try:
        os.write(write, b"hello\n")
        assert typed_ahead(read) == ("", False)
    finally:
        os.close(read)
        os.close(write)
