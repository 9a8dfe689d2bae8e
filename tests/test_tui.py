"""The Textual app driven by Pilot on the real bundled model, with a 64-token window so eviction happens."""

from __future__ import annotations

import gc
import threading

import pytest
from textual.widget import Widget

from _helpers import SIZE, run_cli, send, wait_for
from _helpers import tui_settings as make_settings
from sinkchat import config
from sinkchat.ledger import merge_spans
from sinkchat.settings import Settings
from sinkchat.store import Store
from sinkchat.tui.app import SinkchatApp
from sinkchat.tui.chat_input import ChatInput
from sinkchat.tui.chat_screen import ChatScreen
from sinkchat.tui.gauge import CacheGauge
from sinkchat.tui.header import ChatHeader
from sinkchat.tui.help import HelpScreen
from sinkchat.tui.transcript import Transcript

pytestmark = pytest.mark.anyio  # async tests run on anyio's pytest plugin (asyncio backend)


@pytest.fixture
def anyio_backend():
    return "asyncio"


def kept(chat, message) -> bool:
    """Whether any token of ``message`` is still in the cache, from the cache's own kept ranges."""
    (s0, s1), (w0, w1) = chat.cache.kept()
    return any(s0 <= t < s1 or w0 <= t < w1 for t in range(message.start, message.end))


async def test_chat_streams_evicts_and_gauge_matches_ledger(smollm):
    app = SinkchatApp(make_settings(), loaded=smollm)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "What is the capital of France?")
        await send(pilot, "Name three famous museums in Paris.")
        chat = app.chat
        views = app.query_one(Transcript).views
        assert [v.role for v in views] == [m.role for m in chat.messages]
        assert [v.content for v in views if v.role != "system"] == [
            m.content for m in chat.messages if m.role != "system"
        ]
        assert "Paris" in views[2].content
        assert app.query_one(ChatHeader).tokens_per_s > 0

        occ = chat.occupancy()
        assert occ.evicted > 0, "a 64-token window must have evicted by now"
        gauge = app.query_one(CacheGauge)
        assert gauge.summary() == (
            f"sinks {occ.sinks} · window {occ.window} of 64 · seen {len(chat.tokens)} · forgotten {occ.evicted}"
        )
        merged = merge_spans(chat.cache.evictions)
        assert [line.split(":")[0] for line in gauge.span_lines()] == [
            f"tokens {a}–{b - 1} ({b - a})" for a, b in merged
        ]
        # messages are named as the transcript labels them: "#2 you" is the first question
        assert "#2 you whole" in gauge.span_lines()[0] or "#2–#" in gauge.span_lines()[0]
        assert [str(v.query_one(".role").render()).split("  ")[0] for v in views] == [
            f"#{i + 1} {role}" for i, role in enumerate(["system", "you", "model", "you", "model"])
        ]

        for view, message in zip(views, chat.messages):
            assert view.has_class("-forgotten") == (not kept(chat, message)), message
        forgotten = [v for v in views if v.has_class("-forgotten")]
        assert forgotten and "forgotten" in str(forgotten[0].query_one(".role").render())


def detached_widgets() -> int:
    """Widgets still alive but no longer on any screen (after a full garbage collection)."""
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, Widget) and not o.is_attached)


async def test_turns_leave_no_removed_widget_alive(smollm):
    """Each reply changes the key bindings twice, and the footer rebuilds its keys each time; the
    removed keys must be freed (Textual kept them bound to the footer: 12 widgets a turn, for ever)."""
    app = SinkchatApp(make_settings(max_new_tokens=4), loaded=smollm, save=False)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "Hi.")
        before = detached_widgets()
        for _ in range(3):
            await send(pilot, "Hi.")
        await pilot.pause()
        assert detached_widgets() <= before


