"""One run per store at a time: a kernel file lock that dies with its holder."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path

LOCK_NAME = "lock"


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
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
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
