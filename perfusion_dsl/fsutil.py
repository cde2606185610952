"""Filesystem helpers: spec discovery, symlink-safe globbing, hostile-image checks, containment."""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import os
import re
import stat
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from PIL import Image, UnidentifiedImageError

ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP")
SPEC_SUFFIX = ".concept"
_MAGIC_CHARS = frozenset("*?[")
_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


_Found = dict[tuple[int, int], str]  # (st_dev, st_ino) -> smallest path naming that file


class MatchLimitExceeded(Exception):
    """More paths matched than the documented limit allows; the walk stopped early."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit:,} matches")
        self.limit = limit


class WalkLimitExceeded(MatchLimitExceeded):
    """A pattern made the walk search more folders than the limit allows (e.g. `/**/x`)."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.args = (f"searches more than {limit:,} folders",)


# ---------------------------------------------------------------------------------------------
# Spec discovery


def discover_specs(paths: Sequence[Path], limit: int) -> tuple[list[Path], list[str]]:
    """Every `*.concept` file under `paths`, sorted and unique, plus human-readable problems.

    Directory symlinks below the given paths are never followed and hidden entries (name
    starting with `.`) are skipped; a path given explicitly is used even if it is a symlink.
    Raises MatchLimitExceeded as soon as more than `limit` distinct files are found.
    """
    found: _Found = {}
    problems: list[str] = []
    for path in paths:
        name = os.fspath(path)
        try:
            st = os.stat(name)
        except OSError as exc:
            problems.append(_access_problem(name, exc))
            continue
        if stat.S_ISDIR(st.st_mode):
            _walk_specs(name, found, problems, limit)
        elif not stat.S_ISREG(st.st_mode):
            problems.append(f"not a regular file or directory: {name}")
        elif not name.endswith(SPEC_SUFFIX):
            problems.append(f"not a {SPEC_SUFFIX} file: {name}")
        else:
            _add_spec(found, (st.st_dev, st.st_ino), name, limit)
    return sorted((Path(p) for p in found.values()), key=str), problems


