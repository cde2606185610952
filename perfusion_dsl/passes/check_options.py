"""Types and ranges of every option; effective options after `defaults`."""

from __future__ import annotations

import re
from typing import Any

from perfusion_dsl.context import Context, Unit
from perfusion_dsl.diagnostics import Label, did_you_mean, error
from perfusion_dsl.nodes import Bare, Block, Defaults, Generate, Learn, Let, ListV, Option, Str
from perfusion_dsl.options import (
    GENERATE,
    IDENT,
    LEARN,
    NUMBER,
    SCHEMA,
    Invalid,
    defaults_for,
    int_range,
)
from perfusion_dsl.plan import MAX_SEED

WORD = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_KIND_OF = {Learn: LEARN, Generate: GENERATE}


def _unknown_key(ctx: Context, unit: Unit, opt: Option, kind: str | None) -> None:
    if opt.key in SCHEMA and kind is not None:
        other = next(iter(SCHEMA[opt.key].kinds))
        ctx.add(error("wrong-kind-option", f"`{opt.key}` is a {other} option, not a {kind} option",
                      unit.file, opt.key_span,
                      help=f"move it to a `{other}` statement or to `defaults`"))
        return
    pool = [k for k, s in SCHEMA.items() if kind is None or kind in s.kinds]
    ctx.add(error("unknown-option", f"unknown option `{opt.key}`{did_you_mean(opt.key, pool)}",
                  unit.file, opt.key_span,
                  help=f"{kind or 'known'} options are " + ", ".join(f"`{k}`" for k in pool)))


def _parse_block(ctx: Context, unit: Unit, block: Block, kind: str | None) -> dict[str, Any]:
    """Valid options of `block` as {key: value}; reports the rest."""
    out: dict[str, Any] = {}
    seen: dict[str, Option] = {}
    for opt in block.options:
        if opt.key in seen:
            ctx.add(error("duplicate-option", f"`{opt.key}` is set twice in this block",
                          unit.file, opt.key_span,
                          labels=(Label(unit.file, seen[opt.key].key_span, "first set here"),)))
            continue
        seen[opt.key] = opt
        spec = SCHEMA.get(opt.key)
        if spec is None or (kind is not None and kind not in spec.kinds):
            _unknown_key(ctx, unit, opt, kind)
            continue
        try:
            out[opt.key] = spec.parse(opt.value, opt.key)
        except Invalid as bad:
            span = (bad.at or opt.value).span
            ctx.add(error("option-value", bad.message, unit.file, span, help=bad.help))
    return out


def _check_words(ctx: Context, unit: Unit, items: ListV, what: str) -> None:
    if not items.items:
        ctx.add(error("empty-list", f"{what} list is empty", unit.file, items.span))
    for item in items.items:
        if isinstance(item, Bare) and not (IDENT.fullmatch(item.text) or
                                           NUMBER.fullmatch(item.text)):
            ctx.add(error("not-a-word", f"{what} items are words, numbers or quoted strings, "
                          f"found `{item.text}`", unit.file, item.span,
                          help=f'quote it: "{item.text}"'))
        elif isinstance(item, Str) and not item.value.strip() and what == "adjectives":
            ctx.add(error("not-a-word", "an adjective cannot be empty", unit.file, item.span))


def _check_learn(ctx: Context, unit: Unit, learn: Learn) -> None:
    for sup in learn.supers:
        words = (sup.words,) if isinstance(sup.words, Str) else sup.words
        for word in words:
            if isinstance(word, Bare) and not WORD.fullmatch(word.text):
                ctx.add(error("bad-supercategory", "a supercategory is a word or a quoted "
                              f"phrase, found `{word.text}`", unit.file, word.span))
            elif isinstance(word, Str) and not word.value.strip():
                ctx.add(error("bad-supercategory", "a supercategory cannot be empty",
                              unit.file, word.span))
    if learn.adjectives is not None:
        _check_words(ctx, unit, learn.adjectives, "adjectives")


def _count(ctx: Context, unit: Unit, gen: Generate) -> int:
    if gen.count is None:
        return 1
    try:
        return int_range(1, 10_000)(gen.count, "x COUNT")
    except Invalid as bad:
        ctx.add(error("option-value", bad.message, unit.file, gen.count.span))
        return 1


def _check_last_seed(ctx: Context, unit: Unit, gen: Generate, options: dict[str, Any]) -> None:
    """Image k uses `seed + k`; the last one must still be a valid seed."""
    last = options["seed"] + options["count"] - 1
    if last > MAX_SEED:
        ctx.add(error("option-value", f"the last image would use seed {last:,}, above the "
                      f"largest seed {MAX_SEED:,}", unit.file, gen.span,
                      help="lower `seed` or the count"))


def run(ctx: Context) -> None:
    for unit in ctx.units.values():
        current: dict[str, Any] = {}
        for index, stmt in enumerate(unit.module.statements):
            if isinstance(stmt, Defaults):
                current.update(_parse_block(ctx, unit, stmt.block, None))
            elif isinstance(stmt, Let):
                _check_words(ctx, unit, stmt.items, f"`{stmt.name}`")
            elif isinstance(stmt, Learn | Generate):
                kind = _KIND_OF[type(stmt)]
                own = _parse_block(ctx, unit, stmt.block, kind) if stmt.block else {}
                effective = defaults_for(kind, ctx.models.get(unit.path))
                effective.update({k: v for k, v in current.items() if k in effective})
                effective.update(own)
                if isinstance(stmt, Learn):
                    _check_learn(ctx, unit, stmt)
                else:
                    effective["count"] = _count(ctx, unit, stmt)
                    _check_last_seed(ctx, unit, stmt, effective)
                ctx.options[(unit.path, index)] = effective
