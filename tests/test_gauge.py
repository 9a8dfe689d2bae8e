"""The cache gauge on its own (no model): at 80 columns every counter and every forgotten span is
on screen, flowed onto more lines rather than cut; what it says of a message read in part."""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.app import App

from sinkchat.ledger import Message, Occupancy, describe_span, partial
from sinkchat.tui import themes
from sinkchat.tui.gauge import CacheGauge

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


class Host(App):
    CSS_PATH = Path(themes.__file__).parent / "app.tcss"

    def get_theme_variable_defaults(self) -> dict[str, str]:
        return dict(themes.GAUGE_DEFAULTS)

    def compose(self):
        yield CacheGauge(Occupancy(0, 0, 2000, 4, 0, 0))


async def shown(occupancy: Occupancy, messages: list[Message], size=(80, 24)) -> list[str]:
    """The gauge's lines as a terminal of ``size`` shows them (its height fits them all)."""
    app = Host()
    async with app.run_test(size=size) as pilot:
        gauge = app.query_one(CacheGauge)
        gauge.show(occupancy, messages)
        await pilot.pause()
        lines = gauge.render().plain.splitlines()
        assert gauge.size.height == len(lines)  # none hidden below the gauge's edge
        assert all(len(line) <= gauge.size.width for line in lines), lines  # none cut at the right
        return lines


async def test_at_80_columns_nothing_is_cut():
    messages = [Message("system", "", 0, 19), Message("user", "a long paste", 19, 3000),
                Message("assistant", "a reply", 3000, 123456)]
    spans = ((4, 119), (200, 121583))
    occupancy = Occupancy(4, 1861, 2000, 4, 123456, 121579, spans=spans, pinned=12, pin_capacity=500,
                          window_start=121595)
    text = " ".join(line.strip() for line in await shown(occupancy, messages))
    for part in ("sinks 4", "pinned 12", "window 1861 of 2000", "free", "seen 123456", "forgotten 121579"):
        assert part in text, text
    for span in spans:
        assert f"✂ forgot {describe_span(span, messages)}" in text, text


async def test_a_message_read_in_part_is_never_said_to_be_seen_whole():
    messages = [Message("system", "", 0, 19), Message("user", "a long paste", 19, 211, note=partial(2213))]
    text = " ".join(line.strip() for line in await shown(Occupancy(4, 207, 2000, 4, 211, 0), messages))
    assert "still sees the whole chat" not in text
    assert "nothing forgotten yet, but the model read only 192 of the 2213 tokens of #2 you (stopped)" in text


async def test_a_hybrid_or_learned_sink_models_notes_are_shown_whole_at_80_columns():
    occupancy = Occupancy(0, 40, 2000, 0, 40, 0, local_window=512, learned_sinks=True)
    text = " ".join(line.strip() for line in await shown(occupancy, [Message("user", "hi", 0, 40)]))
    for note in occupancy.notes():
        assert note in text, text
    assert "512" in occupancy.notes()[0] and "learned its own attention sink" in occupancy.notes()[1]


async def test_recalled_blocks_are_named_with_their_messages_at_80_columns():
    from sinkchat.ledger import Recalled, label, memory

    messages = [Message("system", "", 0, 19), Message("user", "The pass key is 52871.", 19, 60),
                Message("assistant", "a reply", 60, 900), Message("user", "What is the pass key?", 900, 912)]
    recall = (Recalled(0, ((4, 68),), 30), Recalled(5, ((324, 388),), 12))
    occupancy = Occupancy(4, 240, 256, 4, 912, 660, spans=((4, 664),), window_start=664, recalled=128,
                          recall_capacity=128, recall=recall, memory_blocks=10, recall_layers=30)
    text = " ".join(line.strip() for line in await shown(occupancy, messages))
    assert "recalled 2 of 10 blocks" in text, text
    assert f"↺ recalled #1 (30 of 30 layers) {describe_span((4, 68), messages)}" in text, text
    assert f"↺ recalled #6 (12 of 30 layers) {describe_span((324, 388), messages)}" in text, text
    assert occupancy.text().endswith("| recalled 2 blocks [4, 68) [324, 388)")
    # the transcript's label of the message the key came from says it is back for this turn
    assert "↺ 41 recalled for this turn" in label(1, "user", "", memory(messages[1], [(4, 664)]), recalled=41)


async def test_recalled_blocks_past_the_listed_ones_are_counted():
    """The counter counts every recalled block; the details list the first few and say how many more."""
    from sinkchat.ledger import Recalled

    messages = [Message("system", "", 0, 19), Message("user", "a long paste", 19, 3000)]
    recall = tuple(Recalled(b, ((4 + 16 * b, 20 + 16 * b),), 30 - b) for b in range(15))
    occupancy = Occupancy(4, 60, 64, 4, 3000, 2936, spans=((4, 2940),), window_start=2940, recalled=64,
                          recall_capacity=64, recall=recall, memory_blocks=19, recall_layers=30)
    lines = await shown(occupancy, messages, size=(100, 40))
    text = " ".join(line.strip() for line in lines)
    assert "recalled 15 of 19 blocks" in text and text.count("↺ recalled #") == CacheGauge.MAX_SPANS, text
    assert "… 9 more recalled span(s), chosen by fewer layers" in text, text


async def test_on_a_short_terminal_the_details_give_way_to_the_transcript():
    """At 80x24 the gauge takes at most half the height (it took the whole screen with many recalled
    blocks); the last line says how many lines gave way and how to see or hide them."""
    from sinkchat.ledger import Recalled

    messages = [Message("system", "", 0, 19), Message("user", "a long paste", 19, 3000)]
    recall = tuple(Recalled(b, ((4 + 16 * b, 20 + 16 * b),), 30 - b) for b in range(15))
    occupancy = Occupancy(4, 60, 64, 4, 3000, 2936, spans=((4, 2940),), window_start=2940, recalled=64,
                          recall_capacity=64, recall=recall, memory_blocks=19, recall_layers=30)
    lines = await shown(occupancy, messages, size=(80, 24))
    assert len(lines) == 24 // 2, lines
    assert lines[-1].startswith("… ") and "more line(s): a taller terminal shows them, Ctrl+G hides the details" \
        in lines[-1], lines
    tall = await shown(occupancy, messages, size=(80, 60))  # room for all of them: nothing gives way
    assert not any("more line(s)" in line for line in tall) and len(tall) > len(lines)
