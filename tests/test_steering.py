"""Memory the user steers, on the real bundled model: pins that outlive the window, taking back and
regenerating or editing the last turn, ``--evict turns``; each through save and resume, and the
plain mode's slash commands with their one-line refusals."""

from __future__ import annotations

import re

import pytest

from _helpers import GREEDY, run_cli, say
from sinkchat import commands
from sinkchat.engine import Chat, Evicted, Notice
from sinkchat.errors import SinkchatError
from sinkchat.ledger import memory
from sinkchat.store import Store

QUESTIONS = ["What is the capital of France?", "How many legs does a spider have?", "What do bees make?",
             "Which planet do we live on?", "What colour is grass?", "Name a big ocean."]


def reopened(store: Store, chat_id: int, loaded, settings) -> Chat:
    store.unlock(chat_id)  # as if the first process had quit
    chat = Chat(loaded, settings)
    assert Store(store.root).open(chat_id, chat) == []
    return chat


def test_a_pinned_message_survives_20_turns_in_a_64_token_window_and_a_resume(smollm):
    settings = GREEDY.replace(window=64, max_new_tokens=8, pin_max=32)
    chat = Chat(smollm, settings)
    say(chat, "My name is Ada and my cat is called Pixel.")
    name = chat.messages[1]
    assert name.role == "user" and "pinned #2 you" in chat.pin(1)
    for i in range(20):
        say(chat, QUESTIONS[i % len(QUESTIONS)])
        held = chat.cache.held()
        assert any(a <= name.start and name.end <= b for a, b in held), f"turn {i}: the pin was evicted"
    occ = chat.occupancy()
    assert occ.evicted > 5 * 64 and occ.pinned == name.end - name.start
    assert all(b <= name.start or a >= name.end for a, b in chat.cache.evictions)
    assert chat.pinned_messages() == [1] and commands.pins_line(chat).startswith("pinned: #2 you")

    store = Store()
    chat_id = store.create(chat, settings)
    again = reopened(store, chat_id, smollm, settings)
    assert again.cache.pins == chat.cache.pins and again.cache.parked == chat.cache.parked
    assert again.occupancy() == chat.occupancy()
    assert say(again, "What is my cat called?") == say(chat, "What is my cat called?")
    assert again.tokens == chat.tokens
    assert "unpinned #2 you" in again.unpin(1)
    say(again, QUESTIONS[0])
    assert again.cache.pins == [] and any(a <= name.start < b for a, b in again.cache.evictions)


@pytest.mark.parametrize("window", [256, 48], ids=["no eviction", "evicting during the reply"])
def test_regenerate_gives_the_same_greedy_reply(smollm, window):
    settings = GREEDY.replace(window=window, block=8, max_new_tokens=30)
    chat = Chat(smollm, settings)
    say(chat, QUESTIONS[0])
    before = (list(chat.cache.evictions), chat.occupancy())
    first = say(chat, "Tell me about the Eiffel Tower.")
    tokens, messages = list(chat.tokens), list(chat.messages)
    assert (chat.cache.evictions != before[0]) == (window == 48)
    assert chat.rollback() is None  # restored exactly: no notice
    assert chat.occupancy() == before[1] and len(chat.messages) == 3  # system, question, reply
    assert say(chat, "Tell me about the Eiffel Tower.") == first
    assert chat.tokens == tokens and chat.messages == messages

    store = Store()  # the state to come back to is saved with the chat
    chat_id = store.create(chat, settings)
    again = reopened(store, chat_id, smollm, settings)
    assert again.rollback() is None
    assert say(again, "Tell me about the Eiffel Tower.") == first and again.tokens == tokens


