"""The ledger's arithmetic (no model): spans merge, messages know what the cache still holds of them."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sinkchat.ledger import (
    Message,
    Occupancy,
    add_span,
    covered_by,
    describe_span,
    gaps,
    memory,
    merge_spans,
    subtract,
)


def test_adjacent_blocks_merge_and_gaps_stay():
    assert merge_spans([(4, 8), (8, 12), (20, 24), (24, 30)]) == [(4, 12), (20, 30)]
    assert merge_spans([]) == []


def test_memory_of_whole_partial_and_untouched_messages():
    spans = [(4, 30)]
    assert memory(Message("user", "x", 10, 20), spans) == memory(Message("user", "x", 10, 20), spans)
    whole = memory(Message("user", "x", 10, 20), spans)
    assert whole.forgotten and not whole.partly
    head_cut = memory(Message("assistant", "x", 25, 40), spans)
    assert head_cut.partly and (head_cut.evicted, head_cut.cut) == (5, 30)
    tail_cut = memory(Message("system", "x", 0, 10), spans)  # sinks 0..3 stay, 4..9 left
    assert tail_cut.partly and tail_cut.evicted == 6 and tail_cut.cut is None
    assert memory(Message("user", "x", 30, 35), spans).evicted == 0


def test_describe_span_condenses_runs_of_whole_messages():
    msgs = [Message("system", "", 0, 19), Message("user", "", 19, 37), Message("assistant", "", 37, 71),
            Message("user", "", 71, 80)]
    assert describe_span((4, 58), msgs) == "tokens 4–57 (54): #1 system 15 of 19, #2 you whole, #3 model 21 of 34"
    assert describe_span((19, 80), msgs) == "tokens 19–79 (61): #2–#4 whole"
    assert describe_span((80, 90), msgs) == "tokens 80–89 (10): no message"


@given(st.lists(st.integers(0, 9), min_size=1, max_size=15), st.integers(0, 100), st.integers(1, 100))
def test_describe_span_names_each_message_by_the_tokens_it_has_inside(sizes, start, length):
    """Expanding the description's runs gives, for every message, how many of its tokens the span
    holds: the whole ones inside runs, the partial ones with their count, none left out; an empty
    message (a reply stopped at once) is named by nothing, though a run of whole ones may span it."""
    msgs, pos = [], 0
    for i, size in enumerate(sizes):
        msgs.append(Message(("user", "assistant")[i % 2], "", pos, pos + size))
        pos += size
    span = (start, start + length)
    said = {}
    for part in describe_span(span, msgs).split(": ", 1)[1].split(", "):
        if part == "no message":
            continue
        numbers = [int(x) for x in part.replace("#", " ").replace("–", " ").split() if x.isdigit()]
        if part.endswith("whole"):
            first, last = numbers[0], numbers[-1] if "–" in part else numbers[0]
            assert sizes[first - 1] and sizes[last - 1], part  # a run starts and ends on a message with tokens
            said.update({i: "whole" for i in range(first, last + 1) if sizes[i - 1]})
        else:
            said[numbers[0]] = numbers[1]
    expected = {}
    for i, m in enumerate(msgs, start=1):
        inside = len(set(range(*span)) & set(range(m.start, m.end)))
        if inside:
            expected[i] = "whole" if inside == m.end - m.start else inside
    assert said == expected


@given(st.lists(st.tuples(st.integers(0, 50), st.integers(1, 10)), max_size=12),
       st.integers(0, 60), st.integers(1, 30))
def test_evicted_count_is_the_overlap_for_any_spans(raw, start, length):
    """Whatever the spans, a message's evicted count is the number of its tokens inside them."""
    spans, pos = [], 0
    for gap, size in raw:  # disjoint, ordered spans, as the cache records them
        spans.append((pos + gap, pos + gap + size))
        pos += gap + size
    m = Message("user", "", start, start + length)
    inside = {t for a, b in spans for t in range(a, b)}
    mem = memory(m, merge_spans(spans))
    assert mem.evicted == len(inside & set(range(m.start, m.end)))
    assert mem.forgotten == (mem.evicted == length)


def tokens_of(spans) -> set[int]:
    return {t for a, b in spans for t in range(a, b)}


span_lists = st.lists(st.tuples(st.integers(0, 80), st.integers(1, 12)), max_size=10)


@given(span_lists, span_lists)
def test_span_sets_add_and_subtract_like_sets_of_tokens(first, second):
    """Pins and evictions are sets of tokens kept as sorted, merged spans: adding, subtracting and
    finding gaps must agree with plain sets, whatever order the spans come in."""
    spans: list = []
    expect: set[int] = set()
    for a, n in first:
        add_span(spans, (a, a + n))
        expect |= set(range(a, a + n))
    assert tokens_of(spans) == expect
    assert spans == sorted(spans) and all(b < c for (_, b), (c, _) in zip(spans, spans[1:]))  # merged
    for a, n in second:
        spans = subtract(spans, a, a + n)
        expect -= set(range(a, a + n))
        assert tokens_of(spans) == expect
    assert tokens_of(gaps(spans, 10, 70)) == set(range(10, 70)) - expect
    assert covered_by(spans, 10, 70) == len(expect & set(range(10, 70)))


def test_occupancy_line_shows_pins_only_when_there_are_some():
    plain = Occupancy(4, 45, 64, 4, 49, 0)
    assert plain.text() == "4 + 45 / 64 | seen 49 | evicted 0 none"
    pinned = Occupancy(4, 33, 64, 4, 120, 71, ((4, 50), (62, 87)), pinned=12, pin_capacity=16)
    assert pinned.text() == "4 + 12 pinned + 33 / 64 | seen 120 | evicted 71 [4, 50) [62, 87)"
    assert pinned.held == 49
