"""Checks every quoted string: known escapes only, and the length limit."""

from __future__ import annotations

import re

from perfusion_dsl.context import Context
from perfusion_dsl.diagnostics import error
from perfusion_dsl.nodes import ESCAPES, Str, walk

_ESCAPE = re.compile(r"\\(.)")
_ALLOWED = ", ".join(f"`\\{c}`" for c in ESCAPES)


def run(ctx: Context) -> None:
    limit = ctx.config.limits.max_string_chars
    for unit in ctx.units.values():
        for node in walk(unit.module.statements):
            if not isinstance(node, Str):
                continue
            if len(node.raw) > limit:
                ctx.add(error("string-too-long",
                              f"string is {len(node.raw):,} characters; the limit is {limit:,}",
                              unit.file, node.span))
                continue
            for m in _ESCAPE.finditer(node.raw):
                if m.group(1) not in ESCAPES:
                    ctx.add(error("bad-escape", f"unknown escape `\\{m.group(1)}` in string",
                                  unit.file, node.span.sub(1 + m.start(), 2),
                                  help=f"known escapes are {_ALLOWED}; write `\\\\` for a "
                                       "backslash"))
