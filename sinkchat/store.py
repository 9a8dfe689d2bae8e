"""Chats on disk: a SQLite index + transcript + token ledger, and the KV state in safetensors.

Layout of the data dir (``config.data_dir(override)``, 0700; every file 0600)::

    chats.db              chats (index), messages (transcript), tokens (the ledger: every token,
                          its message, and whether it is a sink 's', in the window 'w' or evicted 'e')
    state/<id>.safetensors   sink + window K/V of the last save, plus a full copy of the ledger
    locks/<id>.lock          held (flock) by the one process that has the chat open for writing

Why two copies: the ledger is the truth and the KV is derived from it. The state file also carries
the transcript and ledger of its save, so either copy can repair the other. Both carry a sha256
checksum and a save generation; on open the newest intact copy wins:

* state file intact and of the same model/geometry -> KV restored as saved (no recomputation);
* state file missing, damaged or foreign (other model files, quant, dtype, sinks or window) -> the
  KV is rebuilt by re-prefilling the ledger's sink and window tokens, with a notice;
* database rows damaged -> transcript and ledger restored from the state file, with a notice;
* both damaged, or another tokenizer -> a one-line refusal; nothing is changed on disk.

A save is atomic: the state file is written to a temp file, fsynced and renamed (then the dir is
fsynced), and the database changes go in one transaction. A failed save (read-only or full disk)
raises :class:`SaveError` and leaves what was saved before untouched; the chat goes on in memory.

API (the CLI and the TUI use only this)::

    store = Store(data_dir=None)                  # opens/creates chats.db
    chat_id = store.create(chat, settings, title=None)   # first save; takes the chat's lock
    store.save(chat_id, chat)                     # after every turn and on quit; SaveError on failure
    store.list(query=None) -> [ChatInfo]          # newest first; query searches titles and messages
    store.last_id() -> int | None
    chat, notices = store.open(chat_id, loaded, chat_settings, read_only=False)   # ChatLocked if held
    store.settings(chat_id) -> dict               # the CLI settings the chat was made with
    store.transcript(chat_id) -> Transcript       # for show/export, no model needed
    store.rename(chat_id, title); store.delete(chat_id); store.close()
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import stat
import time
from array import array
from contextlib import suppress
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from . import config
from .cache import merge_spans
from .engine import Chat, ChatSettings, Message
from .models import forward
from .errors import SinkchatError

try:
    import fcntl
except ImportError:  # pragma: no cover - no flock on Windows; chats are then not locked
    fcntl = None

FORMAT = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS chats (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    title TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    settings TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    cache_meta TEXT NOT NULL,
    n_tokens INTEGER NOT NULL,
    gen INTEGER NOT NULL,
    checksum TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    chat_id INTEGER NOT NULL, idx INTEGER NOT NULL, role TEXT NOT NULL, content TEXT NOT NULL,
    first_tok INTEGER NOT NULL, end_tok INTEGER NOT NULL, PRIMARY KEY (chat_id, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tokens (
    chat_id INTEGER NOT NULL, pos INTEGER NOT NULL, token INTEGER NOT NULL, msg INTEGER NOT NULL,
    kind TEXT NOT NULL, PRIMARY KEY (chat_id, pos)
) WITHOUT ROWID;
"""


class SaveError(SinkchatError):
    """A save failed (read-only dir, full disk...): shown to the user; the chat goes on in memory."""


class ChatLocked(SinkchatError):
    """Another process has this chat open for writing."""


@dataclass
class Snapshot:
    """Everything one save records about a chat, apart from the KV tensors."""

    tokens: list[int]
    messages: list[Message]
    meta: dict  # SinkCache.state() meta
    fingerprint: dict  # model fingerprint + tokenizer + cache geometry
    settings: dict  # the CLI settings the chat was made with
    gen: int

    def checksum(self) -> str:
        head = json.dumps(
            [self.settings, self.fingerprint, self.meta, [_msg_row(m) for m in self.messages], self.gen],
            sort_keys=True,
        )
        digest = hashlib.sha256(head.encode())
        digest.update(array("q", self.tokens).tobytes())
        return digest.hexdigest()

    def header(self) -> dict:
        return {
            "format": FORMAT,
            "settings": self.settings,
            "fingerprint": self.fingerprint,
            "meta": self.meta,
            "messages": [_msg_row(m) for m in self.messages],
            "gen": self.gen,
        }


