"""Recall from the block memory of what left the window (InfLLM-style): the memory's bookkeeping on
random K/V, exact placement against the independent StreamingLLM reference, a pass key found with
recall and not without, and a damaged memory file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cache import reference_logits, text_ids, worst

from _helpers import ROOT, say
from sinkchat.engine import Chat
from sinkchat.kv import SinkCache, rope_inv_freqs
from sinkchat.kv.memory import FILE_HEADER, BlockMemory, MemoryFileError
from sinkchat.model import forward
from sinkchat.settings import Settings
from sinkchat.store import Store

SAME = 1e-4  # as for pinned tokens (tests/test_pins.py): float32, contiguous positions

INV = [1.0 / (10000 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8)) for _ in range(2)]


def random_kv(n: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(1, 2, n, 8, generator=g) for _ in INV], [torch.randn(1, 2, n, 8, generator=g) for _ in INV])


def fill(memory: BlockMemory, sizes: list[int]) -> tuple[list[int], list[torch.Tensor], list[torch.Tensor]]:
    """Add runs of ``sizes`` tokens (token t has id 1000 + t, its key at position t + 3); return the
    tokens and every layer's keys and values in order."""
    tokens, ks, vs, t = [], [[] for _ in INV], [[] for _ in INV], 0
    for i, n in enumerate(sizes):
        keys, values = random_kv(n, i)
        memory.add([(t, t + n, t + 3)], [1000 + x for x in range(t, t + n)], keys, values)
        tokens += range(t, t + n)
        for j in range(len(INV)):
            ks[j].append(keys[j])
            vs[j].append(values[j])
        t += n
    cat = lambda parts: torch.cat(parts, dim=-2) if parts else torch.zeros(1, 2, 0, 8)  # noqa: E731
    return tokens, [cat(k) for k in ks], [cat(v) for v in vs]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 40), max_size=8), st.integers(1, 16), st.integers(0, 8))
def test_blocks_hold_what_was_added_in_order(sizes, block, back):
    memory = BlockMemory(block, 1, INV)
    tokens, keys, values = fill(memory, sizes)
    total = len(tokens)
    assert memory.blocks == total // block and memory.tokens == total
    for b in range(memory.blocks):
        assert memory.spans(b) == [(b * block, (b + 1) * block)]
        assert memory.positions(b) == [t + 3 for t in range(b * block, (b + 1) * block)]
        for j in range(len(INV)):
            k, v = memory.read(j, b)
            assert torch.equal(k[0], keys[j][0, :, b * block : (b + 1) * block])
            assert torch.equal(v[0], values[j][0, :, b * block : (b + 1) * block])
    # going back to a mark (a rollback) and adding the same again gives the same memory
    mark_at = min(back, len(sizes))
    again = BlockMemory(block, 1, INV)
    fill(again, sizes[:mark_at])
    mark = again.mark()
    fill(again, sizes[mark_at:] + [5, 7])
    again.truncate(*mark)
    assert again.mark() == mark
    rest = sizes[mark_at:]
    t = sum(sizes[:mark_at])
    for i, n in enumerate(rest, start=mark_at):
        k, v = random_kv(n, i)
        again.add([(t, t + n, t + 3)], [1000 + x for x in range(t, t + n)], k, v)
        t += n
    assert again.blocks == memory.blocks and again.pending == memory.pending
    for b in range(memory.blocks):
        assert torch.equal(again.read(1, b)[0], memory.read(1, b)[0])


def test_memory_reopens_from_its_file_and_pending_state(tmp_path):
    memory = BlockMemory(8, 2, INV, directory=tmp_path, key="k")
    tokens, keys, _ = fill(memory, [5, 9, 13])  # 27 tokens: 3 blocks and 3 pending
    meta, tensors = memory.state([0, 1])
    assert memory.path.parent == tmp_path
    ledger = [1000 + t for t in range(40)]
    again = BlockMemory(8, 2, INV, key="k")
    assert again.open(memory.path, meta, tensors, [0, 1], ledger) == []
    assert again.blocks == 3 and again.tokens == 27
    assert torch.equal(again.read(0, 2)[0], memory.read(0, 2)[0])
    query = torch.randn(4, 8)
    assert torch.equal(again.scores(1, query), memory.scores(1, query))
    other = BlockMemory(8, 2, INV, key="another model")
    notices = other.open(memory.path, meta, tensors, [0, 1], ledger)
    assert other.blocks == 0 and len(notices) == 1 and "cannot be used" in notices[0]
    # the key covers the model, its quantization and the KV dtype (--kv-dtype): the notice says so, with the file's
    assert f"another model, quantization or KV dtype (its K/V are {keys[0].dtype})".replace("torch.", "") in notices[0]


