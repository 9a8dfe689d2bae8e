"""One long-lived thread that owns the model: every call that touches its weights or the cache's
tensors (load, forward, CUDA graph recording and replay, eviction, state copies, restores) runs
there, one at a time, in the order asked. The TUI and plain mode both use it.

Why: a CUDA graph is recorded on the thread that first decodes, and any CUDA call another thread
makes while it is captured or replayed (a state copy for a save, a restore, a new chat's buffers)
can invalidate the capture or race the replay. A Textual worker thread per reply also made each
reply's first step run on a thread the graph never saw. With one owner none of that can happen,
and ``--compile auto`` means the same in the TUI as in plain mode. What leaves the thread is plain
Python: the engine's events (text, counters, spans) and copies of state moved to the CPU.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")
_END = object()


class Decoder:
    """``submit(fn, *args)`` runs ``fn`` on the decode thread (a :class:`Future`); ``call`` waits for
    it; ``stream(events, emit)`` advances a generator of events there, handing each to ``emit``."""

    def __init__(self, name: str = "sinkchat-decode"):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def owns(self) -> bool:
        """Whether the calling thread is the decode thread."""
        return threading.current_thread() is self._thread

    def submit(self, fn: Callable[..., T], *args, **kwargs) -> Future:
        """Run ``fn(*args, **kwargs)`` after every job submitted before it."""
        future: Future = Future()
        if not self._thread.is_alive():
            future.set_exception(RuntimeError("the decode thread has ended"))
            return future
        self._jobs.put((future, fn, args, kwargs))
        return future

    def call(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """``fn(*args, **kwargs)`` on the decode thread, waited for (run in place when already there)."""
        if self.owns():
            return fn(*args, **kwargs)
        return self.submit(fn, *args, **kwargs).result()

    def stream(self, events: Iterator, emit: Callable[[object], None]) -> Future:
        """Advance ``events`` to its end on the decode thread, passing each event to ``emit`` (which
        must be safe to call from that thread); the future ends with the generator."""

        def pump() -> None:
            for event in events:
                emit(event)

        return self.submit(pump)

    def iterate(self, events: Iterator, stop: Callable[[], None] = lambda: None) -> Iterator:
        """The events of ``events``, produced on the decode thread and yielded here (plain mode).

        If the caller leaves early (an exception, ``close()``), ``stop`` is called and the turn is
        waited for, so the chat is whole when this generator ends."""
        handed: queue.SimpleQueue = queue.SimpleQueue()
        done = self.stream(events, handed.put)
        done.add_done_callback(lambda f: handed.put(_END))
        try:
            while (event := handed.get()) is not _END:
                yield event
            done.result()  # the generator's own exception, raised here
        finally:
            if not done.done():
                stop()
                done.exception()  # wait: the turn ends after the token in flight

    def close(self, timeout: float | None = None) -> None:
        """Run what is queued, then end the thread (waiting at most ``timeout`` seconds)."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join(timeout)

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args, kwargs = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # handed to whoever waits; the thread goes on
                future.set_exception(exc)
