"""The one decode thread that owns the model (sinkchat.decoder): its job order and hand-offs without a
model, then the TUI under Pilot and plain mode on the real bundled model, with the thread of every
model call recorded: many turns, a stop mid-reply, a new chat, a resume, quitting during a reply."""

from __future__ import annotations

import io
import threading
import time

import pytest

from _helpers import SIZE, send, wait_for
from _helpers import tui_settings as make_settings
from sinkchat import engine, plain
from sinkchat.decoder import Decoder
from sinkchat.kv import SinkCache
from sinkchat.store import Store
from sinkchat.tui import chat_screen
from sinkchat.tui.app import SinkchatApp
from sinkchat.tui.chat_input import ChatInput


def test_jobs_run_in_order_on_one_thread_and_hand_back_results_and_errors():
    decoder = Decoder()
    seen = []
    futures = [decoder.submit(lambda i=i: seen.append((i, threading.current_thread()))) for i in range(20)]
    for f in futures:
        f.result(5)
    assert [i for i, _ in seen] == list(range(20))
    assert {t for _, t in seen} == {decoder.thread} and decoder.thread is not threading.main_thread()
    assert decoder.call(lambda: decoder.call(lambda: 7)) == 7  # a call from the thread itself runs in place
    with pytest.raises(ZeroDivisionError):
        decoder.call(lambda: 1 / 0)
    assert decoder.call(lambda: "still alive") == "still alive"
    decoder.close(5)
    assert not decoder.thread.is_alive()
    with pytest.raises(RuntimeError, match="ended"):
        decoder.submit(lambda: None).result(1)


def test_iterate_yields_events_made_on_the_decode_thread_and_a_caller_leaving_early_stops_the_turn():
    decoder = Decoder()
    stop, threads = threading.Event(), []

    def turn(n):
        for i in range(n):
            threads.append(threading.current_thread())
            if stop.is_set():
                return
            time.sleep(0.01)
            yield i

    assert list(decoder.iterate(turn(5))) == [0, 1, 2, 3, 4]
    assert set(threads) == {decoder.thread}
    events = decoder.iterate(turn(10_000), stop.set)
    assert next(events) == 0
    events.close()  # the consumer left (Ctrl+C off the main thread, a failed write)
    assert stop.is_set() and decoder.call(lambda: "idle") == "idle"  # the turn ended before close returned

    def failing():
        yield 1
        raise ValueError("model failed")

    with pytest.raises(ValueError, match="model failed"):
        list(decoder.iterate(failing()))
    decoder.close(5)


@pytest.fixture
def model_threads(monkeypatch):
    """The thread of every model call the front ends make: forwards, loads, K/V copies and restores."""
    calls: list[tuple[str, threading.Thread]] = []

    def record(name, fn):
        def wrapper(*args, **kwargs):
            calls.append((name, threading.current_thread()))
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(engine, "forward", record("forward", engine.forward))
    monkeypatch.setattr(chat_screen, "load_for", record("load", chat_screen.load_for))
    monkeypatch.setattr(SinkCache, "state", record("state", SinkCache.state))
    monkeypatch.setattr(SinkCache, "load_state", record("load_state", SinkCache.load_state))
    monkeypatch.setattr(SinkCache, "for_model", classmethod(record("cache", SinkCache.for_model.__func__)))
    return calls


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_the_tui_runs_every_model_call_on_one_decode_thread(smollm, model_threads):
    """The app loads the model itself (on the decode thread), then: four turns, Esc mid-reply,
    Ctrl+N mid-reply, the first chat opened again and continued, and Ctrl+Q mid-reply. Nothing hangs,
    every reply is kept, and every model call ran on the app's decode thread."""
    app = SinkchatApp(make_settings(max_new_tokens=12))
    async with app.run_test(size=SIZE) as pilot:
        for question in ("Hi.", "What is the capital of France?", "And of Italy?", "Thanks."):
            await send(pilot, question, timeout=120)
        screen, first = app.chat_screen, app.chat

        async def start_long_reply() -> None:
            """A reply of more than 3 tokens, then held in the sampler (on the decode thread) until the
            chat is told to stop: a busy machine or a short story cannot end it before the key."""
            chat = screen.chat
            chat.settings = chat.settings.replace(max_new_tokens=400)
            held, sample = chat._stop, chat.sampler

            def started() -> bool:
                return chat.messages[-1].role == "assistant" and chat.messages[-1].end - chat.messages[-1].start > 3

            chat.sampler = lambda *args: (held.wait(60) if started() else None, sample(*args))[1]
            await pilot.click(ChatInput)
            app.query_one(ChatInput).insert("Write a long story about a dragon.")
            await pilot.press("enter")
            await wait_for(pilot, started)

        await start_long_reply()
        await pilot.press("escape")
        await wait_for(pilot, lambda: not screen.generating, 20)
        assert first.messages[-1].note == "stopped"
        await start_long_reply()
        await pilot.press("ctrl+n")  # mid-reply: stopped, saved, a new chat
        await wait_for(pilot, lambda: app.chat is not first, 30)
        assert first.messages[-1].note == "stopped" and app.chat.messages == []
        await app.store.idle()
        first_id = Store().list()[0].id
        await send(pilot, "Hello again.", timeout=60)
        assert await app.open_chat(first_id)
        await send(pilot, "One more question?", timeout=60)
        resumed = app.chat
        assert len(resumed.messages) == len(first.messages) + 2
        await start_long_reply()
        await pilot.press("ctrl+q")  # mid-reply: stopped, saved, the app ends
    owners = {thread for _, thread in model_threads}
    assert owners == {app.decoder.thread}, model_threads
    kinds = {name for name, _ in model_threads}
    assert kinds == {"load", "forward", "state", "load_state", "cache"}
    store = Store()
    saved = store.transcript(first_id)
    store.close()
    assert saved.messages[-1].role == "assistant" and saved.messages[-1].note == "stopped"
    assert not app.decoder.thread.is_alive() or app.decoder.thread.join(5) is None


def test_plain_mode_runs_every_model_call_on_its_decode_thread(smollm, model_threads):
    decoder = Decoder()  # as the CLI does: the chat (its cache) is made there too
    chat = decoder.call(engine.Chat, smollm, make_settings(max_new_tokens=8))
    out = io.StringIO()
    plain.run(chat, io.StringIO("Hi.\nAnd again?\n/retry\n"), out, after_turn=lambda chat: chat.state(),
              decoder=decoder)
    assert out.getvalue().count("[cache]") == 3
    assert {thread for _, thread in model_threads} == {decoder.thread}
    assert {name for name, _ in model_threads} == {"cache", "forward", "state"}
    decoder.close(5)
