"""A token learned by several statements must define the very same concept everywhere."""

from __future__ import annotations

from typing import Any

from perfusion_dsl.context import ConceptDecl, Context
from perfusion_dsl.diagnostics import Label, error
from perfusion_dsl.keys import ATTENTION_MASK_RULE


def concept_inputs(ctx: Context, decl: ConceptDecl) -> dict[str, Any]:
    """Everything that changes the trained concept, after defaults and globbing: what the
    cache key hashes. Image and mask files enter by content digest, never by path; caption
    files by their text, and only when set (so keys made before `captions` existed hold)."""
    where = (decl.unit.path, decl.index)
    options = {k: list(v) if isinstance(v, tuple) else v
               for k, v in ctx.options.get(where, {}).items() if k not in ("mask", "captions")}
    masks = ctx.masks.get(where)
    captions = ctx.captions.get(where)
    learn = decl.learn
    model = ctx.models[decl.unit.path]
    config = dict(ctx.config.checkpoint_configs).get(model)
    return {
        "token": learn.token,
        "model": model,
        # a checkpoint's configuration decides how its weights are read: it changes the key
        **({"model_config": config} if config is not None else {}),
        "supercategories": [s.text for s in learn.supers],
        "adjectives": [i.value for i in learn.adjectives.items] if learn.adjectives else [],
        "images": [i.digest for i in ctx.images.get(where, ())],
        "mask": [m.digest for m in masks] if masks is not None
        else _mask_rule(ctx.options.get(where, {}).get("mask", "none")),
        **({"captions": list(captions)} if captions is not None else {}),
        "options": options,
    }


def _mask_rule(mask: str) -> str:
    """`attention` with the rule that cuts its masks (`keys.ATTENTION_MASK_RULE`)."""
    return f"attention:{ATTENTION_MASK_RULE}" if mask == "attention" else mask


def _differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    names = [k for k in dict.fromkeys([*a, *b]) if k != "options" and a.get(k) != b.get(k)]
    names += [f"`{k}`" for k in sorted(set(a["options"]) | set(b["options"]))
              if a["options"].get(k) != b["options"].get(k)]
    return names


def run(ctx: Context) -> None:
    for decl in ctx.duplicates:
        first = ctx.concepts[decl.learn.token]
        differ = _differences(concept_inputs(ctx, first), concept_inputs(ctx, decl))
        if not differ:
            continue  # the same concept declared twice (e.g. a copied file): trained once
        ctx.add(error("duplicate-concept",
                      f"concept `{decl.learn.token}` is learned twice, differently",
                      decl.unit.file, decl.learn.token_span,
                      labels=(Label(first.unit.file, first.learn.token_span,
                                    "first learned here"),),
                      help=f"they differ in {', '.join(differ)}; a token names one concept "
                           "per run, so rename one of them"))
