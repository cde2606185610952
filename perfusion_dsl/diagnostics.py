"""Diagnostics as data, and the one pure function that renders them for people."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from difflib import get_close_matches
from functools import lru_cache
from typing import Literal

from perfusion_dsl.nodes import Span
from perfusion_dsl.terminal import visible

Severity = Literal["error", "warning"]


@dataclass(frozen=True, slots=True)
class Label:
    """A secondary location, e.g. "first learned here"."""

    file: str
    span: Span
    message: str


@dataclass(frozen=True, slots=True)
class Diagnostic:
    code: str
    severity: Severity
    message: str
    file: str
    span: Span | None
    labels: tuple[Label, ...] = ()
    help: str | None = None
    extra: tuple[str, ...] = field(default=(), compare=False)

    def sort_key(self) -> tuple[str, int, int, str]:
        if self.span is None:
            return (self.file, 0, 0, self.message)
        return (self.file, self.span.line, self.span.col, self.message)


def error(code: str, message: str, file: str, span: Span | None, *,
          labels: tuple[Label, ...] = (), help: str | None = None,
          extra: tuple[str, ...] = ()) -> Diagnostic:
    return Diagnostic(code, "error", message, file, span, labels, help, extra)


def warning(code: str, message: str, file: str, span: Span | None, *,
            labels: tuple[Label, ...] = (), help: str | None = None,
            extra: tuple[str, ...] = ()) -> Diagnostic:
    return Diagnostic(code, "warning", message, file, span, labels, help, extra)


def closest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate `word` was most likely meant to be, if any is close."""
    pool = sorted(set(candidates))
    matches = get_close_matches(word, pool, n=1, cutoff=0.7)
    if matches:
        return matches[0]
    lowered = {c.lower(): c for c in pool}
    return lowered.get(word.lower())


def did_you_mean(word: str, candidates: Iterable[str], quote: str = "`") -> str:
    """` (did you mean `x`?)` for a close candidate, else the empty string."""
    match = closest(word, candidates)
    return f" (did you mean {quote}{match}{quote}?)" if match else ""


@lru_cache(maxsize=16)
def _lines(source: str) -> list[str]:
    return source.split("\n")  # cached: one file may have many diagnostics


def _line_text(source: str, line: int) -> str:
    lines = _lines(source)
    return lines[line - 1] if 0 < line <= len(lines) else ""


MAX_EXCERPT = 160  # longer source lines are shown as a window around the span
_CONTEXT = 40


def _window(text: str, first: int, last: int) -> tuple[int, int]:
    """The [lo, hi) slice of a long line worth showing for columns [first, last)."""
    if len(text) <= MAX_EXCERPT:
        return 0, len(text)
    lo = max(0, first - _CONTEXT)
    return lo, min(len(text), max(last, first + 1) + _CONTEXT, lo + MAX_EXCERPT)


def _excerpt(source: str | None, span: Span) -> list[str]:
    """The source line with a caret underline, tabs expanded so the caret lines up."""
    if source is None:
        return []
    text = _line_text(source, span.line).rstrip("\r")
    first = span.col - 1
    last = (span.end_col if span.end_line == span.line else len(text) + 1) - 1
    lo, hi = _window(text, first, last)
    lead, tail = ("..." if lo else ""), ("..." if hi < len(text) else "")
    # escaped per character, so the escaped head is a prefix of the escaped line
    head = visible(lead + text[lo:first]).expandtabs(4)
    body = visible(lead + text[lo:min(max(last, first), hi)]).expandtabs(4)[len(head):]
    gutter = str(span.line)
    pad = " " * len(gutter)
    return [
        f" {gutter} | {visible(lead + text[lo:hi]).expandtabs(4)}{tail}",
        f" {pad} | {' ' * len(head)}{'^' * max(1, len(body))}",
    ]


def render(diag: Diagnostic, sources: Mapping[str, str]) -> str:
    """`path:line:col: severity: message`, the source line, a caret, help and notes."""
    where = diag.file
    if diag.span is not None:
        where = f"{diag.file}:{diag.span.line}:{diag.span.col}"
    out = [visible(f"{where}: {diag.severity}: {diag.message}")]
    if diag.span is not None:
        out += _excerpt(sources.get(diag.file), diag.span)
    for label in diag.labels:
        out.append(visible(f"  note: {label.file}:{label.span.line}:{label.span.col}: "
                           f"{label.message}"))
        out += _excerpt(sources.get(label.file), label.span)
    out += [visible(f"  {line}") for line in diag.extra]
    if diag.help:
        out.append(visible(f"  help: {diag.help}"))
    return "\n".join(out)


def render_all(diags: Iterable[Diagnostic], sources: Mapping[str, str]) -> str:
    return "\n\n".join(render(d, sources) for d in sorted(diags, key=Diagnostic.sort_key))


def summary(diags: Iterable[Diagnostic]) -> tuple[int, int]:
    """(errors, warnings)."""
    items = list(diags)
    errors = sum(1 for d in items if d.severity == "error")
    return errors, len(items) - errors
