"""What a newcomer does in the first minutes, driven by Pilot: typing while the model loads, text
and Enter in one burst, a message longer than the window, focus after the chat list, scrolling,
and the footer at 80x24."""

from __future__ import annotations

import pytest
from textual import events
from textual.widgets import Footer

from _helpers import SIZE, send, tui_settings, wait_for
from sinkchat.store import Unanswered
from sinkchat.tui.app import SinkchatApp
from sinkchat.tui.chat_input import ChatInput
from sinkchat.tui.chats import ChatsScreen
from sinkchat.tui.transcript import Transcript

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


def burst(app, text: str, then: str = "enter") -> None:
    """Keys arriving faster than the app handles them, as from tmux send-keys or a paste without
    bracketed paste: every event is queued before the first is processed."""
    for ch in text:
        app.post_message(events.Key(ch if ch != " " else "space", ch))
    app.post_message(events.Key(then, "\r"))


@pytest.mark.model
async def test_a_message_typed_while_the_model_loads_is_queued_then_sent():
    app = SinkchatApp(tui_settings(max_new_tokens=8), save=False)  # loads the bundled model itself
    async with app.run_test(size=SIZE) as pilot:
        box = app.query_one(ChatInput)
        assert app.focused is box and not box.disabled  # typing starts at once
        burst(app, "//Hello there")  # a leading slash, doubled: text, not a command
        await wait_for(pilot, lambda: app.chat_screen.queued is not None, 10)
        assert app.chat_screen.queued == ("/Hello there", Unanswered("//Hello there"))  # kept as typed
        queued = app.query_one(Transcript).views[-1]
        assert (queued.content, queued.note) == ("/Hello there", "queued") and box.text == ""
        await wait_for(pilot, lambda: app.chat is not None, 120)
        await wait_for(pilot, lambda: len(app.chat.messages) >= 3 and not app.chat_screen.generating, 60)
        assert [m.content for m in app.chat.messages if m.role == "user"] == ["/Hello there"]
        assert app.chat.messages[-1].role == "assistant" and app.chat.messages[-1].content


async def test_text_and_enter_in_one_burst_send_the_whole_message(smollm):
    app = SinkchatApp(tui_settings(max_new_tokens=4), loaded=smollm, save=False)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.chat is not None)
        for text in ("Tell me about the Eiffel Tower please", "And the Louvre?"):
            burst(app, text)
            await wait_for(pilot, lambda: app.chat_screen.generating or app.query_one(ChatInput).text == text, 10)
            await wait_for(pilot, lambda: not app.chat_screen.generating, 60)
        assert [m.content for m in app.chat.messages if m.role == "user"] == [
            "Tell me about the Eiffel Tower please", "And the Louvre?"]
        assert app.query_one(ChatInput).text == ""


async def test_a_message_longer_than_the_window_is_counted_and_asked_about_once(smollm):
    app = SinkchatApp(tui_settings(max_new_tokens=4), loaded=smollm, save=False)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.chat is not None)
        box = app.query_one(ChatInput)
        box.insert("Hi")
        await pilot.pause()
        assert box.border_subtitle.endswith("of 64 tokens") and not box.has_class("-over")
        long = "Summarise this. " + "The quick brown fox jumps over the lazy dog. " * 20
        box.clear()
        box.insert(long)
        await pilot.pause()
        assert "more than the 64-token window" in box.border_subtitle and box.has_class("-over")
        await pilot.press("enter")  # warned, not sent
        await pilot.pause()
        assert not app.chat.messages and box.text == long
        assert any("Press Enter again" in n.message for n in app._notifications)
        await pilot.press("enter")  # sent
        await wait_for(pilot, lambda: len(app.chat.messages) >= 2 and not app.chat_screen.generating, 60)
        assert any(m.content == long.strip() for m in app.chat.messages)


async def test_the_message_box_has_the_focus_after_opening_a_chat(smollm):
    app = SinkchatApp(tui_settings(max_new_tokens=4), loaded=smollm)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "First chat")
        await pilot.press("ctrl+n")
        await send(pilot, "Second chat")
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: isinstance(app.screen, ChatsScreen) and app.screen.rows, 10)
        await pilot.press("down", "enter")  # the older chat
        await wait_for(pilot, lambda: not isinstance(app.screen, ChatsScreen), 10)
        assert app.focused is app.query_one(ChatInput)
        await pilot.press(*"typed", "ctrl+j")
        assert app.query_one(ChatInput).text == "typed\n"
        await pilot.press("f1")
        await pilot.press("escape")
        await pilot.pause()
        assert app.focused is app.query_one(ChatInput)




