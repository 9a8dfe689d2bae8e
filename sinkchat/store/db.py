"""``chats.db``: the chat index, the transcript and the token ledger in SQLite.

Tables: ``chats`` (one row per chat: title, times, settings, fingerprint, cache counters, save
generation and checksum), ``messages`` (the transcript) and ``tokens`` (the ledger: every token,
its message, and whether it is a sink ``s``, pinned ``p``, otherwise held ``w`` or evicted ``e``).

The schema is versioned with ``PRAGMA user_version`` and upgraded on every open by numbered
migrations, each in one transaction (the pattern of simonw/llm's ``migrations.py``): a database
made before versions existed, or one half-created by a killed first start, comes up to date; one
from a newer sinkchat is refused rather than misread. Rows are read by column name.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from array import array
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from ..errors import SinkchatError
from ..files import fault, reason
from ..ledger import Message, covered
from .records import ChatInfo, Refused, Snapshot

MIGRATIONS: list[tuple[str, ...]] = [
    (  # 1: the first schema (databases from before versioning have it at user_version 0)
        """CREATE TABLE IF NOT EXISTS chats (
            id INTEGER PRIMARY KEY AUTOINCREMENT, title TEXT NOT NULL, created REAL NOT NULL,
            updated REAL NOT NULL, settings TEXT NOT NULL, fingerprint TEXT NOT NULL,
            cache_meta TEXT NOT NULL, n_tokens INTEGER NOT NULL, gen INTEGER NOT NULL, checksum TEXT NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS messages (
            chat_id INTEGER NOT NULL, idx INTEGER NOT NULL, role TEXT NOT NULL, content TEXT NOT NULL,
            first_tok INTEGER NOT NULL, end_tok INTEGER NOT NULL, PRIMARY KEY (chat_id, idx)) WITHOUT ROWID""",
        """CREATE TABLE IF NOT EXISTS tokens (
            chat_id INTEGER NOT NULL, pos INTEGER NOT NULL, token INTEGER NOT NULL, msg INTEGER NOT NULL,
            kind TEXT NOT NULL, PRIMARY KEY (chat_id, pos)) WITHOUT ROWID""",
    ),
    (  # 2: why a reply ended early ("stopped", "length"), so a resumed chat shows it again
        "ALTER TABLE messages ADD COLUMN note TEXT NOT NULL DEFAULT ''",
    ),
]
VERSION = len(MIGRATIONS)
COLUMNS = {  # the columns of sinkchat's tables, as the migrations make them
    "chats": {"id", "title", "created", "updated", "settings", "fingerprint", "cache_meta", "n_tokens", "gen",
              "checksum"},
    "messages": {"chat_id", "idx", "role", "content", "first_tok", "end_tok"},
    "tokens": {"chat_id", "pos", "token", "msg", "kind"},
}
ADDED = {2: ("messages", "note")}  # a column a later migration adds: (table, column) by schema version


def loads(text) -> dict:
    """A JSON object from a row, or ``{}`` if the row holds anything else."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def text_of(value) -> str:
    """A row's text column as text, whatever a damaged row holds (bytes are decoded, replaced)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value if isinstance(value, str) else "" if value is None else str(value)


def time_of(value) -> float:
    """A row's time (seconds since the epoch), or 0 where a damaged row holds no usable time."""
    return float(value) if isinstance(value, (int, float)) and 0 <= value < 2**35 else 0.0


def count_of(value) -> int:
    """A row's count, or 0 where a damaged row holds none."""
    return value if isinstance(value, int) and value >= 0 else 0


class Database:
    """One connection to ``chats.db``, created 0600 (never through a symlink) and migrated on open."""

    def __init__(self, path: Path):
        self.path = path
        try:
            if not path.exists() and not path.is_symlink():
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
            elif path.is_symlink():
                raise Refused(f"{path} is a symbolic link; sinkchat does not follow links for its files")
            self.db = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)
            self.db.row_factory = sqlite3.Row
            self.db.text_factory = lambda data: data.decode("utf-8", "replace")  # a damaged row still reads
            self.db.execute("PRAGMA synchronous=FULL")
            try:
                self.migrate()
            except BaseException:
                self.db.close()
                raise
        except sqlite3.DatabaseError as exc:  # not SQLite at all ("file is not a database") is not ours
            kind = SinkchatError if isinstance(exc, sqlite3.OperationalError) else Refused
            raise kind(f"{path} cannot be used as sinkchat's chat store ({exc})") from None
        except OSError as exc:
            raise SinkchatError(f"cannot open the chat store {path}: {reason(exc)}") from None

    def migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > VERSION:
            raise Refused(f"{self.path} was written by a newer sinkchat (schema {version}); upgrade sinkchat")
        if problem := self.foreign(version):
            raise Refused(f"{self.path} is not sinkchat's chat store ({problem}); it was left as it is")
        for number in range(version + 1, VERSION + 1):
            with self.transaction() as db:
                for statement in MIGRATIONS[number - 1]:
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {number}")

    def foreign(self, version: int) -> str | None:
        """Why the file is another program's database, or None: read before anything is written, so
        a file that is not sinkchat's is never migrated into one. Sinkchat's own are empty (a first
        start), half-created by a killed first start (some of its tables, schema 0), or hold its
        three tables with their columns (other tables beside them are left alone)."""
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")
                  if not r[0].startswith("sqlite_")}
        if version == 0 and (other := sorted(tables - COLUMNS.keys())):
            return f"it holds the table{'s' * (len(other) > 1)} {', '.join(other)} and no sinkchat schema version"
        if version > 0 and (missing := sorted(COLUMNS.keys() - tables)):
            return f"schema {version} but no table {', '.join(missing)}"
        for table in sorted(tables & COLUMNS.keys()):
            want = set(COLUMNS[table]) | {c for v, (t, c) in ADDED.items() if t == table and v <= version}
            have = {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}
            if have != want:
                return f"its table {table} has the columns {', '.join(sorted(have))}"
        return None

    @contextmanager
    def transaction(self):
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
            self.db.execute("COMMIT")
        except BaseException:
            try:
                self.db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise

    def close(self) -> None:
        self.db.close()

    # -- chats ---------------------------------------------------------------------------------

    def row(self, chat_id: int) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM chats WHERE id=?", (chat_id,)).fetchone()

    def create(self, title: str, settings: dict, first_save: Callable[[int], Snapshot], above: int = 0) -> int:
        """A new chat's row and its first save's rows in one transaction, with ``first_save(id)``
        (which takes the chat's lock and returns the snapshot) in between: a kill leaves the whole
        chat or none. Its id is past every id this database ever gave and past ``above`` (the
        highest id the data dir's files name), so a database emptied or replaced never hands out
        the id of a chat whose files are still there."""
        now = time.time()
        with self.transaction() as db:
            given = db.execute("SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name='chats'), 0),"
                               " COALESCE((SELECT MAX(id) FROM chats), 0))").fetchone()[0]
            chat_id = max(given, above) + 1
            db.execute(
                "INSERT INTO chats (id, title, created, updated, settings, fingerprint, cache_meta, n_tokens, gen,"
                " checksum) VALUES (?, ?, ?, ?, ?, '{}', '{}', 0, 0, '')",
                (chat_id, title, now, now, json.dumps(settings)),
            )
            self._rows(db, chat_id, first_save(chat_id), {}, 0)
        return chat_id

    def last_id(self) -> int | None:
        row = self.db.execute("SELECT id FROM chats ORDER BY updated DESC, id DESC LIMIT 1").fetchone()
        return row["id"] if row else None

    def list(self, query: str | None = None) -> list[ChatInfo]:
        """Chats newest first; ``query`` matches titles and message text (case-insensitive, literal)."""
        sql = (
            "SELECT c.id, c.title, c.created, c.updated, c.settings, c.n_tokens,"
            " (SELECT COUNT(*) FROM messages m WHERE m.chat_id=c.id AND m.role!='system') AS n_messages FROM chats c"
        )
        args: tuple = ()
        if query:
            like = "%" + query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            sql += (" WHERE c.title LIKE ? ESCAPE '\\' OR EXISTS (SELECT 1 FROM messages m"
                    " WHERE m.chat_id=c.id AND m.content LIKE ? ESCAPE '\\')")
            args = (like, like)
        rows = self.db.execute(sql + " ORDER BY c.updated DESC, c.id DESC", args).fetchall()
        return [ChatInfo(r["id"], text_of(r["title"]), time_of(r["created"]), time_of(r["updated"]),
                         text_of(loads(r["settings"]).get("model", "?")), count_of(r["n_tokens"]),
                         count_of(r["n_messages"])) for r in rows]

    def rename(self, chat_id: int, title: str) -> None:
        self.db.execute("UPDATE chats SET title=? WHERE id=?", (title, chat_id))

    def delete(self, chat_id: int) -> None:
        with self.transaction() as db:
            for table, key in (("tokens", "chat_id"), ("messages", "chat_id"), ("chats", "id")):
                db.execute(f"DELETE FROM {table} WHERE {key}=?", (chat_id,))

    # -- snapshots -----------------------------------------------------------------------------

    def snapshot(self, chat_id: int) -> tuple[Snapshot | None, str | None]:
        """The rows' snapshot if their checksum holds, else ``(None, why)``."""
        row = self.row(chat_id)
        try:
            plain = self.db.cursor()
            plain.row_factory = None  # tuples: the whole ledger is read here, thousands of rows a turn
            msgs = plain.execute(
                "SELECT role, content, first_tok, end_tok, note FROM messages WHERE chat_id=? ORDER BY idx", (chat_id,)
            ).fetchall()
            toks = [r[0] for r in plain.execute("SELECT token FROM tokens WHERE chat_id=? ORDER BY pos", (chat_id,))]
            snap = Snapshot(toks, [Message(*m) for m in msgs], json.loads(row["cache_meta"]),
                            json.loads(row["fingerprint"]), json.loads(row["settings"]), row["gen"])
            if snap.checksum() == row["checksum"] and len(toks) == row["n_tokens"]:
                return snap, None
        except (sqlite3.Error, ValueError, TypeError) as exc:
            return None, f"the database rows are damaged ({exc})"
        return None, "the database rows are damaged (checksum mismatch)"

    def write(self, chat_id: int, snap: Snapshot, old_meta: dict, n_old: int, keep: int = 0) -> None:
        """Store ``snap`` in one transaction: new ledger rows appended (and those a rollback
        rewrote since the rows' revision replaced), changed kinds updated, messages from ``keep`` on
        replaced (the ones before are unchanged), the chat row replaced. ``old_meta``/``n_old``/
        ``keep``: what the rows held before. So a save writes rows in proportion to what changed,
        not to the length of the chat."""
        with self.transaction() as db:
            self._rows(db, chat_id, snap, old_meta, n_old, keep)

    @staticmethod
    def _rows(db, chat_id: int, snap: Snapshot, old_meta: dict, n_old: int, keep: int = 0) -> None:
        meta, toks = snap.meta, snap.tokens
        n_sink, win_start = meta["n_sink"], meta["seen"] - meta["n_win"]
        pinned, parked = _tokens(meta.get("pins", [])), _tokens(meta.get("parked", []))
        kind = lambda p: ("s" if p < n_sink else "p" if p in pinned else "w" if p >= win_start or p in parked  # noqa: E731
                          else "e")
        rewritten = snap.rewritten_from(old_meta.get("revision", 0))
        n_old = min(n_old, len(toks), len(toks) if rewritten is None else rewritten)
        same = old_meta.get("seen") is not None and all(
            old_meta.get(k) == meta[k] for k in ("sinks", "window", "n_sink")
        )
        # rows between the old and the new window start (a rollback may move it back) change kind;
        # the others keep theirs unless the geometry changed, or they are (or were) pinned or parked
        lo, hi = 0, n_old
        if same:
            old_start = old_meta["seen"] - old_meta["n_win"]
            lo, hi = min(old_start, win_start), min(n_old, max(old_start, win_start))
        was = _tokens(old_meta.get("pins", [])) | _tokens(old_meta.get("parked", []))
        odd = sorted(p for p in pinned | parked | was if p < n_old)
        db.execute("DELETE FROM tokens WHERE chat_id=? AND pos>=?", (chat_id, n_old))
        owner = _owners(snap.messages, n_old, len(toks))
        db.executemany(
            "INSERT INTO tokens VALUES (?, ?, ?, ?, ?)",
            ((chat_id, p, toks[p], owner[p - n_old], kind(p)) for p in range(n_old, len(toks))),
        )
        fault("db-mid")
        db.execute(
            "UPDATE tokens SET kind = CASE WHEN pos < ? THEN 's' WHEN pos < ? THEN 'e' ELSE 'w' END"
            " WHERE chat_id=? AND pos>=? AND pos<?", (n_sink, win_start, chat_id, lo, hi),
        )
        db.executemany("UPDATE tokens SET kind=? WHERE chat_id=? AND pos=?", ((kind(p), chat_id, p) for p in odd))
        db.execute("DELETE FROM messages WHERE chat_id=? AND idx>=?", (chat_id, keep))
        db.executemany(
            "INSERT INTO messages (chat_id, idx, role, content, first_tok, end_tok, note)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            ((chat_id, i, m.role, m.content, m.start, m.end, m.note)
             for i, m in enumerate(snap.messages[keep:], start=keep)),
        )
        db.execute(
            "UPDATE chats SET updated=?, settings=?, fingerprint=?, cache_meta=?, n_tokens=?, gen=?, checksum=?"
            " WHERE id=?",
            (time.time(), json.dumps(snap.settings), json.dumps(snap.fingerprint), json.dumps(meta), len(toks),
             snap.gen, snap.checksum(), chat_id),
        )


def _owners(messages: list[Message], start: int, end: int) -> array:
    """The message index of each token in ``[start, end)`` (0 for a token no message holds), from
    :func:`~sinkchat.ledger.covered`: a save costs its new tokens, not the length of the chat."""
    owner = array("l", [0]) * (end - start)
    for i in covered((start, end), messages):
        a, b = max(messages[i].start, start), min(messages[i].end, end)
        owner[a - start : b - start] = array("l", [i]) * (b - a)
    return owner


def _tokens(spans) -> set[int]:
    """The tokens of pinned spans ``[a, b]`` or parked runs ``[a, b, position]`` (bounded by ``--pin-max``)."""
    return {t for span in spans for t in range(span[0], span[1])}
