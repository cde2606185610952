"""Checks prompt templates (names, concepts, groups, size) and expands them into renders."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Any

from perfusion_dsl.context import Context, RenderDecl, Unit
from perfusion_dsl.diagnostics import closest, did_you_mean, error
from perfusion_dsl.nodes import Generate, Span, Str
from perfusion_dsl.output_names import file_name
from perfusion_dsl.plan import RenderOptions
from perfusion_dsl.templates import TOKEN, Choice, NameRef, Part, Piece, parse_template


def _check_tokens(ctx: Context, unit: Unit, text: str, span: Span, offset: int) -> None:
    """Every `word*` in `text` (found at raw `offset` of the string at `span`) is visible."""
    visible = ctx.visible.get(unit.path, {})
    broken: set[str] | None = None
    for m in TOKEN.finditer(text):
        token = m.group()
        if token in visible:
            continue
        if broken is None:  # built only for an unknown token: it is a walk over all files
            broken = set().union(*(u.broken for u in ctx.units.values()))
        if token in broken:
            continue
        hint = did_you_mean(token, visible)
        elsewhere = ctx.concepts.get(token)
        if not hint and elsewhere is None:
            other = closest(token, ctx.concepts)
            elsewhere = ctx.concepts.get(other) if other else None
            hint = f" (did you mean `{other}`?)" if other else ""
        help_text = None
        if elsewhere is not None:
            rel = Path(os.path.relpath(elsewhere.unit.path, unit.path.parent)).as_posix()
            help_text = f"`{elsewhere.learn.token}` is learned in `{elsewhere.unit.file}`; " \
                        f"add `use \"{rel}\"`"
        ctx.add(error("unknown-concept", f"unknown concept `{token}` in template{hint}",
                      unit.file, span.sub(1 + offset + m.start(), len(token)), help=help_text))


def _options_list(ctx: Context, unit: Unit, part: Part, span: Span) -> list[str] | None:
    """The texts a part expands to; None after reporting an unknown name."""
    if isinstance(part, Piece):
        return [part.text]
    if isinstance(part, Choice):
        return [a.text for a in part.alternatives]
    let = ctx.lets.get(unit.path, {}).get(part.name)
    if let is None:
        if part.name not in unit.broken:
            names = ctx.lets.get(unit.path, {})
            ctx.add(error("unknown-let", f"unknown list `{part.name}` in template"
                          f"{did_you_mean(part.name, names)}", unit.file,
                          span.sub(1 + part.at, part.length),
                          help=None if names else "define it first: `let NAME = [a, b]`"))
        return None
    return [item.value for item in let.items.items]


def _check_let_tokens(ctx: Context, unit: Unit, part: NameRef) -> None:
    let = ctx.lets.get(unit.path, {}).get(part.name)
    for item in let.items.items if let else ():
        if isinstance(item, Str):
            _check_tokens(ctx, unit, item.raw, item.span, 0)


MAX_FACTORS_SHOWN = 8  # a template of 700 groups names the first few, then a count


def _amount(count: int) -> str:
    """`64,000,000`, or past 30 digits, where no one reads it digit by digit, `more than
    10^910`."""
    return f"{count:,}" if count < 10**30 else f"more than 10^{len(str(count)) - 1}"


def _too_big(ctx: Context, unit: Unit, gen: Generate, sizes: list[tuple[str, int]],
             total: int) -> bool:
    limit = ctx.config.limits.max_renders_per_generate
    if total <= limit:
        return False
    factors = [f"{what} ({n:,})" for what, n in sizes if n != 1]  # only what multiplies
    if len(factors) > MAX_FACTORS_SHOWN:
        rest = len(factors) - MAX_FACTORS_SHOWN
        factors = [*factors[:MAX_FACTORS_SHOWN], f"… ({rest:,} more)"]
    ctx.add(error("expansion-too-large", f"this template expands to {_amount(total)} images; "
                  f"the limit is {limit:,}", unit.file, gen.template.span,
                  extra=(f"= {' × '.join(factors)}",),
                  help="split it into several `generate` statements, or raise "
                       "`max_renders_per_generate` in perfusion.toml"))
    return True


def _shown(raw: str, part: Part) -> str:
    """A group as written: `{a|b}` or `{NAME}`."""
    if isinstance(part, NameRef):
        return f"`{{{part.name}}}`"
    return f"`{raw[part.at:part.at + part.length]}`"


@dataclass
class _Overflow:
    """The statements past `max_renders_total`: one error for the run, at the first of them,
    with the total, instead of the same error on each later statement."""

    first: tuple[Unit, Generate, int] | None = None  # the statement, renders planned before it
    counts: list[int] = field(default_factory=list)  # renders of each statement past the limit

    def report(self, ctx: Context) -> None:
        if self.first is None:
            return
        unit, gen, before = self.first
        here, later = self.counts[0], self.counts[1:]
        why = f"= {before:,} planned before this statement + {here:,} here"
        if later:
            why += f" + {sum(later):,} in {len(later):,} later statement(s)"
        limit, wanted = ctx.config.limits.max_renders_total, before + sum(self.counts)
        ctx.add(error("too-many-renders", f"the run would render {_amount(wanted)} images; the "
                      f"limit is {limit:,}", unit.file, gen.span, extra=(why,),
                      help="raise `max_renders_total` in perfusion.toml"))


def _expand(ctx: Context, unit: Unit, index: int, gen: Generate, over: _Overflow) -> None:
    parts, errors = parse_template(gen.template.raw)
    for bad in errors:
        ctx.add(error("template", bad.message, unit.file,
                      gen.template.span.sub(1 + bad.at, bad.length), help=bad.help))
    choices = []
    for part in parts:
        for piece in part.alternatives if isinstance(part, Choice) else \
                (part,) if isinstance(part, Piece) else ():
            _check_tokens(ctx, unit, gen.template.raw[piece.at:piece.at + piece.length],
                          gen.template.span, piece.at)
        if isinstance(part, NameRef):
            _check_let_tokens(ctx, unit, part)
        choices.append(_options_list(ctx, unit, part, gen.template.span))
    options = ctx.options.get((unit.path, index))
    if errors or options is None or any(c is None for c in choices):
        return
    lists: list[list[str]] = [c for c in choices if c is not None]
    sizes = [(_shown(gen.template.raw, p), len(c))
             for p, c in zip(parts, lists, strict=True) if not isinstance(p, Piece)]
    sizes += [(f"x {options['count']}", options["count"]),
              ("strength values", len(options["strength"]))]
    total = prod(n for _, n in sizes)
    if _too_big(ctx, unit, gen, sizes, total) or not unit.requested:
        return
    if over.first is not None or len(ctx.renders) + total > ctx.config.limits.max_renders_total:
        over.first = over.first or (unit, gen, len(ctx.renders))
        over.counts.append(total)
        return
    _emit(ctx, unit, gen, lists, options)


def _emit(ctx: Context, unit: Unit, gen: Generate, lists: list[list[str]],
          options: dict[str, Any]) -> None:
    model = ctx.models[unit.path]
    render_opts = RenderOptions(**{k: options[k] for k in RenderOptions.model_fields})
    out_dir = _out_dir(ctx, unit, options)
    for combo in itertools.product(*lists):
        prompt = "".join(combo)
        concepts = tuple(dict.fromkeys(TOKEN.findall(prompt)))
        for strength in options["strength"]:
            for seed in range(options["seed"], options["seed"] + options["count"]):
                ctx.renders.append(RenderDecl(unit, gen, prompt, concepts, seed, strength, model,
                                              render_opts, out_dir,
                                              file_name(prompt, seed, strength)))


def _out_dir(ctx: Context, unit: Unit, options: dict[str, Any]) -> Path:
    if options.get("out"):
        return unit.path.parent / str(options["out"])
    if ctx.config.output_root:
        return ctx.root / ctx.config.output_root / unit.path.stem
    return unit.path.parent / "renders" / unit.path.stem


def run(ctx: Context) -> None:
    over = _Overflow()
    for unit, index, gen in ctx.statements(Generate):
        _expand(ctx, unit, index, gen, over)
    over.report(ctx)
