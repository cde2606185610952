"""One run per store at a time: a kernel file lock that dies with its holder."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from .atomic import kind_of, reason
from .store import LOCK_FILE, StoreUnusable

_OPEN_FLAGS = (os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
               | getattr(os, "O_CLOEXEC", 0))


class LockHeld(Exception):
    """Another process holds the lock; `pid` is who (None when it did not say)."""

    def __init__(self, path: Path, pid: int | None) -> None:
        who = f"process {pid}" if pid is not None else "another process"
        super().__init__(f"{who} is already running a build with the cache {path.parent} "
                         "(lock file " + str(path) + "); wait for it, or pass --wait")
        self.path = path
        self.pid = pid


def holder(path: Path) -> int | None:
    """The pid written by the lock's current holder, if it can be read."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


@contextlib.contextmanager
def build_lock(folder: Path, *, wait: bool = False,
               waiting: Callable[[int | None], None] | None = None) -> Iterator[Path]:
    """Hold `folder`/lock for the duration. The kernel drops an flock when its holder exits,
    even by kill -9, so a stale lock never blocks anyone. The file stays behind:
    removing it would let a third process lock a fresh inode while the second holds the old
    one."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = _open(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            if not wait:
                raise LockHeld(path, holder(path)) from None
            if waiting is not None:
                waiting(holder(path))
            fcntl.flock(fd, fcntl.LOCK_EX)  # blocks; Ctrl-C interrupts it
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock


def _open(path: Path) -> int:
    """The lock file, never through a link (its pid would be written wherever it points) and
    never anything but a regular file (a FIFO cannot block: O_NONBLOCK)."""
    try:
        fd = os.open(path, _OPEN_FLAGS, 0o666)
    except OSError as exc:
        if os.path.islink(path):
            raise StoreUnusable(path, "is a symbolic link; the lock must be a file of the "
                                      "store's own: remove the link") from None
        raise StoreUnusable(path, f"cannot open the lock file: {reason(exc)}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise StoreUnusable(path, f"is {kind_of(mode)}, not the lock file; remove it")
    return fd
