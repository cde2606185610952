"""Finds each file's base model: one `model` line at most, and the same across `use`."""

from __future__ import annotations

from perfusion_dsl.context import Context, use_target
from perfusion_dsl.diagnostics import Label, error
from perfusion_dsl.nodes import Model, Use


def run(ctx: Context) -> None:
    for unit in ctx.units.values():
        models = [s for s in unit.module.statements if isinstance(s, Model)]
        for extra in models[1:]:
            ctx.add(error("two-models", "a file can have only one `model` statement",
                          unit.file, extra.span,
                          labels=(Label(unit.file, models[0].span, "the first one is here"),)))
        chosen = models[0].source.value.strip() if models else ctx.config.model
        if models and not chosen:
            ctx.add(error("empty-model", "`model` needs a name, found an empty string",
                          unit.file, models[0].source.span))
        ctx.models[unit.path] = chosen or ctx.config.model
    for unit in ctx.units.values():
        uses = [s for s in unit.module.statements if isinstance(s, Use)]
        for target in unit.uses:
            theirs, ours = ctx.models[target], ctx.models[unit.path]
            if theirs == ours:
                continue
            stmt = next(u for u in uses if use_target(unit.path, u.path.value) == target)
            ctx.add(error("model-mismatch",
                          f"`{ctx.units[target].file}` uses model `{theirs}` but this file "
                          f"uses `{ours}`", unit.file, stmt.span,
                          help="a concept belongs to the model it was trained on; "
                               "give both files the same `model`"))
