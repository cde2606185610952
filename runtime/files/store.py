"""Content-addressed store of concept artifacts: atomic publish, digest checked on every hit."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import stat
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import concept_file
from .atomic import (
    FileError,
    fsync_folder,
    kind_of,
    open_regular,
    read_regular,
    reason,
    write_new,
)
from .safetensors_file import FormatProblem, parse_header, read_file, tensor_sha256

# Layout, one folder per key, published whole by one rename:
#   <root>/concepts/<key>/artifact.safetensors
#   <root>/concepts/<key>/manifest.json
#   <root>/tmp/<key>.<random>/     staging, same filesystem as concepts/
#   <root>/trash/<key>.<time>.<random>/   corrupt entries moved aside
#   <root>/renders/<render key>/<sha256>.png   rendered images by render key (a revert
#                                             restores them without loading a model)
FORMAT = "perfusion-store"
FORMAT_VERSION = 1
ARTIFACT = "artifact.safetensors"
MANIFEST = "manifest.json"
GRACE_SECONDS = 3600.0  # gc leaves younger tmp/ and trash/ leftovers: a put may be staging
MAX_MANIFEST_BYTES = 1 << 24  # the inputs list every image: 10,000 of them fit

_KEY = re.compile(r"[0-9A-Za-z_-]{1,128}")  # no dots or slashes: a key is never a path

log = logging.getLogger(__name__)


class StoreError(FileError):
    """The store could not be written or cleaned; names the path and the reason."""


class StoreUnusable(StoreError):
    """The store's place or layout is wrong before anything is built (a file where its folder
    should be, a part that is a link): a usage error, exit 2."""


@dataclass(frozen=True)
class Problem:
    """One bad store entry: where, and what is wrong (with expected and actual digests)."""

    path: Path
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class _Bad(Exception):
    """Internal: an entry check failed at `path`."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(message)
        self.problem = Problem(path, message)


STORE_DIR = ".perfusion"  # a build's store, in its run root, unless told otherwise
LOCK_FILE = "lock"  # the build lock (files/lock.py)
CINV_DIR = "cinv"  # C⁻¹ per base model (method/covariance.py)
# What a store holds at its top: the C⁻¹ cache (cinv/) lives here too.
PARTS = ("concepts", "tmp", "trash", "renders", "history", "checkpoints", CINV_DIR, LOCK_FILE)


CINV_DIGEST = "cinv_sha256"  # its metadata field: sha256 of the stored tensor's bytes
MAX_CINV_BYTES = 1 << 28  # 256 MiB: a D×D float32 for D up to 8,192


def cinv_problem(path: Path) -> str | None:
    """Why the C⁻¹ cache file at `path` cannot be trusted, or None: its tensor must hash to
    the digest its metadata records (a flipped bit would otherwise be used silently)."""
    try:
        data = read_file(path, MAX_CINV_BYTES, "C⁻¹ cache file")
        header, _ = parse_header(data)
        metadata = header.get("__metadata__")
        recorded = metadata.get(CINV_DIGEST) if isinstance(metadata, dict) else None
        if recorded is None:
            return "no digest: an older version wrote it (the next run recomputes it)"
        actual = tensor_sha256(data, "cinv")
    except FormatProblem as exc:
        return str(exc)
    if actual != recorded:
        return f"sha256 expected {recorded}, actual {actual} (the next run recomputes it)"
    return None


def _unusable_folder(path: Path, exc: OSError) -> str:
    """Why the store folder `path` cannot be made, as a person would say it."""
    for above in (path, *path.parents):
        with contextlib.suppress(OSError):
            mode = os.stat(above).st_mode
            if not stat.S_ISDIR(mode):
                what = "it" if above == path else f"{above}"
                return f"cannot be the cache folder: {what} is {kind_of(mode)}, not a folder"
            break
    return f"cannot create the cache folder: {reason(exc)}"


def cache_root(explicit: str | os.PathLike[str] | None = None,
               run_root: Path | None = None) -> Path:
    """The one answer to "where do the store and the C⁻¹ cache live": `explicit` (`--cache`,
    `cache_dir=`), else `$PERFUSION_CACHE`, else `.perfusion/` in the run root for a build,
    else, for the Python API, which has no run root, the user's cache folder
    (`$XDG_CACHE_HOME`, else `~/.cache`) `/perfusion`."""
    if explicit is not None:
        return Path(explicit)
    env = os.environ.get("PERFUSION_CACHE")
    if env:
        return Path(env)
    if run_root is not None:
        return run_root / STORE_DIR
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "perfusion"


