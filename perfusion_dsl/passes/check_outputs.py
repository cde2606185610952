"""Keeps outputs inside the run root and finds clashes: two renders with one file name
(`output_names.file_name`, given as templates expand) in one folder."""

from __future__ import annotations

from pathlib import Path

from perfusion_dsl.context import Context, RenderDecl
from perfusion_dsl.diagnostics import Label, error, warning
from perfusion_dsl.nodes import Generate, Span
from perfusion_dsl.spec_files import is_within


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
    # keyed by the folder's text and the name: no path is built per render (a check of a
    # large spec names thousands; docs/editors.md)
    claimed: dict[tuple[str, str], RenderDecl] = {}
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
        key = (str(render.out_dir), render.name)
        first = claimed.get(key)
        if first is None:
            claimed[key] = render
            ctx.outputs.append(render)
            continue
        pair = (id(first.generate), id(render.generate))
        if pair in reported:
            continue
        reported.add(pair)
        same = _identity(first) == _identity(render)
        make = warning if same else error
        ctx.add(make("duplicate-render" if same else "render-clash",
                     f"this renders `{ctx.display(render.out)}` again" if same else
                     f"two different renders would write `{ctx.display(render.out)}`",
                     render.unit.file, render.generate.template.span,
                     labels=(Label(first.unit.file, first.generate.template.span,
                                   "also rendered here"),),
                     help=None if same else "give one of them another `out:` folder or seed"))
