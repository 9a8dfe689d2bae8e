"""The ``sinkchat`` command: flags, validation, subcommands; starts the TUI or the plain chat.

Every user mistake becomes one line ``sinkchat: error: ...`` and exit code 2, never a traceback.
"""

from __future__ import annotations

import os
import sys

import typer

from . import __version__, bench_cli, config, models
from .errors import SinkchatError

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

DEFAULTS = {
    "model": models.DEFAULT_MODEL,
    "sinks": 4,
    "window": 2000,
    "quant": "4bit",
    "device": "auto",
    "dtype": "auto",
    "temperature": 0.7,
    "top_p": 0.9,
    "top_k": 50,
    "repetition_penalty": 1.1,
    "max_new_tokens": 512,
    "theme": "sinkchat-dark",
}


def settings(saved: dict | None = None, **flags) -> dict:
    """Flags given on the command line, over a resumed chat's settings, over the config file, over the defaults."""
    merged = {**DEFAULTS, **config.load_config(), **(saved or {})}
    merged.update({k: v for k, v in flags.items() if v is not None})
    validate(merged)
    return merged


def validate(s: dict) -> None:
    """Range checks that need no model, so bad flags fail before anything loads."""
    checks = [
        (s["sinks"] >= 0, f"--sinks must be 0 or more (got {s['sinks']})"),
        (s["window"] >= 1, f"--window must be 1 or more (got {s['window']})"),
        (s["temperature"] >= 0, f"--temperature must be 0 or more (got {s['temperature']})"),
        (0 < s["top_p"] <= 1, f"--top-p must be in (0, 1] (got {s['top_p']})"),
        (s["top_k"] >= 0, f"--top-k must be 0 (off) or more (got {s['top_k']})"),
        (s["repetition_penalty"] > 0, f"--repetition-penalty must be above 0 (got {s['repetition_penalty']})"),
        (s["max_new_tokens"] >= 1, f"--max-new-tokens must be 1 or more (got {s['max_new_tokens']})"),
        (s.get("block") is None or s["block"] >= 1, f"--block must be 1 or more (got {s.get('block')})"),
        (s["quant"] in models.QUANTS, f"--quant must be one of {', '.join(models.QUANTS)} (got {s['quant']!r})"),
        (s["device"] in models.DEVICES, f"--device must be one of {', '.join(models.DEVICES)} (got {s['device']!r})"),
        (s["dtype"] in models.DTYPES, f"--dtype must be one of {', '.join(models.DTYPES)} (got {s['dtype']!r})"),
    ]
    for ok, message in checks:
        if not ok:
            raise SinkchatError(message)


def load_model(s: dict, progress=lambda msg: None) -> models.LoadedModel:
    return models.load(
        s["model"], s["quant"], s["device"], s["dtype"], progress=progress, context=s["sinks"] + s["window"]
    )


def chat_settings(s: dict):
    from .engine import ChatSettings
    from .sampling import SamplingParams

    return ChatSettings(
        sinks=s["sinks"],
        window=s["window"],
        block=s.get("block"),
        max_new_tokens=s["max_new_tokens"],
        system=s.get("system"),
        keep_system=bool(s.get("keep_system")),
        sampling=SamplingParams(s["temperature"], s["top_p"], s["top_k"], s["repetition_penalty"], s.get("seed")),
    )


