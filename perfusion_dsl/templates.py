"""Parses a prompt template (`{a|b}`, `{NAME}`, escapes) into parts with raw offsets."""

from __future__ import annotations

import re
from dataclasses import dataclass

from perfusion_dsl.nodes import ESCAPES

TOKEN = re.compile(r"(?<![A-Za-z0-9_-])[A-Za-z_][A-Za-z0-9_-]*\*")
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


@dataclass(frozen=True, slots=True)
class Piece:
    """Literal text; `at` is its offset in the raw template."""

    text: str
    at: int
    length: int


@dataclass(frozen=True, slots=True)
class Choice:
    """`{a|b|c}`: one prompt per alternative."""

    alternatives: tuple[Piece, ...]
    at: int
    length: int


@dataclass(frozen=True, slots=True)
class NameRef:
    """`{NAME}`: one prompt per item of `let NAME`."""

    name: str
    at: int
    length: int


Part = Piece | Choice | NameRef


@dataclass(frozen=True, slots=True)
class TemplateError:
    message: str
    at: int
    length: int
    help: str | None = None


# Runs of characters that need no decoding, taken a run at a time rather than one by one.
_PLAIN = {stop: re.compile(f"[^\\\\{re.escape(stop)}]+") for stop in ("{}", "{|}")}


def _literal(raw: str, start: int, stop: str) -> tuple[str, int]:
    """Decoded text from `start` up to (not including) the first unescaped char of `stop`."""
    plain = _PLAIN[stop]
    out, i = [], start
    while i < len(raw) and raw[i] not in stop:
        run = plain.match(raw, i)
        if run is not None:
            out.append(run.group())
            i = run.end()
        elif i + 1 < len(raw):  # raw[i] is a backslash
            out.append(ESCAPES.get(raw[i + 1], raw[i + 1]))
            i += 2
        else:
            out.append(raw[i])
            i += 1
    return "".join(out), i


def _group(raw: str, start: int) -> tuple[Part | TemplateError, int]:
    """The group opening at raw[start] == "{"; returns it and the offset after "}"."""
    alts: list[Piece] = []
    i = start + 1
    while True:
        text, j = _literal(raw, i, "{|}")
        alts.append(Piece(text, i, j - i))
        if j >= len(raw):
            return TemplateError("unclosed `{` in template", start, 1,
                                 "close the group with `}`, or write `\\{` for a brace"), j
        if raw[j] == "{":
            return TemplateError("groups cannot be nested", j, 1,
                                 "write the alternatives out in one group"), _skip(raw, j)
        if raw[j] == "}":
            return _finish(alts, start, j + 1 - start), j + 1
        i = j + 1


def _skip(raw: str, at: int) -> int:
    """The offset after the `}` closing the outer group, when raw[at] is a nested `{`.

    Skipping only to the first `}` would leave the outer group's `}` unmatched and
    report a second, cascading error."""
    depth, i = 2, at + 1
    while i < len(raw):
        if raw[i] == "\\":
            i += 2
            continue
        depth += {"{": 1, "}": -1}.get(raw[i], 0)
        i += 1
        if depth == 0:
            return i
    return len(raw)


def _finish(alts: list[Piece], at: int, length: int) -> Part | TemplateError:
    if all(not a.text.strip() for a in alts):
        return TemplateError("empty group in template", at, length,
                             "write alternatives `{a|b}` or a `let` name `{NAME}`")
    if len(alts) == 1:
        name = alts[0].text.strip()
        if NAME.fullmatch(name):
            return NameRef(name, alts[0].at, alts[0].length)
        return TemplateError("a group needs `|` alternatives or a `let` name", at, length,
                             "e.g. `{a forest|the snow}` or `{outfits}`")
    return Choice(tuple(alts), at, length)


def parse_template(raw: str) -> tuple[list[Part], list[TemplateError]]:
    parts: list[Part] = []
    errors: list[TemplateError] = []
    i = 0
    while i < len(raw):
        if raw[i] == "{":
            got, i = _group(raw, i)
            (errors if isinstance(got, TemplateError) else parts).append(got)  # type: ignore[arg-type]
        elif raw[i] == "}":
            errors.append(TemplateError("unmatched `}` in template", i, 1,
                                        "write `\\}` for a literal brace"))
            i += 1
        else:
            text, j = _literal(raw, i, "{}")
            parts.append(Piece(text, i, j - i))
            i = j
    return parts, errors