class Store:
    """Concept artifacts by cache key; every hit is re-hashed, corrupt entries are misses."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.concepts = self.root / "concepts"
        self.tmp = self.root / "tmp"
        self.trash = self.root / "trash"

    def check_layout(self) -> None:
        """Make the store's folder if missing and refuse a store whose parts are not what
        they should be: a link at any of them could send what the build writes (the lock's
        pid, build records, cached images, checkpoints) outside it. The store folder itself
        may be a link: it is where the user put the store. Raises StoreUnusable."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnusable(self.root, _unusable_folder(self.root, exc)) from None
        links = []
        for name in PARTS:
            path = self.root / name
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StoreUnusable(path, f"cannot be read: {reason(exc)}") from None
            if stat.S_ISLNK(mode):
                links.append(path)
            elif stat.S_ISREG(mode) != (name == LOCK_FILE):
                want = "the lock file" if name == LOCK_FILE else "a folder"
                raise StoreUnusable(path, f"is {kind_of(mode)}, not {want}; remove it "
                                          "(the store rebuilds what it held)")
        advice = ("the parts of a store must not be links, since what the build writes there "
                  "would land elsewhere: remove {}, or point --cache or PERFUSION_CACHE at the "
                  "folder you want the store in")
        if len(links) == 1:
            raise StoreUnusable(links[0], f"is a symbolic link (to {os.readlink(links[0])!r}); "
                                + advice.format("the link"))
        if links:
            raise StoreUnusable(self.root, f"its parts {', '.join(p.name for p in links)} are "
                                "symbolic links; " + advice.format("the links"))

    def entry(self, key: str) -> Path:
        """The folder of `key`'s entry (it may not exist)."""
        if not _KEY.fullmatch(key):
            raise ValueError(f"not a store key: {key!r}")
        return self.concepts / key

    def get(self, key: str) -> Path | None:
        """The artifact of `key` when its entry is complete and its digest matches, else None.

        A corrupt or partial entry is logged (path and both digests), moved to trash/ and
        reported as a miss, so the caller rebuilds it.
        """
        folder = self.entry(key)
        if not os.path.lexists(folder):
            return None
        try:
            _check_entry(folder, key)
        except _Bad as bad:
            log.warning("corrupt cache entry, rebuilding it: %s", bad.problem)
            try:
                self._move_aside(folder)
            except OSError as exc:
                log.warning("could not move %s aside: %s", folder, reason(exc))
            return None
        return folder / ARTIFACT

    def discard(self, key: str, why: str) -> None:
        """Move `key`'s entry to trash/ because it failed a check its digest cannot make
        (one that needs the pipeline or the plan): from now on it is a miss, rebuilt."""
        folder = self.entry(key)
        log.warning("corrupt cache entry, rebuilding it: %s: %s", folder, why)
        try:
            self._move_aside(folder)
        except OSError as exc:
            log.warning("could not move %s aside: %s", folder, reason(exc))

    def manifest(self, key: str) -> dict[str, Any]:
        """The manifest of `key`'s entry; StoreError when it is unreadable."""
        try:
            return _read_manifest(self.entry(key) / MANIFEST, key)
        except _Bad as bad:
            raise StoreError(bad.problem.path, bad.problem.message) from None

    def peek(self, key: str) -> Path | None:
        """The artifact of `key` when its entry is valid, else None; changes nothing."""
        folder = self.entry(key)
        return folder / ARTIFACT if _is_valid(folder, key) else None

    def checkpoint(self, key: str) -> Path:
        """Where an unfinished training of `key` keeps its checkpoint."""
        return self.root / "checkpoints" / f"{self.entry(key).name}.safetensors"

    def render(self, key: str) -> bytes | None:
        """The cached PNG of a render key when its bytes still hash to its name, else None."""
        folder = self.root / "renders" / self.entry(key).name
        if folder.is_symlink():  # what it points at is not the store's
            log.warning("ignoring a cached render folder that is a symbolic link: %s", folder)
            return None
        for child in _children(folder):
            data = _read_regular(child)
            if data is not None and child.name == f"{hashlib.sha256(data).hexdigest()}.png":
                return data
            log.warning("ignoring a corrupt cached render: %s", child)
        return None

    def put_render(self, key: str, data: bytes) -> None:
        """Keep `data` as the render of `key` (staged in tmp/, then renamed: never partial)."""
        folder = self.root / "renders" / self.entry(key).name
        final = folder / f"{hashlib.sha256(data).hexdigest()}.png"
        if folder.is_symlink():  # never write through it: move the link itself aside
            self._move_aside(folder)
        elif final.exists():
            return
        self.tmp.mkdir(parents=True, exist_ok=True)
        temp = self.tmp / f"render.{secrets.token_hex(8)}"
        try:
            write_new(temp, data)
            folder.mkdir(parents=True, exist_ok=True)
            os.replace(temp, final)
        except OSError as exc:
            raise StoreError(final, f"cannot save the render: {reason(exc)}") from exc
        finally:
            temp.unlink(missing_ok=True)

    def put(self, key: str, data: bytes, *, token: str, tool_version: str,
            inputs: dict[str, Any] | None = None) -> Path:
        """Publish `data` as `key`'s artifact atomically and return its path.

        `inputs`: what the concept was built from (model, supercategories, adjectives,
        options, images), kept in the manifest: the artifact holds only what loading needs.

        Staged complete and fsynced in tmp/, then one rename of the folder: no final-named
        entry is ever incomplete. A valid existing entry is kept. On any OSError the
        staging folder is removed and a StoreError names the entry.
        """
        existing = self.get(key)
        if existing is not None:
            return existing
        folder = self.entry(key)
        manifest = _manifest(key, data, token, tool_version, inputs)
        temp: Path | None = None
        try:
            temp = self._stage(key, data, manifest)
            self._publish(key, temp)
            fsync_folder(self.concepts)
        except OSError as exc:
            raise StoreError(folder, f"cannot save the concept artifact: {reason(exc)}") from exc
        finally:
            if temp is not None:
                shutil.rmtree(temp, ignore_errors=True)  # gone already once published
        return folder / ARTIFACT

    def verify(self) -> list[Problem]:
        """Check every concept entry, cached render and C⁻¹ entry (read-only): one Problem
        per bad one."""
        problems: list[Problem] = []
        for child in _children(self.concepts):
            if not _KEY.fullmatch(child.name):
                problems.append(Problem(child, "not a store entry (unexpected name)"))
                continue
            try:
                _check_entry(child, child.name)
            except _Bad as bad:
                problems.append(bad.problem)
        for folder in _children(self.root / "renders"):
            for child in [folder] if folder.is_symlink() else _children(folder):
                data = _read_regular(child)
                if data is None or child.name != f"{hashlib.sha256(data).hexdigest()}.png":
                    problems.append(Problem(child, "cached render does not match its name "
                                                   "(its sha256); the next run renders it "
                                                   "again"))
        for child in _children(self.root / CINV_DIR):
            problem = cinv_problem(child)
            if problem is not None:
                problems.append(Problem(child, problem))
        return problems

    def gc(self, keep: set[str], *, keep_renders: set[str] | None = None,
           grace: float = GRACE_SECONDS) -> list[str]:
        """Remove entries whose key is not in `keep`, and tmp/, trash/ and checkpoints/
        leftovers older than `grace` seconds (checkpoints only of keys not in `keep`); return
        the removed paths. A key in `keep` is never removed. Cached renders are removed when
        their key is not in `keep_renders` (None: every cached render is kept)."""
        cutoff = time.time() - grace
        if keep_renders is None:
            keep_renders = {c.name for c in _children(self.root / "renders")}
        doomed = [c for c in _children(self.concepts)
                  if c.name not in keep and (_KEY.fullmatch(c.name) or _older(c, cutoff))]
        doomed += [c for c in _children(self.tmp) + _children(self.trash) if _older(c, cutoff)]
        doomed += [c for c in _children(self.root / "renders")
                   if c.name not in keep_renders and _older(c, cutoff)]
        doomed += [c for c in _children(self.root / "checkpoints")
                   if c.name.split(".")[0] not in keep and _older(c, cutoff)]
        removed: list[str] = []
        for path in doomed:
            try:
                _remove(path)
            except OSError as exc:
                raise StoreError(path, f"cannot remove: {reason(exc)}") from exc
            removed.append(str(path))
        return removed

    def _stage(self, key: str, data: bytes, manifest: bytes) -> Path:
        """A complete, fsynced copy of the entry in tmp/ (same filesystem as concepts/)."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        temp = self.tmp / f"{key}.{secrets.token_hex(8)}"
        os.mkdir(temp, 0o777)  # not mkdtemp: its 0700 would ignore the user's umask
        try:
            write_new(temp / ARTIFACT, data)
            write_new(temp / MANIFEST, manifest)
            fsync_folder(temp)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        return temp

    def _publish(self, key: str, temp: Path) -> None:
        """Rename `temp` to the entry's name; keep a valid entry that appeared meanwhile."""
        folder = self.entry(key)
        self.concepts.mkdir(parents=True, exist_ok=True)
        if os.path.lexists(folder):
            if _is_valid(folder, key):
                return  # another writer won: same key, same content
            self._move_aside(folder)
        try:
            os.rename(temp, folder)
        except OSError as exc:
            lost_race = exc.errno in (errno.EEXIST, errno.ENOTEMPTY)
            if not (lost_race and _is_valid(folder, key)):
                raise

    def _move_aside(self, folder: Path) -> None:
        """Move a bad entry to trash/ (a rename, so it is never seen half-removed)."""
        self.trash.mkdir(parents=True, exist_ok=True)
        os.rename(folder, self.trash / f"{folder.name}.{time.time_ns()}.{secrets.token_hex(4)}")