@app.callback(invoke_without_command=True)
def main(
    ctx: typer.Context,
    model: str = typer.Option(None, "--model", "-m", help="Alias (see `sinkchat models`), HF id, folder or .gguf."),
    sinks: int = typer.Option(None, help="Attention-sink tokens kept forever [default: 4; 0 = plain window]."),
    window: int = typer.Option(None, "--window", "-w", help="Most recent tokens kept [default: 2000]."),
    block: int = typer.Option(None, help="Tokens evicted at once when the window is full [default: window/16, max 256]."),
    keep_system: bool = typer.Option(None, "--keep-system/--no-keep-system", help="Keep the whole system prompt as sinks."),
    system: str = typer.Option(None, "--system", "-s", help="System prompt."),
    quant: str = typer.Option(None, help="4bit (NF4) | 8bit | none [default: 4bit]."),
    device: str = typer.Option(None, help="auto | cuda | cpu [default: auto]."),
    dtype: str = typer.Option(None, help="Compute dtype: auto | float32 | bfloat16 | float16."),
    temperature: float = typer.Option(None, "--temperature", "-t", help="0 = greedy [default: 0.7]."),
    top_p: float = typer.Option(None, help="Nucleus sampling mass [default: 0.9]."),
    top_k: int = typer.Option(None, help="Sample from the k most likely tokens; 0 = off [default: 50]."),
    repetition_penalty: float = typer.Option(None, help="1 = off [default: 1.1]."),
    seed: int = typer.Option(None, help="Random seed, for replies that can be replayed."),
    max_new_tokens: int = typer.Option(None, help="Longest reply in tokens [default: 512]."),
    plain: bool = typer.Option(False, "--plain", help="Line-oriented chat on stdin/stdout instead of the TUI."),
    theme: str = typer.Option(None, help="TUI theme (see themes/)."),
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
    data_dir: str = typer.Option(None, "--data-dir", help="Where chats are saved [default: the XDG data dir]."),
    resume: str = typer.Option(
        None, "--resume", metavar="[ID]",
        help="Continue the last chat, or chat ID (see `sinkchat chats list`), with its saved settings.",
    ),
) -> None:
    """Chat with a local model whose memory stays flat however long the chat runs."""
    if version:
        print(f"sinkchat {__version__}")
        return
    if data_dir:
        os.environ["SINKCHAT_DATA_DIR"] = data_dir  # one place for the chats/TUI code to find it
    if ctx.invoked_subcommand is not None:
        return
    store, chat_id, saved = _resume(resume)
    s = settings(
        saved,
        model=model, sinks=sinks, window=window, block=block, keep_system=keep_system, system=system,
        quant=quant, device=device, dtype=dtype, temperature=temperature, top_p=top_p, top_k=top_k,
        repetition_penalty=repetition_penalty, seed=seed, max_new_tokens=max_new_tokens, theme=theme,
    )
    if plain:
        _run_plain(s, store, chat_id)
    else:
        _run_tui({**s, "resume_id": chat_id}, store)


def _resume(resume: str | None):
    """The store, the chat to resume (locked before the model loads) and its saved settings."""
    from .store import Store

    store = Store()
    if resume is None:
        return store, None, None
    if resume != "last" and not resume.isdigit():
        raise SinkchatError(f"--resume takes a chat number (see `sinkchat chats list`), got {resume!r}")
    chat_id = store.resolve(None if resume == "last" else int(resume))
    store.lock(chat_id)
    return store, chat_id, store.settings(chat_id)


def _run_plain(s: dict, store, chat_id: int | None) -> None:
    from . import plain
    from .engine import Chat
    from .store import Autosave

    interactive = sys.stdin.isatty()
    note = (lambda msg: print(msg, file=sys.stderr)) if interactive else (lambda msg: None)
    loaded = load_model(s, progress=note)
    if chat_id is None:
        chat = Chat(loaded, chat_settings(s))
    else:
        chat, notices = store.open(chat_id, loaded, chat_settings(s))
        for notice in notices:
            print(f"sinkchat: {notice}", file=sys.stderr)
    save = Autosave(store, chat, s, chat_id, lambda msg: print(f"sinkchat: {msg}", file=sys.stderr))
    try:
        plain.run(chat, after_turn=save)
    finally:
        save(chat)
        store.close()


def _run_tui(s: dict, store) -> None:
    """The app takes over ``store``, which already holds the resumed chat's lock, so no other
    process can open the chat between the check here and the TUI showing it."""
    try:
        from .tui.app import run as run_tui
    except ImportError:
        store.close()
        raise SinkchatError("the TUI is not available in this build; use --plain") from None
    run_tui(s, store)


@app.command("models")
def list_models() -> None:
    """List model aliases and whether each can load on this machine without a download."""
    from rich.console import Console
    from rich.table import Table

    table = Table("alias", "source", "model", "here", box=None)
    for alias, where, desc, ok in models.available():
        table.add_row(alias, where, desc, "yes" if ok else "download")
    Console().print(table)


from .chats_cli import chats_app  # noqa: E402

app.add_typer(chats_app, name="chats")
app.add_typer(bench_cli.app, name="bench")


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


def run() -> None:
    """Console-script entry point: one-line errors, exit 2 for bad input, 130 for Ctrl+C."""
    try:
        app(args=_optional_resume(sys.argv[1:]), standalone_mode=False)
    except SinkchatError as exc:
        print(f"sinkchat: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.TyperException as exc:  # usage errors: unknown option, a value of the wrong type
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        print(f"sinkchat: error: {message}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 2))
    except (typer.Abort, KeyboardInterrupt):
        sys.exit(130)
