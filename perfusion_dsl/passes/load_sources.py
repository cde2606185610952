"""Reads and parses the requested spec files and every file they `use`; finds cycles."""

from __future__ import annotations

import os
from pathlib import Path

from perfusion_dsl.context import Context, Unit, use_target
from perfusion_dsl.diagnostics import error, warning
from perfusion_dsl.nodes import Module, Use
from perfusion_dsl.parser import defined_names, parse
from perfusion_dsl.reading import Unreadable, describe_mode, read_limited
from perfusion_dsl.source import Source, decode


def _read(ctx: Context, path: Path, file: str) -> bytes | None:
    """The file's bytes, or None after reporting why they cannot be used."""
    limit = ctx.config.limits.max_spec_bytes
    try:
        data = ctx.overlay[path][:limit + 1] if path in ctx.overlay else read_limited(path, limit)
    except Unreadable as exc:
        ctx.add(error("unreadable", f"cannot read spec file: {exc.reason}", file, None))
        return None
    if len(data) > limit:
        size = len(ctx.overlay[path]) if path in ctx.overlay else max(_size(path), len(data))
        ctx.add(error("spec-too-large", f"spec file is {size:,} bytes; the limit is "
                      f"{limit:,}", file, None, help="split it into several files, "
                      "or raise `max_spec_bytes` in perfusion.toml"))
        return None
    return data


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _load(ctx: Context, path: Path, requested: bool) -> Unit:
    file = ctx.display(path)
    data = _read(ctx, path, file)
    if data is None:  # already reported; an unread file is not also "empty"
        return Unit(path, file, Source(file, ""), Module(()), frozenset(), requested, ())
    source, diags = decode(data, file, ctx.config.limits.max_spec_bytes)
    ctx.diagnostics.extend(diags)
    if source is None:
        return _undecodable(path, file, data, requested)
    parsed = parse(source, by_statement=path in ctx.overlay)  # an editor's buffer
    ctx.diagnostics.extend(parsed.diagnostics)
    if not parsed.module.statements and not parsed.diagnostics:  # blank or only comments
        ctx.add(warning("empty-file", "file declares nothing", file, None))
    uses = tuple(_resolve_use(ctx, path, file, s) for s in parsed.module.statements
                 if isinstance(s, Use))
    return Unit(path, file, source, parsed.module, parsed.broken_names, requested,
                tuple(p for p in uses if p is not None))


def _undecodable(path: Path, file: str, data: bytes, requested: bool) -> Unit:
    """A file that is not UTF-8. It is shown with replacement characters so the caret lands
    on the bad byte, and the concepts and lists it seems to define are marked broken so that
    files using them get no cascade of unknown names."""
    text = data.decode("utf-8", errors="replace")
    broken = frozenset(defined_names(text))
    return Unit(path, file, Source(file, text), Module(()), broken, requested, ())


def _resolve_use(ctx: Context, path: Path, file: str, use: Use) -> Path | None:
    target = Path(use.path.value)
    full = use_target(path, use.path.value)
    if not use.path.value.endswith(".concept"):
        ctx.add(error("use-not-spec", f"`use` needs a `.concept` file, found `{target}`",
                      file, use.path.span))
        return None
    if not full.is_file() and full not in ctx.overlay:
        kind = _kind(full)
        what = f"`{target}` is {kind}, not a spec file" if kind else f"no such spec file `{target}`"
        ctx.add(error("use-missing", what, file, use.path.span,
                      help=f"`use` paths are relative to this file; looked for "
                           f"`{ctx.display(full)}`"))
        return None
    if full == path:
        ctx.add(error("use-cycle", "a file cannot `use` itself", file, use.path.span))
        return None
    return full


def _kind(path: Path) -> str | None:
    """What is at `path` when it exists but is not a file (a directory, a FIFO, …)."""
    try:
        return describe_mode(os.stat(path).st_mode)
    except OSError:
        return None


def run(ctx: Context) -> None:
    requested = set(ctx.requested)
    queue = list(ctx.requested)
    while queue:
        path = queue.pop(0)
        if path in ctx.units:
            continue
        unit = _load(ctx, path, path in requested)
        ctx.units[path] = unit
        queue.extend(p for p in unit.uses if p not in ctx.units)
    _report_cycles(ctx)


def _report_cycles(ctx: Context) -> None:
    """One diagnostic per cycle, at the `use` that closes it (shown as a → b → a).

    Iterative depth-first search, so a long chain of `use` cannot exhaust the stack."""
    done: set[Path] = set()
    reported: set[frozenset[Path]] = set()
    for start in sorted(ctx.units):
        if start in done:
            continue
        stack: list[tuple[Path, int]] = [(start, 0)]
        on_stack = {start}
        while stack:
            path, i = stack[-1]
            uses = ctx.units[path].uses
            if i == len(uses):
                stack.pop()
                on_stack.discard(path)
                done.add(path)
                continue
            stack[-1] = (path, i + 1)
            target = uses[i]
            if target in on_stack:
                trail = [p for p, _ in stack]
                cycle = [*trail[trail.index(target):], target]
                if frozenset(cycle) not in reported:
                    reported.add(frozenset(cycle))
                    _cycle_error(ctx, path, target, cycle)
            elif target not in done and target in ctx.units:
                stack.append((target, 0))
                on_stack.add(target)


def _cycle_error(ctx: Context, path: Path, target: Path, cycle: list[Path]) -> None:
    unit = ctx.units[path]
    span = next(s.path.span for s in unit.module.statements
                if isinstance(s, Use) and use_target(path, s.path.value) == target)
    shown = " → ".join(ctx.units[p].file for p in cycle)
    ctx.add(error("use-cycle", f"`use` cycle: {shown}", unit.file, span,
                  help="move the shared concepts into a file that both `use`"))
