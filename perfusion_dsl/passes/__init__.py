"""Semantic passes, in the order they run: the table of contents of the compiler."""

from __future__ import annotations

from collections.abc import Callable

from perfusion_dsl.context import Context
from perfusion_dsl.passes import (
    check_duplicates,
    check_options,
    check_outputs,
    check_strings,
    expand_templates,
    load_sources,
    resolve_images,
    resolve_models,
    resolve_names,
)

PASSES: tuple[tuple[str, Callable[[Context], None]], ...] = (
    ("load_sources", load_sources.run),  # read, decode, parse; follow `use`; cycles
    ("check_strings", check_strings.run),  # escapes, string length
    ("resolve_models", resolve_models.run),  # one `model` per file, same across `use`
    ("resolve_names", resolve_names.run),  # `let` lists, concepts, visibility
    ("check_options", check_options.run),  # option keys, types, ranges; defaults
    ("resolve_images", resolve_images.run),  # globs, image decoding, masks, captions
    ("check_duplicates", check_duplicates.run),  # a token learned twice means one concept
    ("expand_templates", expand_templates.run),  # templates, concepts, expansion limits
    ("check_outputs", check_outputs.run),  # output names, run root, clashes
)


def run_all(ctx: Context) -> Context:
    for _, run in PASSES:
        run(ctx)
    return ctx
