"""The safetensors container read strictly, without torch: a bounded read of a regular file,
the header (8-byte little-endian length, then a JSON object) checked, and the canonical
re-serialisation that makes a file's bytes depend only on its content."""

from __future__ import annotations

import errno
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .atomic import open_regular, reason

MAX_HEADER_BYTES = 1024 * 1024


class FormatProblem(Exception):
    """What is wrong with a file, without its path: the caller adds it."""


def read_file(path: Path, limit: int, what: str) -> bytes:
    """The bytes of the regular file at `path` (a link is followed: a file the user named),
    at most `limit`; FormatProblem says why not ("no such file", "not a regular file (it is
    a directory)", "too large for a <what>")."""
    try:
        file = open_regular(path, follow_links=True)
    except FileNotFoundError:
        raise FormatProblem("no such file") from None
    except OSError as exc:
        not_file = exc.errno == errno.EINVAL and str(exc.strerror).startswith("not a regular")
        raise FormatProblem(exc.strerror if not_file else f"cannot open: {reason(exc)}") \
            from None
    with file:
        try:
            data = file.read(limit + 1)
        except OSError as exc:
            raise FormatProblem(f"cannot read: {reason(exc)}") from None
    if len(data) > limit:
        raise FormatProblem(f"too large for a {what} (over {limit:,} bytes)")
    return data


def parse_header(data: bytes) -> tuple[dict[str, Any], int]:
    """The safetensors header as a dict (no key twice) and where the tensor data starts."""
    if len(data) < 8:
        sniffed = _sniff(data)
        raise FormatProblem(f"too small to be a safetensors file ({len(data)} bytes)"
                            + (f"; {sniffed}" if sniffed else ""))
    length = int.from_bytes(data[:8], "little")
    if not 2 <= length <= MAX_HEADER_BYTES or data[8:9] != b"{":
        raise FormatProblem("not a safetensors file: " + (
            _sniff(data) or "its first 8 bytes do not give the length of a JSON header"))
    if 8 + length > len(data):
        raise FormatProblem(f"truncated: the header is {length:,} bytes but only "
                            f"{len(data) - 8:,} follow the length field")
    try:
        text = data[8:8 + length].decode("utf-8")
        header = json.loads(text, object_pairs_hook=no_duplicates)
    except UnicodeDecodeError as exc:
        raise FormatProblem(f"the header is not UTF-8 (byte {8 + exc.start})") from None
    except ValueError as exc:
        raise FormatProblem(f"the header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise FormatProblem("the header is not a JSON object")
    return header, 8 + length


def tensor_sha256(data: bytes, name: str) -> str:
    """sha256 (hex) of the stored bytes of tensor `name` in a safetensors file's `data`: a
    digest kept in the metadata is checked against it without loading anything."""
    header, start = parse_header(data)
    entry = header.get(name)
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= len(data) - start):
        raise FormatProblem(f"no tensor {name!r} with data inside the file")
    return hashlib.sha256(data[start + offsets[0]:start + offsets[1]]).hexdigest()


def canonical(raw: bytes) -> bytes:
    """`raw` (what safetensors wrote) with its header re-serialised with sorted keys:
    safetensors writes metadata in hash-map order, which changes from process to process."""
    header, start = parse_header(raw)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("ascii")
    text += b" " * (-len(text) % 8)  # keep the data 8-byte aligned, as safetensors does
    return len(text).to_bytes(8, "little") + text + raw[start:]


def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A `json.loads` object hook that refuses a key given twice (ValueError)."""
    keys = [key for key, _ in pairs]
    twice = {k for k in keys if keys.count(k) > 1}
    if twice:
        raise ValueError(f"a key appears twice ({names_of(twice)})")
    return dict(pairs)


def names_of(names: Iterable[str], most: int = 5) -> str:
    """The first `most` of `names`, sorted, and how many more."""
    ordered = sorted(names)
    shown = ", ".join(ordered[:most])
    return shown + (f" and {len(ordered) - most} more" if len(ordered) > most else "")


def _sniff(data: bytes) -> str:
    """What the file looks like instead, for the error message ("" when unsure)."""
    if not data:
        return "the file is empty"
    if data.startswith(b"PK\x03\x04"):
        return "it is a zip archive, which is what torch.save writes (pickles are never loaded)"
    if data[0] == 0x80 and data[1:2] and 2 <= data[1] <= 5:
        return "it is a Python pickle (pickles are never loaded)"
    head = data[:512]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = head[:exc.start].decode("utf-8") if exc.start > len(head) - 4 else ""
    if text and all(ch.isprintable() or ch in "\t\r\n" for ch in text):
        return "it looks like a text file"
    return ""
