"""The chat-level API: create, save, open, list, rename, delete; :class:`Autosave` for front ends.

A save commits the database rows first, in one transaction (the ledger is the truth: once they
are in, no kill loses the turn), then writes the state (a segment after the files of the last save,
or a new base; each atomic: temp, fsync, rename), both stamped with the same save generation and
checksum. On open the newest intact copy wins, and the engine (:meth:`Chat.restore`) decides
whether the saved K/V fits or must be rebuilt from the ledger. A new chat takes an id no file in
the data dir names, and its first state file is created, never written over. The store reads and
writes files and rows; it never runs the model.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import secrets
import sqlite3
import stat
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from .. import config
from ..errors import SinkchatError
from ..files import (
    MEMORY_ORPHAN,
    fault,
    make_private,
    private_dir,
    reason,
    sweep_memory_orphans,
    write_atomic,
    written_bytes,
)
from ..ledger import ChatState, state_problem
from ..settings import Settings
from ..text import valid
from .db import Database, loads, text_of, time_of
from .locks import Locks
from .records import ChatInfo, ChatLocked, NoChats, ReadOnly, Refused, SaveError, Snapshot, Transcript, Unanswered
from .statefile import Chain, base_path, read_chain, segment_path, segment_paths, unchanged, write_segment, write_state


def _disk(what: str):
    """Whatever the disk or SQLite says during the method becomes one line, ``cannot <what>: <reason>``."""

    def wrap(method):
        @functools.wraps(method)
        def checked(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except (OSError, sqlite3.Error) as exc:
                raise SinkchatError(f"cannot {what.format(*args)}: {reason(exc)}") from None

        return checked

    return wrap


READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


def flush_memory(fd: int | None) -> None:
    """fsync a block memory's file from the descriptor :meth:`Store.keep_memory` gave, and close it;
    :class:`SaveError` when the disk refuses (the save that would count its blocks must not be made)."""
    if fd is None:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        raise SaveError(f"could not keep the memory of forgotten tokens on disk ({reason(exc)})") from None
    finally:
        os.close(fd)


class Store:
    """The chats in one data dir. One instance per process, used by one thread at a time."""

    def __init__(self, data_dir: str | Path | None = None, create: bool = True):
        """The store in ``data_dir``. ``create=False`` (commands that only read): :class:`NoChats`
        where there is no data dir or no ``chats.db``, and nothing is made. :class:`Refused` for a
        ``chats.db`` that is not sinkchat's or a linked ``state/``/``locks/`` folder: nothing is written."""
        self.root = config.data_dir(data_dir)
        self.db_path = self.root / "chats.db"
        for folder in (self.root / "state", self.root / "locks"):
            if folder.is_symlink():
                raise Refused(f"{folder} is a symbolic link; sinkchat does not follow links for its folders or files")
        if not create and not self.root.is_dir():
            raise NoChats(f"no saved chats (no data directory at {self.root})")
        if not create and not (self.db_path.exists() or self.db_path.is_symlink()):
            raise NoChats(f"no saved chats in {self.root}")
        try:
            private_dir(self.root)
        except OSError as exc:
            raise SinkchatError(f"cannot create the data directory {self.root}: {reason(exc)}") from None
        self.db = Database(self.db_path)
        for path, mode in ((self.db_path, 0o600), (self.db_path.with_name("chats.db-journal"), 0o600),
                           (self.root / "state", 0o700), (self.root / "locks", 0o700)):
            make_private(path, mode)  # what the README promises, whoever left them open
        self.locks = Locks(self.root)
        self._new = f"new-{secrets.token_hex(8)}"  # the key of this process's new chat's message in flight
        self.last_save: dict | None = None  # the last save's time, bytes, kind and new tokens, for `bench endless`
        self._chains: dict[int, Chain] = {}  # what each chat's state files hold, as this process wrote or read them

    def state_path(self, chat_id: int) -> Path:
        """The chat's base state file (its segments sit next to it, see :mod:`.statefile`)."""
        return base_path(self.root / "state", chat_id)

    # -- locks ---------------------------------------------------------------------------------

    def memory_path(self, chat_id: int) -> Path:
        """The chat's block memory (``--recall``): what left its window, in blocks (:mod:`sinkchat.kv.memory`)."""
        return self.root / "state" / f"{chat_id}.memory"

    def lock(self, chat_id: int) -> None:
        """Take the chat's write lock (released when this process exits, even by kill -9).

        :class:`ChatLocked` if another process holds it; :class:`ReadOnly` if the lock file cannot
        be made because the disk or directory is read-only (the chat can still be read)."""
        try:
            self.locks.lock(chat_id)
        except OSError as exc:
            kind = ReadOnly if exc.errno in READ_ONLY else SinkchatError
            raise kind(f"cannot lock chat {chat_id}: {reason(exc)}") from None

    def unlock(self, chat_id: int) -> None:
        self.locks.unlock(chat_id)

    def holds(self, chat_id: int) -> bool:
        """Whether this process may save chat ``chat_id`` (it holds the chat's lock)."""
        return self.locks.holds(chat_id)

    def close(self) -> None:
        self.locks.close()
        with suppress(sqlite3.Error):
            self.db.close()

    def _sweep(self, chat_id: int) -> None:
        """Remove temp files a killed save left behind (only the lock holder may: none is in flight)."""
        for tmp in (self.root / "state").glob(f".{chat_id}.*.tmp"):
            with suppress(OSError):
                tmp.unlink()
        sweep_memory_orphans(self.root / "state")  # block memories of killed processes, never adopted by a chat

    def _prune(self, chat_id: int) -> None:
        """Remove the chat's segment files (after a new base made them garbage, or with the chat)."""
        for path in segment_paths(self.root / "state", chat_id):
            path.unlink()
            fault("segments-pruning")  # killed with some removed: the rest are stale, never read

    def _write(self, chat_id: int, chain: Chain | None, snap: Snapshot, tensors: dict, keep: int = 0,
               fresh: bool = False) -> Chain:
        """Write ``snap``'s K/V: a segment after ``chain`` (what the files hold at the generation
        before, of whose messages ``snap`` keeps the first ``keep``) if it can describe the change,
        else a new base, then the old segments go. ``fresh``: a new chat's first save, which never
        replaces a file that is already there."""
        state_dir = private_dir(self.root / "state", links=False)
        if chain is not None and chain.extends(snap, tensors) is None:
            path = segment_path(state_dir, chat_id, snap.gen)
            if path.is_symlink() or path.exists():  # left by a save that failed half-way: never read
                path.unlink()
            chain = write_segment(path, chain, snap, tensors, keep)
            fault("segment-renamed")
            return chain
        chain = write_state(self.state_path(chat_id), snap, tensors, overwrite=not fresh)
        fault("state-renamed")
        self._prune(chat_id)
        return chain

    def _ids_on_disk(self) -> int:
        """The highest chat id a file in the data dir names (state files, segments, temp files, locks),
        or 0: ids a new chat must not take, whatever the database says."""
        top = 0
        for folder in (self.root / "state", self.root / "locks"):
            with suppress(OSError):
                for name in os.listdir(folder):
                    head = name.lstrip(".").split(".", 1)[0]
                    if head.isascii() and head.isdigit():
                        top = max(top, int(head))
        return top

    # -- writing -------------------------------------------------------------------------------

    def create(self, chat, settings: Settings, title: str | None = None) -> int:
        """Register ``chat`` (titled by its first user message) and save it; returns its id."""
        self.keep_memory(chat, None)
        return self.create_state(*chat.state(), settings, title)

    def save(self, chat_id: int, chat) -> None:
        """Commit the chat's rows and settings, then write its state file; ``SaveError`` on failure."""
        self.keep_memory(chat, chat_id)
        self.save_state(chat_id, *chat.state(), chat.settings)

    def keep_memory(self, chat, chat_id: int | None, flush: bool = True) -> int | None:
        """With ``--recall``: the chat's block memory file in the state folder, flushed (:func:`flush_memory`)
        before a save counts it; ``flush=False``: a descriptor of the file for the caller to flush, on
        its saving thread (the fsync of a turn's blocks takes milliseconds), or None."""
        if not getattr(chat, "recalls", False):
            return None
        try:
            fd = chat.keep_memory(private_dir(self.root / "state"), chat_id)
        except OSError as exc:
            raise SaveError(f"could not keep the memory of forgotten tokens on disk ({reason(exc)})") from None
        if not flush:
            return fd
        flush_memory(fd)
        return None

    def _name_memory(self, chat_id: int, meta: dict) -> list[Path]:
        """A new chat's block memory, still under its process's temporary name, gets the chat's own name
        too (a hard link), and ``meta`` names that one, so no save ever names a temporary file (which
        :func:`~sinkchat.files.sweep_memory_orphans` may remove once its process is gone). Returns the
        temporary name, to unlink once the chat is committed."""
        saved = meta.get("memory") or {}
        name = saved.get("file")
        if not name or not MEMORY_ORPHAN.fullmatch(name):
            return []
        tmp, target = self.root / "state" / name, self.memory_path(chat_id)
        with suppress(FileNotFoundError):
            target.unlink()  # (left by a create whose transaction failed)
        os.link(tmp, target, follow_symlinks=False)
        saved["file"] = target.name
        return [tmp]

    def create_state(self, state: ChatState, tensors: dict, settings: Settings, title: str | None = None) -> int:
        """:meth:`create` from what :meth:`Chat.state` returned (a copy taken while the chat was idle).

        The ledger is the truth, so it is committed first: the chat's row and its first save's rows
        in one transaction, then the state file. A kill before that file is whole leaves the chat
        with its first turn (opening it rebuilds the K/V from the ledger). Its id names no file in
        the data dir, and the state file is created, never written over. :class:`SaveError` when it
        fails: its ``chat_id`` is None when no chat was made, else the chat's (only its K/V was
        not written; the next save writes it)."""
        if title is None:
            first = next((m.content for m in state.messages if m.role == "user"), "") or "new chat"
            title = " ".join(first.split())[:60]
        snap = Snapshot.of(state, settings.saved(), 1)
        made: list[int] = []
        linked: list[Path] = []

        def first_save(chat_id: int) -> Snapshot:
            made.append(chat_id)
            self.locks.lock(chat_id)
            linked.extend(self._name_memory(chat_id, snap.meta))
            return snap

        try:
            chat_id = self.db.create(valid(title)[0], settings.saved(), first_save, self._ids_on_disk())
        except (OSError, sqlite3.Error, ChatLocked) as exc:
            for chat_id in made:  # no row was committed: its lock file goes too
                with suppress(OSError):
                    self.locks.remove(chat_id)
                if linked:
                    with suppress(OSError):
                        self.memory_path(chat_id).unlink()
            raise SaveError(f"could not save the chat ({reason(exc)}); it goes on in memory only") from None
        for tmp in linked:  # the memory is the chat's by its own name now (the process keeps it open)
            with suppress(OSError):
                tmp.unlink()
        fault("ledger-committed")
        self._write_kv(chat_id, None, snap, tensors, fresh=True)
        return chat_id

    def save_state(self, chat_id: int, state: ChatState, tensors: dict, settings: Settings | None = None) -> None:
        """:meth:`save` from what :meth:`Chat.state` returned: the rows of what changed in one
        transaction, then a state segment or base (a kill in between loses no turn: the K/V is
        rebuilt from the ledger when the chat is opened). ``settings``: the ones the chat runs with
        now (a resume's flags over the saved ones), saved as the chat's, so they agree with the
        cache saved beside them and the next ``--resume`` runs the chat as it was; None keeps the saved ones."""
        if not self.locks.holds(chat_id):
            raise SaveError(f"chat {chat_id} is open read-only here; not saved")
        t0, written = time.perf_counter(), written_bytes()
        chain = self._chains.pop(chat_id, None)  # until this save succeeds, the next one writes a new base
        try:
            row = self.db.row(chat_id)
            if row is None:
                raise SaveError(f"chat {chat_id} was deleted; not saved")
            snap = Snapshot.of(state, loads(row["settings"]) if settings is None else settings.saved(), row["gen"] + 1)
            if chain is not None and chain.snap.gen != row["gen"]:
                chain = None
            keep = 0
            if chain is not None:  # reuse what the last save hashed of the messages both share
                keep = unchanged(chain.snap.messages, snap.messages)
                snap.follow(chain.snap, keep)
            self.db.write(chat_id, snap, loads(row["cache_meta"]), row["n_tokens"], keep)
        except (OSError, sqlite3.Error) as exc:
            raise SaveError(
                f"could not save chat {chat_id} ({reason(exc)}); it goes on in memory, earlier saves are intact"
            ) from None
        fault("ledger-committed")
        new = self._write_kv(chat_id, chain, snap, tensors, keep)
        after = written_bytes()
        self.last_save = {"seconds": time.perf_counter() - t0,
                          "bytes": after - written if after is not None and written is not None else None,
                          "kind": "segment" if new.segments else "base",
                          "tokens": len(snap.tokens) - (len(chain.snap.tokens) if chain else 0)}

    def _write_kv(self, chat_id: int, chain: Chain | None, snap: Snapshot, tensors: dict, keep: int = 0,
                  fresh: bool = False) -> Chain:
        """:meth:`_write` once the rows are committed; a failure is a :class:`SaveError` carrying the
        chat's id (its messages are saved, only the K/V is not)."""
        try:
            self._chains[chat_id] = new = self._write(chat_id, chain, snap, tensors, keep, fresh)
        except OSError as exc:
            raise SaveError(f"saved chat {chat_id}'s messages but not its KV cache ({reason(exc)}); it goes on in "
                            "memory, and opening it rebuilds the cache from the saved messages", chat_id) from None
        return new

    @_disk("rename chat {0}")
    def rename(self, chat_id: int, title: str) -> None:
        title = " ".join(valid(title)[0].split())
        if not title:
            raise SinkchatError("a chat title cannot be empty")
        self._row(chat_id)
        self.db.rename(chat_id, title[:200])

    @_disk("delete chat {0}")
    def delete(self, chat_id: int) -> None:
        """Remove a chat and its state file; refused while another process has it open."""
        self._row(chat_id)
        self.lock(chat_id)
        self._sweep(chat_id)
        self.db.delete(chat_id)
        with suppress(FileNotFoundError):
            self.state_path(chat_id).unlink()
        with suppress(FileNotFoundError):
            self.memory_path(chat_id).unlink()
        self.drop_draft(chat_id)
        self._prune(chat_id)
        self._chains.pop(chat_id, None)
        self.locks.remove(chat_id)

    # -- the message in flight ------------------------------------------------------------------

    def draft_path(self, chat_id: int | str | None) -> Path:
        """Where the message just sent to chat ``chat_id`` waits for its turn's save (None: this
        process's new chat's; a ``new-<key>`` string: another process's)."""
        return self.root / "state" / f"{self._new if chat_id is None else chat_id}.draft"

    def keep_draft(self, chat_id: int | None, draft: Unanswered) -> None:
        """Keep ``draft``, the message just sent to chat ``chat_id``, until its turn is saved (the save
        calls :meth:`drop_draft`): a sinkchat killed mid-reply (kill -9, a crash, power) lost it with
        the turn; the next start gives it back (:meth:`take_draft`). Kept with the chat's save
        generation, so a message whose turn was saved after all is known; a new chat's is named by a
        random key whose lock this process holds while it lives (a pid is reused: by a container's
        every start, by a reboot). Best effort: a disk that says no costs only this."""
        with suppress(OSError, sqlite3.Error, SinkchatError):
            row = self.db.row(chat_id) if chat_id is not None else None
            if chat_id is None:
                self.locks.lock(self._new)
            private_dir(self.root / "state", links=False)
            record = {"gen": row["gen"] if row else None, "typed": draft.typed, "replace": draft.replace,
                      "pin": draft.pin}
            write_atomic(self.draft_path(chat_id), json.dumps(record).encode())

    def drop_draft(self, chat_id: int | None, new_too: bool = False) -> None:
        """Forget chat ``chat_id``'s message in flight (its turn is saved); ``new_too`` or None: this
        process's new chat's (the chat was created by this save)."""
        paths = [self.draft_path(chat_id)] if chat_id is not None else []
        if new_too or chat_id is None:
            paths.append(self.draft_path(None))
        for path in paths:
            with suppress(OSError):
                path.unlink()
        if new_too or chat_id is None:
            with suppress(OSError):
                self.locks.remove(self._new)

    def take_draft(self, chat_id: int | None) -> Unanswered | None:
        """The message a sinkchat sent to chat ``chat_id`` and was stopped before saving its turn, removed
        from the disk (None: the newest one a process that is gone left for a new chat), or None:
        none, one the chat has saved since (a kill between the save and forgetting it), or anything
        but a regular file in its place (a link, a FIFO: never read)."""
        key: str | None = None
        path = self.draft_path(chat_id)
        if chat_id is None:
            key = self._orphan()
            if key is None:
                return None
            path = self.draft_path(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:  # none, or a link
            return None
        try:
            with os.fdopen(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    return None
                raw = f.read().decode("utf-8", "replace")
            path.unlink()
            if key is not None:
                self.locks.remove(key)
            row = self.db.row(chat_id) if chat_id is not None else None
        except (OSError, sqlite3.Error):
            return None
        finally:
            if key is not None:
                self.locks.unlock(key)
        record = loads(raw)
        typed = record.get("typed") if record else raw  # not ours as written: its text all the same
        if not isinstance(typed, str) or not typed.strip():
            return None
        if record and row is not None and record.get("gen") not in (None, row["gen"]):
            return None  # saved since
        replace = record.get("replace") if record else None
        return Unanswered(typed, replace if type(replace) is int and replace >= 0 else None,
                          record.get("pin") is True if record else False)

    def _orphan(self) -> str | None:
        """The key of the newest new chat's message whose process is gone (its lock free), now held
        by this process; the others' locks are let go, and a lock left with no message is removed."""
        found: list[tuple[float, str]] = []
        with suppress(OSError):
            keys = {p.name.removesuffix(".draft") for p in (self.root / "state").glob("new-*.draft")}
            keys |= {p.name.removesuffix(".lock") for p in self.locks.dir.glob("new-*.lock")}
            for key in sorted(keys - {self._new}):
                if not (key[4:].isascii() and key[4:].isalnum()):
                    continue
                try:
                    self.locks.lock(key)
                    st = self.draft_path(key).lstat()
                except FileNotFoundError:  # a lock with no message (taken by another start meanwhile)
                    with suppress(OSError):
                        self.locks.remove(key)
                    continue
                except (ChatLocked, OSError):  # its process lives
                    self.locks.unlock(key)
                    continue
                if stat.S_ISREG(st.st_mode):
                    found.append((st.st_mtime, key))
                else:  # a FIFO, a link, a folder: never read, never chosen
                    with suppress(OSError):
                        self.locks.remove(key)
        found.sort()
        for _, key in found[:-1]:
            self.locks.unlock(key)
        return found[-1][1] if found else None

    # -- reading -------------------------------------------------------------------------------

    @_disk("list the saved chats")
    def list(self, query: str | None = None) -> list[ChatInfo]:
        return self.db.list(valid(query)[0] if query else query)

    @_disk("read the saved chats")
    def last_id(self) -> int | None:
        return self.db.last_id()

    @_disk("read chat {0}")
    def resolve(self, chat_id: int | None) -> int:
        """``chat_id`` if it exists, or the most recent chat when it is None."""
        if chat_id is None:
            chat_id = self.last_id()
            if chat_id is None:
                raise SinkchatError(f"no saved chats in {self.root}")
        self._row(chat_id)
        return chat_id

    @_disk("read chat {0}")
    def settings(self, chat_id: int) -> dict:
        """The settings the chat was saved with (unchecked; :meth:`Settings.resolve` checks them)."""
        return loads(self._row(chat_id)["settings"])

    def _row(self, chat_id: int):
        row = self.db.row(chat_id)
        if row is None:
            raise SinkchatError(f"no chat {chat_id} in {self.root} (see `sinkchat chats list`)")
        return row

    def _best(self, chat_id: int, tensors_too: bool) -> tuple[Snapshot, dict | None, str | None, bool, Chain | None]:
        """The newest intact copy of a chat: (snapshot, KV tensors or None, what was wrong with
        the other copy, whether the database rows are behind and need repairing from the state
        files, the state files' chain when the snapshot is theirs)."""
        row = self._row(chat_id)
        db_snap, db_why = self.db.snapshot(chat_id)
        if db_snap is not None and (problem := state_problem(db_snap)):
            db_snap, db_why = None, f"the database rows are damaged ({problem})"
        tensors = chain = None
        try:
            chain, tensors = read_chain(self.root / "state", chat_id, tensors_too)
            file_snap = chain.snap
            if problem := state_problem(file_snap):
                raise ValueError(f"the state file is damaged ({problem})")
            file_why = chain.problem
            if db_snap is None and chain.problem and type(row["gen"]) is int and file_snap.gen < row["gen"]:
                file_snap = None  # the files stop before the rows' save: using them would lose turns
        except (ValueError, OSError) as exc:
            file_snap, tensors, file_why = None, None, reason(exc)
        if db_snap is None and file_snap is None:
            raise SinkchatError(
                f"chat {chat_id} cannot be opened: {db_why}, and {file_why}; nothing was changed on disk"
            )
        if file_snap is not None and (db_snap is None or file_snap.gen > db_snap.gen):
            why = db_why or "the database is older than the state file"
            return file_snap, tensors, why, True, chain
        if file_snap is not None and file_snap.gen == db_snap.gen:
            return db_snap, tensors, None, False, chain if chain.tip == db_snap.checksum() else None
        older = "the state file is older than the database (a save stopped before writing it)"
        return db_snap, None, file_why or older, False, None

    @_disk("read chat {0}")
    def transcript(self, chat_id: int) -> Transcript:
        """A saved chat's text and spans, for show and export (no model, no torch)."""
        snap, _, why, rows_behind, _ = self._best(chat_id, tensors_too=False)
        notices = [f"chat {chat_id}: {why}; read it from the state file"] if rows_behind else []
        row = self._row(chat_id)
        return Transcript(chat_id, text_of(row["title"]), time_of(row["created"]), time_of(row["updated"]),
                          snap.settings, snap.meta,
                          snap.messages, snap.tokens, notices)

    @_disk("open chat {0}")
    def open(self, chat_id: int, chat, read_only: bool = False,
             on_model: Callable = lambda fn, *args: fn(*args)) -> list[str]:
        """Make the fresh ``chat`` continue saved chat ``chat_id``; returns notices for the user.
        ``on_model(fn, *args)`` runs the restore (K/V loaded or re-prefilled: model calls) where the
        model's calls belong (:meth:`sinkchat.decoder.Decoder.call`).

        Takes the chat's lock unless ``read_only`` (then :meth:`save` refuses); :class:`ChatLocked`
        if another process holds it. On a read-only disk the chat opens read-only, with a notice
        (:meth:`holds` then says False). Damaged rows are repaired from the state file here, so
        the next save starts from an intact database.
        """
        self._row(chat_id)
        notices = []
        if not read_only and not self.holds(chat_id):
            try:
                self.lock(chat_id)
            except ReadOnly as exc:
                read_only = True
                notices.append(f"{exc}; the chat opens read-only and goes on in memory (not saved)")
        if not read_only:
            self._sweep(chat_id)
            for path in [self.state_path(chat_id), *segment_paths(self.root / "state", chat_id),
                         self.locks.path(chat_id)]:
                make_private(path, 0o600)
        try:
            snap, tensors, why, rows_behind, chain = self._best(chat_id, tensors_too=True)
            if rows_behind:
                notices.append(f"chat {chat_id}: {why}; restored them from the state file")
            elif why:
                notices.append(f"chat {chat_id}: {why}; rebuilt the KV cache from the ledger's sink and window tokens")
            if hasattr(chat, "open_memory"):  # with --recall: the block memory of what left the window, first,
                # so that a cache rebuilt in another geometry keeps in it every token it evicts
                notices += on_model(chat.open_memory, self.root / "state", chat_id, snap, tensors, not read_only)
            restored = on_model(chat.restore, snap, tensors)
            notices += restored
            if rows_behind and not read_only:
                try:  # repair the rows from the state file, so the next save starts from them
                    self.db.write(chat_id, snap, {}, 0)
                except (OSError, sqlite3.Error) as exc:
                    notices.append(f"chat {chat_id}: could not repair the database ({exc})")
                    chain = None
            if chain is not None and tensors is not None and not restored and not read_only:
                self._chains[chat_id] = chain  # the cache holds the files' K/V: the next save appends to them
        except BaseException:
            self.unlock(chat_id)
            raise
        return notices


class Autosave:
    """Saving for a front end: creates the chat on its first turn, then saves after each turn.

    ``autosave(chat)`` saves now. A front end that writes on another thread calls
    :meth:`capture` while the chat is idle (a copy of its state and K/V: a plain memory copy, so
    the next reply can start at once) and :meth:`write` on its saving thread. A failed save is
    reported through ``notify`` (once, until a save succeeds) and the chat goes on in memory; the
    next save tries again. Nothing new since the last save, or a chat opened read-only: nothing is
    written (so quitting is cheap).
    """

    def __init__(self, store: Store, chat, settings: Settings, chat_id: int | None, notify=lambda msg: None):
        self.store, self.chat_id, self.notify, self.settings = store, chat_id, notify, settings
        self.saved = self._mark(chat) if chat_id is not None else None
        self.failure: str | None = None  # the last failure reported (the same one is not repeated)

    @staticmethod
    def _mark(chat) -> tuple:
        """What changes when a chat has something new to save (a stopped reply may add no token;
        a pin or a rollback bumps the chat's revision)."""
        return len(chat.tokens), len(chat.messages), chat.messages[-1].row() if chat.messages else None, chat.revision

    def capture(self, chat) -> tuple | None:
        """A copy of what to save, or None if nothing is new since the last capture."""
        mark = self._mark(chat)
        if not chat.messages or mark == self.saved or not self.writable or getattr(chat, "busy", False):
            return None  # (a reply still being written is never copied: it is saved once it stops)
        self.saved = mark
        memory = None
        try:  # the block memory's file goes next to the state files; the writer flushes it
            memory = self.store.keep_memory(chat, self.chat_id, flush=False)
        except SaveError as exc:  # the turns are saved all the same (a block lost to it: one notice at resume)
            self.notify(str(exc))
        state, tensors = chat.state()  # copies (one memory copy of the held K/V)
        tensors = {name: t.cpu() for name, t in tensors.items()}  # off a GPU here, so the writer never touches it
        return state, tensors, memory

    def write(self, captured: tuple | None) -> None:
        """Save what :meth:`capture` took, on the saving thread: the memory's file flushed first, then the
        save that counts its blocks."""
        if captured is None:
            return
        state, tensors, memory = captured
        try:
            flush_memory(memory)
        except SaveError as exc:  # as above: the turns are saved all the same
            self.notify(str(exc))
        created = self.chat_id is None
        try:
            if created:
                self.chat_id = self.store.create_state(state, tensors, self.settings)
            else:
                self.store.save_state(self.chat_id, state, tensors, self.settings)
        except SaveError as exc:
            self.chat_id = self.chat_id or exc.chat_id  # made, though its K/V was not written
            if exc.chat_id is not None:  # the messages are saved, only the K/V is not
                self.store.drop_draft(exc.chat_id, new_too=created)
            self.saved = None  # try again at the next turn
            if str(exc) != self.failure:
                self.failure = str(exc)
                self.notify(self.failure)
        else:
            self.failure = None
            self.store.drop_draft(self.chat_id, new_too=created)  # the message in flight is saved with its turn

    @property
    def writable(self) -> bool:
        """False for a chat opened read-only (a read-only disk; the user was told when it opened)."""
        return self.chat_id is None or self.store.holds(self.chat_id)

    def __call__(self, chat) -> None:
        self.write(self.capture(chat))