def test_regenerate_and_edit_keep_the_pin_on_their_message_and_say_what_goes(smollm):
    settings = GREEDY.replace(window=80, block=8, max_new_tokens=30, pin_max=40)
    chat = Chat(smollm, settings)
    say(chat, QUESTIONS[0])
    first = say(chat, "Tell me about the Eiffel Tower.")
    assert "pinned #4 you" in chat.pin(3)
    assert chat.rollback() is None  # restored exactly; the pin comes back with the message: nothing to say
    assert say(chat, "Tell me about the Eiffel Tower.") == first  # the same reply, and pinned again
    assert chat.pinned_messages() == [3]
    assert chat.rollback() is None
    say(chat, "Tell me about Big Ben.")  # an edit keeps the pin too
    assert chat.pinned_messages() == [3]
    chat.unpin(3)
    chat.pin(4)  # the reply
    assert chat.rollback() == "unpinned #5 model: a new reply replaces it"  # said, never silent
    say(chat, "Tell me about Big Ben.")
    assert chat.pinned_messages() == []


def test_a_message_sent_pinned_is_never_evicted_by_its_own_reply(smollm):
    """At a small window a message was evicted by its reply before it could be pinned: sent pinned,
    it is pinned as soon as it is read, and a refusal is said before anything is sent."""
    chat = Chat(smollm, GREEDY.replace(window=64, block=8, max_new_tokens=80, pin_max=32))
    events = list(chat.submit("Remember: the code word is marmalade. Now tell me a long story.", pin=True))
    notices = [e for e in events if isinstance(e, Notice)]
    assert [n.refused for n in notices] == [False] and notices[0].text.startswith("pinned #2 you")
    assert chat.cache.evictions and chat.pinned_messages() == [1]  # the reply evicted; the message stayed
    assert memory(chat.messages[1], chat.cache.evictions).evicted == 0
    with pytest.raises(SinkchatError, match="over the budget of 32"):
        chat.check_pin("word " * 40)


def test_a_resume_with_a_smaller_pin_budget_unpins_the_newest_pins(smollm):
    """Pins made under a larger --pin-max than the resumed chat has: the newest are unpinned, each
    with a one-line notice, so the budget holds."""
    chat = Chat(smollm, GREEDY.replace(window=128, max_new_tokens=8, pin_max=64))
    say(chat, "My name is Ada and my cat is called Pixel.")
    say(chat, "I live in Lyon.")
    chat.pin(1)
    chat.pin(3)
    sizes = [chat.messages[i].end - chat.messages[i].start for i in (1, 3)]
    state, tensors = chat.state()
    again = Chat(smollm, GREEDY.replace(window=128, max_new_tokens=8, pin_max=sizes[0]))
    notices = again.restore(state, tensors)
    assert len(notices) == 1 and notices[0].startswith("unpinned #4 you: ") and "\n" not in notices[0]
    assert again.pinned_messages() == [1] and again.occupancy().pinned == sizes[0] <= again.cache.pin_max
    assert "1 more" not in commands.pins_line(again) and say(again, QUESTIONS[1])


def test_edit_replaces_the_stored_turn_and_resumes_exactly(smollm):
    settings = GREEDY.replace(window=48, block=8, max_new_tokens=20)
    store = Store()
    chat = Chat(smollm, settings)
    say(chat, QUESTIONS[0])
    chat_id = store.create(chat, settings)
    say(chat, "Tell me about the Eiffel Tower.")
    store.save(chat_id, chat)
    chat.rollback()
    edited = say(chat, "Tell me about Big Ben.")
    store.save(chat_id, chat)
    saved = store.transcript(chat_id)
    assert [m.content for m in saved.messages][-2:] == ["Tell me about Big Ben.", edited]
    assert saved.tokens == chat.tokens and saved.notices == []
    again = reopened(store, chat_id, smollm, settings)
    assert again.messages == chat.messages and again.occupancy() == chat.occupancy()
    assert say(again, QUESTIONS[1]) == say(chat, QUESTIONS[1]) and again.tokens == chat.tokens


