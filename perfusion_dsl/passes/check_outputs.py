"""Names every output image, keeps outputs inside the run root, and finds clashes."""

from __future__ import annotations

import dataclasses
import re
from functools import lru_cache
from pathlib import Path

from perfusion_dsl.context import Context, RenderDecl
from perfusion_dsl.diagnostics import Label, error, warning
from perfusion_dsl.nodes import Generate, Span
from perfusion_dsl.spec_files import is_within

_NON_WORD = re.compile(r"[^a-z0-9]+")
MAX_SLUG = 80


@lru_cache(maxsize=1024)  # a prompt's renders (strengths, seeds) come one after another
def slug(prompt: str) -> str:
    text = _NON_WORD.sub("-", prompt.lower()).strip("-")
    return text[:MAX_SLUG].rstrip("-") or "prompt"


def file_name(render: RenderDecl) -> str:
    # repr: the shortest text that round-trips, so distinct strengths get distinct names
    return f"{slug(render.prompt)}_seed{render.seed}_s{render.strength!r}.png"


def _identity(render: RenderDecl) -> tuple[object, ...]:
    return (render.prompt, render.seed, render.strength, render.model, render.options)


def _out_span(gen: Generate) -> Span:
    if gen.block is not None:
        for opt in gen.block.options:
            if opt.key == "out":
                return opt.value.span
    return gen.template.span


def run(ctx: Context) -> None:
    checked: dict[Path, bool] = {}
    claimed: dict[Path, RenderDecl] = {}
    reported: set[tuple[int, int]] = set()
    for render in ctx.renders:
        inside = checked.get(render.out_dir)
        if inside is None:
            inside = checked[render.out_dir] = is_within(ctx.root, render.out_dir)
            if not inside:
                ctx.add(error("out-outside-root", f"output folder `{ctx.display(render.out_dir)}`"
                              f" is outside the run root `{ctx.root.as_posix()}`",
                              render.unit.file, _out_span(render.generate),
                              help="outputs must stay inside the run root: the folder with "
                                   "perfusion.toml, else the current folder; run perfusion "
                                   "from the project folder or pass `--root`"))
        if not inside:
            continue
        out = render.out_dir / file_name(render)
        first = claimed.get(out)
        if first is None:
            claimed[out] = render = dataclasses.replace(render, out=out)
            ctx.outputs.append(render)
            continue
        pair = (id(first.generate), id(render.generate))
        if pair in reported:
            continue
        reported.add(pair)
        same = _identity(first) == _identity(render)
        make = warning if same else error
        ctx.add(make("duplicate-render" if same else "render-clash",
                     f"this renders `{ctx.display(out)}` again" if same else
                     f"two different renders would write `{ctx.display(out)}`",
                     render.unit.file, render.generate.template.span,
                     labels=(Label(first.unit.file, first.generate.template.span,
                                   "also rendered here"),),
                     help=None if same else "give one of them another `out:` folder or seed"))
