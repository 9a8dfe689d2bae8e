"""``locks/<id>.lock``: one process at a time writes a chat.

An ``flock`` on the chat's lock file, released by the kernel when the process exits (kill -9
included), so a crash never leaves a chat locked. The file holds the holder's pid, for the
message the second process shows. It is opened with ``O_NOFOLLOW``: a symlink planted at its name
is refused, never followed (and never truncated).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from ..files import private_dir
from .records import ChatLocked

try:
    import fcntl
except ImportError:  # pragma: no cover - no flock on Windows; chats are then not locked
    fcntl = None


class Locks:
    def __init__(self, root: Path):
        self.dir = root / "locks"
        self.held: dict[int, int] = {}  # chat id -> fd

    def path(self, chat_id: int) -> Path:
        return self.dir / f"{chat_id}.lock"

    def lock(self, chat_id: int) -> None:
        """Take the chat's write lock; :class:`ChatLocked` if another process holds it, ``OSError``
        if the lock file cannot be made (read-only disk, a link planted at its name)."""
        if chat_id in self.held or fcntl is None:
            return
        private_dir(self.dir, links=False)
        try:
            fd = os.open(self.path(chat_id), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise OSError(f"{self.path(chat_id)} is a symbolic link; sinkchat does not follow links") from None
            raise
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
        self.held[chat_id] = fd

    def unlock(self, chat_id: int) -> None:
        fd = self.held.pop(chat_id, None)
        if fd is not None:
            os.close(fd)

    def holds(self, chat_id: int) -> bool:
        return fcntl is None or chat_id in self.held

    def remove(self, chat_id: int) -> None:
        """Delete a (held) chat's lock file, then release it."""
        try:
            self.path(chat_id).unlink()
        except FileNotFoundError:
            pass
        self.unlock(chat_id)

    def close(self) -> None:
        for chat_id in list(self.held):
            self.unlock(chat_id)
