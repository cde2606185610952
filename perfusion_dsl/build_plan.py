"""Turns a checked context into the plan (pydantic, frozen, versioned)."""

from __future__ import annotations

from perfusion_dsl.context import ConceptDecl, Context, RenderDecl
from perfusion_dsl.keys import concept_key
from perfusion_dsl.passes.check_duplicates import concept_inputs
from perfusion_dsl.plan import ConceptStep, LearnOptions, Plan, RenderStep


def _concept(ctx: Context, decl: ConceptDecl) -> ConceptStep:
    where = (decl.unit.path, decl.index)
    options = ctx.options[where]
    masks = ctx.masks.get(where)
    mask = tuple(ctx.display(m.path) for m in masks) if masks is not None else options["mask"]
    captions = ctx.captions.get(where, "none")
    inputs = concept_inputs(ctx, decl)
    return ConceptStep(token=inputs["token"], file=decl.unit.file, line=decl.learn.span.line,
                       model=inputs["model"], supercategories=inputs["supercategories"],
                       adjectives=inputs["adjectives"],
                       images=[ctx.display(i.path) for i in ctx.images[where]],
                       image_sha256=[i.digest for i in ctx.images[where]],
                       mask_sha256=[m.digest for m in masks] if masks is not None else [],
                       options=LearnOptions(**{k: options[k] for k in LearnOptions.model_fields
                                               if k not in ("mask", "captions")},
                                            mask=mask, captions=captions),
                       key=concept_key(inputs))


def _render(ctx: Context, render: RenderDecl) -> RenderStep:
    return RenderStep(file=render.unit.file, line=render.generate.span.line, model=render.model,
                      prompt=render.prompt, concepts=list(render.concepts), seed=render.seed,
                      strength=render.strength, out=ctx.display(render.out),
                      options=render.options)


def build(ctx: Context) -> Plan:
    concepts = sorted(ctx.concepts.values(), key=lambda d: (d.unit.file, d.learn.span.line))
    steps = [_concept(ctx, d) for d in concepts]
    renders = [_render(ctx, r) for r in ctx.outputs]
    used = {c.model for c in steps} | {r.model for r in renders}
    return Plan(concepts=steps, renders=renders,
                checkpoint_configs={m: c for m, c in ctx.config.checkpoint_configs if m in used})
