"""Collects `let` lists and learned concepts; decides which concepts each file can see."""

from __future__ import annotations

from perfusion_dsl.context import ConceptDecl, Context
from perfusion_dsl.diagnostics import Label, error
from perfusion_dsl.nodes import Learn, Let


def _lets(ctx: Context) -> None:
    for unit in ctx.units.values():
        table: dict[str, Let] = {}
        for stmt in unit.module.statements:
            if not isinstance(stmt, Let):
                continue
            if stmt.name in table:
                first = table[stmt.name]
                ctx.add(error("let-redefined", f"`{stmt.name}` is already defined",
                              unit.file, stmt.name_span,
                              labels=(Label(unit.file, first.name_span, "first defined here"),),
                              help="`let` names are defined once per file"))
                continue
            table[stmt.name] = stmt
        ctx.lets[unit.path] = table


def _concepts(ctx: Context) -> None:
    """The first learn of each token; later ones are compared by `check_duplicates`."""
    for unit, index, learn in ctx.statements(Learn):
        decl = ConceptDecl(unit, index, learn)
        if learn.token in ctx.concepts:
            ctx.duplicates.append(decl)
        else:
            ctx.concepts[learn.token] = decl
    limit = ctx.config.limits.max_concepts
    if len(ctx.concepts) > limit:
        decl = list(ctx.concepts.values())[limit]
        ctx.add(error("too-many-concepts", f"this run learns {len(ctx.concepts):,} concepts; "
                      f"the limit is {limit:,}", decl.unit.file, decl.learn.token_span,
                      help="raise `max_concepts` in perfusion.toml"))


def _visibility(ctx: Context) -> None:
    by_file: dict[object, dict[str, ConceptDecl]] = {}
    for decl in ctx.concepts.values():
        by_file.setdefault(decl.unit.path, {})[decl.learn.token] = decl
    for unit, _, learn in ctx.statements(Learn):
        # a token learned identically in two files is visible from both
        by_file.setdefault(unit.path, {})[learn.token] = ctx.concepts[learn.token]
    for unit in ctx.units.values():
        seen = dict(by_file.get(unit.path, {}))
        for target in unit.uses:
            seen.update(by_file.get(target, {}))
        ctx.visible[unit.path] = seen


def run(ctx: Context) -> None:
    _lets(ctx)
    _concepts(ctx)
    _visibility(ctx)
