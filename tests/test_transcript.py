"""The transcript of an endless chat, without a model: widgets stay bounded however many messages,
and every message can still be scrolled to and read."""

from __future__ import annotations

import gc

import pytest

from _helpers import TranscriptApp, wait_for
from sinkchat.ledger import Message
from sinkchat.tui.transcript import Entry, MessageView, Transcript

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


def mounted(t: Transcript) -> list[int]:
    return [v.index for v in t.query(MessageView)]


@pytest.mark.slow  # two thousand real mounts: a couple of minutes on 2 cores
async def test_two_thousand_messages_keep_the_widgets_bounded_and_all_readable():
    app = TranscriptApp()
    async with app.run_test(size=(100, 30)) as pilot:
        t = app.query_one(Transcript)
        for i in range(2000):
            await t.add("user" if i % 2 == 0 else "assistant", f"message number {i}\n\nwith a second paragraph")
            assert len(mounted(t)) <= Transcript.MOUNTED
        await pilot.pause()
        assert mounted(t) == list(range(2000 - Transcript.MOUNTED, 2000))
        assert t.scroll_y == t.max_scroll_y  # following the end
        earlier = str(t.query_one("#earlier").render())
        assert f"{2000 - Transcript.MOUNTED} earlier messages" in earlier

        await t.jump_home()  # Ctrl+Home: the first message, read as any other
        await pilot.pause()
        assert mounted(t)[0] == 0 and len(mounted(t)) <= Transcript.MOUNTED
        assert t.query(MessageView).first().content.startswith("message number 0")
        assert t.scroll_y == 0

        for _ in range(12):  # reading on: newer messages mount as the bottom is reached
            t.scroll_to(y=t.max_scroll_y, animate=False)
            await pilot.pause(0.1)
        assert max(mounted(t)) >= Transcript.MOUNTED + 2 * Transcript.BATCH
        assert len(mounted(t)) <= 2 * Transcript.MOUNTED + Transcript.BATCH
        indices = mounted(t)
        assert indices == list(range(indices[0], indices[-1] + 1))  # a contiguous window, in order

        await t.jump_end()
        await pilot.pause()
        assert mounted(t)[-1] == 1999 and t.scroll_y == t.max_scroll_y
        gc.collect()  # the views taken off the screen are freed, not kept alive somewhere
        assert not [o for o in gc.get_objects() if isinstance(o, MessageView) and not o.is_attached]


async def test_scrolling_up_mounts_the_older_messages_above_in_place():
    app = TranscriptApp()
    async with app.run_test(size=(100, 30)) as pilot:
        t = app.query_one(Transcript)
        await t.reset([Entry("user", f"entry {i}") for i in range(300)])
        await pilot.pause()
        assert mounted(t)[0] == 300 - Transcript.MOUNTED
        t.release_anchor()
        t.scroll_home(animate=False)
        await wait_for(pilot, lambda: mounted(t)[0] == 300 - Transcript.MOUNTED - Transcript.BATCH, 30)
        await wait_for(pilot, lambda: t.scroll_y > 0, 30)  # the view stays on what was read, new views above it
        assert mounted(t)[0] == 300 - Transcript.MOUNTED - Transcript.BATCH  # one batch, not more


async def test_marks_count_the_forgotten_messages_above_the_window():
    app = TranscriptApp()
    async with app.run_test(size=(100, 30)) as pilot:
        t = app.query_one(Transcript)
        await t.reset([Entry("user", f"entry {i}") for i in range(100)])
        messages = [Message("user", f"entry {i}", 10 * i, 10 * i + 10) for i in range(100)]
        t.mark(messages, [(4, 505)], lambda message, token: None)  # messages 1..49 forgotten, 50 partly
        await pilot.pause()
        assert "60 earlier messages (49 forgotten by the model)" in str(t.query_one("#earlier").render())
        assert all(not v.has_class("-forgotten") for v in t.query(MessageView))
        await t.jump_home()
        await pilot.pause()
        views = list(t.query(MessageView))
        assert views[1].has_class("-forgotten") and views[0].has_class("-partly")


async def test_the_transcript_follows_the_end_until_the_user_scrolls_up():
    app = TranscriptApp()
    async with app.run_test(size=(80, 24)) as pilot:
        t = app.query_one(Transcript)
        for i in range(6):
            await t.add("user", f"question {i}")
            await t.add("assistant", f"answer {i}")
        reply = await t.add("assistant")
        code = "Here is the code:\n\n```python\n" + "".join(f"x{i} = {i}\n" for i in range(25)) + "```\n"
        for part in (code[:40], code[40:200], code[200:]):
            await reply.append(part)
        await reply.finish()
        await pilot.pause(0.3)
        assert t.scroll_y == t.max_scroll_y > 0  # the code block's last line is on screen
        t.release_anchor()  # the user scrolls up to read
        t.scroll_home(animate=False)
        await pilot.pause()
        await t.views[-1].append("\n\nmore text")
        await pilot.pause(0.3)
        assert t.scroll_y == 0  # reading is not interrupted
        t.scroll_end(animate=False)  # back at the bottom: following again
        await pilot.pause(0.3)
        await t.views[-1].append("\n\neven more text\n\nand more")
        await reply.finish()
        await pilot.pause(0.3)
        assert t.scroll_y == t.max_scroll_y