@dataclass(frozen=True)
class ChatInfo:
    id: int
    title: str
    created: float
    updated: float
    model: str
    n_tokens: int
    n_messages: int


@dataclass
class Transcript:
    """A saved chat as text and spans, for ``chats show`` and ``chats export``."""

    id: int
    title: str
    created: float
    updated: float
    settings: dict
    meta: dict
    messages: list[Message]
    tokens: list[int]
    notices: list[str] = field(default_factory=list)

    @property
    def evicted(self) -> list[tuple[int, int]]:
        return merge_spans(sorted(tuple(s) for s in self.meta.get("evictions", [])))


def _msg_row(m: Message) -> list:
    return [m.role, m.content, m.start, m.end]


def _fault(point: str) -> None:
    """Fault injection for the crash tests: ``SINKCHAT_FAULT=point@n`` SIGKILLs this process at
    ``point`` of its n-th save (a real kill -9 at an exact place, not a simulation)."""
    want = os.environ.get("SINKCHAT_FAULT")
    if want and want.split("@")[0] == point:
        _fault.count[point] = _fault.count.get(point, 0) + 1
        if _fault.count[point] == int(want.split("@")[1] if "@" in want else 1):
            os.kill(os.getpid(), 9)


_fault.count = {}


def model_fingerprint(chat: Chat) -> dict:
    """What the saved KV depends on: the loaded model (files, quant, dtype, RoPE), its tokenizer,
    and the cache geometry (sinks, window, block)."""
    return {
        **chat.loaded.fingerprint,
        "tokenizer": _vocab_hash(chat.tokenizer),
        "sinks": chat.cache.sinks,
        "window": chat.cache.window,
        "block": chat.cache.block,
    }


@lru_cache(maxsize=4)
def _vocab_hash(tokenizer) -> str:
    """Token ids mean something only to their tokenizer: a ledger needs the same vocabulary."""
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[:32]


def snapshot(chat: Chat, meta: dict, settings: dict, gen: int) -> Snapshot:
    """The chat's transcript and ledger, with ``meta`` from ``chat.cache.state()``."""
    return Snapshot(list(chat.tokens), [Message(**vars(m)) for m in chat.messages], meta,
                    model_fingerprint(chat), settings, gen)


# -- the state file ------------------------------------------------------------------------------


