"""``sinkchat chats``: list, show, export, rename and delete saved chats (no model is loaded)."""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path

import typer

from ..errors import SinkchatError

app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Saved chats: list | show | export | rename | delete. Resume one with `sinkchat --resume ID`.",
    epilog="Examples:  sinkchat chats list -q paris   |   sinkchat chats export 3 -f json -o chat3.json",
)

ID_HELP = "Chat number from `sinkchat chats list` [default: the most recent chat]."
MAX_ID = 2**63 - 1  # SQLite's largest integer: a larger number is a usage error, not an overflow
DATA_DIR = typer.Option(None, "--data-dir", help="Where chats are saved [default: $SINKCHAT_DATA_DIR or the XDG "
                        "data dir].")


def _store(ctx: typer.Context, data_dir: str | None):
    """The store in ``--data-dir`` (given here or before the subcommand: ``sinkchat --data-dir D chats list``).
    No command here makes a data dir or a ``chats.db``: where there is none, :class:`NoChats` says so."""
    from ..store import Store

    return Store(data_dir or (ctx.find_root().obj or {}).get("data_dir"), create=False)


def _notices(notices) -> None:
    from .main import note

    for notice in notices:
        note(notice)


@app.command("list")
def list_chats(
    ctx: typer.Context,
    query: str = typer.Option(None, "--search", "-q", help="Only chats whose title or messages contain this."),
    data_dir: str = DATA_DIR,
) -> None:
    """List saved chats, most recent first."""
    from rich.table import Table

    from ..store import NoChats
    from ..text import clean
    from .output import console

    try:
        rows = _store(ctx, data_dir).list(query)
    except NoChats as exc:
        print(exc)
        return
    if not rows:
        print("no saved chats" + (f" matching {clean(query, one_line=True)!r}" if query else ""))
        return
    table = Table(box=None)
    for column in ("id", "title", "updated", "model", "messages", "tokens"):
        # a narrow terminal wraps the title and the model (an id folds onto more lines); nothing is cut
        table.add_column(column, no_wrap=column not in ("title", "model"), overflow="fold")
    for c in rows:
        when = datetime.fromtimestamp(c.updated).strftime("%Y-%m-%d %H:%M")
        cells = (str(c.id), c.title, when, c.model, str(c.n_messages), str(c.n_tokens))
        table.add_row(*(clean(cell, one_line=True) for cell in cells))
    console().print(table)


@app.command("show")
def show(
    ctx: typer.Context,
    chat_id: int = typer.Argument(None, metavar="[ID]", help=ID_HELP, min=1, max=MAX_ID),
    data_dir: str = DATA_DIR,
) -> None:
    """Print a chat's transcript (Markdown), with what the model has evicted marked."""
    from ..export import to_markdown

    store = _store(ctx, data_dir)
    t = store.transcript(store.resolve(chat_id))
    _notices(t.notices)
    sys.stdout.write(to_markdown(t))


@app.command("export")
def export(
    ctx: typer.Context,
    chat_id: int = typer.Argument(None, metavar="[ID]", help=ID_HELP, min=1, max=MAX_ID),
    fmt: str = typer.Option("md", "--format", "-f", help="md | json"),
    output: Path = typer.Option(None, "--output", "-o", help="File to write, - for stdout [default: stdout]."),
    force: bool = typer.Option(False, "--force", help="Overwrite --output if it exists."),
    data_dir: str = DATA_DIR,
) -> None:
    """Export a chat as Markdown or JSON; evicted spans are marked, nothing is left out."""
    from ..export import to_json, to_markdown
    from ..files import reason, write_atomic

    if fmt not in ("md", "json"):
        raise SinkchatError(f"--format must be md or json (got {fmt!r})")
    store = _store(ctx, data_dir)
    t = store.transcript(store.resolve(chat_id))
    _notices(t.notices)
    text = to_json(t) + "\n" if fmt == "json" else to_markdown(t)
    if output is None or str(output) == "-":
        sys.stdout.write(text)
        return
    try:
        write_atomic(output, text.encode("utf-8"), overwrite=force)
    except FileExistsError:
        raise SinkchatError(f"{output} exists; pass --force to overwrite it") from None
    except OSError as exc:
        raise SinkchatError(f"cannot write {output}: {reason(exc)}") from None
    print(f"wrote chat {t.id} to {output}", file=sys.stderr)


@app.command("rename")
def rename(
    ctx: typer.Context,
    chat_id: int = typer.Argument(..., metavar="ID", min=1, max=MAX_ID),
    title: str = typer.Argument(..., help="New title."),
    data_dir: str = DATA_DIR,
) -> None:
    """Give a chat a new title."""
    _store(ctx, data_dir).rename(chat_id, title)


@app.command("delete")
def delete(
    ctx: typer.Context,
    chat_id: int = typer.Argument(..., metavar="ID", min=1, max=MAX_ID),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask."),
    data_dir: str = DATA_DIR,
) -> None:
    """Delete a chat and its saved cache for good (refused while it is open elsewhere)."""
    store = _store(ctx, data_dir)
    store.resolve(chat_id)
    if not yes:
        if not sys.stdin.isatty():
            raise SinkchatError(f"deleting chat {chat_id} needs --yes when not on a terminal")
        if not typer.confirm(f"delete chat {chat_id} for good?"):
            raise typer.Exit(1)
    store.delete(chat_id)
    print(f"deleted chat {chat_id}", file=sys.stderr)
