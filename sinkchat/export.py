"""Saved chats as Markdown (to read) and JSON (to process or import), in the screen's words.

Eviction is about the model's memory, not the record: every message is exported in full, and
each one says what the model still holds of it. Markdown labels each message exactly as the
transcript does (``#5 you  ▒ pinned: the model keeps it``, ``⊘ forgotten``, ``✂ 12 of 40 tokens
forgotten``, a paste read in part) and lists the forgotten spans as the gauge does; JSON gives the
same facts as fields (number, pinned, note, evicted token spans). Neither holds a raw control
character: Markdown shows them as symbols (it is printed to terminals), JSON escapes them (it
loads back as the very same text).
"""

from __future__ import annotations

import json
from datetime import datetime

from .ledger import clip, describe_span, is_pinned, label, memory
from .store.records import Transcript
from .text import clean, escape_json

FORMAT = "sinkchat-chat/1"


def _pinned(t: Transcript) -> list[bool]:
    pins, sinks = [tuple(s) for s in t.meta.get("pins", [])], t.meta.get("sinks", 0)
    return [is_pinned(m, pins, sinks) for m in t.messages]


def to_json(t: Transcript) -> str:
    spans = t.evicted
    return escape_json(json.dumps(
        {
            "format": FORMAT,
            "id": t.id,
            "title": t.title,
            "created": t.created,
            "updated": t.updated,
            "settings": t.settings,
            "cache": {k: t.meta.get(k) for k in ("sinks", "window", "block", "n_sink", "n_win", "seen")},
            "evicted": [list(s) for s in spans],
            "pins": [list(s) for s in t.meta.get("pins", [])],
            "messages": [
                {"number": i + 1, "role": m.role, "content": m.content, "note": m.note, "start": m.start, "end": m.end,
                 "pinned": pinned, "evicted": [list(s) for s in clip(spans, m.start, m.end)]}
                for i, (m, pinned) in enumerate(zip(t.messages, _pinned(t)))
            ],
            "tokens": t.tokens,
        },
        ensure_ascii=False,
        indent=1,
    ))


def to_markdown(t: Transcript) -> str:
    spans = t.evicted
    when = datetime.fromtimestamp(t.updated).strftime("%Y-%m-%d %H:%M")
    s = t.settings
    lines = [
        f"# {t.title}",
        "",
        f"- chat {t.id}, last saved {when}, model {s.get('model', '?')}, "
        f"sinks {t.meta.get('sinks', '?')} + window {t.meta.get('window', '?')}",
        f"- {len(t.tokens)} tokens; " + ("forgotten by the model:" if spans else "nothing forgotten by the model"),
        *(f"  - ✂ forgot {describe_span(span, t.messages)}" for span in spans),
    ]
    for i, (m, pinned) in enumerate(zip(t.messages, _pinned(t))):
        lines += ["", f"## {label(i, m.role, m.note, memory(m, spans), pinned)}", ""]
        lines.append(m.content or ("_(the chat template's default system prompt)_" if m.role == "system" else ""))
    return clean("\n".join(lines) + "\n")
