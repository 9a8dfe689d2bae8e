"""The chat engine on the real bundled model (4-bit packed int4 on the CPU, as users run it)."""

from __future__ import annotations

import string
import threading

import pytest

from _helpers import GREEDY
from sinkchat.engine import Chat, Done, Evicted, Stats, TokenText, _Detokenizer
from sinkchat.errors import SinkchatError
from sinkchat.ledger import merge_spans
from sinkchat.settings import Settings
from sinkchat.template import Turns, text_of


def ask(chat: Chat, text: str) -> tuple[str, list]:
    events = list(chat.submit(text))
    done = events[-1]
    assert isinstance(done, Done)
    streamed = "".join(e.text for e in events if isinstance(e, TokenText))
    assert streamed == done.reply  # what a UI shows is the reply
    return done.reply, events


def covered(chat: Chat) -> list[int]:
    """Conversation token indices that are either still cached or in the eviction ledger."""
    (s0, s1), (w0, w1) = chat.cache.kept()
    return [*range(s0, s1), *(t for a, b in chat.cache.evictions for t in range(a, b)), *range(w0, w1)]


def test_six_turn_chat_with_a_small_window_evicts_and_stays_readable(smollm):
    chat = Chat(smollm, GREEDY.replace(sinks=4, window=64, max_new_tokens=30))
    questions = [  # a 135M model is not an encyclopedia: check that it answers on topic, in words
        ("What is the capital of France?", "paris"),
        ("How many legs does a spider have?", "leg"),
        ("What colour is the sky on a clear day?", "blue"),
        ("What do cows drink?", "cow"),
        ("Which planet do we live on?", "earth"),
        ("What do bees make?", "bee"),
    ]
    evictions = []
    for question, expected in questions:
        reply, events = ask(chat, question)
        evictions += [e.span for e in events if isinstance(e, Evicted)]
        words = reply.lower().split()
        assert expected in reply.lower(), (question, reply)
        assert len(words) >= 3 and len(set(words)) / len(words) > 0.6, reply  # words, not a loop (greedy
        # answers can be short and whole: "A cow drinks milk.")
        assert sum(w.strip(string.punctuation).replace("'", "").isalnum() for w in words) / len(words) > 0.8, reply
        assert all(isinstance(e.occupancy.window, int) for e in events if isinstance(e, Stats))
        assert max(layer.get_seq_length() for layer in chat.cache.layers) <= 4 + 64
    occ = chat.occupancy()
    assert occ.seen > 2 * (4 + 64) and occ.evicted > 64  # far more was said than the cache holds
    assert merge_spans(evictions) == chat.cache.evictions  # every eviction was announced, in order,
    assert len(set(evictions)) == len(evictions)  # once
    # the ledger's evicted spans and the kept tokens account for every token, once each
    assert sorted(covered(chat)) == list(range(len(chat.tokens))) == list(range(occ.seen))
    # messages tile the conversation in order: system?, user, assistant, user, assistant...
    assert [m.role for m in chat.messages if m.role != "system"] == ["user", "assistant"] * 6
    assert [(m.start, m.end) for m in chat.messages] == list(
        zip([0] + [m.end for m in chat.messages[:-1]], [m.end for m in chat.messages])
    )
    assert chat.messages[-1].end == len(chat.tokens)


def test_pasted_text_longer_than_the_window_streams_through_bounded_memory(smollm):
    chat = Chat(smollm, GREEDY.replace(sinks=4, window=64, max_new_tokens=5))
    size = None
    for event in chat.submit("Summarise this. " + "The quick brown fox jumps over the lazy dog. " * 60):
        size = size or chat.cache.memory_bytes()
        assert max(layer.get_seq_length() for layer in chat.cache.layers) <= 4 + 64
    user = next(m for m in chat.messages if m.role == "user")
    assert user.end - user.start > 5 * 64  # the message itself is 5+ windows long
    assert chat.cache.memory_bytes() == size  # buffers allocated once, never grown
    assert sorted(covered(chat)) == list(range(len(chat.tokens)))


def test_each_turn_is_tokenized_alone_and_matches_the_full_template(smollm):
    """Incremental turns give exactly the tokens of the template rendered over the whole history."""
    chat = Chat(smollm, GREEDY.replace(sinks=4, window=512, max_new_tokens=12, system="Be brief."))
    history = [{"role": "system", "content": "Be brief."}]
    for q in ("Hi!", "Name a fruit.", "And a colour?"):
        reply, _ = ask(chat, q)
        history += [{"role": "user", "content": q}]
        full = smollm.tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        prompt_tokens = chat.tokens[: chat.messages[-1].start]
        assert smollm.tokenizer.decode(prompt_tokens) == full
        if len(history) == 2:  # the first turn: the very tokens of the whole template, too
            assert prompt_tokens == smollm.tokenizer(full, add_special_tokens=False)["input_ids"]
        history += [{"role": "assistant", "content": reply}]


def test_stop_ends_within_one_token_and_keeps_the_partial_reply(smollm):
    chat = Chat(smollm, GREEDY.replace(sinks=4, window=128, max_new_tokens=200))
    seen, after_stop = [], 0
    for event in chat.submit("Write a long story about a dragon and a knight."):
        if isinstance(event, TokenText):
            seen.append(event.text)
            if len(seen) == 5:
                threading.Thread(target=chat.stop).start()  # as a UI thread would
                threading.Event().wait(0.05)
            elif len(seen) > 5:
                after_stop += 1
        if isinstance(event, Done):
            done = event
    assert done.reason == "stopped"
    assert after_stop <= 1
    assert done.reply.startswith("".join(seen[:5])) and done.reply.strip()
    assert chat.messages[-1].content == done.reply
    # the chat goes on after a stop
    reply, _ = ask(chat, "Thanks. What is 2 + 2?")
    assert "4" in reply or "four" in reply.lower()


