"""Where names are defined and used across a compilation's files, for an editor's go to
definition, find references and rename (`perfusion lsp`): concept tokens (learned once,
named in templates and `let` items of any file that sees them), `let` names (defined and
named in one file: lists are never shared) and `use` paths (each names a file).

Positions are the compiler's: 1-based lines and code-point columns of the decoded text."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from perfusion_dsl.context import ConceptDecl, Context, Unit, use_target
from perfusion_dsl.nodes import Bare, Generate, Learn, Let, Span, Str, Use
from perfusion_dsl.templates import NAME, TOKEN, NameRef, parse_template

Kind = Literal["token", "let", "use"]


@dataclass(frozen=True, slots=True)
class Occurrence:
    """One place a name is written. `key` identifies the thing named: the token, (file,
    name) for a `let`, the target file for a `use`."""

    kind: Kind
    name: str  # as written: `moon*`, `places`, `moon.concept`
    path: Path  # the file it is written in
    span: Span
    definition: bool
    key: object

    def contains(self, line: int, col: int) -> bool:
        """The cursor at (line, col) is on it (just after its last character counts)."""
        return self.span.line == line and self.span.col <= col <= self.span.end_col


def _tokens_in(raw: str, span: Span, path: Path) -> Iterator[Occurrence]:
    """The `word*` tokens written in a string's raw text (its span includes the quotes)."""
    for m in TOKEN.finditer(raw):
        yield Occurrence("token", m.group(), path, span.sub(1 + m.start(), len(m.group())),
                         False, m.group())


def _in_template(unit: Unit, gen: Generate) -> Iterator[Occurrence]:
    raw, span = gen.template.raw, gen.template.span
    yield from _tokens_in(raw, span, unit.path)
    parts, _ = parse_template(raw)
    for part in parts:
        if isinstance(part, NameRef):
            at = raw.index(part.name, part.at)  # the name inside `{ name }`
            yield Occurrence("let", part.name, unit.path, span.sub(1 + at, len(part.name)),
                             False, (unit.path, part.name))


def _in_unit(unit: Unit) -> Iterator[Occurrence]:
    for stmt in unit.module.statements:
        if isinstance(stmt, Learn):
            yield Occurrence("token", stmt.token, unit.path, stmt.token_span, True, stmt.token)
        elif isinstance(stmt, Let):
            yield Occurrence("let", stmt.name, unit.path, stmt.name_span, True,
                             (unit.path, stmt.name))
            for item in stmt.items.items:
                if isinstance(item, Str):
                    yield from _tokens_in(item.raw, item.span, unit.path)
                elif isinstance(item, Bare) and TOKEN.fullmatch(item.text):
                    yield Occurrence("token", item.text, unit.path, item.span, False,
                                     item.text)
        elif isinstance(stmt, Generate):
            yield from _in_template(unit, stmt)
        elif isinstance(stmt, Use):
            yield Occurrence("use", stmt.path.raw, unit.path, stmt.path.span, False,
                             use_target(unit.path, stmt.path.value))


def occurrences(ctx: Context) -> list[Occurrence]:
    """Every occurrence in every loaded file, files in path order."""
    return [occ for path in sorted(ctx.units) for occ in _in_unit(ctx.units[path])]


def at(occs: list[Occurrence], path: Path, line: int, col: int) -> Occurrence | None:
    return next((o for o in occs if o.path == path and o.contains(line, col)), None)


def learned(ctx: Context, occ: Occurrence) -> ConceptDecl | None:
    """The learn of the token `occ` names: the one its file sees, else any of the run."""
    return ctx.visible.get(occ.path, {}).get(occ.name) or ctx.concepts.get(occ.name)


def definition(ctx: Context, occ: Occurrence) -> tuple[Path, Span | None] | None:
    """Where the thing `occ` names is defined: a learn's token, a `let`'s name, or a used
    file (None for its span: the file itself). None when it is defined nowhere."""
    if occ.kind == "use":
        target = occ.key
        assert isinstance(target, Path)
        return (target, None) if target in ctx.units or target.is_file() else None
    if occ.kind == "token":
        decl = learned(ctx, occ)
        return (decl.unit.path, decl.learn.token_span) if decl else None
    let = ctx.lets.get(occ.path, {}).get(occ.name)
    return (occ.path, let.name_span) if let else None


def references(occs: list[Occurrence], occ: Occurrence, *,
               include_definition: bool = True) -> list[Occurrence]:
    """Every occurrence of what `occ` names, in file order."""
    return [o for o in occs if o.kind == occ.kind and o.key == occ.key
            and (include_definition or not o.definition)]


class RenameRefused(ValueError):
    """A rename that would break the specs; the message says why."""


def new_name(occ: Occurrence, wanted: str, occs: list[Occurrence]) -> str:
    """The name `occ`'s thing gets when the user asks for `wanted` (a token keeps its `*`);
    raises RenameRefused when that is not a valid, free name."""
    wanted = wanted.strip()
    if occ.kind == "token":
        wanted = wanted if wanted.endswith("*") else wanted + "*"
        if not TOKEN.fullmatch(wanted):
            raise RenameRefused(f"`{wanted}` is not a concept token: a letter or `_`, then "
                                "letters, digits, `_` or `-`, then `*`")
        taken = {o.name for o in occs if o.kind == "token" and o.definition}
    elif occ.kind == "let":
        if not NAME.fullmatch(wanted):
            raise RenameRefused(f"`{wanted}` is not a list name: a letter or `_`, then "
                                "letters, digits, `_` or `-`")
        taken = {o.name for o in occs if o.kind == "let" and o.definition
                 and o.path == occ.path}
    else:
        raise RenameRefused("rename a `use` path by renaming the file")
    if wanted != occ.name and wanted in taken:
        raise RenameRefused(f"`{wanted}` is already defined")
    return wanted


def rename(occs: list[Occurrence], occ: Occurrence, wanted: str
           ) -> dict[Path, list[tuple[Span, str]]]:
    """The edits, by file, that rename what `occ` names to `wanted` everywhere."""
    name = new_name(occ, wanted, occs)
    edits: dict[Path, list[tuple[Span, str]]] = {}
    for o in references(occs, occ):
        edits.setdefault(o.path, []).append((o.span, name))
    return edits
