"""Turns a checked context into the plan (pydantic, frozen, versioned)."""

from __future__ import annotations

from typing import Any

from perfusion_dsl.context import ConceptDecl, Context, RenderDecl
from perfusion_dsl.keys import concept_key
from perfusion_dsl.plan import ConceptStep, Plan, RenderStep


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _concept(ctx: Context, decl: ConceptDecl) -> ConceptStep:
    where = (decl.unit.path, decl.index)
    options = {k: _jsonable(v) for k, v in ctx.options[where].items()}
    images = ctx.images[where]
    masks = ctx.masks.get(where)
    mask_key: str | list[str] = options["mask"]
    if masks is not None:
        options["mask"] = [ctx.display(m.path) for m in masks]
        mask_key = [m.digest for m in masks]
    learn = decl.learn
    supers = [s.text for s in learn.supers]
    adjectives = [i.value for i in learn.adjectives.items] if learn.adjectives else []
    model = ctx.models[decl.unit.path]
    key = concept_key(token=learn.token, model=model, supercategories=supers,
                      adjectives=adjectives, image_digests=[i.digest for i in images],
                      mask=mask_key, options={k: v for k, v in options.items() if k != "mask"})
    return ConceptStep(token=learn.token, file=decl.unit.file, line=learn.span.line, model=model,
                       supercategories=supers, adjectives=adjectives,
                       images=[ctx.display(i.path) for i in images], options=options, key=key)


def _render(ctx: Context, render: RenderDecl) -> RenderStep:
    assert render.out is not None
    return RenderStep(file=render.unit.file, line=render.generate.span.line,
                      prompt=render.prompt, concepts=list(render.concepts), seed=render.seed,
                      strength=render.strength, out=ctx.display(render.out),
                      options=dict(render.options))


def build(ctx: Context) -> Plan:
    concepts = sorted(ctx.concepts.values(), key=lambda d: (d.unit.file, d.learn.span.line))
    return Plan(concepts=[_concept(ctx, d) for d in concepts],
                renders=[_render(ctx, r) for r in ctx.renders])
