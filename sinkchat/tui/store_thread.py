"""Every use of the chat store, in order, on one thread, so the screen never waits on the disk.

Why a thread: a save at the default 2000-token window writes and fsyncs a ~93 MB state file
(0.65-0.86 s measured on a 2-core machine for SmolLM2; a 7B model's is larger), too long to
freeze the screen after every reply; opening a chat reads one back. Why one: the store's SQLite
connection is then used by one thread at a time with no lock, and saves land in order.

What a save writes is copied on the UI thread first (:meth:`Autosave.capture`), so the next
reply can start while the copy is written.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from ..store import Store

T = TypeVar("T")


class StoreThread:
    def __init__(self, store: Store):
        self.store = store
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="sinkchat-store")
        self._last: Future | None = None

    def submit(self, job: Callable[[Store], T]) -> Future:
        """Run ``job(store)`` after every job submitted before it."""
        self._last = self._pool.submit(job, self.store)
        return self._last

    async def call(self, job: Callable[[Store], T]) -> T:
        """``job(store)`` on the store thread, awaited without blocking the UI; its exception is raised here."""
        return await asyncio.wrap_future(self.submit(job))

    def done(self) -> bool:
        return self._last is None or self._last.done()

    async def idle(self) -> None:
        """Wait until every job submitted so far has run."""
        if self._last is not None:
            await asyncio.wait([asyncio.wrap_future(self._last)])

    def close(self) -> None:
        """Run what is queued, then close the store."""
        self._pool.submit(lambda: self.store.close())
        self._pool.shutdown(wait=True)
