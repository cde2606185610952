"""What an editor shows over a `.concept` file (`perfusion lsp`): hover texts for keywords,
options (the docs' own table, `option_docs`), `let` names, concept tokens and templates;
and inlay hints after each statement: how many images a `generate` makes and where they
go, and whether a `learn` is up to date. Pure functions of a compilation and a cursor;
the store's statuses come in as data."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from perfusion_dsl.completion import scan
from perfusion_dsl.context import Context, Unit
from perfusion_dsl.navigation import Occurrence, at, learned
from perfusion_dsl.nodes import Generate, Learn, Statement
from perfusion_dsl.option_docs import hover_markdown

# The statement forms of docs/language.md, one line each.
KEYWORD_DOCS = {
    "model": '`model "SOURCE"`: the base model of this file: `toy:shapes` (built in), a '
             "local diffusers folder or a model id. Never loaded by the compiler.",
    "use": '`use "PATH.concept"`: the concepts learned in that file become available here '
           "(only its concepts: `let` lists and `defaults` are not shared). The path is "
           "relative to this file.",
    "let": "`let NAME = [ITEM, …]`: a named list; `{NAME}` in a template makes one prompt "
           "per item. Names are file-local.",
    "defaults": "`defaults { OPTIONS }`: options for the `learn` and `generate` statements "
                "after it in this file. `steps` and `seed` reach both kinds.",
    "learn": "`learn PATTERN as TOKEN <SUPER, …> [adjectives: [WORD, …]] [{ OPTIONS }]`: "
             "trains the concept TOKEN from the images PATTERN matches; its cross-attention "
             "keys are locked to the supercategories. The first one's words before its "
             "last (`purple` of `<purple diamond>`) stand before the token in its "
             "training captions and in every prompt that names it.",
    "generate": '`generate "TEMPLATE" [x COUNT] [{ OPTIONS }]`: renders COUNT images for '
                "every prompt the template expands to, once per `strength` value; image k "
                "uses seed `seed + k`.",
    "as": "`as TOKEN`: the name of the concept a `learn` trains, written `name*`.",
    "adjectives": "`adjectives: [WORD, …]`: words you assert of the concept; they go into "
                  "its training captions next to the token.",
    "x": "`x COUNT`: images per prompt (1 to 10,000; default 1).",
}
_WORD = re.compile(r"[A-Za-z0-9_*-]+")
_OPTION_KEY = re.compile(r"[ \t]*([a-z_]+)[ \t]*:")
PROMPTS_SHOWN = 3


def _word_at(line: str, col: int) -> tuple[str, int] | None:
    """The word under 1-based column `col` of `line`, and its start column."""
    for m in _WORD.finditer(line):
        if m.start() < col <= m.end() + 1:
            return m.group(), m.start() + 1
    return None


def _line_offset(text: str, line: int) -> int:
    pos = 0
    for _ in range(line - 1):
        pos = text.index("\n", pos) + 1
    return pos


def _statement_at(unit: Unit, line: int) -> Statement | None:
    return next((s for s in unit.module.statements
                 if s.span.line <= line <= s.span.end_line), None)


def _renders_by_generate(ctx: Context) -> dict[int, list[tuple[str, Path]]]:
    """(prompt, folder) of each render, by the id of its generate statement (one pass)."""
    found: dict[int, list[tuple[str, Path]]] = {}
    for r in ctx.renders:
        found.setdefault(id(r.generate), []).append((r.prompt, r.out_dir))
    return found


def _folders(ctx: Context, dirs: list[Path]) -> str:
    shown = sorted({PurePosixPath(ctx.display(d)).as_posix() for d in dirs})
    return ", ".join(f"{d}/" for d in shown)


def _plural(count: int, word: str) -> str:
    return f"{count:,} {word}" + ("" if count == 1 else "s")


def _token_hover(ctx: Context, occ: Occurrence, statuses: Mapping[str, str]) -> str:
    decl = learned(ctx, occ)
    if decl is None:
        return f"**`{occ.name}`**: not learned in this file or any file it `use`s"
    learn = decl.learn
    lines = [f"**`{learn.token}`**, learned in `{decl.unit.file}:{learn.span.line}`",
             "```perfusion", decl.unit.source.text[learn.span.start:learn.span.end]
             .split("\n")[0], "```",
             f"- supercategories: {', '.join(s.text for s in learn.supers)}"]
    if learn.adjectives is not None:
        lines.append(f"- adjectives: {', '.join(i.value for i in learn.adjectives.items)}")
    images = ctx.images.get((decl.unit.path, decl.index))
    if images is not None:
        lines.append(f"- images: {len(images)}")
    if occ.name in statuses:
        lines.append(f"- store: {statuses[occ.name]}")
    return "\n".join(lines)


def _let_hover(ctx: Context, occ: Occurrence) -> str:
    let = ctx.lets.get(occ.path, {}).get(occ.name)
    if let is None:
        return f"**`{occ.name}`**: no `let {occ.name}` in this file"
    items = [i.value for i in let.items.items]
    return (f"**`let {let.name}`** ({_plural(len(items), 'item')}, line {let.span.line})\n\n"
            + "\n".join(f"- {item}" for item in items))


def _template_hover(ctx: Context, gen: Generate) -> str:
    renders = _renders_by_generate(ctx).get(id(gen), [])
    if not renders:
        return "**template**: makes no images here (errors above, or a file only `use`d)"
    prompts = list(dict.fromkeys(p for p, _ in renders))
    lines = [f"**{_plural(len(renders), 'image')}** from {_plural(len(prompts), 'prompt')} "
             f"→ {_folders(ctx, [d for _, d in renders])}", ""]
    lines += [f"- {p}" for p in prompts[:PROMPTS_SHOWN]]
    if len(prompts) > PROMPTS_SHOWN:
        lines.append(f"- … and {len(prompts) - PROMPTS_SHOWN:,} more")
    return "\n".join(lines)


def hover(ctx: Context, occs: list[Occurrence], path: Path, line: int, col: int,
          statuses: Mapping[str, str] | None = None) -> str | None:
    """Markdown for the cursor at (line, col) of the file at `path`; None for nothing."""
    unit = ctx.units.get(path)
    if unit is None:
        return None
    occ = at(occs, path, line, col)
    if occ is not None:
        if occ.kind == "token":
            return _token_hover(ctx, occ, statuses or {})
        if occ.kind == "let":
            return _let_hover(ctx, occ)
        return f"uses `{ctx.display(occ.key)}`" if isinstance(occ.key, Path) else None
    text = unit.source.text
    start = _line_offset(text, line)
    end = text.find("\n", start)
    line_text = text[start:] if end < 0 else text[start:end]
    state = scan(text[:start + col - 1])
    if state.in_comment:
        return None
    stmt = _statement_at(unit, line)
    if state.in_string:
        return _template_hover(ctx, stmt) if isinstance(stmt, Generate) else None
    found = _word_at(line_text, col)
    if found is None:
        return None
    word, word_col = found
    key = _OPTION_KEY.match(line_text[word_col - 1:])
    if state.depth > 0 and key is not None and key.group(1) == word:
        kind = state.statement if state.statement in ("learn", "generate") else None
        return hover_markdown(word, kind)
    return KEYWORD_DOCS.get(word)


@dataclass(frozen=True, slots=True)
class Hint:
    line: int  # 1-based
    col: int  # 1-based, where the hint is drawn (after the statement's first line)
    label: str


def _code(line: str) -> str:
    """`line` without a trailing comment (a `#` outside strings)."""
    quoted = escaped = False
    for i, ch in enumerate(line):
        if escaped:
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == "#" and not quoted:
            return line[:i]
    return line


def _end_of_first_line(unit: Unit, stmt: Statement) -> tuple[int, int]:
    """Where a hint goes: after the statement's first line, before a block's `{`."""
    text = unit.source.text
    end = text.find("\n", stmt.span.start)
    stop = min(end if end >= 0 else len(text), stmt.span.end)
    stripped = _code(text[stmt.span.start:stop]).rstrip()
    if stripped.endswith("{"):  # after the template and count, before the block
        stripped = stripped[:-1].rstrip()
    return stmt.span.line, stmt.span.col + len(stripped)


def inlay_hints(ctx: Context, path: Path, statuses: Mapping[str, str] | None = None
                ) -> list[Hint]:
    """After each `generate` of the file at `path`: `→ N images in FOLDER/`. After each
    `learn`: its status against the store (`statuses`, token → text), when given."""
    unit = ctx.units.get(path)
    if unit is None:
        return []
    hints = []
    by_generate = _renders_by_generate(ctx)
    for stmt in unit.module.statements:
        if isinstance(stmt, Generate):
            renders = by_generate.get(id(stmt), [])
            if renders:
                line, col = _end_of_first_line(unit, stmt)
                hints.append(Hint(line, col, f"→ {_plural(len(renders), 'image')} in "
                                             f"{_folders(ctx, [d for _, d in renders])}"))
        elif isinstance(stmt, Learn) and statuses and stmt.token in statuses:
            line, col = _end_of_first_line(unit, stmt)
            hints.append(Hint(line, col, statuses[stmt.token]))
    return hints
