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


def _same_definition(a: ConceptDecl, b: ConceptDecl) -> bool:
    """Two learn statements that would train the very same concept."""
    where_a = (a.unit.path.parent / a.learn.pattern.value).as_posix()
    where_b = (b.unit.path.parent / b.learn.pattern.value).as_posix()
    return where_a == where_b and (a.learn.supers, a.learn.adjectives, a.learn.block) == (
        b.learn.supers, b.learn.adjectives, b.learn.block)


def _concepts(ctx: Context) -> None:
    for unit, index, learn in ctx.statements(Learn):
        decl = ConceptDecl(unit, index, learn)
        first = ctx.concepts.get(learn.token)
        if first is None:
            ctx.concepts[learn.token] = decl
        elif not _same_definition(first, decl) or ctx.models[first.unit.path] != \
                ctx.models[unit.path]:
            ctx.add(error("duplicate-concept", f"concept `{learn.token}` is learned twice",
                          unit.file, learn.token_span,
                          labels=(Label(first.unit.file, first.learn.token_span,
                                        "first learned here"),),
                          help="a token names one concept per run; rename one of them"))
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
