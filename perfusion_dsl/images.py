"""Image files checked before anything decodes them in earnest: regular files only, never
blocking on a FIFO, bounded in bytes and pixels, of an allowed format; and their digests."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
import warnings
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from perfusion_dsl.reading import READ_FLAGS, describe_mode

ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP")


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


# What decoding found, by content digest and pixel limit: the same bytes decode the same, so
# a process that checks again (an editor's server, on every edit) decodes each image once.
# Reading and hashing stay (a tenth of decoding a photo), so a changed file is always seen.
_DECODED: dict[tuple[str, int], tuple[int, int, str] | str] = {}
MAX_DECODED = 100_000


def check_image(path: Path, max_pixels: int, max_bytes: int) -> ImageInfo | ImageProblem:
    """Read, hash and fully decode `path` without ever blocking on or trusting its contents."""
    data = _read_regular_file(path, max_bytes)
    if isinstance(data, ImageProblem):
        return data
    digest = hashlib.sha256(data).hexdigest()
    decoded = _DECODED.get((digest, max_pixels))
    if decoded is None:
        decoded = _decode(data, max_pixels)
        if len(_DECODED) >= MAX_DECODED:
            _DECODED.clear()
        _DECODED[digest, max_pixels] = decoded
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
        fd = os.open(path, READ_FLAGS)
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


def _mode_problem(st: os.stat_result, max_bytes: int) -> str | None:
    if stat.S_ISDIR(st.st_mode):
        return "is a directory, not an image"
    if not stat.S_ISREG(st.st_mode):
        return f"is not a regular file ({describe_mode(st.st_mode)})"
    if st.st_size == 0:
        return "is empty (0 bytes)"
    if st.st_size > max_bytes:
        return f"is larger than {_format_bytes(max_bytes)}"
    return None


def _format_bytes(count: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size and count % size == 0:
            return f"{count // size} {unit}"
    return f"{count:,} byte{'s' * (count != 1)}"


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
    fd = os.open(path, READ_FLAGS)
    with os.fdopen(fd, "rb") as handle:
        mode = os.fstat(handle.fileno()).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), os.fspath(path))
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
        return hashlib.file_digest(handle, "sha256").hexdigest()
