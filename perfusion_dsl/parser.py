"""Parses one source text into a `Module`, recovering at statement boundaries."""

from __future__ import annotations

import itertools
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from lark import Lark, Token, Transformer, UnexpectedInput

from perfusion_dsl import nodes as n
from perfusion_dsl.diagnostics import Diagnostic, error
from perfusion_dsl.source import Source, span_at
from perfusion_dsl.syntax_errors import STATEMENT_STARTS, translate

MAX_SYNTAX_ERRORS = 20
# A line in column 0 that starts like a statement: the keyword and what must follow it
_STATEMENT_START = re.compile(
    "^(?:" + "|".join(word + follow for word, follow in STATEMENT_STARTS.items()) + ")",
    re.MULTILINE)
_STRING_OR_COMMENT = re.compile(r'"(?:[^"\\\n]|\\[^\n])*"?|#[^\n]*')
_BRACKETS = re.compile(r'"(?:[^"\\\n]|\\[^\n])*"?|#[^\n]*|[\[\]{}\n]')
_LEARNED = re.compile(r"\bas\s+([A-Za-z_][A-Za-z0-9_-]*\*)")
_LET = re.compile(r"^[ \t]*let\s+([A-Za-z_][A-Za-z0-9_-]*)", re.MULTILINE)
_REMEMBERING = threading.Lock()  # the language server checks in worker threads


def defined_names(text: str, start: int = 0, end: int | None = None) -> set[str]:
    """The concept tokens (`as me*`) and `let` names that `text[start:end]` seems to define,
    read without parsing: what a broken region marks as broken, so that the files using
    them get no cascade of unknown names."""
    end = len(text) if end is None else end
    return set(_LEARNED.findall(text, start, end)) | set(_LET.findall(text, start, end))


def grammar_text() -> str:
    return resources.files("perfusion_grammar").joinpath("concept.lark").read_text("utf-8")


def _cache_path() -> str | bool:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    folder = os.path.join(base, "perfusion")
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
    except OSError:
        return False
    return os.path.join(folder, "grammar.lark.cache")


@cache
def parser(strict: bool = False) -> Lark:
    """The production parser: LALR, contextual lexer, positions on.

    Lark caches the built tables in the user's own cache folder (not a shared
    temp folder), keyed by a hash of the grammar and Lark's version."""
    return _lark(strict, None)


def _lark(strict: bool, transformer: Any) -> Lark:
    # Both parsers pass the very same options (Lark leaves `transformer` out of its cache
    # key), so they share one cache file instead of overwriting each other's.
    cache_to = False if strict else _cache_path()
    return Lark(
        grammar_text(),
        parser="lalr",
        lexer="contextual",
        propagate_positions=True,
        strict=strict,
        cache=cache_to,
        cache_grammar=bool(cache_to),  # keeps `.grammar` on a cached parser (for `from_lark`)
        transformer=transformer,
    )


def span_of(tok: Token) -> n.Span:
    assert tok.start_pos is not None and tok.end_pos is not None
    assert tok.line is not None and tok.column is not None
    assert tok.end_line is not None and tok.end_column is not None
    return n.Span(tok.start_pos, tok.end_pos, tok.line, tok.column, tok.end_line, tok.end_column)


def _span(first: Any, last: Any) -> n.Span:
    a = first if isinstance(first, n.Span) else getattr(first, "span", None) or span_of(first)
    b = last if isinstance(last, n.Span) else getattr(last, "span", None) or span_of(last)
    return a.to(b)