def test_max_new_tokens_and_end_of_turn(smollm):
    chat = Chat(smollm, GREEDY.replace(sinks=4, window=256, max_new_tokens=3))
    *_, done = chat.submit("Tell me about the sea.")
    assert (done.reason, done.generated) == ("length", 3)
    chat = Chat(smollm, GREEDY.replace(sinks=4, window=256, max_new_tokens=200))
    *_, done = chat.submit("Say just the word yes.")
    assert done.reason == "end" and done.generated < 200


def test_a_seed_replays_a_sampled_reply(smollm):
    params = Settings(temperature=1.0, top_p=0.95, top_k=40, repetition_penalty=1.1, seed=7, sinks=4, window=128,
                      max_new_tokens=20)

    def sample(p):
        return ask(Chat(smollm, p), "Invent a name for a cat.")[0]

    assert sample(params) == sample(params)
    others = {sample(params.replace(seed=seed)) for seed in (1, 2, 3)}
    assert len(others) > 1  # sampling really samples


def test_keep_system_pins_the_whole_system_prompt(smollm):
    """--keep-system is a pin on the system prompt: never evicted, counted against --pin-max."""
    system = "You are a pirate. Always answer like a pirate would, with arr and matey."
    settings = GREEDY.replace(sinks=4, window=48, max_new_tokens=20, system=system, keep_system=True, pin_max=24)
    chat = Chat(smollm, settings)
    for q in ("Hello!", "What is the sea?", "Where is the treasure?"):
        ask(chat, q)
    sys_msg = chat.messages[0]
    assert sys_msg.role == "system" and sys_msg.end > 4
    assert chat.cache.pins == [(4, sys_msg.end)] and chat.pinned_messages() == [0]
    assert chat.occupancy().pinned == sys_msg.end - 4 and chat.occupancy().evicted > 0
    assert all(a >= sys_msg.end for a, _ in chat.cache.evictions)  # every system token is still in the cache
    with pytest.raises(SinkchatError, match="--keep-system: the system prompt is .* more than --pin-max 4"):
        Chat(smollm, settings.replace(pin_max=4))


def test_detokenizer_never_splits_multibyte_characters(smollm):
    tok = smollm.tokenizer
    text = "naïve café — 東京 🎉 ok"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    d = _Detokenizer(tok)
    parts = [d.push(i) for i in ids] + [d.flush()]
    assert "".join(parts) == text
    assert not any("\ufffd" in p for p in parts)


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_other_architectures_chat_through_the_sink_cache(arch, tiny_models):
    """Random weights say nothing sensible, but the whole path (template, cache, eviction) runs."""
    from sinkchat.model import load

    loaded = load(str(tiny_models[arch]), quant="none", device="cpu")
    chat = Chat(loaded, GREEDY.replace(sinks=4, window=32, max_new_tokens=30))
    for q in ("Hello there, how are you today?", "Tell me more please."):
        list(chat.submit(q))
    assert chat.occupancy().evicted > 0
    assert sorted(covered(chat)) == list(range(len(chat.tokens)))


MISTRAL_TEMPLATE = (  # Mistral v0.3's shape: the system prompt goes into the *last* user turn
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- else %}{{- ' ' + message['content'] + eos_token }}{%- endif %}{%- endfor %}"
)


def test_turns_render_incrementally_for_a_template_that_moves_the_system_prompt(smollm):
    """A template that rewrites history cannot be diffed with the system prompt in it; later turns
    are rendered as the template renders them without one, and the first turn carries it."""
    from copy import deepcopy

    tok = deepcopy(smollm.tokenizer)
    tok.chat_template = MISTRAL_TEMPLATE
    turns = Turns(tok, "Be kind.")
    head, first = (text_of(pieces) for pieces in turns.first("one"))
    render = lambda msgs: tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert head + first == render([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "one"}])
    assert "Be kind." in head + first
    convo = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "R"}, {"role": "user", "content": "two"}]
    assert render(convo) == render(convo[:1]) + " R" + text_of(turns.next("two"))


def passkey_message(key: int, before: int = 8, after: int = 2) -> str:
    """A pass key in filler, then the question (Mohtashami & Jaggi's passkey retrieval, in one message)."""
    fill = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    return fill * before + f"The pass key is {key}. Remember it. {key} is the pass key. " + fill * after + \
        "What is the pass key?"


@pytest.mark.parametrize("key", [60494, 43936])
def test_the_repetition_penalty_spares_what_the_user_said(smollm, key):
    """The penalty applies to the reply's own generated tokens only: a near-greedy reply (temperature
    1e-6, penalty 1.1, the default) repeats the pass key the user gave. Penalising the prompt's
    tokens too, as sinkchat did, turned it away from every digit of the key (0 of 5 keys found)."""
    chat = Chat(smollm, Settings(temperature=1e-6, repetition_penalty=1.1, seed=0, window=2000, max_new_tokens=12))
    reply, _ = ask(chat, passkey_message(key))
    assert str(key) in reply, reply


def test_temperature_0_replies_are_pure_greedy(smollm):
    """``-t 0`` is the argmax whatever ``--repetition-penalty`` says: the same reply as with no penalty."""
    replies = [ask(Chat(smollm, Settings(temperature=0, repetition_penalty=p, window=2000, max_new_tokens=24)),
                   "Name three colours, then name them again.")[0] for p in (1.0, 1.5)]
    assert replies[0] == replies[1]
