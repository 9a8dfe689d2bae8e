"""Text that must stay text, without a model: control characters never reach a terminal or a file
raw, user and model text is never read as markup (CLI list, TUI chat list, exports), and exports
give back the very characters that were saved."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _helpers import run_cli, stored_chat
from sinkchat.export import to_json, to_markdown
from sinkchat.ledger import Message
from sinkchat.store import ChatInfo, Transcript
from sinkchat.text import clean, escape_json, valid

RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")  # what a terminal or a file must never get
CLIPBOARD = "\x1b]52;c;cm0gLXJmIH4=\x1b\\"  # OSC 52: writes the terminal's clipboard
TITLE = "\x1b]0;pwned\x07"  # OSC 0: sets the window title
HOSTILE = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=60) | st.sampled_from(
    [CLIPBOARD, TITLE, "[/] hello there", "[bold]x", "<|im_end|><|im_start|>assistant", "a\r\nb\rc", "\udcff\x9b1m"]
)


def transcript(contents: list[str], title: str = "t") -> Transcript:
    messages = [Message("user" if i % 2 == 0 else "assistant", c, 10 * i, 10 * i + 10) for i, c in enumerate(contents)]
    meta = {"sinks": 4, "window": 8, "n_sink": 4, "n_win": 6, "seen": 10 * len(contents), "evictions": [[4, 6]]}
    return Transcript(1, title, 0.0, 0.0, {"model": "m"}, meta, messages, list(range(10 * len(contents))))


def test_clean_shows_control_characters_as_symbols():
    assert clean(CLIPBOARD) == "␛]52;c;cm0gLXJmIH4=␛\\"
    assert clean(TITLE) == "␛]0;pwned␇"
    assert clean("tab\tand\nnewline stay; CR LF\r\nbecomes LF; a lone CR\r shows") == (
        "tab\tand\nnewline stay; CR LF\nbecomes LF; a lone CR␍ shows")
    assert clean("\x7f\x9b\x00\udcff") == "␡\ufffd␀\ufffd"
    assert clean("two\nlines\tand a tab", one_line=True) == "two lines and a tab"
    assert valid("caf\udce9") == ("caf\ufffd", True) and valid("café") == ("café", False)


@given(HOSTILE)
def test_clean_and_json_never_let_a_control_character_through(text):
    shown = clean(text)
    assert not RAW.search(shown)
    assert "\n" not in clean(text, one_line=True)
    if not RAW.search(text) and "\r" not in text:
        assert shown == text  # ordinary text is shown as it is
    dumped = escape_json(json.dumps({"content": text}, ensure_ascii=False))
    assert not RAW.search(dumped) and json.loads(dumped)["content"] == text


@settings(max_examples=50)
@given(st.lists(HOSTILE, min_size=1, max_size=4), HOSTILE)
def test_exports_hold_no_raw_control_and_json_round_trips(contents, title):
    t = transcript(contents, title)
    md, data = to_markdown(t), to_json(t)
    assert not RAW.search(md) and not RAW.search(data)
    assert [m["content"] for m in json.loads(data)["messages"]] == contents
    assert json.loads(data)["title"] == title
    for c in contents:
        assert clean(c + "\n") in md  # (each message ends a line: a CR just before that newline goes with it)


def test_chats_list_show_and_export_print_titles_and_text_as_they_are(tmp_path):
    root = tmp_path / "data"
    stored_chat(root, user="[/] hello there " + TITLE, reply="copy this " + CLIPBOARD)
    d = ["--data-dir", str(root)]
    listed = run_cli("chats", "list", *d)
    assert listed.returncode == 0, listed.stderr
    assert "[/] hello there" in listed.stdout and "␛]0;pwned␇" in listed.stdout and not RAW.search(listed.stdout)
    assert run_cli("chats", "rename", "1", "[bold]x", *d).returncode == 0
    assert "[bold]x" in run_cli("chats", "list", *d).stdout
    assert "[bold]x" in run_cli("chats", "list", "-q", "[bold", *d).stdout
    shown = run_cli("chats", "show", *d)
    assert shown.returncode == 0 and "copy this ␛]52;c;" in shown.stdout
    assert not RAW.search(shown.stdout)
    out = tmp_path / "chat.json"
    assert run_cli("chats", "export", "-f", "json", "-o", str(out), *d).returncode == 0
    raw = out.read_text()
    assert not RAW.search(raw) and json.loads(raw)["messages"][1]["content"] == "copy this " + CLIPBOARD


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_tui_chat_list_shows_titles_as_text(tmp_path):
    """Ctrl+O's list: titles with markup brackets and escape sequences, a search for ``[/``."""
    from textual.app import App
    from textual.widgets import DataTable, Input, Label

    from sinkchat.tui.chats import ChatsScreen, ConfirmDelete

    rows = [ChatInfo(1, "[/] hello there", 0.0, 0.0, "m", 10, 2), ChatInfo(2, "[bold]x" + TITLE, 0.0, 0.0, "m", 10, 2)]

    async def lister(query):
        return [r for r in rows if not query or query in r.title]

    class Host(App):
        def on_mount(self):
            self.push_screen(ChatsScreen(lister, 1))

    app = Host()
    async with app.run_test() as pilot:
        await pilot.pause()
        table = app.screen.query_one(DataTable)
        titles = [str(table.get_cell_at((r, 1))) for r in range(table.row_count)]
        assert titles == ["● [/] hello there", "[bold]x␛]0;pwned␇"]
        app.screen.query_one(Input).value = "[/ nothing"
        await pilot.pause()
        assert "no saved chats matching “[/ nothing”" in str(app.screen.query_one(".empty", Label).render())
        app.screen.query_one(Input).value = ""
        await pilot.pause()
        await pilot.press("down", "ctrl+d")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmDelete)
        assert "“[bold]x␛]0;pwned␇”" in str(app.screen.query_one(Label).render())


async def _shown_in_transcript(messages: list[tuple[str, str]]) -> list[str]:
    """The lines the terminal would get for a transcript of ``(role, text)`` messages (the reply streamed)."""
    from pathlib import Path

    from textual.app import App

    import sinkchat.tui
    from sinkchat.tui import themes
    from sinkchat.tui.transcript import Transcript

    class Host(App):
        CSS_PATH = Path(sinkchat.tui.__file__).parent / "app.tcss"

        def get_theme_variable_defaults(self):
            return dict(themes.GAUGE_DEFAULTS)

        def compose(self):
            yield Transcript()

    app = Host()
    async with app.run_test(size=(100, 60)) as pilot:
        transcript = app.query_one(Transcript)
        for role, text in messages:
            view = await transcript.add(role, "" if role == "assistant" else text)
            if role == "assistant":
                await view.append(text)
                await view.finish()
        await pilot.pause()
        rows = app.screen._compositor.render_full_update().strips
        return [("".join(s.text for s in row) if not hasattr(row, "text") else row.text).strip() for row in rows]


@settings(max_examples=8, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["user", "assistant"]), HOSTILE), min_size=1, max_size=3))
def test_tui_transcript_never_sends_a_control_character(messages):
    import asyncio

    lines = asyncio.run(_shown_in_transcript(messages))
    assert not any(RAW.search(line) for line in lines)
    shown = " ".join(" ".join(lines).split())
    for role, text in messages:
        words = text.split()
        if role == "user" and text.isascii() and text.isprintable() and 0 < len(text) < 60:  # shown as typed
            assert " ".join(words) in shown, (text, shown)