def _manifest(key: str, data: bytes, token: str, tool_version: str,
              inputs: dict[str, Any] | None) -> bytes:
    fields: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "key": key,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "token": token,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "tool_version": tool_version,
    }
    if inputs is not None:
        fields["inputs"] = inputs
    return (json.dumps(fields, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _is_valid(folder: Path, key: str) -> bool:
    try:
        _check_entry(folder, key)
    except _Bad:
        return False
    return True


def _check_entry(folder: Path, key: str) -> None:
    """Raise _Bad unless `folder` holds a manifest for `key` and an artifact matching it
    that passes the concept file's own checks (every one that needs no model): an entry
    whose digest matches but which could never load is as corrupt as a flipped bit."""
    if folder.is_symlink() or not folder.is_dir():
        raise _Bad(folder, "not a folder")
    path = folder / ARTIFACT
    data, actual, actual_size = _digest(path)
    try:
        manifest = _read_manifest(folder / MANIFEST, key)
    except _Bad as bad:
        where, why = bad.problem.path, bad.problem.message
        raise _Bad(where, f"{why}; sha256 expected unknown, actual {actual}") from None
    expected, size = manifest["sha256"], manifest["size"]
    if actual_size != size or actual != expected:
        found = "missing or unreadable" if actual_size is None else f"{actual_size:,} bytes"
        raise _Bad(path, f"{found} (manifest: {size:,} bytes); "
                         f"sha256 expected {expected}, actual {actual}")
    try:
        concept_file.read(data)
    except FormatProblem as problem:
        raise _Bad(path, f"its digest matches but it is not a usable concept file: "
                         f"{problem}") from None


def _read_manifest(path: Path, key: str) -> dict[str, Any]:
    try:
        manifest = json.loads(_read_small(path))
    except OSError as exc:
        raise _Bad(path, f"manifest unreadable: {reason(exc)}") from exc
    except ValueError as exc:
        raise _Bad(path, f"manifest is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise _Bad(path, "manifest is not a JSON object")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise _Bad(path, f"unknown manifest format {manifest.get('format')!r} "
                         f"version {manifest.get('format_version')!r}")
    if manifest.get("key") != key:
        raise _Bad(path, f"manifest is for key {manifest.get('key')!r}, not {key!r}")
    sha, size = manifest.get("sha256"), manifest.get("size")
    if not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
        raise _Bad(path, f"manifest sha256 is not a digest: {sha!r}")
    if not (type(size) is int and size >= 0):
        raise _Bad(path, f"manifest size is not a byte count: {size!r}")
    return manifest


def _read_small(path: Path) -> bytes:
    return read_regular(path, MAX_MANIFEST_BYTES + 1)[:MAX_MANIFEST_BYTES]


def _read_regular(path: Path) -> bytes | None:
    try:
        return read_regular(path)
    except OSError:
        return None


def _digest(path: Path) -> tuple[bytes, str, int | None]:
    """The bytes (up to the concept file's limit: a larger one never matches its manifest),
    their sha256 and the size of the regular file at `path` (never through a link), or why
    not."""
    try:
        with open_regular(path) as f:
            data, size = f.read(concept_file.MAX_FILE_BYTES + 1), os.fstat(f.fileno()).st_size
    except OSError as exc:
        if exc.errno == errno.EINVAL and str(exc.strerror).startswith("not a regular"):
            return b"", "none (artifact is not a regular file)", None
        return b"", f"none (artifact unreadable: {reason(exc)})", None
    return data, hashlib.sha256(data).hexdigest(), size


def _children(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except FileNotFoundError:
        return []


def _older(path: Path, cutoff: float) -> bool:
    with contextlib.suppress(FileNotFoundError):
        return os.lstat(path).st_mtime < cutoff
    return False


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)