async def test_escape_stops_and_keeps_partial_reply(smollm):
    app = SinkchatApp(make_settings(max_new_tokens=200), loaded=smollm)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.click(ChatInput)
        app.query_one(ChatInput).insert("Write a long story about a dragon who learns to bake bread.")
        await pilot.press("enter")
        chat = app.chat

        def reply_partly_evicted() -> bool:  # the window (64) has moved past the reply's first tokens
            return chat.messages[-1].role == "assistant" and any(
                b > chat.messages[-1].start for _, b in chat.cache.evictions
            )

        # Hold the reply there until Esc was pressed, so a slow or busy machine cannot let it run to its end
        # first: the decode thread waits in the sampler; the key, the gauge and the stop are the real ones.
        held, sample = threading.Event(), chat.sampler
        chat.sampler = lambda *args: (held.wait(60) if reply_partly_evicted() else None, sample(*args))[1]
        await wait_for(pilot, reply_partly_evicted)
        await pilot.pause(0.3)  # let a gauge update reach the screen mid-reply
        box = app.query_one(ChatInput)
        box.insert("And then?")
        await pilot.press("enter")  # refused while the model answers: the words stay in the box
        assert box.text == "And then?" and len(chat.messages) == 3
        box.clear()
        ended = app.turns_ended
        await pilot.press("escape")
        held.set()
        await wait_for(pilot, lambda: not app.chat_screen.generating, 10)
        reply = app.chat.messages[-1]
        view = app.query_one(Transcript).views[-1]
        assert reply.content and view.content == reply.content
        assert reply.end - reply.start < 200
        label = str(view.query_one(".role").render())
        assert "[stopped]" in label and view.has_class("-partly")
        words, paragraph = chat.kept_from(reply, max(b for _, b in chat.cache.evictions))
        assert words and words.split()[0] in reply.content  # the reply's own words, never template text
        assert f"kept from “{words}…”" in label, label
        await wait_for(pilot, lambda: app.turns_ended > ended)  # the turn's end reached the app: its save queued
        await app.store.idle()  # the stopped reply was saved, with its note
        saved = Store().transcript(app.chat_id).messages[-1]
        assert (saved.content, saved.note) == (reply.content, "stopped")
        await pilot.press("ctrl+r")  # copy the last reply, with the message box focused
        assert app.clipboard == reply.content


async def test_a_new_chat_shows_nothing_of_the_chat_before(smollm):
    """Ctrl+N after a chat whose system prompt was partly evicted: the new chat's system message has
    no ✂ mark, and the selection of the old chat's message is gone (Ctrl+L would pin the new chat's)."""
    app = SinkchatApp(make_settings(), loaded=smollm, save=False)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "What is the capital of France?")
        await send(pilot, "Name three famous museums in Paris.")
        transcript = app.query_one(Transcript)
        assert "✂" in str(transcript.views[0].query_one(".role").render())  # the system prompt is partly gone
        await pilot.press("alt+up")
        assert transcript.selected is not None
        old = app.chat
        await pilot.press("ctrl+n")
        await wait_for(pilot, lambda: app.chat is not old and transcript.views)
        [system] = transcript.views
        assert str(system.query_one(".role").render()) == "#1 system" and not system.has_class("-partly")
        assert transcript.selected is None
        await pilot.press("ctrl+l")
        assert not app.chat.cache.pins


async def test_escape_while_a_long_paste_is_read_says_what_was_read(smollm):
    """Esc stops a paste between prefill chunks: its label says how many of its tokens the model read,
    and the gauge never says the model sees the whole chat (it says what it did not read)."""
    import pydoc_data.topics

    app = SinkchatApp(make_settings(window=256, max_new_tokens=8), loaded=smollm)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "Hi.")
        paste = pydoc_data.topics.topics["assignment"][:8000]
        box = app.query_one(ChatInput)
        box.insert(paste)
        await pilot.press("enter")  # longer than the window: the screen asks first
        ended = app.turns_ended
        await pilot.press("enter", "escape")
        await wait_for(pilot, lambda: not app.chat_screen.generating)
        chat = app.chat
        user = chat.messages[-2]
        total = len(chat.turns.encode(chat.turns.next(paste.strip())))
        read = user.end - user.start
        assert user.role == "user" and user.note == f"partial:{total}" and read < total
        view = app.query_one(Transcript).views[-2]
        assert f"[stopped: the model read {read} of its {total} tokens]" in str(view.query_one(".role").render())
        gauge = str(app.query_one(CacheGauge).render())
        assert "still sees the whole chat" not in gauge
        assert app.query_one(ChatHeader).tokens_per_s is None  # no reply token: no speed (it said 0.0 tok/s)
        if not chat.cache.evictions:
            assert f"nothing forgotten yet, but the model read only {read} of the {total} tokens of #4 you" in gauge
        await wait_for(pilot, lambda: app.turns_ended > ended)  # the stopped turn's save queued
        await app.store.idle()
        assert Store().transcript(app.chat_id).messages[-2].note == f"partial:{total}"