def _access_problem(name: str, exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return f"no such file or directory: {name}"
    if isinstance(exc, PermissionError):
        return f"permission denied: {name}"
    return f"cannot access {name}: {exc.strerror or exc}"


def _add_spec(found: _Found, key: tuple[int, int], name: str, limit: int) -> None:
    old = found.get(key)
    if old is None and len(found) >= limit:
        raise MatchLimitExceeded(limit)
    if old is None or name < old:  # scandir order is arbitrary; keep the result deterministic
        found[key] = name


def _walk_specs(top: str, found: _Found, problems: list[str], limit: int) -> None:
    stack = [top]
    while stack:
        directory = stack.pop()
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                    elif entry.name.endswith(SPEC_SUFFIX):
                        _spec_entry(entry, found, problems, limit)
        except OSError as exc:
            problems.append(f"cannot read directory {directory}: {exc.strerror or exc}")


def _spec_entry(entry: os.DirEntry[str], found: _Found, problems: list[str], limit: int) -> None:
    try:
        st = entry.stat()  # follows a symlink to a file
    except OSError:
        problems.append(f"broken symbolic link: {entry.path}")
        return
    if stat.S_ISREG(st.st_mode):
        _add_spec(found, (st.st_dev, st.st_ino), entry.path, limit)
    elif not stat.S_ISDIR(st.st_mode):  # a symlink to a directory is silently not followed
        problems.append(f"not a regular file: {entry.path}")


# ---------------------------------------------------------------------------------------------
# Globbing

_LITERAL, _WILD, _RECURSIVE = 0, 1, 2


@dataclass(frozen=True, slots=True)
class _Segment:
    kind: int
    text: str
    match: Callable[[str], object] | None = None
    dot_ok: bool = False  # the segment itself starts with ".", so it may match hidden names


def glob_files(base: Path, pattern: str, limit: int) -> list[Path]:
    """Paths matching `pattern` (relative to `base` unless absolute), sorted by path string.

    Each `/`-separated segment matches one name with fnmatch semantics (`*`, `?`, `[...]`);
    a `**` segment matches zero or more directories and a trailing `**` means `**/*`.
    Wildcards do not match a leading `.` unless the segment starts with `.`. Directory
    symlinks are never descended into by a wildcard or `**` (literal segments, which the
    author named, are resolved by the OS as usual). Every matching entry is returned,
    directories and broken symlinks included, so the caller can say what is wrong with it.
    Raises MatchLimitExceeded as soon as more than `limit` distinct paths match, and
    WalkLimitExceeded when the walk would search more than `limit` folders: a pattern that
    matches little can still ask to search a whole disk.
    """
    root = pattern.startswith("/")
    start = "/" if root else os.fspath(base)
    segments = _compile(pattern)
    if not segments:
        return []
    found: set[str] = set()
    stack: list[tuple[str, int]] = [(start, 0)]
    visited = 0
    while stack:
        directory, index = stack.pop()
        visited += 1
        if visited > limit:
            raise WalkLimitExceeded(limit)
        _expand(directory, index, segments, stack, found, limit)
    # Without `.` or empty segments, string order is the order of the Paths' strings.
    return [Path(p) for p in sorted(found)]


def _compile(pattern: str) -> list[_Segment]:
    parts = [p for p in pattern.split("/") if p and p != "."]  # `a/./b` is `a/b`
    if parts and parts[-1] == "**":
        parts.append("*")
    segments: list[_Segment] = []
    for part in parts:
        last = segments[-1] if segments else None
        if part == "**":
            if last is None or last.kind != _RECURSIVE:  # `**/**` is the same as `**`
                segments.append(_Segment(_RECURSIVE, part))
        elif _MAGIC_CHARS.isdisjoint(part):
            if last is not None and last.kind == _LITERAL:  # join literal runs: one lookup
                segments[-1] = _Segment(_LITERAL, f"{last.text}/{part}")
            else:
                segments.append(_Segment(_LITERAL, part))
        else:
            regex = re.compile(fnmatch.translate(part))
            segments.append(_Segment(_WILD, part, regex.fullmatch, part.startswith(".")))
    return segments


def _join(directory: str, name: str) -> str:
    return directory + name if directory.endswith("/") else f"{directory}/{name}"


def _expand(
    directory: str,
    index: int,
    segments: list[_Segment],
    stack: list[tuple[str, int]],
    found: set[str],
    limit: int,
) -> None:
    segment = segments[index]
    last = index == len(segments) - 1
    if segment.kind == _LITERAL:
        path = _join(directory, segment.text)
        if not last:
            stack.append((path, index + 1))
        elif _lexists(path):
            _add_match(found, path, limit)
        return
    following = segments[index + 1] if segment.kind == _RECURSIVE else segment
    if segment.kind == _RECURSIVE and following.kind != _WILD:
        stack.append((directory, index + 1))  # zero directories; the literal is a lookup
    wild_index = index if segment.kind == _WILD else index + 1
    for name, path, is_dir in _scan(directory):
        if segment.kind == _RECURSIVE and is_dir and not name.startswith("."):
            stack.append((path, index))
        if following.kind == _WILD and _name_matches(following, name):
            if wild_index == len(segments) - 1:
                _add_match(found, path, limit)
            elif is_dir:
                stack.append((path, wild_index + 1))


def _scan(directory: str) -> Iterator[tuple[str, str, bool]]:
    """(name, path, is a real directory) for each entry; unreadable directories yield nothing."""
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                try:
                    is_dir = entry.is_dir(follow_symlinks=False)
                except OSError:
                    is_dir = False
                yield entry.name, entry.path, is_dir
    except (OSError, ValueError):
        return


def _name_matches(segment: _Segment, name: str) -> bool:
    if name.startswith(".") and not segment.dot_ok:
        return False
    assert segment.match is not None
    return segment.match(name) is not None


def _lexists(path: str) -> bool:
    try:
        os.lstat(path)
    except (OSError, ValueError):
        return False
    return True


def _add_match(found: set[str], path: str, limit: int) -> None:
    if path not in found:
        if len(found) >= limit:
            raise MatchLimitExceeded(limit)
        found.add(path)


# ---------------------------------------------------------------------------------------------
# Images


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """A decoded, allowed image: its content digest, size in pixels and format."""

    path: Path
    digest: str
    width: int
    height: int
    format: str


@dataclass(frozen=True, slots=True)
class ImageProblem:
    """Why a file is not a usable image; `message` follows the path, e.g. "is empty (0 bytes)"."""

    path: Path
    message: str


def check_image(path: Path, max_pixels: int, max_bytes: int) -> ImageInfo | ImageProblem:
    """Read, hash and fully decode `path` without ever blocking on or trusting its contents."""
    data = _read_regular_file(path, max_bytes)
    if isinstance(data, ImageProblem):
        return data
    digest = hashlib.sha256(data).hexdigest()
    decoded = _decode(data, max_pixels)
    if isinstance(decoded, str):
        return ImageProblem(path, decoded)
    width, height, fmt = decoded
    return ImageInfo(path, digest, width, height, fmt)


def _read_regular_file(path: Path, max_bytes: int) -> bytes | ImageProblem:
    try:
        st = os.stat(path)
    except (OSError, ValueError) as exc:
        return ImageProblem(path, _stat_problem(path, exc))
    problem = _mode_problem(st, max_bytes)
    if problem:
        return ImageProblem(path, problem)
    try:
        # O_NONBLOCK: should the path be swapped for a FIFO after the stat, open won't hang.
        fd = os.open(path, _READ_FLAGS)
        with os.fdopen(fd, "rb") as handle:
            problem = _mode_problem(os.fstat(handle.fileno()), max_bytes)
            data = b"" if problem else handle.read(max_bytes + 1)
    except OSError as exc:
        return ImageProblem(path, _stat_problem(path, exc))
    if problem:
        return ImageProblem(path, problem)
    if len(data) > max_bytes:
        return ImageProblem(path, f"is larger than {_format_bytes(max_bytes)}")
    return data if data else ImageProblem(path, "is empty (0 bytes)")


def _stat_problem(path: Path, exc: OSError | ValueError) -> str:
    if isinstance(exc, ValueError):
        return "is not a valid path"
    if isinstance(exc, FileNotFoundError):
        return "is a broken symbolic link" if os.path.islink(path) else "does not exist"
    if isinstance(exc, PermissionError):
        return "cannot be read: permission denied"
    return f"cannot be read: {exc.strerror or exc}"


_FILE_KINDS: tuple[tuple[Callable[[int], bool], str], ...] = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _mode_problem(st: os.stat_result, max_bytes: int) -> str | None:
    if stat.S_ISDIR(st.st_mode):
        return "is a directory, not an image"
    if not stat.S_ISREG(st.st_mode):
        kind = next((k for test, k in _FILE_KINDS if test(st.st_mode)), "a special file")
        return f"is not a regular file ({kind})"
    if st.st_size == 0:
        return "is empty (0 bytes)"
    if st.st_size > max_bytes:
        return f"is larger than {_format_bytes(max_bytes)}"
    return None


def _format_bytes(count: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size and count % size == 0:
            return f"{count // size} {unit}"
    return f"{count:,} bytes"


def _decode(data: bytes, max_pixels: int) -> tuple[int, int, str] | str:
    """(width, height, format) of a fully decoded image, or the reason it is unusable."""
    fmt = _sniff(data)
    with warnings.catch_warnings():
        # Our own pixel limit below replaces Pillow's bomb warning; other Pillow warnings
        # (malformed MPO, invalid APNG) describe images it still decodes correctly.
        warnings.simplefilter("ignore")
        try:
            with Image.open(BytesIO(data), formats=ALLOWED_FORMATS) as im:
                fmt = im.format or fmt
                width, height = im.size
                if width * height > max_pixels:
                    return _too_many_pixels(width * height, max_pixels)
                im.load()
                return width, height, fmt or "unknown"
        except Image.DecompressionBombError as exc:
            return _pillow_bomb(exc, max_pixels)
        except UnidentifiedImageError:
            return _unidentified(data, fmt)
        except Exception as exc:  # hostile input reaches a third-party parser: never crash
            return f"is not a readable image: {_reason(exc, fmt)}"


def _too_many_pixels(pixels: int, limit: int) -> str:
    return f"has {pixels:,} pixels; the limit is {limit:,} (decompression bomb guard)"


def _pillow_bomb(exc: Image.DecompressionBombError, max_pixels: int) -> str:
    # Pillow refuses images above 2 * MAX_IMAGE_PIXELS inside Image.open, before we see the
    # size; its message is the only place the pixel count is available.
    match = re.search(r"\((\d+) pixels\)", str(exc))
    if match is None:
        return "has too many pixels (decompression bomb guard)"
    pixels = int(match.group(1))
    if pixels > max_pixels:
        return _too_many_pixels(pixels, max_pixels)
    pillow_limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    return f"has {pixels:,} pixels; Pillow's limit is {pillow_limit:,} (decompression bomb guard)"


def _reason(exc: BaseException, fmt: str | None) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    kind = f"the {fmt} data" if fmt else "the data"
    if "truncated" in text.lower():
        return f"{kind} is truncated"
    if isinstance(exc, MemoryError):
        return "not enough memory to decode it"
    short = text if len(text) <= 80 else text[:77] + "..."
    return f"{kind} is corrupt ({short})"


_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\x89PNG\r\n\x1a\n", "PNG"),
    (0, b"\xff\xd8\xff", "JPEG"),
    (8, b"WEBP", "WEBP"),
    (0, b"GIF87a", "GIF"),
    (0, b"GIF89a", "GIF"),
    (0, b"BM", "BMP"),
    (0, b"II*\x00", "TIFF"),
    (0, b"MM\x00*", "TIFF"),
    (0, b"\x00\x00\x01\x00", "ICO"),
    (0, b"8BPS", "PSD"),
    (0, b"qoif", "QOI"),
    (4, b"ftypavif", "AVIF"),
    (4, b"ftypheic", "HEIC"),
    (0, b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
)


def _sniff(data: bytes) -> str | None:
    """The image format named by the file's magic bytes, if we know it."""
    for offset, magic, name in _MAGIC:
        if data[offset : offset + len(magic)] == magic:
            if name == "WEBP" and not data.startswith(b"RIFF"):
                continue
            return name
    return None


def _unidentified(data: bytes, fmt: str | None) -> str:
    if fmt in ALLOWED_FORMATS:
        return f"is not a readable image: the {fmt} header is truncated or damaged"
    if fmt is not None:
        return f"is a {fmt} image; allowed formats are {', '.join(ALLOWED_FORMATS)}"
    if _looks_like_text(data[:4096]):
        return "is not a readable image: it looks like a text file"
    return f"is not a readable image: not a {', '.join(ALLOWED_FORMATS)} file"


def _looks_like_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start >= len(head) - 3  # a multi-byte character cut off by the slice
    return True


def file_digest(path: Path) -> str:
    """sha256 hex of a regular file's bytes, read in chunks; never blocks on a FIFO."""
    fd = os.open(path, _READ_FLAGS)
    with os.fdopen(fd, "rb") as handle:
        mode = os.fstat(handle.fileno()).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), os.fspath(path))
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
        return hashlib.file_digest(handle, "sha256").hexdigest()


# ---------------------------------------------------------------------------------------------
# Containment


def is_within(root: Path, target: Path) -> bool:
    """True when `target`'s real path (symlinks in its existing prefix resolved) is in `root`'s."""
    real_root = os.path.realpath(root)
    real_target = os.path.realpath(target)
    if real_target == real_root:
        return True
    return real_target.startswith(real_root.rstrip("/") + "/")
