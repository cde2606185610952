"""Compiles the spec files under some paths: discovery, config, passes; the plan on demand."""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from perfusion_dsl.config import CONFIG_NAME, MAX_CONFIG_BYTES, find_root, load_config
from perfusion_dsl.context import Context
from perfusion_dsl.diagnostics import Diagnostic
from perfusion_dsl.passes import run_all
from perfusion_dsl.patterns import MatchLimitExceeded
from perfusion_dsl.reading import Unreadable, read_limited
from perfusion_dsl.spec_files import discover_specs, is_within

if TYPE_CHECKING:
    from perfusion_dsl.plan import Plan


class UsageError(Exception):
    """A problem with the command line rather than with a spec (exit 2)."""


@dataclass(frozen=True)
class Compilation:
    context: Context

    @property
    def diagnostics(self) -> list[Diagnostic]:
        return sorted(self.context.diagnostics, key=Diagnostic.sort_key)

    @property
    def ok(self) -> bool:
        return not self.context.failed

    def plan(self) -> Plan:
        """The plan (imports pydantic only now, keeping `check` fast)."""
        from perfusion_dsl.build_plan import build

        assert self.ok, "no plan for specs with errors"
        return build(self.context)


def run_root(paths: list[Path], explicit: Path | None = None) -> Path:
    """The run root: `--root`; else the nearest folder with perfusion.toml above the current
    folder, then above each given path; else the current folder when it holds every given
    path, else the deepest folder that holds them all (a notebook elsewhere calling
    `compile_paths([folder])` gets the folder, as `cd folder && perfusion run .` does)."""
    if explicit is not None:
        return explicit.resolve()
    cwd = Path.cwd().resolve()
    for start in (cwd, *(p.absolute() for p in paths)):
        found = find_root(start)
        if (found / CONFIG_NAME).is_file():
            return found
    folders = [p.resolve() if p.is_dir() else p.resolve().parent for p in paths]
    if not folders or all(is_within(cwd, f) for f in folders):
        return cwd
    return Path(os.path.commonpath(folders))


def spec_path(path: Path) -> Path:
    """A spec file's path as the compiler keys it: absolute, its folder resolved."""
    return path.absolute().parent.resolve() / path.name


class _Pauses:
    count = 0  # compilations running now, in any thread
    was_enabled = True  # the collector's state before the first: a caller's choice is kept
    lock = threading.Lock()


@contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while compiling: a compilation allocates tens of
    thousands of small objects (one per image) and makes no cycles to collect, and the
    collector's passes over them were the slow tail of an editor's checks (90th percentile
    twice the median; docs/editors.md). Collection resumes when the last one ends."""
    with _Pauses.lock:
        if _Pauses.count == 0:
            _Pauses.was_enabled = gc.isenabled()
        _Pauses.count += 1
        gc.disable()
    try:
        yield
    finally:
        with _Pauses.lock:
            _Pauses.count -= 1
            if _Pauses.count == 0 and _Pauses.was_enabled:
                gc.enable()


def compile_paths(paths: list[Path], root: Path | None = None,
                  model: str | None = None, *,
                  overlay: Mapping[Path, str] | None = None) -> Compilation:
    """Check every `.concept` file under `paths`; raises UsageError for bad paths.
    `model` overrides the project's default model (a spec's `model` line still wins).
    `overlay`: texts that replace files' contents (an editor's unsaved buffers); a path
    given in `paths` that is only in the overlay is checked too."""
    with _gc_paused():
        return _compile(paths, root, model, overlay)


def _compile(paths: list[Path], root: Path | None, model: str | None,
             overlay: Mapping[Path, str] | None) -> Compilation:
    texts = {spec_path(p): t.encode("utf-8", "surrogatepass") for p, t in (overlay or {}).items()}
    unsaved = [p for p in paths if spec_path(p) in texts and not p.exists()]
    root = run_root(paths, root)
    config, config_diags = load_config(root, lambda p: _display(root, p))
    if model is not None:
        if not model.strip():
            raise UsageError("--model needs a model name")
        config = replace(config, model=model.strip())
    try:
        files, problems = discover_specs([p for p in paths if p not in unsaved],
                                         config.limits.max_spec_files)
    except MatchLimitExceeded as exc:
        raise UsageError(f"more than {exc.limit:,} spec files under the given paths "
                         "(raise `max_spec_files` in perfusion.toml)") from exc
    if problems:
        raise UsageError("; ".join(problems))
    files += unsaved
    if not files:
        shown = ", ".join(str(p) for p in paths)
        raise UsageError(f"no `.concept` files found under {shown}")
    requested = list(dict.fromkeys(spec_path(f) for f in files))
    ctx = Context(root=root, config=config, requested=requested, overlay=texts)
    ctx.diagnostics.extend(config_diags)
    if config.file is not None and config_diags:
        ctx.extra_sources[_display(root, config.file)] = _text(config.file)
    return Compilation(run_all(ctx))


def _text(path: Path) -> str:
    """perfusion.toml's text for showing its diagnostics (bounded: it may be /dev/zero)."""
    try:
        return read_limited(path, MAX_CONFIG_BYTES).decode("utf-8", errors="replace")
    except Unreadable:
        return ""


def _display(root: Path, path: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()