async def test_theme_switch_restyles_gauge_and_is_remembered(smollm):
    app = SinkchatApp(make_settings(theme="sinkchat-dark"), loaded=smollm)
    async with app.run_test(size=SIZE) as pilot:
        gauge = app.query_one(CacheGauge)
        before = gauge.get_component_rich_style("gauge--window").color
        await pilot.press("ctrl+t")
        await pilot.pause()
        assert app.theme == "sinkchat-light"
        assert gauge.get_component_rich_style("gauge--window").color != before
        assert config.load_config()["theme"] == "sinkchat-light"
    assert Settings.resolve(config=config.load_config())[0].theme == "sinkchat-light"


async def test_help_lists_every_binding(smollm):
    app = SinkchatApp(make_settings(), loaded=smollm)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.chat is not None)
        assert app.focused is app.query_one(ChatInput)
        active = app.screen.active_bindings  # what the footer shows and a key press reaches
        for binding in [*app.BINDINGS, *ChatScreen.BINDINGS]:
            if binding.action != "stop":  # hidden: nothing to stop
                assert active[binding.key].binding.action == binding.action, binding.key
        await pilot.press("f1")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        for binding in [*app.BINDINGS, *ChatScreen.BINDINGS, *ChatInput.BINDINGS]:
            assert binding.description in app.screen.table
        assert "ctrl+p" in app.screen.table and "ctrl+j" in app.screen.table
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, HelpScreen)


async def test_broken_theme_file_is_named_and_app_starts(smollm):
    folder = config.config_dir() / "themes"
    folder.mkdir(parents=True)
    (folder / "broken.toml").write_text('name = "broken"\nprimary = "not-a-colour"\n')
    (folder / "mine.toml").write_text('name = "mine"\nprimary = "#ff8800"\n')
    app = SinkchatApp(make_settings(theme="mine"), loaded=smollm)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        notes = [n.message for n in app._notifications]
        assert any(str(folder / "broken.toml") in n and "primary" in n for n in notes), notes
        assert app.theme == "mine"  # a user theme from the config dir
        await send(pilot, "Hi")
        assert app.chat.messages[-1].content


async def test_model_load_failure_is_a_message_not_a_traceback():
    app = SinkchatApp(make_settings(model="/nonexistent/model-folder"))
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.query_one("#loading").has_class("-failed"), 30)
        text = str(app.query_one("#loading .status").render())
        assert "Could not load the model: no such model folder or file: /nonexistent/model-folder" in text
        assert app.load_error == "no such model folder or file: /nonexistent/model-folder"  # run() exits 1 with it
        await pilot.press(*"hello", "enter")  # nothing to send to, and nothing typed is lost
        await pilot.pause()
        assert app.query_one(ChatInput).text == "hello"


async def test_ctrl_c_says_in_words_how_to_quit():
    """Textual's own notice keeps its markup (the key in bold, not ``[b]ctrl+q[/b]``); sinkchat's
    notices are text (brackets in a title stay brackets)."""
    from textual.widgets._toast import Toast

    app = SinkchatApp(make_settings(model="/nonexistent/model-folder"), save=False)
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await wait_for(pilot, lambda: app.query_one("#loading").has_class("-failed"), 30)
        await pilot.press("ctrl+c")
        app.say("chat [b]1[/b] was renamed")
        await pilot.pause()
        shown = [str(toast.render()) for toast in app.screen.query(Toast)]
        assert any("Press ctrl+q to quit the app" in text for text in shown), shown
        assert any("chat [b]1[/b] was renamed" in text for text in shown), shown