async def test_page_keys_scroll_the_transcript_from_the_message_box(smollm):
    app = SinkchatApp(tui_settings(max_new_tokens=30), loaded=smollm, save=False)
    async with app.run_test(size=(80, 24)) as pilot:
        for q in ("What is the capital of France?", "And of Italy?", "And of Spain?"):
            await send(pilot, q)
        t = app.query_one(Transcript)
        assert app.focused is app.query_one(ChatInput) and t.max_scroll_y > 0
        assert t.scroll_y == t.max_scroll_y
        await pilot.press("ctrl+home")
        await pilot.pause()
        assert t.scroll_y == 0
        await pilot.press("pagedown")
        await pilot.pause()
        assert 0 < t.scroll_y
        await pilot.press("ctrl+end")
        await pilot.pause()
        assert t.scroll_y == t.max_scroll_y


async def test_the_essential_keys_fit_the_footer_at_80_columns(smollm):
    app = SinkchatApp(tui_settings(), loaded=smollm, save=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.chat is not None)
        await pilot.pause()
        footer = app.screen.query_one(Footer)
        shown = {key.key: key.region for key in footer.query("FooterKey")}
        for key in ("enter", "ctrl+n", "ctrl+o", "f1", "ctrl+q"):
            assert key in shown and shown[key].right <= 80, (key, shown.get(key))


def keys(app, text: str) -> None:
    """``text`` as keys queued in one burst, a newline as Enter (a paste without bracketed paste)."""
    for ch in text:
        app.post_message(events.Key({" ": "space", "\n": "enter"}.get(ch, ch), "\r" if ch == "\n" else ch))


@pytest.mark.parametrize(("typed", "sent", "left", "refused"), [
    ("Say hi\nFOLLOWUP TEXT", "Say hi", "FOLLOWUP TEXT", False),  # typed on after Enter: never submitted
    # a paste without bracketed paste: the second line is refused while the model answers, back in the box
    ("Line one\nline two\nline three", "Line one", "line two\nline three", True),
])
async def test_text_typed_right_after_enter_stays_in_the_box(smollm, typed, sent, left, refused):
    app = SinkchatApp(tui_settings(max_new_tokens=4), loaded=smollm, save=False)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.chat is not None)
        box = app.query_one(ChatInput)
        keys(app, typed)
        await wait_for(pilot, lambda: len(app.chat.messages) >= 3 and not app.chat_screen.generating, 60)
        await pilot.pause()
        assert [m.content for m in app.chat.messages if m.role == "user"] == [sent]
        assert box.text == left  # as typed
        assert any("stays in the box" in n.message for n in app._notifications) == refused


async def test_a_queued_message_comes_back_before_what_was_typed_since_when_the_load_fails(monkeypatch):
    import threading

    from sinkchat.errors import SinkchatError
    from sinkchat.tui import chat_screen

    release = threading.Event()

    def load_for(settings, progress):  # a load that fails once the test has typed on
        release.wait(30)
        raise SinkchatError("no such model")

    monkeypatch.setattr(chat_screen, "load_for", load_for)
    app = SinkchatApp(tui_settings(), save=False)
    async with app.run_test(size=SIZE) as pilot:
        box = app.query_one(ChatInput)
        keys(app, "First message\nsecond draft")
        await wait_for(pilot, lambda: app.chat_screen.queued is not None and app.chat_screen.queued[0] == "First message" and box.text == "second draft", 10)
        release.set()
        await wait_for(pilot, lambda: app.load_error is not None, 10)
        await pilot.pause()
        assert box.text == "First message\nsecond draft"


async def test_ctrl_j_in_a_burst_of_keys_lands_where_it_was_typed(smollm):
    """Keys arriving in one burst (tmux send-keys, a text expander): Ctrl+J's new line lands between
    the keys around it (through its binding it landed after the whole burst: "ghijkl\\n")."""
    app = SinkchatApp(tui_settings(), loaded=smollm, save=False)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.chat is not None)
        box = app.query_one(ChatInput)
        box.focus()
        for ch in "ghi":
            app.post_message(events.Key(ch, ch))
        app.post_message(events.Key("ctrl+j", "\n"))
        for ch in "jkl":
            app.post_message(events.Key(ch, ch))
        await wait_for(pilot, lambda: len(box.text) == 7)
        assert box.text == "ghi\njkl"
