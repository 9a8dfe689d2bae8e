"""Long-chat memory: a fact stated early, asked for after the window moved past it, in three modes:
``dense`` (everything kept: the model's own ceiling, where the context fits the model), ``sinks``
(sinks + window: what left the window is forgotten) and ``recall`` (sinks + window + recall from the
block memory of what left it, :mod:`sinkchat.kv.memory`, after InfLLM, Xiao et al., 2024).

Tasks (:data:`TASKS`), each at a length in tokens and a depth (0..1) of the fact in the context:

* ``passkey``: a five-digit key in repeated filler (Mohtashami & Jaggi, 2023), raw text;
* ``needle``: a sentence ("The secret ingredient of grandmother's soup is saffron.") in real text,
  the bundled default text that ``bench ppl`` reads (Kamradt's needle in a haystack), raw text;
* ``lines``: LongChat's LongEval lines retrieval (Li et al., 2023): ``line 417: REGISTER_CONTENT is
  <37215>`` x N, then the content of one line, raw text;
* ``chat``: a fact told in an early user turn, asked for many turns later, every turn through the
  model's chat template as the chat engine renders it (:class:`~sinkchat.template.Turns`), the
  other turns from ``bench turns``' script;
* the user's own, from a JSONL file (:mod:`.taskfile`).

Scoring: an exact answer (passkey, lines, a file's task without candidates) is found when the greedy
continuation holds it (digits: the continuation's digits start with it); a free-form fact (needle,
chat, a file's task with candidates) is found when the right answer has the highest log-likelihood
(summed over its tokens) among the candidates, so a 135M model's score means something. The context
is fed in chunks of 64 tokens, the question as its own chunks; in recall mode each chunk recalls,
as the chunks of a long user message do. The report says where the answer's tokens were when the
question was asked: in the window, recalled, or evicted.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass

import torch

from ..kv import SinkCache
from ..kv.cache import max_positions
from ..ledger import covered_by
from ..template import Turns
from . import bos_first, default_text, text_ids
from .stream import Stream, Tick, dense_cache, nll
from .taskfile import UserTask

MODES = ("dense", "sinks", "recall")
TASKS = ("passkey", "needle", "lines", "chat")
CHUNK = 64  # tokens per forward while reading the context

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"

SOUP = (
    "\n\nThe secret ingredient of grandmother's soup is {x}.\n\n",
    "\n\nWhat is the secret ingredient of grandmother's soup? The secret ingredient of grandmother's soup is",
    ("saffron", "ginger", "cinnamon", "garlic", "nutmeg", "lemon", "honey", "paprika"),
)

LINES_HEAD = (
    "Below is a record of lines I want you to remember. Each line begins with 'line <line index>' and "
    "contains a '<REGISTER_CONTENT>' at the end of the line as a numerical value. For each line index, "
    "memorize its corresponding <REGISTER_CONTENT>. At the end of the record, I will ask you to retrieve "
    "the corresponding <REGISTER_CONTENT> of a certain line index. Now the record start:\n\n"
)
LINE = "line {label}: REGISTER_CONTENT is <{value}>\n"
LINES_QUESTION = (
    "\nNow the record is over. Tell me what is the <REGISTER_CONTENT> in line {label}? I need the "
    "number.\nThe <REGISTER_CONTENT> in line {label} is <"
)

KEY_FACT = (
    "Please remember this: I keep my spare key under the {x}.",
    "I will remember that.",
    "Where do I keep my spare key?",
    "You keep your spare key under the",
    ("doormat", "flowerpot", "mailbox", "bench", "rock", "stairs", "bin", "lamp"),
)


@dataclass
class Task:
    """One question: ``ids`` (context, then the question from ``ask`` on), the ``answer`` and its token
    span in ``ids`` (None: not found in the context), and ``choices`` (None: greedy, exact answer)."""

    task: str
    ids: list[int]
    ask: int
    answer: str
    span: tuple[int, int] | None
    depth: float | None
    choices: tuple[str, ...] | None = None
    choice_ids: tuple[list[int], ...] | None = None


@dataclass
class Result:
    task: str
    mode: str
    answer: str  # the right answer
    got: str  # the greedy continuation, or the candidate with the highest log-likelihood
    found: bool
    tokens: int
    depth: float | None
    depth_tokens: int | None  # the answer's first token in the input
    where: str  # the answer's tokens when the question was asked: window, recalled, evicted, dense, "-"
    seconds: float = 0.0


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def _bos(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] if bos_first(tokenizer) else []


def passkey_task(tokenizer, tokens: int, depth: float, seed: int) -> Task:
    """About ``tokens`` tokens of filler with a five-digit key at ``depth`` (0..1) of it, then the question."""
    key = str(random.Random(seed).randint(10000, 99999))
    filler = _encode(tokenizer, FILLER)
    n = max(1, tokens // len(filler))
    at = int(round(depth * n))
    before = _bos(tokenizer) + filler * at
    needle = _encode(tokenizer, NEEDLE.format(key=key))
    context = before + needle + filler * (n - at)
    return Task(
        "passkey",
        context + _encode(tokenizer, QUESTION),
        len(context),
        key,
        (len(before), len(before) + len(needle)),
        depth,
    )


def needle_task(tokenizer, tokens: int, depth: float, seed: int, text: str | None = None) -> Task:
    """A sentence in ``tokens`` tokens of real text (``text``, default :func:`~sinkchat.bench.default_text`),
    at the line break nearest before ``depth``; candidates: :data:`SOUP`'s eight ingredients."""
    fact, question, choices = SOUP
    x = random.Random(seed).choice(choices)
    needle, asked = _encode(tokenizer, fact.format(x=x)), _encode(tokenizer, question)
    body = text_ids(tokenizer, text or default_text(), max(8, tokens - len(needle) - len(asked)))
    at = max(len(_bos(tokenizer)), int(round(depth * len(body))))
    for back in range(min(64, at)):  # a whole line before the needle: start it after a line break
        if "\n" in tokenizer.decode(body[at - back - 1 : at - back]):
            at -= back
            break
    context = body[:at] + needle + body[at:]
    return Task(
        "needle",
        context + asked,
        len(context),
        x,
        (at, at + len(needle)),
        depth,
        choices,
        tuple(_encode(tokenizer, " " + c) for c in choices),
    )