def test_unknown_theme_flag_is_one_line_error():
    result = run_cli("--theme", "no-such-theme")
    assert result.returncode == 2
    assert result.stderr.startswith("sinkchat: error: unknown theme 'no-such-theme'")
    assert "sinkchat-contrast" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("theme", ["sinkchat-dark", "sinkchat-light"])
def test_main_screen_snapshot(smollm, snap_compare, theme):
    async def chat(pilot):
        pilot.app.query_one(ChatInput).cursor_blink = False
        await send(pilot, "What is the capital of France?")
        await send(pilot, "And of Italy?")
        pilot.app.query_one(ChatHeader).tokens_per_s = None  # speed varies run to run; the text does not
        await pilot.pause()

    settings = make_settings(theme=theme, kv_dtype="bfloat16")  # what auto picks with AVX512-BF16, on any CPU
    assert snap_compare(SinkchatApp(settings, loaded=smollm), terminal_size=SIZE, run_before=chat)


async def test_the_gauge_counts_the_set_sinks_from_a_chats_start(smollm, monkeypatch):
    import threading

    from sinkchat.tui import chat_screen

    release = threading.Event()  # the model "loads" until the gauge was read
    monkeypatch.setattr(chat_screen, "load_for", lambda settings, progress: (release.wait(30), smollm)[1])
    app = SinkchatApp(make_settings(sinks=4, max_new_tokens=4), save=False)
    async with app.run_test(size=SIZE) as pilot:
        gauge = app.query_one(CacheGauge)
        await pilot.pause()
        assert app.chat is None and gauge.summary().startswith("sinks 4 · window 0 of 64")
        assert "▓ sinks 4 · █ window 0 of 64" in str(gauge.render())
        release.set()
        await wait_for(pilot, lambda: app.chat is not None)
        assert gauge.summary().startswith("sinks 4 · window 0 of 64")
        await send(pilot, "Hi.")
        assert gauge.summary().startswith("sinks 4 ·") and app.chat.occupancy().sinks == 4
        await pilot.press("ctrl+n")
        await wait_for(pilot, lambda: not app.chat.messages)
        await pilot.pause()
        assert gauge.summary().startswith("sinks 4 · window 0 of 64")
        assert "▓ sinks 4 · █ window 0 of 64" in str(gauge.render())


async def test_load_notices_show_before_the_first_reply(tiny_models, compiling):
    """What the load has to say (here: that the first reply compiles the decode step) is on screen as
    soon as the chat is, not only once the first reply, which it is about, has finished."""
    from sinkchat.model import load

    loaded = load(str(tiny_models["mistral"]), quant="none", device="cpu", compile="on")
    app = SinkchatApp(make_settings(), loaded=loaded, save=False)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.chat is not None)
        await pilot.pause()
        notes = [n.message for n in app._notifications]
        assert any(n.startswith("the first reply compiles the decode step") for n in notes), notes


async def test_the_header_keeps_the_speed_in_view_at_80_columns(smollm):
    """At 80x24 the header's description (model, device, kernels, dtype) does not fit: it is cut short
    with an ellipsis, and the speed, the part that changes, stays at the end of the line (it was cut)."""
    app = SinkchatApp(make_settings(), loaded=smollm)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()  # the chat shown (its speed cleared)
        header = app.query_one(ChatHeader)
        header.model = "/home/me/[bold]models[/]/" + "very-long-model-name-" * 4 + " │ cpu │ gguf Q4_K_M │ bfloat16"
        header.tokens_per_s = 1234.5
        await pilot.pause()
        line = header.render()
        assert line.plain.endswith("… │ 1234.5 tok/s") and line.plain.startswith("sinkchat │ /home/me/[bold]")
        assert line.cell_len == header.content_size.width
        header.model = "tiny"
        await pilot.pause()
        assert header.render().plain == "sinkchat │ tiny │ 1234.5 tok/s"
