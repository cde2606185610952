"""A project's files and folders: the `.concept` files under the given paths, and whether a
path stays inside the run root."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

from perfusion_dsl.patterns import MatchLimitExceeded

SPEC_SUFFIX = ".concept"

_Found = dict[tuple[int, int], str]  # (st_dev, st_ino) -> smallest path naming that file


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



def is_within(root: Path, target: Path) -> bool:
    """True when `target`'s real path (symlinks in its existing prefix resolved) is in `root`'s."""
    real_root = os.path.realpath(root)
    real_target = os.path.realpath(target)
    if real_target == real_root:
        return True
    return real_target.startswith(real_root.rstrip("/") + "/")
