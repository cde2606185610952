"""Reading users' text files with bounds: at most a limit, never blocking on a named pipe put
where a file should be, and never anything but a regular file, with the reason in words.
Spec files, `use` targets and perfusion.toml are read here (images have their own checks in
`images.py`, which share `describe_mode`)."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

# Links are followed (a spec may be one); O_NONBLOCK: opening a FIFO cannot block.
READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)

FILE_KINDS: tuple[tuple[Callable[[int], bool], str], ...] = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def describe_mode(mode: int) -> str:
    """What a non-regular file is, for messages: "a directory", "a FIFO", …"""
    return next((kind for test, kind in FILE_KINDS if test(mode)), "a special file")


class Unreadable(Exception):
    """The file cannot be read as text; `reason` says why ("it is a FIFO, not a file")."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def read_limited(path: Path, limit: int) -> bytes:
    """At most `limit` + 1 bytes of the regular file at `path` (one more than allowed, so the
    caller can tell a file that is too large). Raises Unreadable."""
    try:
        fd = os.open(path, READ_FLAGS)
    except OSError as exc:
        raise Unreadable(exc.strerror or type(exc).__name__) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise Unreadable(f"it is {describe_mode(mode)}, not a file")
        with os.fdopen(fd, "rb") as handle:
            fd = -1  # the handle owns it now
            return handle.read(limit + 1)
    except OSError as exc:
        raise Unreadable(exc.strerror or type(exc).__name__) from None
    finally:
        if fd >= 0:
            os.close(fd)
