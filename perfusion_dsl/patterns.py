"""Globbing that never follows a symbolic link to a folder, with a limit on what it matches
and searches (the `learn` and `mask` patterns of a spec)."""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

_MAGIC_CHARS = frozenset("*?[")


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