def _tensor_sum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def write_state(path: Path, snap: Snapshot, tensors: dict[str, torch.Tensor]) -> None:
    """Atomically replace ``path``: temp file, fsync, rename, fsync of the directory."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    tensors["ledger"] = torch.tensor(snap.tokens, dtype=torch.int64)
    header = {**snap.header(), "ledger_sum": snap.checksum(), "tensor_sum": _tensor_sum(tensors)}
    data = save(tensors, metadata={"sinkchat": json.dumps(header)})
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        half = len(data) // 2
        _write_all(fd, memoryview(data)[:half])
        _fault("state-temp")
        _write_all(fd, memoryview(data)[half:])
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with suppress(OSError):
            tmp.unlink()
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except OSError:
        with suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        n = os.write(fd, data)
        data = data[n:]


def _fsync_dir(path: Path) -> None:
    with suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_state(path: Path) -> tuple[Snapshot, dict[str, torch.Tensor]]:
    """The snapshot and KV tensors of a state file; ``ValueError`` saying why if it is unusable."""
    from safetensors import safe_open

    if not path.is_file():
        raise ValueError("the state file is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {})["sinkchat"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors reports truncation and bad headers in many ways
        raise ValueError(f"the state file is damaged ({str(exc).splitlines()[0][:80]})") from None
    if header.get("format") != FORMAT:
        raise ValueError("the state file has an unknown format")
    if _tensor_sum(tensors) != header.get("tensor_sum"):
        raise ValueError("the state file is damaged (checksum mismatch)")
    ledger = tensors.pop("ledger")
    snap = Snapshot(
        ledger.tolist(), [Message(*m) for m in header["messages"]], header["meta"],
        header["fingerprint"], header["settings"], header["gen"],
    )
    if snap.checksum() != header.get("ledger_sum"):
        raise ValueError("the state file is damaged (ledger checksum mismatch)")
    return snap, tensors


# -- restoring a chat ----------------------------------------------------------------------------


def restore(chat: Chat, snap: Snapshot, tensors: dict[str, torch.Tensor] | None) -> list[str]:
    """Make a fresh ``chat`` continue ``snap``: transcript, ledger, cache counters and KV.

    With ``tensors`` (from a state file of the same model and geometry) the KV is loaded as saved,
    so greedy decoding continues token for token as the uninterrupted chat would. Without, it is
    rebuilt from the ledger. Returns notices for the user.
    """
    notices: list[str] = []
    now = model_fingerprint(chat)
    if snap.fingerprint.get("tokenizer") != now["tokenizer"]:
        raise SinkchatError(
            f"this chat was made with {snap.fingerprint.get('model')}, whose tokenizer differs from "
            f"{now['model']}'s; resume it with --model {snap.fingerprint.get('model')}"
        )
    chat.tokens = list(snap.tokens)
    chat.messages = [Message(**vars(m)) for m in snap.messages]
    if not chat.tokens:
        return notices
    differs = [k for k in now if k != "block" and now[k] != snap.fingerprint.get(k)]
    if tensors is not None and not differs:
        chat.cache.load_state(tensors, snap.meta, device=chat._device)
        if now["block"] != snap.meta["block"]:  # the KV does not depend on it: keep it, say so
            chat.cache.block = now["block"]
            notices.append(f"eviction block changed from {snap.meta['block']} to {now['block']}; it applies from now on")
        return notices
    rebuild_kv(chat, snap.meta)
    if tensors is not None:
        notices.append(f"the saved KV cache was made with another {', '.join(differs)}; rebuilt it from the ledger")
    return notices


@torch.inference_mode()
def rebuild_kv(chat: Chat, meta: dict | None) -> None:
    """Re-prefill the ledger's sink and window tokens through ``chat.cache`` (fresh, empty).

    The sinks go in at positions ``0..S-1`` and the window right after them at ``S..S+W-1``;
    RoPE scores depend only on query-key distance, so this is the saved layout with the sinks
    moved forward, which is what the cache does anyway. The counters (``seen``, ``base``,
    the eviction ledger) are then set to say the window's first token is conversation token
    ``seen - W``, so new tokens get the next positions and later evictions name the right spans.
    With the saved sinks/window the held ranges are the saved ones; with others the first
    ``sinks`` tokens and the last ``window`` tokens of the ledger are held.
    """
    cache, tokens = chat.cache, chat.tokens
    seen = len(tokens)
    if meta and (meta["sinks"], meta["window"]) == (cache.sinks, cache.window) and meta["seen"] == seen:
        n_sink, n_win, evictions = meta["n_sink"], meta["n_win"], [list(s) for s in meta["evictions"]]
    else:
        n_sink = min(cache.sinks, seen)
        n_win = min(cache.window - cache.block if seen - n_sink > cache.window else cache.window, seen - n_sink)
        evictions = [[n_sink, seen - n_win]] if seen - n_win > n_sink else []
    for ids in (tokens[:n_sink], tokens[seen - n_win :]):
        for i in range(0, len(ids), chat.chunk):
            chunk = ids[i : i + chat.chunk]
            positions, _ = cache.reserve(len(chunk))
            forward(chat.model, cache, chunk, positions)
    tensors, new = cache.state()
    new.update(seen=seen, base=seen - n_win - n_sink, evictions=evictions, block=cache.block)
    cache.load_state(tensors, new)


# -- the store -----------------------------------------------------------------------------------


class Store:
    """The chats in one data dir. One instance per process, used by one thread at a time
    (the TUI's saver thread and UI thread take turns under a lock)."""

    def __init__(self, data_dir: str | Path | None = None):
        self.root = config.data_dir(data_dir)
        with suppress(OSError):  # private, but a dir the user made read-only stays read-only
            os.chmod(self.root, stat.S_IMODE(self.root.stat().st_mode) & 0o700)
        self.db_path = self.root / "chats.db"
        self._locks: dict[int, int] = {}
        try:
            if not self.db_path.exists():
                os.close(os.open(self.db_path, os.O_WRONLY | os.O_CREAT, 0o600))
            self.db = sqlite3.connect(self.db_path, timeout=10, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA synchronous=FULL")
            if not self.db.execute("SELECT 1 FROM sqlite_master WHERE name='chats'").fetchone():
                self.db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise SinkchatError(f"cannot open the chat store {self.db_path}: {exc}") from None

    # -- paths and locks ---------------------------------------------------------------------

    def state_path(self, chat_id: int) -> Path:
        return self.root / "state" / f"{chat_id}.safetensors"

    def _dir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(mode=0o700, exist_ok=True)
        return path

    def lock(self, chat_id: int) -> None:
        """Take the chat's write lock (released when this process exits, even by kill -9)."""
        if chat_id in self._locks or fcntl is None:
            return
        path = self._dir("locks") / f"{chat_id}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ChatLocked(
                f"chat {chat_id} is open in another sinkchat process (pid {holder}); close it first, "
                f"or read it with `sinkchat chats show {chat_id}`"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._locks[chat_id] = fd

    def _sweep(self, chat_id: int) -> None:
        """Remove temp files a killed save left behind (only the lock holder may: none is in flight)."""
        for tmp in (self.root / "state").glob(f".{chat_id}.safetensors.*.tmp"):
            with suppress(OSError):
                tmp.unlink()

    def unlock(self, chat_id: int) -> None:
        fd = self._locks.pop(chat_id, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        for chat_id in list(self._locks):
            self.unlock(chat_id)
        self.db.close()

    # -- writing -----------------------------------------------------------------------------

    def create(self, chat: Chat, settings: dict | None = None, title: str | None = None) -> int:
        """Register ``chat`` (titled by its first user message) and save it; returns its id."""
        if title is None:
            first = next((m.content for m in chat.messages if m.role == "user"), "") or "new chat"
            title = " ".join(first.split())[:60]
        now = time.time()
        try:
            cur = self.db.execute(
                "INSERT INTO chats (title, created, updated, settings, fingerprint, cache_meta, n_tokens, gen, checksum)"
                " VALUES (?, ?, ?, ?, '{}', '{}', 0, 0, '')",
                (title, now, now, json.dumps(settings or {})),
            )
        except sqlite3.Error as exc:
            raise SaveError(f"could not save the chat ({exc}); it goes on in memory only") from None
        chat_id = cur.lastrowid
        self.lock(chat_id)
        try:
            self.save(chat_id, chat)
        except SaveError:  # leave no half-made chat behind; the caller retries on the next turn
            with suppress(sqlite3.Error):
                self.db.execute("DELETE FROM chats WHERE id=?", (chat_id,))
            self.unlock(chat_id)
            raise
        return chat_id

    def save(self, chat_id: int, chat: Chat) -> None:
        """Write the chat's state file, then its rows in one transaction; ``SaveError`` on failure."""
        if fcntl is not None and chat_id not in self._locks:
            raise SaveError(f"chat {chat_id} is open read-only here; not saved")
        try:
            row = self.db.execute("SELECT settings, cache_meta, n_tokens, gen FROM chats WHERE id=?", (chat_id,)).fetchone()
            if row is None:
                raise SaveError(f"chat {chat_id} was deleted; not saved")
            settings, old_meta, n_old, gen = json.loads(row[0]), _loads(row[1]), row[2], row[3]
            tensors, meta = chat.cache.state()
            snap = snapshot(chat, meta, settings, gen + 1)
            self._dir("state")
            write_state(self.state_path(chat_id), snap, tensors)
            _fault("state-renamed")
            self._write_rows(chat_id, snap, old_meta, n_old)
        except SaveError:
            raise
        except (OSError, sqlite3.Error) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise SaveError(f"could not save chat {chat_id} ({reason}); it goes on in memory, earlier saves are intact") from None

    def _write_rows(self, chat_id: int, snap: Snapshot, old_meta: dict, n_old: int) -> None:
        meta, toks = snap.meta, snap.tokens
        win_start = meta["seen"] - meta["n_win"]
        owner = array("l", [0]) * len(toks)
        for i, m in enumerate(snap.messages):
            owner[m.start : m.end] = array("l", [i]) * (m.end - m.start)
        kind = lambda p: "s" if p < meta["n_sink"] else "w" if p >= win_start else "e"  # noqa: E731
        n_old = min(n_old, len(toks))
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("DELETE FROM tokens WHERE chat_id=? AND pos>=?", (chat_id, n_old))
            db.executemany(
                "INSERT INTO tokens VALUES (?, ?, ?, ?, ?)",
                ((chat_id, p, toks[p], owner[p], kind(p)) for p in range(n_old, len(toks))),
            )
            _fault("db-mid")
            lo = meta["n_sink"]
            if old_meta.get("seen") is not None and (old_meta["sinks"], old_meta["window"]) == (meta["sinks"], meta["window"]):
                lo = max(lo, old_meta["seen"] - old_meta["n_win"])
            db.execute("UPDATE tokens SET kind='e' WHERE chat_id=? AND pos>=? AND pos<?", (chat_id, lo, win_start))
            db.execute("UPDATE tokens SET kind='w' WHERE chat_id=? AND pos>=? AND pos<?", (chat_id, max(win_start, meta["n_sink"]), n_old))
            db.execute("DELETE FROM messages WHERE chat_id=?", (chat_id,))
            db.executemany(
                "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?)",
                ((chat_id, i, *_msg_row(m)) for i, m in enumerate(snap.messages)),
            )
            db.execute(
                "UPDATE chats SET updated=?, settings=?, fingerprint=?, cache_meta=?, n_tokens=?, gen=?, checksum=? WHERE id=?",
                (time.time(), json.dumps(snap.settings), json.dumps(snap.fingerprint), json.dumps(meta), len(toks),
                 snap.gen, snap.checksum(), chat_id),
            )
            db.execute("COMMIT")
        except BaseException:
            with suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise

    def rename(self, chat_id: int, title: str) -> None:
        title = " ".join(title.split())
        if not title:
            raise SinkchatError("a chat title cannot be empty")
        self._row(chat_id)
        self.db.execute("UPDATE chats SET title=? WHERE id=?", (title[:200], chat_id))

    def delete(self, chat_id: int) -> None:
        """Remove a chat and its state file; refused while another process has it open."""
        self._row(chat_id)
        self.lock(chat_id)
        self._sweep(chat_id)
        self.db.execute("BEGIN IMMEDIATE")
        for table, key in (("tokens", "chat_id"), ("messages", "chat_id"), ("chats", "id")):
            self.db.execute(f"DELETE FROM {table} WHERE {key}=?", (chat_id,))
        self.db.execute("COMMIT")
        with suppress(FileNotFoundError):
            self.state_path(chat_id).unlink()
        with suppress(FileNotFoundError):
            (self.root / "locks" / f"{chat_id}.lock").unlink()
        self.unlock(chat_id)

    # -- reading -----------------------------------------------------------------------------

    def list(self, query: str | None = None) -> list[ChatInfo]:
        sql = (
            "SELECT c.id, c.title, c.created, c.updated, c.settings, c.n_tokens,"
            " (SELECT COUNT(*) FROM messages m WHERE m.chat_id=c.id AND m.role!='system') FROM chats c"
        )
        args: tuple = ()
        if query:
            like = f"%{query}%"
            sql += " WHERE c.title LIKE ? OR EXISTS (SELECT 1 FROM messages m WHERE m.chat_id=c.id AND m.content LIKE ?)"
            args = (like, like)
        rows = self.db.execute(sql + " ORDER BY c.updated DESC, c.id DESC", args).fetchall()
        return [ChatInfo(r[0], r[1], r[2], r[3], _loads(r[4]).get("model", "?"), r[5], r[6]) for r in rows]

    def last_id(self) -> int | None:
        row = self.db.execute("SELECT id FROM chats ORDER BY updated DESC, id DESC LIMIT 1").fetchone()
        return row[0] if row else None

    def resolve(self, chat_id: int | None) -> int:
        """``chat_id`` if it exists, or the most recent chat when it is None."""
        if chat_id is None:
            chat_id = self.last_id()
            if chat_id is None:
                raise SinkchatError(f"no saved chats in {self.root}")
        self._row(chat_id)
        return chat_id

    def settings(self, chat_id: int) -> dict:
        return _loads(self._row(chat_id)[4])

    def _row(self, chat_id: int):
        row = self.db.execute("SELECT * FROM chats WHERE id=?", (chat_id,)).fetchone()
        if row is None:
            raise SinkchatError(f"no chat {chat_id} in {self.root} (see `sinkchat chats list`)")
        return row

    def _db_snapshot(self, chat_id: int) -> tuple[Snapshot | None, str | None]:
        """The rows' snapshot if their checksum holds, else ``(None, why)``."""
        row = self._row(chat_id)
        try:
            msgs = self.db.execute(
                "SELECT role, content, first_tok, end_tok FROM messages WHERE chat_id=? ORDER BY idx", (chat_id,)
            ).fetchall()
            toks = [t for (t,) in self.db.execute("SELECT token FROM tokens WHERE chat_id=? ORDER BY pos", (chat_id,))]
            snap = Snapshot(toks, [Message(*m) for m in msgs], json.loads(row[6]), json.loads(row[5]),
                            json.loads(row[4]), row[8])
            if snap.checksum() == row[9] and len(toks) == row[7]:
                return snap, None
        except (sqlite3.Error, ValueError, TypeError) as exc:
            return None, f"the database rows are damaged ({exc})"
        return None, "the database rows are damaged (checksum mismatch)"

    def _best(self, chat_id: int) -> tuple[Snapshot, dict | None, list[str], bool]:
        """The newest intact copy of a chat: (snapshot, KV tensors or None, notices, whether the
        database rows are behind it and need repairing from the state file)."""
        db_snap, db_why = self._db_snapshot(chat_id)
        try:
            file_snap, tensors = read_state(self.state_path(chat_id))
            file_why = None
        except ValueError as exc:
            file_snap, tensors, file_why = None, None, str(exc)
        if db_snap is None and file_snap is None:
            raise SinkchatError(
                f"chat {chat_id} cannot be opened: {db_why}, and {file_why}; nothing was changed on disk"
            )
        if file_snap is not None and (db_snap is None or file_snap.gen > db_snap.gen):
            why = db_why or "the last save was interrupted before the database was updated"
            return file_snap, tensors, [f"chat {chat_id}: {why}; restored them from the state file"], True
        if file_snap is not None and file_snap.gen == db_snap.gen:
            return db_snap, tensors, [], False
        why = file_why or "the state file is older than the database"
        return db_snap, None, [f"chat {chat_id}: {why}; rebuilt the KV cache from the ledger's sink and window tokens"], False

    def transcript(self, chat_id: int) -> Transcript:
        snap, _, notices, _ = self._best(chat_id)
        row = self._row(chat_id)
        return Transcript(chat_id, row[1], row[2], row[3], snap.settings, snap.meta, snap.messages, snap.tokens, notices)

    def open(
        self, chat_id: int, loaded, chat_settings: ChatSettings, read_only: bool = False
    ) -> tuple[Chat, list[str]]:
        """A ``Chat`` that continues saved chat ``chat_id``, and notices for the user.

        Takes the chat's lock unless ``read_only`` (then :meth:`save` refuses). Damaged rows are
        repaired from the state file here, so the next save starts from an intact database.
        """
        self._row(chat_id)
        if not read_only:
            self.lock(chat_id)
            self._sweep(chat_id)
        try:
            snap, tensors, notices, rows_behind = self._best(chat_id)
            chat = Chat(loaded, chat_settings)
            notices += restore(chat, snap, tensors)
            if rows_behind and not read_only:
                try:  # repair the rows from the state file, so the next save starts from them
                    self._write_rows(chat_id, snap, {}, 0)
                except (OSError, sqlite3.Error) as exc:
                    notices.append(f"chat {chat_id}: could not repair the database ({exc})")
        except BaseException:
            self.unlock(chat_id)
            raise
        return chat, notices


def _loads(text: str) -> dict:
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


SAVED_SETTINGS = (
    "model", "quant", "dtype", "sinks", "window", "block", "keep_system", "system",
    "temperature", "top_p", "top_k", "repetition_penalty", "seed", "max_new_tokens",
)


class Autosave:
    """``after_turn`` for a UI: creates the chat on its first turn, then saves after each turn.

    A failed save is reported through ``notify`` and the chat goes on in memory; the next call
    tries again. A call with nothing new since the last save does nothing (so quitting is cheap).
    """

    def __init__(self, store: Store, chat: Chat, settings: dict, chat_id: int | None, notify=lambda msg: None):
        self.store, self.chat_id, self.notify = store, chat_id, notify
        self.settings = {k: settings.get(k) for k in SAVED_SETTINGS}
        self.saved = len(chat.tokens) if chat_id is not None else 0

    def __call__(self, chat: Chat) -> None:
        if not chat.messages or len(chat.tokens) == self.saved:
            return
        try:
            if self.chat_id is None:
                self.chat_id = self.store.create(chat, self.settings)
            else:
                self.store.save(self.chat_id, chat)
            self.saved = len(chat.tokens)
        except SaveError as exc:
            self.notify(str(exc))