def test_a_damaged_block_is_one_notice_and_never_recalled(tmp_path):
    memory = BlockMemory(8, 1, INV, directory=tmp_path, key="k")
    fill(memory, [24])
    meta, tensors = memory.state([0, 1])
    g = memory.geometry
    at = FILE_HEADER + g.record_size + g.head_size + g.token_size + 5  # inside block 1's layer 0
    with open(memory.path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(MemoryFileError):
        memory.read(0, 1)
    assert memory.valid() == [0, 2]
    notices = memory.take_notices()
    assert len(notices) == 1 and "block #2" in notices[0] and "tokens 8–15" in notices[0]
    # the record's token section is intact, so a reopened memory finds the damage only when it reads the block
    memory.read(1, 1)  # the other layer of the block is intact
    # a file whose header is damaged: the chat opens with an empty memory and one notice
    with open(memory.path, "r+b") as f:
        f.write(b"garbage!")
    fresh = BlockMemory(8, 1, INV, key="k")
    notices = fresh.open(memory.path, meta, tensors, [0, 1], [1000 + t for t in range(24)])
    assert fresh.blocks == 0 and len(notices) == 1


def recall_run(model, ids, max_positions, recall_at=(80, 130, 150), pinned=None):
    """Stream ``ids`` through a 4 + 40 cache with 96 recall slots in blocks of 32 (a chunk of 8 that
    recalls at each of ``recall_at``, else token by token); record each step's held tokens in slot
    order (sinks, parked ``pinned`` tokens, recalled blocks, window) and the position of the first."""
    cache = SinkCache(rope_inv_freqs(model), 4, 40, 8, max_positions=max_positions, pin_max=16 if pinned else 0,
                      recall=96, recall_block=32)
    contexts, sizes, starts, out, i = [], [], [], [], 0
    recalled = []
    with torch.no_grad():
        while i < len(ids):
            size = 8 if i in recall_at else 16 if i == 0 else 1
            pos, _ = cache.reserve(size, recall=i in recall_at)
            if i in recall_at:  # every layer recalls the whole memory (it holds at most 3 blocks)
                assert 0 < cache.memory.blocks <= 3
            logits = forward(model, cache, ids[i : i + size], pos, keep=0)
            if pinned and i + size == pinned[1]:
                cache.pin(*pinned)
            chosen = cache.recalled[0]
            assert all(r == chosen for r in cache.recalled)
            (s0, s1), (w0, w1) = cache.kept()
            back = [t for b in chosen for a, z in cache.memory.spans(b) for t in range(a, z)]
            parked = [t for a, z, _ in cache.parked for t in range(a, z)]
            contexts.append([t for t in [*range(s0, s1), *parked, *back, *range(w0, i)] if t < i])
            starts.append(pos[0, 0].item() - len(contexts[-1]))
            sizes.append(size)
            out.append(logits)
            recalled.append(len(back))
            i += size
    return cache, contexts, sizes, starts, out, recalled


@pytest.mark.parametrize("max_positions, pinned", [(None, None), (140, None), (140, (20, 30))])
def test_recalled_blocks_equal_the_reference_at_contiguous_positions(smollm_f32, max_positions, pinned):
    """The reference (tests/test_cache.py) keeps every token's K/V as first computed and attends to the
    given tokens at contiguous positions: sinks, parked pinned tokens, the recalled blocks, the window.
    The cache brings the blocks back from the memory file and places them before the window, rebased
    or not, after the pinned tokens an eviction parked."""
    model = smollm_f32.model
    ids = text_ids(smollm_f32.tokenizer, 170)
    cache, contexts, sizes, starts, got, recalled = recall_run(model, ids, max_positions, pinned=pinned)
    if pinned:
        assert cache.parked and not any(a < pinned[1] and pinned[0] < b for a, b in cache.evictions)
    assert max(recalled) == 96 and recalled[-1] == 96  # 3 blocks recalled by the end, kept while decoding
    assert cache.occupancy().recalled == 96
    if max_positions:
        assert cache.base > 0  # rebased with recalled tokens in place
    assert worst(got, reference_logits(model, ids, contexts, sizes, starts)) <= SAME


def test_pass_key_is_found_with_recall_and_not_without(smollm):
    """The bundled model, raw text, greedy: a key evicted long before the question."""
    from sinkchat.bench.memory import passkey_task, run_task

    task = passkey_task(smollm.tokenizer, 600, 0.15, seed=3)
    sinks = run_task(smollm.model, smollm.tokenizer, task, "sinks", 4, 128)
    recall = run_task(smollm.model, smollm.tokenizer, task, "recall", 4, 128, recall=128, recall_block=64)
    assert sinks.where == "evicted" and not sinks.found
    assert recall.where == "recalled" and recall.found, recall.got


def test_recall_off_forgets(tmp_path):
    cache = SinkCache(INV, 2, 8, 4)
    assert cache.memory is None and cache.occupancy().recall_capacity == 0
    assert not os.listdir(tmp_path)


RECALL = dict(sinks=4, window=64, block=8, recall=32, recall_block=16, max_new_tokens=12, temperature=0,
              repetition_penalty=1.0)
TURNS = ["The pass key is 52871. Remember it.", "Tell me about the grass and the sky.", "And the sun?",
         "What is the pass key?"]


def recall_chat(loaded, store, turns):
    chat = Chat(loaded, Settings(**RECALL))
    say(chat, turns[0])
    chat_id = store.create(chat, chat.settings)
    for text in turns[1:]:
        say(chat, text)
        store.save(chat_id, chat)
    return chat_id, chat


def test_resume_with_a_memory_is_token_identical(smollm):
    store = Store()
    chat_id, chat = recall_chat(smollm, store, TURNS[:3])
    assert chat.cache.memory.blocks >= 2, "the test needs blocks in the memory when it is saved"
    assert store.memory_path(chat_id).is_file()
    store.unlock(chat_id)
    again = Chat(smollm, chat.settings)
    assert Store(store.root).open(chat_id, again) == []
    assert again.cache.memory.mark() == chat.cache.memory.mark()
    n = len(chat.tokens)
    assert say(again, TURNS[3]) == say(chat, TURNS[3])
    assert again.tokens[n:] == chat.tokens[n:]
    assert again.occupancy().recall == chat.occupancy().recall and chat.occupancy().recall
    assert "recalled" in again.occupancy().text()


def test_resuming_with_recall_off_says_the_memory_is_dropped(smollm):
    """--resume N --recall 0 on a chat with a memory: one notice says what happens to it (it was silent)."""
    store = Store()
    chat_id, chat = recall_chat(smollm, store, TURNS[:3])
    blocks = chat.cache.memory.blocks
    store.unlock(chat_id)
    notices = Store(store.root).open(chat_id, Chat(smollm, chat.settings.replace(recall=0)))
    assert notices == [f"this chat's memory of {blocks} blocks is not used with --recall 0 and is dropped at its "
                       "next save; resume with --recall N to keep recalling from it"]


def test_rollback_takes_the_turns_blocks_back_out_of_the_memory(smollm):
    store = Store()
    _, chat = recall_chat(smollm, store, TURNS[:2])
    before, tokens = chat.cache.memory.mark(), list(chat.tokens)
    first = say(chat, "Tell me a long story about the pass key and the grass, the sky and the sun.")
    assert chat.cache.memory.mark() != before
    assert chat.rollback() is None
    assert chat.cache.memory.mark() == before and chat.tokens == tokens
    assert say(chat, "Tell me a long story about the pass key and the grass, the sky and the sun.") == first


def test_a_damaged_memory_file_loses_recall_not_the_chat(smollm):
    store = Store()
    chat_id, chat = recall_chat(smollm, store, TURNS[:3])
    store.unlock(chat_id)
    store.memory_path(chat_id).write_bytes(b"not a memory")
    again = Chat(smollm, chat.settings)
    notices = Store(store.root).open(chat_id, again)
    assert len(notices) == 1 and "memory file" in notices[0] and "can no longer be recalled" in notices[0]
    assert again.tokens == chat.tokens and again.cache.memory.blocks == 0
    assert say(again, TURNS[3])  # the chat goes on, and new evictions are remembered again


def memory_tokens(memory: BlockMemory) -> list[int]:
    """Every conversation token the memory holds, in blocks (damaged ones too) and pending, in its order."""
    return [t for runs in [*memory.runs, memory.pending] for t0, t1, _ in runs for t in range(t0, t1)]


def evicted_tokens(cache: SinkCache) -> list[int]:
    return [t for a, b in cache.evictions for t in range(a, b)]


@pytest.mark.parametrize("window", [40, 96])
def test_resume_with_another_window_keeps_every_evicted_token_in_the_memory(smollm, window):
    """A chat saved with --window 64 and resumed with a smaller or larger one: each token the rebuilt
    cache does not hold is in the memory exactly once (in a block or waiting for one), on disk too."""
    store = Store()
    chat_id, chat = recall_chat(smollm, store, TURNS[:3])
    store.unlock(chat_id)
    again = Chat(smollm, chat.settings.replace(window=window))
    Store(store.root).open(chat_id, again)
    memory = again.cache.memory
    assert sorted(memory_tokens(memory)) == evicted_tokens(again.cache)
    assert memory.blocks == len(evicted_tokens(again.cache)) // memory.block >= 1
    for b in memory.valid():  # each block reads back from the file
        memory.read(0, b)
    say(again, TURNS[3])
    assert sorted(memory_tokens(memory)) == evicted_tokens(again.cache)


def test_a_new_chats_memory_has_the_chats_own_name_from_its_first_save(smollm):
    """No save names a temporary memory file (one a later start may sweep once its process is gone)."""
    store = Store()
    chat = Chat(smollm, Settings(**RECALL))
    for text in TURNS[:3]:
        say(chat, text)
    assert chat.cache.memory.blocks
    chat_id = store.create(chat, chat.settings)
    assert store.memory_path(chat_id).is_file() and not list((store.root / "state").glob(".memory-*"))
    store.save(chat_id, chat)
    assert store.memory_path(chat_id).is_file() and not list((store.root / "state").glob(".memory-*"))


KILLED = """
import json, sys
sys.path.insert(0, "tests")
from _helpers import say
from sinkchat.engine import Chat
from sinkchat.model import load
from sinkchat.settings import Settings
from sinkchat.store import Store
settings, turns = Settings(**json.loads(sys.argv[2])), json.loads(sys.argv[3])
chat, store = Chat(load("smollm2-135m", quant="auto", device="cpu"), settings), Store(sys.argv[1])
say(chat, turns[0])
chat_id = store.create(chat, settings)
print(len(chat.tokens), chat.cache.memory.blocks, flush=True)
for text in turns[1:]:
    say(chat, text)
    store.save(chat_id, chat)
    print(len(chat.tokens), chat.cache.memory.blocks, flush=True)
"""


def test_kill_9_while_a_memory_block_is_written_loses_no_turn(smollm, tmp_path):
    """A real SIGKILL half-way through a block record (a turn evicting into the memory), then the next
    start: every saved turn is there, the memory holds the blocks the last save counted, intact, and
    the chat goes on recalling from them."""
    settings = {**RECALL, "window": 48}
    turns = [*TURNS[:3], "Tell me a long story about the grass.", *TURNS[3:]]
    proc = subprocess.run([sys.executable, "-c", KILLED, str(tmp_path), json.dumps(settings), json.dumps(turns)],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "SINKCHAT_FAULT": "memory-write@3"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    saves = [tuple(map(int, line.split())) for line in proc.stdout.split("\n") if line]
    assert saves and saves[-1][1] >= 1, "the kill should come after a save that counts a block"
    tokens, blocks = saves[-1]
    chat = Chat(smollm, Settings(**settings))
    notices = Store(tmp_path).open(1, chat)
    assert len(notices) <= 1, notices
    assert len(chat.tokens) == tokens and chat.cache.memory.blocks == blocks
    memory = chat.cache.memory
    assert memory.valid() == list(range(blocks))
    for b in range(blocks):
        memory.read(0, b)
    assert sorted(memory_tokens(memory)) == evicted_tokens(chat.cache)
    say(chat, "What is the pass key?")
    assert chat.occupancy().recall and not memory.damaged


def test_autosave_flushes_the_memory_on_its_writing_thread_before_the_save(smollm, monkeypatch):
    """The fsync of a turn's blocks (milliseconds) is not on the thread that captures the chat between
    turns; on the writing thread it comes before the state file that counts the blocks."""
    import threading

    from sinkchat.store import Autosave

    synced: list[tuple[str, str]] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(
        (threading.current_thread().name, os.readlink(f"/proc/self/fd/{fd}"))) or real(fd))
    store = Store()
    chat = Chat(smollm, Settings(**RECALL))
    autosave = Autosave(store, chat, chat.settings, None)
    for text in TURNS[:3]:
        say(chat, text)
        captured = autosave.capture(chat)
        assert synced == []
        writer = threading.Thread(target=autosave.write, args=(captured,), name="writer")
        writer.start()
        writer.join()
        names = [Path(path).name for thread, path in synced]
        assert {thread for thread, _ in synced} == {"writer"}
        memory = [i for i, name in enumerate(names) if name.endswith(".memory") or name.startswith(".memory-")]
        state = [i for i, name in enumerate(names) if "safetensors" in name]
        assert state and (memory[0] < state[0] if chat.cache.memory.blocks else not memory), names
        synced.clear()
    assert chat.cache.memory.blocks and store.memory_path(autosave.chat_id).is_file()