def test_a_saved_cache_that_does_not_fit_is_rebuilt_with_its_pins_and_budget(smollm):
    settings = GREEDY.replace(window=128, max_new_tokens=8, pin_max=64)
    chat = Chat(smollm, settings)
    say(chat, "My name is Ada and my cat is called Pixel.")
    chat.pin(1)
    state, tensors = chat.state()
    tensors["0.k"] = tensors["0.k"][:, :, 1:]  # one slot short of what the counters say
    again = Chat(smollm, settings)
    notices = again.restore(state, tensors)
    assert len(notices) == 1 and "does not fit its ledger" in notices[0]
    assert again.cache.pins == chat.cache.pins and again.occupancy() == chat.occupancy()
    assert "pinned #3 model" in again.pin(2)  # within the chat's --pin-max, not a budget of zero


def test_rollback_without_a_checkpoint_rebuilds_from_the_ledger(smollm):
    """A chat whose checkpoint is gone (saved by an older sinkchat): the cache is re-prefilled from
    the ledger as it was before the turn, with a notice; the ledger stays whole."""
    chat = Chat(smollm, GREEDY.replace(window=48, block=8, max_new_tokens=30))
    say(chat, QUESTIONS[0])
    say(chat, "Tell me about the Eiffel Tower.")
    start = chat.messages[-2].start
    chat.cache.checkpoint = None
    assert "rebuilt from the chat's text" in chat.rollback()
    assert len(chat.tokens) == start == chat.occupancy().seen
    assert sorted(t for a, b in chat.cache.held() + chat.cache.evictions for t in range(a, b)) == list(range(start))
    assert say(chat, "Tell me about the Eiffel Tower.")


def test_rollback_without_a_checkpoint_does_not_lose_what_the_turn_evicted(smollm):
    """The window still reaches back before the turn, but the turn's reply evicted tokens held before
    it: cutting the turn off would leave the cache short of them, so it is rebuilt and holds them."""
    chat = Chat(smollm, GREEDY.replace(window=80, block=8, max_new_tokens=40))  # the turn evicts 24 of 41
    say(chat, "Hi!")
    start_before = len(chat.tokens)
    assert chat.occupancy().evicted == 0
    say(chat, "Tell me about the Eiffel Tower in Paris, please.")
    start = chat.messages[-2].start
    assert start == start_before and 0 < chat.occupancy().evicted and chat.cache.seen - chat.cache.n_win < start
    chat.cache.checkpoint = None
    assert "rebuilt from the chat's text" in chat.rollback()
    assert chat.occupancy().seen == start and chat.occupancy().evicted == 0  # all of it fits again


def test_evict_turns_never_starts_the_cache_mid_message(smollm):
    settings = GREEDY.replace(window=64, block=4, max_new_tokens=14, evict="turns")
    chat = Chat(smollm, settings)
    starts = []
    for i in range(16):
        for event in chat.submit(QUESTIONS[i % len(QUESTIONS)]):
            if isinstance(event, Evicted):
                start = chat.cache.kept()[1][0]
                opens = {m.start for m in chat.messages if m.role == "user"}
                assert start in opens, (i, start, [(m.role, m.start, m.end) for m in chat.messages])
                starts.append(start)
    assert len(starts) > 10 and chat.occupancy().evicted > 4 * 64
    store = Store()
    chat_id = store.create(chat, settings)
    again = reopened(store, chat_id, smollm, settings)
    assert again.occupancy() == chat.occupancy()
    assert say(again, QUESTIONS[0]) == say(chat, QUESTIONS[0]) and again.tokens == chat.tokens


