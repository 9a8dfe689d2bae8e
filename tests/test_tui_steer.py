"""Steering the model's memory in the TUI, driven by Pilot on the real bundled model: select and pin
a message, regenerate the last reply, edit the last message; the gauge's pinned segment."""

from __future__ import annotations

import pytest

from _helpers import SIZE, send, wait_for
from _helpers import tui_settings as make_settings
from sinkchat.store import Store
from sinkchat.tui.app import SinkchatApp
from sinkchat.tui.chat_input import ChatInput
from sinkchat.tui.gauge import CacheGauge
from sinkchat.tui.header import ChatHeader
from sinkchat.tui.transcript import Transcript

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


def label(app, index: int) -> str:
    return str(app.query_one(Transcript).view_of(index).query_one(".role").render())


async def select_and_pin(pilot, index: int) -> None:
    """Alt+Up from the newest message to ``index``, then Ctrl+L."""
    app = pilot.app
    await pilot.press("alt+up")
    while app.query_one(Transcript).selected != index:
        await pilot.press("alt+up")
    await pilot.press("ctrl+l")
    await pilot.pause()


async def test_a_pinned_message_is_marked_kept_and_saved(smollm):
    app = SinkchatApp(make_settings(pin_max=32, max_new_tokens=20), loaded=smollm)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "My name is Ada. What is the capital of France?")
        await pilot.press("ctrl+l")  # nothing selected yet: one line, nothing pinned
        await pilot.pause()
        assert app.chat.cache.pins == []
        await select_and_pin(pilot, 1)
        chat = app.chat
        assert chat.pinned_messages() == [1], [n.message for n in app._notifications]
        assert "▒ pinned" in label(app, 1) and app.query_one(Transcript).view_of(1).has_class("-pinned")
        gauge = app.query_one(CacheGauge)
        pinned = chat.messages[1].end - chat.messages[1].start
        assert f"pinned {pinned}" in gauge.summary()
        for question in ("Name three museums in Paris.", "And a famous bridge?"):
            await send(pilot, question)
        assert chat.occupancy().evicted > 0 and chat.occupancy().pinned == pinned
        assert "forgotten" not in label(app, 1) and "▒ pinned" in label(app, 1)
        assert app.query_one(Transcript).view_of(3).has_class("-forgotten")  # what was not pinned went
        saved = Store().transcript(app.chat_id)
        assert saved.meta["pins"] == [[chat.messages[1].start, chat.messages[1].end]]
        await pilot.press("alt+down", "alt+down")  # back down: #4, #5; then up to #2 and unpin it
        await select_and_pin(pilot, 1)
        assert chat.cache.pins == [] and "pinned" not in label(app, 1)


async def test_regenerate_repeats_the_greedy_reply_and_edit_replaces_the_turn(smollm):
    app = SinkchatApp(make_settings(max_new_tokens=30), loaded=smollm)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "What is the capital of France?")
        await send(pilot, "Name a famous museum there.")
        chat = app.chat
        first = chat.messages[-1].content
        assert chat.occupancy().evicted > 0
        turns = len(chat.messages)
        await pilot.press("f5")
        await wait_for(pilot, lambda: not app.chat_screen.generating and len(chat.messages) == turns)
        await app.store.idle()
        assert chat.messages[-1].content == first  # greedy: token for token the same reply
        assert [v.content for v in app.query_one(Transcript).views][-2:] == [chat.messages[-2].content, first]

        await pilot.press("f2")
        box = app.query_one(ChatInput)
        assert box.text == "Name a famous museum there." and "editing #4" in box.border_title
        box.clear()
        box.insert("Name a famous bridge there.")
        await pilot.press("enter")
        await wait_for(pilot, lambda: not app.chat_screen.generating and len(chat.messages) == turns)
        await app.store.idle()
        views = app.query_one(Transcript).views
        assert [v.content for v in views][-2:] == ["Name a famous bridge there.", chat.messages[-1].content]
        saved = Store().transcript(app.chat_id)
        assert [m.content for m in saved.messages] == [m.content for m in chat.messages]
        assert saved.tokens == chat.tokens


def test_gauge_snapshot_with_a_pinned_segment(smollm, snap_compare):
    async def pin(pilot):
        pilot.app.query_one(ChatInput).cursor_blink = False
        await send(pilot, "My name is Ada. What is the capital of France?")
        await select_and_pin(pilot, 1)
        await send(pilot, "And of Italy?")
        pilot.app.query_one(ChatHeader).tokens_per_s = None  # speed varies run to run
        pilot.app.clear_notifications()
        await pilot.pause()

    # The bf16 KV cache --kv-dtype auto picks on a CPU with AVX512-BF16, on any CPU. With a float32 cache
    # the second reply reads "indeed the cradle of civilization": at its 15th token float32's top two
    # logits were 0.047 apart, and the bf16 cache (logits within 9.4e-3 of the largest) tied them.
    settings = make_settings(pin_max=32, max_new_tokens=20, kv_dtype="bfloat16")
    assert snap_compare(SinkchatApp(settings, loaded=smollm), terminal_size=SIZE, run_before=pin)