def lines_task(tokenizer, tokens: int, depth: float, seed: int) -> Task:
    """LongEval's lines (``line 417: REGISTER_CONTENT is <37215>``) filling about ``tokens`` tokens; the
    question asks for the line at ``depth`` of them."""
    rng = random.Random(seed)
    head = _bos(tokenizer) + _encode(tokenizer, LINES_HEAD)
    per_line = len(_encode(tokenizer, LINE.format(label=417, value=37215)))
    n = max(2, (tokens - len(head) - 30) // per_line)
    labels = rng.sample(range(100, 100 + max(900, 2 * n)), n)
    values = [str(rng.randint(10000, 99999)) for _ in range(n)]
    asked = min(n - 1, int(round(depth * (n - 1))))
    context, span = list(head), (0, 0)
    for i, (label, value) in enumerate(zip(labels, values)):
        line = _encode(tokenizer, LINE.format(label=label, value=value))
        if i == asked:
            span = (len(context), len(context) + len(line))
        context += line
    question = _encode(tokenizer, LINES_QUESTION.format(label=labels[asked]))
    return Task("lines", context + question, len(context), values[asked], span, depth)


def chat_task(tokenizer, tokens: int, depth: float, seed: int) -> Task:
    """A chat of about ``tokens`` tokens through the model's chat template: the turns of ``bench turns``'
    script (repeated as needed), :data:`KEY_FACT`'s fact told in the user turn at ``depth`` of them, and
    asked for in the last; candidates: its eight places."""
    from .turns import SCRIPT

    fact, ack, question, prefix, choices = KEY_FACT
    x = random.Random(seed).choice(choices)
    turns = Turns(tokenizer, None)
    exchanges = [(fact.format(x=x), ack)]
    per_turn = sum(len(_encode(tokenizer, q + r)) + 12 for q, r in SCRIPT) / len(SCRIPT)
    n = max(1, int(tokens / per_turn))
    told = int(round(depth * n))
    script = [SCRIPT[i % len(SCRIPT)] for i in range(n)]
    exchanges = script[:told] + exchanges + script[told:]
    ids: list[int] = []
    span = (0, 0)
    for i, (user, reply) in enumerate(exchanges):
        if i == 0:
            system, turn = turns.first(user)
            ids += turns.encode(system)
        else:
            turn = turns.next(user)
        start = len(ids)
        ids += turns.encode(turn)
        if i == told:
            span = (start, len(ids))
        ids += turns.encode([(reply, True)])
    ask = len(ids)
    ids += turns.encode(turns.next(question) + [(prefix, True)])
    return Task("chat", ids, ask, x, span, depth, choices, tuple(_encode(tokenizer, " " + c) for c in choices))


BUILDERS = {"passkey": passkey_task, "needle": needle_task, "lines": lines_task, "chat": chat_task}


def user_task(tokenizer, task: UserTask) -> Task:
    """A task of the user's file as token ids: raw text (BOS, context, a line break, question) or, with
    ``chat``, the context as a user turn answered "OK.", then the question as the next turn. The
    answer's span is where its text first appears in the context (None if it does not)."""
    context, answer = task.context, task.answer
    if task.chat:
        turns = Turns(tokenizer, None)
        system, turn = turns.first(context)
        head = turns.encode(system)
        first = next((i for i, (_, literal) in enumerate(turn) if literal), 0)  # where the context starts
        lead = head + turns.encode(turn[:first])
        ids = head + turns.encode(turn) + turns.encode([("OK.", True)])
        ask = len(ids)
        ids += turns.encode(turns.next(task.question))
    else:
        lead = _bos(tokenizer)
        ids = lead + _encode(tokenizer, context)
        ask = len(ids)
        ids += _encode(tokenizer, "\n" + task.question)
    span = None
    at = context.find(answer)
    if at >= 0:
        a = len(lead) + len(_encode(tokenizer, context[:at]))
        span = (a, max(a + 1, len(lead) + len(_encode(tokenizer, context[: at + len(answer)]))))
    depth = span[0] / ask if span else None
    choices = task.candidates
    choice_ids = tuple(_encode(tokenizer, (" " if not task.chat else "") + c) for c in choices) if choices else None
    return Task(task.source, ids, ask, answer, span, depth, choices, choice_ids)


def matches(answer: str, text: str) -> bool:
    """An exact answer in a greedy continuation: digits start the continuation's digits; other text
    appears in it (case and runs of white space aside)."""
    if answer.isdigit():
        return "".join(re.findall(r"\d", text)).startswith(answer)
    squash = lambda s: " ".join(s.lower().split())  # noqa: E731
    return squash(answer) in squash(text)


@torch.inference_mode()
def run_task(
    model,
    tokenizer,
    task: Task,
    mode: str,
    sinks: int,
    window: int,
    recall: int = 0,
    recall_block: int = 64,
    chunk: int = CHUNK,
    tick: Tick | None = None,
) -> Result:
    """Feed ``task`` through a cache of ``mode`` in chunks of ``chunk`` tokens, then score it: greedy
    decoding, or each candidate's log-likelihood (the cache taken back to the question for each)."""
    t0 = time.perf_counter()
    if mode == "dense":
        cache = dense_cache(model)
    else:
        cache = SinkCache.for_model(
            model, sinks, window, recall=recall if mode == "recall" else 0, recall_block=recall_block
        )
    stream = Stream(model, cache)  # which also names the ids it fed to the memory's records
    recalling = mode == "recall"
    chunk = chunk if mode == "dense" else min(chunk, window)  # a chunk must fit the window

    def feed(a: int, b: int) -> torch.Tensor:
        for i in range(a, b, chunk):
            logits = stream.forward(task.ids[i : min(b, i + chunk)], recall=recalling)
            if tick is not None:
                tick(min(chunk, b - i))
        return logits

    feed(0, task.ask)
    stream.mark()
    logits = feed(task.ask, len(task.ids))
    where = _where(cache, task.span)
    if task.choices:
        scores = []
        for i, cand in enumerate(task.choice_ids):
            if i:
                stream.back()
                logits = feed(task.ask, len(task.ids))
            rows = logits[-1:] if len(cand) == 1 else torch.cat([logits[-1:], stream.forward(cand[:-1])])
            scores.append(-sum(nll(rows, cand)))
        got = task.choices[max(range(len(scores)), key=scores.__getitem__)]
        found = got == task.answer
    else:
        out: list[int] = []
        for _ in range(len(_encode(tokenizer, " " + task.answer)) + 4):
            tok = int(logits[-1].argmax())
            out.append(tok)
            logits = stream.forward([tok])
        got = tokenizer.decode(out, skip_special_tokens=True).strip()
        found = matches(task.answer, got)
    return Result(
        task.task,
        mode,
        task.answer,
        got,
        found,
        len(task.ids),
        task.depth,
        task.span[0] if task.span else None,
        where,
        time.perf_counter() - t0,
    )


def _where(cache, span: tuple[int, int] | None) -> str:
    if span is None:
        return "-"
    if not isinstance(cache, SinkCache):
        return "window"
    a, b = span
    evicted = covered_by(cache.evictions, a, b)
    if not evicted:
        return "window"
    recalled = covered_by(cache.occupancy().recalled_spans(), a, b)
    return "recalled" if recalled and recalled >= (b - a) // 2 else "evicted"  # a 1-token answer: 0 >= 0


def run_memory(
    loaded,
    modes: list[str],
    tasks: list[str],
    user: list[UserTask],
    lengths: list[int],
    depths: list[float],
    keys: int,
    sinks: int,
    window: int,
    recall: int,
    recall_block: int,
    bars,
    results: list[Result],
    note=None,
) -> None:
    """Every built-in task at every (length, depth, key) and every task of the user's file, in every mode,
    appended to ``results`` as it is measured. Dense skips a task longer than the model's context
    (``note`` says so once)."""
    model, tokenizer = loaded.model, loaded.tokenizer
    limit = max_positions(model.config)
    skipped = False
    groups = [
        (f"{name} {tokens} @ {depth:.0%}", [BUILDERS[name](tokenizer, tokens, depth, seed) for seed in range(keys)])
        for name in tasks
        for tokens in lengths
        for depth in depths
    ]
    if user:
        groups.append((user[0].source.rsplit(":", 1)[0], [user_task(tokenizer, t) for t in user]))
    for label, group in groups:
        for mode in modes:
            todo = [t for t in group if mode != "dense" or limit is None or len(t.ids) <= limit]
            skipped |= len(todo) < len(group)
            tick = bars(f"{label} {mode}", sum(len(t.ids) for t in todo))
            for task in todo:
                results.append(run_task(model, tokenizer, task, mode, sinks, window, recall, recall_block, tick=tick))
    if skipped and note is not None:
        note(f"sinkchat: dense skipped the tasks longer than the model's context of {limit} tokens")


def memory_report(results: list[Result], extra: dict) -> dict:
    """One record per task and mode (``task``, ``mode``, ``found``, ``depth_tokens``, ``where``...) and a
    summary per (task, length, depth, mode); a file's tasks are summed per file and mode."""
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        name = r.task.rsplit(":", 1)[0] if r.task not in TASKS else r.task
        key = (name, r.tokens, r.depth, r.mode) if r.task in TASKS else (name, None, None, r.mode)
        groups.setdefault(key, []).append(r)
    summary = []
    for (task, tokens, depth, mode), rs in groups.items():
        where = {w: sum(r.where == w for r in rs) for w in ("window", "recalled", "evicted", "-")}
        at = sorted(r.depth_tokens for r in rs if r.depth_tokens is not None)
        summary.append(
            {
                "task": task,
                "tokens": tokens or round(sum(r.tokens for r in rs) / len(rs)),
                "depth": depth,
                "depth_tokens": at[len(at) // 2] if at else None,
                "mode": mode,
                "found": sum(r.found for r in rs),
                "tasks": len(rs),
                "where": where,
                "seconds": sum(r.seconds for r in rs),
            }
        )
    records = [
        {
            "task": r.task,
            "mode": r.mode,
            "found": bool(r.found),
            "tokens": r.tokens,
            "depth": r.depth,
            "depth_tokens": r.depth_tokens,
            "where": r.where,
            "answer": r.answer,
            "got": r.got,
            "seconds": round(r.seconds, 3),
        }
        for r in results
    ]
    return {**extra, "summary": summary, "results": records}