def test_slash_commands_refuse_bad_input_in_one_line(smollm):
    chat = Chat(smollm, GREEDY.replace(window=64, max_new_tokens=8, pin_max=8))

    def run(line: str) -> commands.Outcome:
        return commands.execute(chat, commands.parse(line))

    for line, refusal in [("/retry", "no turn to take back yet"), ("/edit Hi", "no turn to take back yet"),
                          ("/pin 1", "no message #1 yet"), ("/frobnicate", "unknown command /frobnicate")]:
        outcome = run(line)
        assert outcome.refused and refusal in outcome.message and "\n" not in outcome.message
    say(chat, "Hello there, how are you doing today, my friend?")
    for line, refusal in [("/pin 9", "no message #9 (the chat has #1–#3)"), ("/pin two", "takes a message number"),
                          ("/pin 2", "over the budget of 8"), ("/unpin 3", "#3 model is not pinned"),
                          ("/edit", "/edit needs the new text"), ("/retry now", "/retry takes nothing after it"),
                          ("/pins all", "/pins takes nothing after it")]:
        outcome = run(line)
        assert outcome.refused and refusal in outcome.message, (line, outcome)
    assert commands.parse("//pin 2") == "/pin 2" and commands.parse("/usr/bin is a folder") == "/usr/bin is a folder"
    assert run("/retry").send == "Hello there, how are you doing today, my friend?" and len(chat.messages) == 1


def test_plain_mode_keep_quit_and_pins_that_go_are_said(tmp_path):
    lines = ["/help", "/keep My name is Ada.", "/unpin 2", "/pin 3", "/retry", "/pin 2", "/edit My name is Ada L.",
             "/pins", "/quit", "Never sent."]
    result = run_cli("--plain", "--temperature", "0", "--max-new-tokens", "12", "--window", "64", "--pin-max", "32",
                     "--data-dir", str(tmp_path), input="\n".join(lines) + "\n")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    said = [line for line in result.stdout.splitlines() if line.startswith("[sinkchat] ")]
    assert "/quit, /exit or Ctrl+D to leave" in said[0] and "/keep TEXT" in said[0]
    assert said[1].startswith("[sinkchat] pinned #2 you")  # /keep: pinned as it was read
    assert said[4] == "[sinkchat] unpinned #3 model: a new reply replaces it"  # /retry said where the pin went
    assert said[-1].startswith("[sinkchat] pinned: #2 you")  # the edited message kept its pin
    assert result.stdout.count("[cache]") == 3  # /quit ended the session: the last line was never sent
    assert "Never sent." not in run_cli("chats", "show", "--data-dir", str(tmp_path)).stdout


def test_plain_mode_commands_end_to_end(tmp_path):
    lines = ["/retry", "/pin 7", "What is the capital of France?", "/pin 2", "/pins", "/edit",
             "/edit What is the capital of Italy?", "/retry"]
    result = run_cli("--plain", "--temperature", "0", "--max-new-tokens", "12", "--window", "64", "--pin-max", "32",
                     "--data-dir", str(tmp_path), input="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    refusals = [line for line in result.stderr.splitlines() if line.startswith("sinkchat: ")]
    for phrase in ("there is no turn to take back yet", "there is no message #7", "/edit needs the new text"):
        assert sum(phrase in line for line in refusals) == 1, (phrase, result.stderr)
    out = result.stdout.splitlines()
    assert any(line.startswith("[sinkchat] pinned #2 you") for line in out)
    assert any(line.startswith("[sinkchat] pinned: #2 you") for line in out)
    replies = [r.strip() for r in re.split(r"^\[(?:cache|sinkchat)\].*$", result.stdout, flags=re.M) if r.strip()]
    assert len(replies) == 3 and replies[-1] == replies[-2]  # /retry: the same greedy reply


def test_evict_turns_says_when_a_turn_does_not_fit_the_room_left(tmp_path):
    """A question and its reply longer than a 64-token window: the window starts inside the turn
    (there is no turn boundary to cut at), and plain mode says so in one line."""
    result = run_cli("--plain", "-t", "0", "--window", "64", "--evict", "turns", "--max-new-tokens", "55",
                     "--data-dir", str(tmp_path), input="Tell me about cats.\nTell me about dogs.\n")
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stdout.splitlines() if "did not fit" in line]
    assert notes and all(re.fullmatch(r"\[cache\] #\d+ (you|model) did not fit the room left in the window: "
                                      r"evicting it token by token until the next turn", line) for line in notes)
