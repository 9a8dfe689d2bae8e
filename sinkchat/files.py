"""Writing files so that a crash, a full disk or a planted symlink never costs what was there.

Every file sinkchat owns is written the same way: a temp file created next to the target with
``O_EXCL | O_NOFOLLOW`` (so a link planted there is refused, not followed), mode 0600, written,
fsynced, renamed over the target, then the directory is fsynced. A reader sees the old file or the
new one, never half of either. ``fault(point)`` lets the crash tests kill the process at a named
place with a real SIGKILL.
"""

from __future__ import annotations

import os
import re
import stat
from contextlib import suppress
from pathlib import Path

_fault_counts: dict[str, int] = {}
MEMORY_TMP = ".memory-{pid}-{token}.tmp"  # a block memory's file until a chat's save adopts it (kv.memory)
MEMORY_ORPHAN = re.compile(r"\.memory-(\d+)-[0-9a-f]{8}\.tmp")


def fault(point: str) -> None:
    """``SINKCHAT_FAULT=point@n`` SIGKILLs this process the n-th time it reaches ``point`` (tests only;
    a value of another shape never matches)."""
    name, _, nth = os.environ.get("SINKCHAT_FAULT", "").partition("@")
    if name == point:
        _fault_counts[point] = _fault_counts.get(point, 0) + 1
        if str(_fault_counts[point]) == (nth or "1"):
            os.kill(os.getpid(), 9)


def reason(exc: BaseException) -> str:
    """What the OS said (``Read-only file system``), without errno and path; else the exception's message."""
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def fsync_dir(path: Path) -> None:
    with suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: Path, data: bytes, *, overwrite: bool = True, fault_point: str | None = None) -> None:
    """Replace (or, with ``overwrite=False``, create) ``path`` with ``data``, mode 0600.

    Raises ``FileExistsError`` when ``overwrite`` is False and ``path`` exists, ``OSError`` for
    what the disk says (read-only, full, a symlink planted at the temp name). ``fault_point`` is
    reached half-way through writing the temp file.
    """
    path = Path(path)
    if path.is_symlink():
        raise OSError(f"{path} is a symbolic link; sinkchat does not write through links")
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} exists")
    if path.exists() and not path.is_file():  # a device, a FIFO, a socket, a directory: never replaced
        raise OSError(f"{path} is not a regular file; sinkchat replaces only regular files")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        try:
            half = len(data) // 2
            write_all(fd, memoryview(data)[:half])
            if fault_point:
                fault(fault_point)
            write_all(fd, memoryview(data)[half:])
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if path appeared meanwhile: never clobbers
            os.unlink(tmp)
    except BaseException:
        with suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def private_dir(path: Path, links: bool = True) -> Path:
    """``path`` as a directory, created 0700 if missing; an existing one keeps its mode (it is the user's).
    ``links=False``: a folder sinkchat owns inside the data dir (``state/``, ``locks/``), where a
    symbolic link is refused as it is for sinkchat's files (the data dir itself may be a link)."""
    if path.is_symlink() and not links:
        raise OSError(f"{path} is a symbolic link; sinkchat does not follow links for its folders or files")
    if path.is_symlink() and not path.is_dir():
        raise OSError(f"{path} is a broken symbolic link")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def make_private(path: Path, mode: int) -> None:
    """Take back from ``path`` (a file or directory of sinkchat's) the permissions ``mode`` does not
    grant, where a copy, a restore or another program left it open to others (``chats.db`` 0644);
    adds none. A link, another user's file or a disk that says no is left as it is."""
    with suppress(OSError):
        st = os.lstat(path)
        now = stat.S_IMODE(st.st_mode)
        if not stat.S_ISLNK(st.st_mode) and st.st_uid == os.getuid() and now & ~mode:
            os.chmod(path, now & mode)


def written_bytes() -> int | None:
    """Bytes this thread has passed to write calls so far (Linux ``/proc/thread-self/io``), else None.

    Taken before and after a save, it is what the save wrote, fsyncs and SQLite journal included.
    """
    try:
        with open("/proc/thread-self/io", encoding="ascii") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))
    except (OSError, StopIteration, ValueError):
        return None


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists (one of another user counts: it may be writing); a number no
    process can have (from a file name someone else made) is none."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    except OSError:
        return True
    return True


def sweep_memory_orphans(directory: Path) -> list[str]:
    """Remove the memory files in ``directory`` that a process killed before its store adopted them
    left behind: ``.memory-<pid>-<random>.tmp`` regular files (never a link, never anything else)
    whose process is gone. Returns the names removed."""
    removed = []
    with suppress(OSError):
        for entry in os.scandir(directory):
            match = MEMORY_ORPHAN.fullmatch(entry.name)
            if match is None or not entry.is_file(follow_symlinks=False) or alive(int(match[1])):
                continue
            with suppress(OSError):
                os.unlink(entry.path)
                removed.append(entry.name)
    return removed
