"""`perfusion fmt`: prints a parsed module in canonical form, keeping every comment."""

from __future__ import annotations

import bisect
import contextlib
import os
import stat
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from perfusion_dsl import nodes as n
from perfusion_dsl.diagnostics import Diagnostic, error, render_all
from perfusion_dsl.limits import DEFAULT_LIMITS
from perfusion_dsl.parser import parse
from perfusion_dsl.reading import Unreadable, read_limited
from perfusion_dsl.source import decode
from perfusion_dsl.spec_files import is_within
from perfusion_dsl.terminal import visible

INDENT = 2
MAX_LINE = 100
_END = sys.maxsize  # flushes every comment still pending


# ---------------------------------------------------------------------------------------------
# Printing


@dataclass(slots=True)
class _Line:
    indent: int
    text: str
    comment: str | None = None

    def render(self) -> str:
        if not self.text and self.comment is None:
            return ""
        out = " " * self.indent + self.text
        if self.comment is None:
            return out
        return f"{out}  {self.comment}" if self.text else out + self.comment


def _item(item: n.Item) -> str:
    return f'"{item.raw}"' if isinstance(item, n.Str) else item.text


def _super(sup: n.Super) -> str:
    if isinstance(sup.words, n.Str):
        return _item(sup.words)
    return " ".join(w.text for w in sup.words)


def _token_starts(statements: tuple[n.Statement, ...]) -> dict[int, int]:
    """For each source line holding code, the offset of its first token."""
    first: dict[int, int] = {}

    def note(line: int, offset: int) -> None:
        first[line] = min(offset, first.get(line, offset))

    for stmt in statements:
        for node in n.walk(stmt):
            span = getattr(node, "span", None)
            if isinstance(span, n.Span):
                note(span.line, span.start)
                note(span.end_line, span.end - 1)
    return first


