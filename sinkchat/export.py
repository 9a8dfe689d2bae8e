"""Saved chats as Markdown (to read) and JSON (to process or import), evicted spans marked.

Eviction is about the model's memory, not the record: every message is exported in full, and
each one says which of its tokens the model no longer holds. Neither holds a raw control
character: Markdown shows them as symbols (it is printed to terminals), JSON escapes them (it
loads back as the very same text).
"""

from __future__ import annotations

import json
from datetime import datetime

from .ledger import NOTE_LABEL, clip
from .store.records import Transcript
from .text import clean, escape_json

FORMAT = "sinkchat-chat/1"


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
            "messages": [
                {"role": m.role, "content": m.content, "note": m.note, "start": m.start, "end": m.end,
                 "evicted": [list(s) for s in clip(spans, m.start, m.end)]}
                for m in t.messages
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
        f"- {len(t.tokens)} tokens; evicted from the model's memory: "
        + (", ".join(f"tokens [{a}, {b})" for a, b in spans) or "none"),
    ]
    for m in t.messages:
        note = f" [{NOTE_LABEL.get(m.note, m.note)}]" if m.note else ""
        lines += ["", f"## {m.role}{note}", ""]
        cut = clip(spans, m.start, m.end)
        evicted = sum(b - a for a, b in cut)
        if evicted == m.end - m.start and evicted:
            lines += [f"> [evicted] the model no longer holds this message (tokens [{m.start}, {m.end}))", ""]
        elif evicted:
            where = ", ".join(f"[{a}, {b})" for a, b in cut)
            lines += [f"> [partly evicted] tokens {where} of this message's [{m.start}, {m.end}) are gone from "
                      "the model's memory", ""]
        lines.append(m.content or ("_(the chat template's default system prompt)_" if m.role == "system" else ""))
    return clean("\n".join(lines) + "\n")