class ToNodes(Transformer[Token, Any]):
    """Builds `nodes` from the parse tree, or while parsing (see `_node_parser`); raises on
    any rule it does not know."""

    def __default__(self, data: str, children: list[Any], meta: Any) -> Any:
        if data.startswith("_"):  # only while parsing: Lark's helper rules, see `_Inlined`
            return _Inlined(children)
        raise NotImplementedError(f"grammar rule {data!r} has no node builder")

    def STRING(self, tok: Token) -> n.Str:
        return n.Str(tok.value[1:-1], span_of(tok))

    def BARE(self, tok: Token) -> n.Bare:
        return n.Bare(tok.value, span_of(tok))

    GLOB = BARE

    def start(self, children: list[Any]) -> n.Module:
        return n.Module(tuple(children))

    def model_stmt(self, c: list[Any]) -> n.Model:
        return n.Model(c[1], _span(c[0], c[1]))

    def use_stmt(self, c: list[Any]) -> n.Use:
        return n.Use(c[1], _span(c[0], c[1]))

    def let_stmt(self, c: list[Any]) -> n.Let:
        return n.Let(str(c[1]), c[3], span_of(c[1]), _span(c[0], c[3]))

    def defaults_stmt(self, c: list[Any]) -> n.Defaults:
        return n.Defaults(c[1], _span(c[0], c[1]))

    def learn_stmt(self, c: list[Any]) -> n.Learn:
        rest = c[7:]
        adjectives = next((x for x in rest if isinstance(x, n.ListV)), None)
        block = next((x for x in rest if isinstance(x, n.Block)), None)
        return n.Learn(c[1], str(c[3]), c[5], adjectives, block, span_of(c[3]),
                       _span(c[0], c[-1]))

    def generate_stmt(self, c: list[Any]) -> n.Generate:
        count = next((x for x in c[2:] if isinstance(x, n.Bare)), None)
        block = next((x for x in c[2:] if isinstance(x, n.Block)), None)
        return n.Generate(c[1], count, block, _span(c[0], c[-1]))

    def adjectives(self, c: list[Any]) -> n.ListV:
        return c[2]  # type: ignore[no-any-return]

    def count(self, c: list[Any]) -> n.Bare:
        return c[1]  # type: ignore[no-any-return]

    def supers(self, c: list[Any]) -> tuple[n.Super, ...]:
        return tuple(x for x in c if isinstance(x, n.Super))

    def super(self, c: list[Any]) -> n.Super:
        words = c[0] if isinstance(c[0], n.Str) else tuple(c)
        return n.Super(words, _span(c[0], c[-1]))

    def block(self, c: list[Any]) -> n.Block:
        return n.Block(tuple(x for x in c if isinstance(x, n.Option)), _span(c[0], c[-1]))

    def option(self, c: list[Any]) -> n.Option:
        return n.Option(str(c[0]), c[2], span_of(c[0]), _span(c[0], c[2]))

    def list(self, c: list[Any]) -> n.ListV:
        items = tuple(x for x in c if isinstance(x, n.Str | n.Bare))
        return n.ListV(items, _span(c[0], c[-1]))


_TO_NODES = ToNodes()


class _Inlined:
    """The children of one of Lark's helper rules (`_item`, `__list_star_4`, ...), which
    Lark splices into the parent rule; `.children` is all it reads. Not a `Tree`, so no
    positions are computed for it: every node takes its span from its tokens."""

    __slots__ = ("children",)

    def __init__(self, children: list[Any]) -> None:
        self.children = children


@cache
def _node_parser() -> Lark:
    """The production parser with `ToNodes` as Lark's internal transformer: each node is
    built as its rule is reduced (tokens as they are shifted), so no parse tree is built
    and walked again; `parse` takes about half the time."""
    return _lark(False, _TO_NODES)


@dataclass(frozen=True, slots=True)
class Parsed:
    module: n.Module
    diagnostics: tuple[Diagnostic, ...]
    broken_names: frozenset[str]  # tokens and lets defined in statements that failed to parse


def comments(text: str) -> tuple[n.Comment, ...]:
    """Every `#` comment outside strings, with its span."""
    found = []
    line, seen = 1, 0  # line number at offset `seen`, counted incrementally (not per comment)
    for m in _STRING_OR_COMMENT.finditer(text):
        if m.group().startswith("#"):
            start = m.start()
            line += text.count("\n", seen, start)
            seen = start
            col = start - (text.rfind("\n", 0, start) + 1) + 1
            span = n.Span(start, m.end(), line, col, line, col + len(m.group()))
            found.append(n.Comment(m.group(), span))
    return tuple(found)


def _chunk_around(text: str, offset: int) -> tuple[int, int]:
    """The statement-shaped region [start, end) of `text` holding `offset`."""
    starts = _statement_starts(text)
    start = max((s for s in starts if s <= offset), default=0)
    end = min((s for s in starts if s > offset), default=len(text))
    return start, end


def _statement_starts(text: str) -> list[int]:
    """Line offsets that may begin a statement: bracket depth 0, or a keyword in column 0."""
    depth_at: dict[int, int] = {}
    depth = 0
    for m in _BRACKETS.finditer(text):
        tok = m.group()
        if tok == "\n":
            depth_at[m.end()] = depth
        elif tok in ("[", "{"):
            depth += 1
        elif tok in ("]", "}"):
            depth = max(0, depth - 1)
    starts = [0] + [at for at, d in depth_at.items() if d == 0]
    # A keyword in column 0 starts a statement even inside an unclosed bracket.
    starts += [m.start() for m in _STATEMENT_START.finditer(text)]
    return sorted(set(starts))


def _unclosed(text: str) -> list[tuple[int, int, int]]:
    """(offset of the opening bracket, start, end) of each statement-shaped region, split at
    statement keywords in column 0, that ends with a `[` or `{` still open."""
    bounds = sorted({0, *(m.start() for m in _STATEMENT_START.finditer(text)), len(text)})
    found = []
    for start, end in itertools.pairwise(bounds):
        opened: list[int] = []
        for m in _BRACKETS.finditer(text, start, end):
            tok = m.group()
            if tok == "[" or tok == "{":
                opened.append(m.start())
            elif (tok == "]" or tok == "}") and opened:
                opened.pop()
        if opened:
            found.append((opened[0], start, end))
    return found