@dataclass
class _Printer:
    """Prints statements line by line; comments are flushed in source order as it goes."""

    comments: list[n.Comment]
    own_line: set[int]  # start offsets of comments that have no code before them on their line
    starts: list[int] = field(default_factory=list)  # start offsets of `comments`
    lines: list[_Line] = field(default_factory=list)
    next_comment: int = 0
    last_top_line: int = 0  # source line of the last top-level element printed

    @classmethod
    def for_module(cls, module: n.Module) -> _Printer:
        comments = sorted(module.comments, key=lambda c: c.span.start)
        first = _token_starts(module.statements)
        own = {c.span.start for c in comments
               if first.get(c.span.line, c.span.start) >= c.span.start}
        return cls(comments, own, [c.span.start for c in comments])

    def open(self, indent: int, text: str) -> None:
        self.lines.append(_Line(indent, text))

    def emit(self, text: str) -> None:
        self.lines[-1].text += text

    def has_comments(self, span: n.Span) -> bool:
        """Whether a comment lies strictly inside `span` (between its brackets)."""
        i = bisect.bisect_right(self.starts, span.start)
        return i < len(self.starts) and self.starts[i] < span.end

    def flush(self, before: int, indent: int, top: bool = False) -> None:
        """Print the comments that start before offset `before`."""
        while self.next_comment < len(self.comments):
            comment = self.comments[self.next_comment]
            if comment.span.start >= before:
                return
            self.next_comment += 1
            text = comment.text.rstrip()
            last = self.lines[-1] if self.lines else None
            if comment.span.start in self.own_line or last is None or last.comment is not None:
                if top:
                    self.gap(comment.span.line, comment.span.line)
                self.lines.append(_Line(indent, "", text))
            else:
                last.comment = text

    def gap(self, line: int, end_line: int) -> None:
        """At top level, keep one blank line where the source had any."""
        if self.lines and line > self.last_top_line + 1:
            self.open(0, "")
        self.last_top_line = end_line

    # -- values -----------------------------------------------------------------------------

    def listv(self, value: n.ListV, indent: int, suffix: str = "") -> None:
        flat = "[" + ", ".join(_item(i) for i in value.items) + "]"
        line = self.lines[-1]
        width = line.indent + len(line.text) + len(flat) + len(suffix)
        if width <= MAX_LINE and not self.has_comments(value.span):
            self.emit(flat)
            return
        self.emit("[")
        for item in value.items:
            self.flush(item.span.start, indent + INDENT)
            self.open(indent + INDENT, _item(item) + ",")
        self.flush(value.span.end - 1, indent + INDENT)
        self.open(indent, "]")

    def value(self, value: n.Value, indent: int) -> None:
        if isinstance(value, n.ListV):
            self.listv(value, indent)
        else:
            self.emit(_item(value))

    def block(self, block: n.Block | None, indent: int) -> None:
        if block is None:
            return
        if not block.options and not self.has_comments(block.span):
            self.emit(" {}")
            return
        self.emit(" {")
        inner = indent + INDENT
        for option in block.options:
            self.flush(option.span.start, inner)
            self.open(inner, f"{option.key}: ")
            self.value(option.value, inner)
        self.flush(block.span.end - 1, inner)
        self.open(indent, "}")

    # -- statements -------------------------------------------------------------------------

    def statement(self, stmt: n.Statement) -> None:
        if isinstance(stmt, n.Model):
            self.open(0, f"model {_item(stmt.source)}")
        elif isinstance(stmt, n.Use):
            self.open(0, f"use {_item(stmt.path)}")
        elif isinstance(stmt, n.Let):
            self.open(0, f"let {stmt.name} = ")
            self.listv(stmt.items, 0)
        elif isinstance(stmt, n.Defaults):
            self.open(0, "defaults")
            self.block(stmt.block, 0)
        elif isinstance(stmt, n.Learn):
            self.learn(stmt)
        else:
            count = f" x {stmt.count.text}" if stmt.count is not None else ""
            self.open(0, f"generate {_item(stmt.template)}{count}")
            self.block(stmt.block, 0)

    def learn(self, stmt: n.Learn) -> None:
        supers = ", ".join(_super(s) for s in stmt.supers)
        self.open(0, f"learn {_item(stmt.pattern)} as {stmt.token} <{supers}>")
        if stmt.adjectives is not None:
            self.emit(" adjectives: ")
            self.listv(stmt.adjectives, 0, " {" if stmt.block is not None else "")
        self.block(stmt.block, 0)

    def module(self, module: n.Module) -> str:
        for stmt in module.statements:
            self.flush(stmt.span.start, 0, top=True)
            self.gap(stmt.span.line, stmt.span.end_line)
            self.statement(stmt)
        self.flush(_END, 0, top=True)
        if not self.lines:
            return ""
        return "\n".join(line.render() for line in self.lines) + "\n"


def format_module(module: n.Module) -> str:
    """The canonical text of `module`; its comments are placed by their spans."""
    return _Printer.for_module(module).module(module)


# ---------------------------------------------------------------------------------------------
# Text


def _comment_texts(module: n.Module) -> list[str]:
    return [c.text.rstrip() for c in module.comments]


def _faithful(text: str, module: n.Module) -> bool:
    """Whether `text` parses back to `module` with the same comments (a safety net)."""
    source, _ = decode(text.encode("utf-8"), "<formatted>", len(text.encode("utf-8")) + 1)
    if source is None:
        return False
    again = parse(source)
    return (not again.diagnostics and again.module == module
            and _comment_texts(again.module) == _comment_texts(module))


def format_bytes(data: bytes, file: str) -> tuple[str | None, list[Diagnostic]]:
    """The canonical text of a file's bytes, or None (and why) when it is not safe to format."""
    source, diags = decode(data, file, DEFAULT_LIMITS.max_spec_bytes)
    if source is None or any(d.severity == "error" for d in diags):
        return None, diags
    parsed = parse(source)
    diags += parsed.diagnostics
    if any(d.severity == "error" for d in diags):
        return None, diags
    text = format_module(parsed.module)
    if not _faithful(text, parsed.module):
        diags.append(error("fmt-unstable", "the formatter could not print this file "
                           "faithfully, so it was left unchanged (this is a bug)", file, None))
        return None, diags
    return text, diags


# ---------------------------------------------------------------------------------------------
# Files