async def test_ctrl_l_on_a_typed_message_sends_it_pinned(smollm):
    """With no message selected, Ctrl+L marks the message being typed; sent, it is pinned as soon as
    it is read, so its own long reply cannot evict it. One over the pin budget stays in the box."""
    app = SinkchatApp(make_settings(pin_max=32, max_new_tokens=60), loaded=smollm)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.chat is not None)
        box = app.query_one(ChatInput)
        box.insert("word " * 40)
        await pilot.press("ctrl+l")
        assert "sent pinned" in box.border_title
        await pilot.press("enter")  # over the budget: refused, kept in the box, still marked
        await pilot.pause()
        assert box.text.strip() == ("word " * 40).strip() and "sent pinned" in box.border_title
        assert not app.chat.messages
        box.clear()  # emptied: the mark goes with the text
        await pilot.pause()
        assert "sent pinned" not in box.border_title
        box.insert("The code word is marmalade. Tell me a long story about a cat.")
        await pilot.press("ctrl+l", "enter")
        chat = app.chat
        await wait_for(pilot, lambda: len(chat.messages) == 3 and not app.chat_screen.generating)
        assert "sent pinned" not in box.border_title
        assert chat.pinned_messages() == [1] and chat.cache.evictions  # the reply evicted, not the message
        assert "▒ pinned" in label(app, 1) and "forgotten" not in label(app, 1)


async def enter(pilot, text: str, ends_turn: bool = True) -> None:
    """``text`` typed in the box and Enter; ``ends_turn``: wait for the turn (or pin) it makes to end."""
    app = pilot.app
    ended = app.turns_ended
    app.query_one(ChatInput).insert(text)
    await pilot.press("enter")
    await pilot.pause()
    if ends_turn:
        await wait_for(pilot, lambda: app.turns_ended > ended and not app.chat_screen.generating)


def told(app) -> str:
    return app._notifications and list(app._notifications)[-1].message


async def test_plain_mode_commands_in_the_box_steer_the_chat_and_are_never_sent(smollm):
    from sinkchat.tui.help import HelpScreen

    app = SinkchatApp(make_settings(pin_max=32, max_new_tokens=4), loaded=smollm, save=False)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "Hi.")
        chat, box = app.chat, app.query_one(ChatInput)
        users = lambda: [m.content for m in chat.messages if m.role == "user"]  # noqa: E731
        await enter(pilot, "/pin 2")
        assert chat.pinned_messages() == [1] and box.text == "" and users() == ["Hi."]
        await enter(pilot, "/pins", ends_turn=False)
        assert told(app).startswith("pinned: #2 you")
        await enter(pilot, "/unpin #2")
        assert chat.pinned_messages() == []
        await enter(pilot, "/frobnicate", ends_turn=False)  # a typo: one line, kept in the box, not sent
        assert told(app).startswith("unknown command /frobnicate; commands: /pin N")
        assert box.text == "/frobnicate" and users() == ["Hi."]
        box.clear()
        await enter(pilot, "/pin", ends_turn=False)
        assert "takes a message number" in told(app) and box.text == "/pin"
        box.clear()
        await enter(pilot, "/retry")
        assert users() == ["Hi."] and len(chat.messages) == 3 and "stopped" not in told(app)
        await enter(pilot, "/edit Hello.")
        assert users() == ["Hello."] and len(chat.messages) == 3
        await enter(pilot, "//help me")  # one slash dropped, sent as it is
        await enter(pilot, "/usr/bin is a folder")  # a slash not followed by a word alone: a message
        await enter(pilot, "/keep My name is Ada.")
        assert users() == ["Hello.", "/help me", "/usr/bin is a folder", "My name is Ada."]
        assert chat.pinned_messages() == [len(chat.messages) - 2]
        await enter(pilot, "/help", ends_turn=False)
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        await pilot.pause()
        await enter(pilot, "/quit", ends_turn=False)
        await wait_for(pilot, lambda: app._exit, 10)  # as ctrl+q: the app exits
    assert app.return_code == 0 and len(users()) == 4


async def test_a_command_that_cannot_run_during_a_reply_stays_in_the_box(smollm):
    import threading

    app = SinkchatApp(make_settings(max_new_tokens=4), loaded=smollm, save=False)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "Hi.")
        chat, box, held = app.chat, app.query_one(ChatInput), threading.Event()
        sample = chat.sampler
        chat.sampler = lambda *args: (held.wait(60), sample(*args))[1]
        box.insert("Tell me more.")
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.chat_screen.generating)
        await enter(pilot, "/retry", ends_turn=False)
        assert box.text == "/retry" and "wait for the reply" in told(app)
        held.set()
        await wait_for(pilot, lambda: not app.chat_screen.generating)
        assert [m.content for m in chat.messages if m.role == "user"] == ["Hi.", "Tell me more."]