def _close_brackets(source: Source, text: str, diags: list[Diagnostic],
                    broken: set[str], error_at: int) -> str:
    """Reports each bracket still open when a later statement (or the end of the file)
    begins at its opening, and blanks that statement: one error where the mistake is, not
    one per following statement. A parse error inside the open region is left alone."""
    for opener, start, end in _unclosed(text):
        if error_at < end and text[error_at:end].strip():
            continue
        char = text[opener]
        closer = "]" if char == "[" else "}"
        what = "list" if char == "[" else "block"
        diags.append(error("syntax", f"this `{char}` is never closed", source.file,
                           span_at(text, opener, 1),
                           help=f"close the {what} with `{closer}`"))
        broken.update(defined_names(text, start, end))
        text = _blank(text, start, end)
    return text


def _blank(text: str, start: int, end: int) -> str:
    middle = re.sub(r"[^\n]", " ", text[start:end])
    return text[:start] + middle + text[end:]


# Statements parsed on their own, by their text, at line 1 of offset 0 (`by_statement`)
_STATEMENTS: OrderedDict[str, tuple[n.Statement, ...]] = OrderedDict()
MAX_REMEMBERED_STATEMENTS = 4096


def _statement_bounds(text: str) -> list[int]:
    """Where statements may be parsed apart: the start of each line outside brackets,
    strings and comments that begins with neither a blank nor a comment (blank and comment
    lines stay with the statement before)."""
    bounds = [0]
    depth = 0
    for m in _BRACKETS.finditer(text):
        tok = m.group()
        if tok == "\n":
            at = m.end()
            if depth == 0 and at < len(text) and text[at] not in " \t\f\r\n#":
                bounds.append(at)
        elif tok == "[" or tok == "{":
            depth += 1
        elif tok == "]" or tok == "}":
            depth = max(0, depth - 1)
    bounds.append(len(text))
    return bounds


def _by_statement(text: str) -> tuple[n.Statement, ...] | None:
    """The statements of `text`, each region between `_statement_bounds` parsed on its own
    (or taken from `_STATEMENTS`) and moved into place; None when any region fails to
    parse, so errors always come from the whole-file parse.

    Equal to parsing the whole text: a bound follows a newline outside brackets, which the
    grammar allows only between statements, and no token but a newline crosses a line end;
    a bound in the wrong place (a `[` in a glob) makes a region that fails, never a
    different tree."""
    statements: list[n.Statement] = []
    line = 1
    for start, end in itertools.pairwise(_statement_bounds(text)):
        chunk = text[start:end]
        found = _STATEMENTS.get(chunk)
        if found is None:
            try:
                built: Any = _node_parser().parse(chunk)
            except UnexpectedInput:
                return None
            found = _STATEMENTS[chunk] = built.statements
            if len(_STATEMENTS) > MAX_REMEMBERED_STATEMENTS:
                _STATEMENTS.popitem(last=False)
        else:
            _STATEMENTS.move_to_end(chunk)
        statements += n.moved(found, start, line - 1)
        line += chunk.count("\n")
    return tuple(statements)


def parse(source: Source, *, by_statement: bool = False) -> Parsed:
    """Parse, reporting up to MAX_SYNTAX_ERRORS errors, one per broken statement.

    `by_statement`: for a text parsed again and again as it is edited (an editor's buffer):
    each statement is parsed on its own and remembered by its text, so an edit re-parses
    only the statements it touched (docs/editors.md). The result is the same: a text with
    an error is parsed whole to find it, and again by statement once it is blanked."""
    text = source.text if source.text.endswith("\n") else source.text + "\n"
    diags: list[Diagnostic] = []
    broken: set[str] = set()
    brackets_checked = False
    for _ in range(MAX_SYNTAX_ERRORS):
        try:
            statements = _remembered(text) if by_statement else None
            if statements is None:
                built: Any = _node_parser().parse(text)  # a Module (ToNodes builds it)
                statements = built.statements
        except UnexpectedInput as exc:
            if not brackets_checked:  # only a file that fails pays for this scan
                brackets_checked = True
                closed = _close_brackets(source, text, diags, broken,
                                         _error_offset(exc, text))
                if closed != text:
                    text = closed
                    continue
            diags.append(translate(exc, source))
            start, end = _chunk_around(text, _error_offset(exc, text))
            bad = text[start:end]
            broken.update(defined_names(bad))
            blanked = _blank(text, start, end)
            if blanked == text:
                break
            text = blanked
            continue
        module = n.Module(statements, comments(source.text))
        return Parsed(module, tuple(diags), frozenset(broken))
    return Parsed(n.Module((), comments(source.text)), tuple(diags), frozenset(broken))


def _remembered(text: str) -> tuple[n.Statement, ...] | None:
    with _REMEMBERING:
        return _by_statement(text)


def _error_offset(exc: UnexpectedInput, text: str) -> int:
    pos = getattr(exc, "pos_in_stream", None)
    token = getattr(exc, "token", None)
    if isinstance(token, Token) and token.start_pos is not None and token.type != "$END":
        pos = token.start_pos
    if pos is None or pos < 0 or pos >= len(text):
        return len(text.rstrip("\n"))
    return int(pos)


__all__ = ["Parsed", "comments", "parse", "parser"]
