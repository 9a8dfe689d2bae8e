"""Saving off the UI thread: one saver thread, saves in order, every use of the store under one lock.

Why a thread: a save at the default 2000-token window writes and fsyncs a ~93 MB state file
(0.65-0.86 s measured on the 2-core CI machine for SmolLM2; a 7B model's is larger), too long to
freeze the screen after every reply. A 64-token window's save takes 8-50 ms.

Why it is safe: a save reads the live chat (its cache tensors, tokens and messages), so the next
reply waits for :meth:`Saver.wait` before it touches the chat; the UI thread awaits :meth:`idle`
before it opens, replaces or deletes a chat. The store's SQLite connection is shared with this one
thread, and ``lock`` keeps their uses apart.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from ..engine import Chat
from ..store import Autosave, Store


class Saver:
    def __init__(self, store: Store, report):
        """``report(message)`` is called on the saver thread when a save fails."""
        self.store, self.report = store, report
        self.lock = threading.RLock()
        self.autosave: Autosave | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="sinkchat-save")
        self._last: Future | None = None

    @property
    def chat_id(self) -> int | None:
        return self.autosave.chat_id if self.autosave is not None else None

    def follow(self, chat: Chat, settings: dict, chat_id: int | None) -> None:
        """Save ``chat`` from now on, as stored chat ``chat_id`` (None: created on its first save)."""
        self.autosave = Autosave(self.store, chat, settings, chat_id, self.report)

    def save(self, chat: Chat) -> None:
        """Queue a save of ``chat`` (nothing happens if nothing is new since the last one)."""
        autosave = self.autosave
        if autosave is None:
            return

        def job() -> None:
            try:
                with self.lock:
                    autosave(chat)
            except Exception as exc:  # Autosave reports SaveError itself; anything else, one line too
                self.report(f"could not save the chat ({type(exc).__name__}: {exc}); it goes on in memory")

        self._last = self._pool.submit(job)

    def wait(self) -> None:
        """Block until the queued saves are done (for worker threads)."""
        if self._last is not None:
            self._last.result()

    def done(self) -> bool:
        return self._last is None or self._last.done()

    async def idle(self) -> None:
        """Wait, without blocking the UI, until the queued saves are done."""
        if self._last is not None:
            await asyncio.wrap_future(self._last)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self.lock:
            self.store.close()
