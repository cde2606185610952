"""The one atomic file writer of the runtime, and the reads that never follow a link.

Every durable file the runtime writes (concept files, training checkpoints, the C⁻¹ cache,
store manifests, outputs, build records) goes through `replace_in` or `write_atomically`:
the data goes to a hidden temp file in the target's folder, created with mode 0o666 so
that the user's umask applies (`tempfile.mkstemp` would make it 0600), is written in full
and fsynced, then renamed over the final name, and the folder is fsynced so that the
rename survives a power cut. Readers see the old file or the new one, never a mixture; on
any failure the temp file is removed and the old file is untouched. A symbolic link (or
anything but a regular file) at the final name is never written through: `write_atomically`
replaces the link itself, and `check_target` refuses it where a caller wants that (outputs).

The compiler keeps its own writer (`perfusion_dsl.formatter.write_atomic`): it edits a
user's spec in place, through a link and keeping the file's mode, which is the opposite
policy, and the compiler may not import the runtime.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any

# Never through a link; O_NONBLOCK so that a FIFO put in a file's place cannot block a read.
READ_FLAGS = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
              | getattr(os, "O_CLOEXEC", 0))
FOLDER_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
_CREATE_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                 | getattr(os, "O_CLOEXEC", 0))
_UNSYNCABLE = (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP)


class FileError(Exception):
    """A durable file could not be written or read; names the path and the reason."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)
        self.problem = problem


def reason(exc: OSError) -> str:
    """An OSError as a person reads it: its message and its errno name."""
    code = errno.errorcode.get(exc.errno or 0)
    return f"{exc.strerror or exc}" + (f" ({code})" if code else "")


# ---------------------------------------------------------------------------------- reading


def open_regular(path: Path, *, follow_links: bool = False) -> io.BufferedReader:
    """The regular file at `path` opened for reading, through a link only when
    `follow_links` (a file the user named); OSError otherwise, EINVAL "not a regular file
    (it is a directory)" for anything but a file. A FIFO in a file's place cannot block."""
    flags = READ_FLAGS & ~getattr(os, "O_NOFOLLOW", 0) if follow_links else READ_FLAGS
    fd = os.open(path, flags)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):  # before fdopen, which refuses a folder with its own error
        os.close(fd)
        raise OSError(errno.EINVAL, f"not a regular file (it is {kind_of(mode)})", str(path))
    return os.fdopen(fd, "rb")


def kind_of(mode: int) -> str:
    """What a file mode names, for messages: "a file", "a directory", "a named pipe", …"""
    kinds = {stat.S_ISREG: "a file", stat.S_ISDIR: "a directory", stat.S_ISFIFO: "a named pipe",
             stat.S_ISSOCK: "a socket", stat.S_ISCHR: "a character device",
             stat.S_ISBLK: "a block device", stat.S_ISLNK: "a symbolic link"}
    return next((name for test, name in kinds.items() if test(mode)), "not a file")


def read_regular(path: Path, limit: int | None = None) -> bytes:
    """The bytes of the regular file at `path` (at most `limit`), never through a link."""
    with open_regular(path) as handle:
        return handle.read() if limit is None else handle.read(limit)


def file_sha256(path: Path) -> str | None:
    """sha256 of the regular file at `path` (never through a symlink), or None."""
    try:
        with open_regular(path) as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError:
        return None


# ---------------------------------------------------------------------------------- writing


def write_new(path: Path, data: bytes) -> None:
    """`data` as a new file at `path` (refused if anything has that name), fsynced. For
    files inside a staging folder that is itself renamed into place."""
    fd = os.open(path, _CREATE_FLAGS, 0o666)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(folder: Path | int) -> None:
    """Make new names and renames in `folder` (a path or an open descriptor) durable;
    quietly nothing on filesystems that cannot sync a folder."""
    fd = folder if isinstance(folder, int) else os.open(folder, FOLDER_FLAGS)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _UNSYNCABLE:
            raise
    finally:
        if not isinstance(folder, int):
            os.close(fd)


def check_target(folder: int, name: str, shown: Path,
                 error: type[FileError] = FileError) -> None:
    """Refuse to replace anything but a regular file: a link's target stays untouched."""
    try:
        mode = os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode):
        target = os.readlink(name, dir_fd=folder)
        raise error(shown, f"refusing to replace the symbolic link to {target!r}; "
                           "remove the link to write the file here")
    if not stat.S_ISREG(mode):
        raise error(shown, "refusing to replace something that is not a regular file")


def replace_in(folder: int, name: str, data: bytes, *, sync: bool = True) -> None:
    """`data` as a fsynced temp file renamed onto `name` in the open folder `folder`, then
    (`sync`) the folder fsynced. Raises OSError; the temp file never outlives this call."""
    temp = f".{name[:100]}.{secrets.token_hex(8)}.tmp"  # hidden, under the name-length limit
    created = False
    try:
        out = os.open(temp, _CREATE_FLAGS, 0o666, dir_fd=folder)  # 0o666 & ~umask
        created = True
        try:
            _write_all(out, data)
            os.fsync(out)
        finally:
            os.close(out)
        os.replace(temp, name, src_dir_fd=folder, dst_dir_fd=folder)
        created = False
    finally:
        if created:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=folder)
    if sync:
        fsync_folder(folder)


def write_atomically(path: Path, data: bytes, error: type[FileError] = FileError) -> None:
    """Replace the file at `path` with `data`, atomically and durably (module docstring).

    The folder must exist; it may be a link. A link at `path` itself is replaced, never
    written through. Raises `error` naming `path`: "cannot create a file in <folder>",
    "cannot save: <reason>", or, once the new file is in place, "saved, but syncing its
    folder failed"."""
    path = Path(path)
    try:
        folder = os.open(path.parent, FOLDER_FLAGS)
    except OSError as exc:
        raise error(path, f"cannot create a file in {path.parent}: {reason(exc)}") from exc
    try:
        try:
            replace_in(folder, path.name, data, sync=False)
        except OSError as exc:
            raise error(path, f"cannot save: {reason(exc)}") from exc
        try:
            fsync_folder(folder)
        except OSError as exc:
            raise error(path, f"saved, but syncing its folder failed: {reason(exc)}") from exc
    finally:
        os.close(folder)


def write_json_atomically(path: Path, value: Any, error: type[FileError] = FileError) -> None:
    """`value` as indented, key-sorted JSON at `path` (folders made), via write_atomically."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise error(path, f"cannot create its folder: {reason(exc)}") from exc
    text = json.dumps(value, indent=2, sort_keys=True) + "\n"
    write_atomically(path, text.encode("utf-8"), error)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