@dataclass
class _Tally:
    changed: list[str] = field(default_factory=list)
    unchanged: int = 0
    failed: int = 0
    skipped: int = 0


def _discover(paths: list[Path]) -> list[Path]:
    from perfusion_dsl.compiler import UsageError
    from perfusion_dsl.patterns import MatchLimitExceeded
    from perfusion_dsl.spec_files import discover_specs

    try:
        files, problems = discover_specs(paths, DEFAULT_LIMITS.max_spec_files)
    except MatchLimitExceeded as exc:
        raise UsageError(f"more than {exc.limit:,} spec files under the given paths") from exc
    if problems:
        raise UsageError("; ".join(problems))
    if not files:
        shown = ", ".join(str(p) for p in paths)
        raise UsageError(f"no `.concept` files found under {shown}")
    return files


def _read(path: Path, file: str) -> tuple[bytes | None, list[Diagnostic]]:
    try:
        return read_limited(path, DEFAULT_LIMITS.max_spec_bytes), []
    except Unreadable as exc:
        msg = f"cannot read spec file: {exc.reason}"
        return None, [error("unreadable", msg, file, None)]


def write_atomic(path: Path, data: bytes) -> None:
    """Replace the file `path` names (through a symlink) with `data`, keeping its mode."""
    target = os.path.realpath(path)
    mode = stat.S_IMODE(os.stat(target).st_mode)
    fd, temp = tempfile.mkstemp(dir=os.path.dirname(target),
                                prefix=f".{os.path.basename(target)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, mode)
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def _report(diags: list[Diagnostic], file: str, data: bytes | None) -> None:
    text = (data or b"").decode("utf-8", errors="replace").replace("\r\n", "\n")
    print(render_all(diags, {file: text.removeprefix("\ufeff")}), file=sys.stderr)


def _outside(path: Path, root: Path) -> str | None:
    """Where `path` leads when it is a link to a file outside `root` (which fmt leaves
    alone: it would rewrite a file the project does not own), else None."""
    if not path.is_symlink() or is_within(root, path):
        return None
    return os.path.realpath(path)


def _format_one(path: Path, check: bool, tally: _Tally, root: Path) -> None:
    file = str(path)
    target = _outside(path, root)
    if target is not None:
        print(visible(f"{file}: skipped: it is a symbolic link to {target}, outside the run "
                      f"root {root}; format that file where it is"), file=sys.stderr)
        tally.skipped += 1
        return
    data, diags = _read(path, file)
    text = None
    if data is not None:
        text, diags = format_bytes(data, file)
    if text is None:
        _report(diags, file, data)
        tally.failed += 1
        return
    new = text.encode("utf-8")
    if new == data:
        tally.unchanged += 1
        return
    if not check:
        try:
            write_atomic(path, new)
        except OSError as exc:
            print(visible(f"{file}: error: cannot write: {exc.strerror or exc}"), file=sys.stderr)
            tally.failed += 1
            return
    print(visible(f"{'would reformat' if check else 'reformatted'} {file}"))
    tally.changed.append(file)


def _plural(count: int, what: str = "file") -> str:
    return f"{count} {what}{'s' * (count != 1)}"


def _summary(tally: _Tally, check: bool) -> str:
    would = "would be " if check else ""
    parts = [f"{_plural(len(tally.changed))} {would}reformatted",
             f"{_plural(tally.unchanged)} {would}left unchanged"]
    if tally.failed:
        parts.append(f"{_plural(tally.failed)} with errors (not formatted)")
    if tally.skipped:
        parts.append(f"{_plural(tally.skipped)} skipped (links to files outside the run root)")
    return ", ".join(parts)


def format_files(paths: list[Path], check: bool, root: Path | None = None) -> int:
    """Format every spec under `paths` in place (or, with `check`, only report); exit status.
    A spec that is a link to a file outside `root` (the run root; default: the current
    folder) is skipped and named."""
    tally = _Tally()
    root = (root or Path.cwd()).resolve()
    for path in _discover(paths):
        _format_one(path, check, tally, root)
    print(_summary(tally, check))
    return 1 if tally.failed or (check and tally.changed) else 0
