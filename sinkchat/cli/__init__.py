"""The ``sinkchat`` command line: the chat (:mod:`.main`), ``sinkchat chats`` (:mod:`.chats`) and
``sinkchat bench`` (:mod:`.bench`).

Every user mistake becomes one line ``sinkchat: error: ...`` and exit code 2, never a traceback;
Ctrl+C exits 130. Lower layers raise :class:`~sinkchat.errors.SinkchatError` with plain wording;
only this package prints it.
"""

from __future__ import annotations

import os
import sys
from contextlib import suppress

import typer
from typer._click.exceptions import NoArgsIsHelpError  # typer's own copy of click

from ..errors import SinkchatError
from ..files import reason
from ..text import clean
from . import bench_chat  # noqa: F401  (adds `bench endless` to the bench commands)
from .bench import app as bench_app
from .chats import app as chats_app
from .main import app

app.add_typer(chats_app, name="chats")
app.add_typer(bench_app, name="bench")

__all__ = ["app", "run"]


def _optional_resume(args: list[str]) -> list[str]:
    """``--resume`` alone means the last chat (Click options cannot take an optional value)."""
    args = list(args)
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg == "--resume" and (i + 1 == len(args) or args[i + 1].startswith("-")):
            args.insert(i + 1, "last")
            break
    return args


def run(argv: list[str] | None = None) -> None:
    """Console-script entry point: one-line errors, exit 2 for bad input, 130 for Ctrl+C."""
    try:
        code = app(args=_optional_resume(sys.argv[1:] if argv is None else argv), standalone_mode=False)
        sys.stdout.flush()  # a full disk shows here, not as an error at interpreter exit
    except SinkchatError as exc:
        _error(str(exc))
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except NoArgsIsHelpError as exc:  # `sinkchat chats`: the help as typer prints it, exit 2
        exc.show()
        sys.exit(exc.exit_code)
    except typer.TyperException as exc:  # usage errors: unknown option, a value of the wrong type
        _error(exc.format_message() if hasattr(exc, "format_message") else str(exc))
        sys.exit(getattr(exc, "exit_code", 2))
    except (typer.Abort, KeyboardInterrupt):
        sys.exit(130)
    except BrokenPipeError:  # `sinkchat chats show | head`: the reader has all it wanted
        _quiet_stdout()
        sys.exit(0)
    except OSError as exc:  # stdout on a full disk, an I/O error: one line, never a traceback
        _quiet_stdout()
        # a file's error names the file (only stdout's own errors come without one)
        what = f"use {exc.filename}" if exc.filename else "write the output"
        _error(f"cannot {what}: {reason(exc)}")
        sys.exit(1)
    if isinstance(code, int) and code:  # a command's typer.Exit(code) comes back as a value here
        sys.exit(code)


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so what is still buffered raises no second error at exit."""
    with suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _error(message: str) -> None:
    print(f"sinkchat: error: {clean(message, one_line=True)}", file=sys.stderr)
