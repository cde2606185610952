"""The frozen syntax tree of a `.concept` file; spans never take part in equality."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "t": "\t", "{": "{", "}": "}", "|": "|"}


@dataclass(frozen=True, slots=True)
class Span:
    """A half-open character range [start, end) with 1-based line/column of both ends."""

    start: int
    end: int
    line: int
    col: int
    end_line: int
    end_col: int

    def to(self, other: Span) -> Span:
        """The span from the start of self to the end of other."""
        return Span(self.start, other.end, self.line, self.col, other.end_line, other.end_col)

    def sub(self, offset: int, length: int) -> Span:
        """A sub-span of a single-line span, `offset` characters in."""
        start = self.start + offset
        col = self.col + offset
        return Span(start, start + length, self.line, col, self.line, col + length)


NOWHERE = Span(0, 0, 1, 1, 1, 1)


@dataclass(frozen=True, slots=True)
class Str:
    """A double-quoted string; `raw` is the text between the quotes, escapes undecoded."""

    raw: str
    span: Span = field(default=NOWHERE, compare=False, repr=False)

    @property
    def value(self) -> str:
        """The decoded text (unknown escapes are reported by a pass and kept literally)."""
        if "\\" not in self.raw:
            return self.raw
        out: list[str] = []
        chars = iter(self.raw)
        for ch in chars:
            if ch == "\\":
                nxt = next(chars, "")
                out.append(ESCAPES.get(nxt, nxt))
            else:
                out.append(ch)
        return "".join(out)


@dataclass(frozen=True, slots=True)
class Bare:
    """An unquoted word: identifier, number, boolean, size or path, told apart by passes."""

    text: str
    span: Span = field(default=NOWHERE, compare=False, repr=False)

    @property
    def value(self) -> str:
        return self.text


Item = Str | Bare


@dataclass(frozen=True, slots=True)
class ListV:
    """A bracketed list of words and strings."""

    items: tuple[Item, ...]
    span: Span = field(default=NOWHERE, compare=False, repr=False)


Value = Str | Bare | ListV


@dataclass(frozen=True, slots=True)
class Option:
    key: str
    value: Value
    key_span: Span = field(default=NOWHERE, compare=False, repr=False)
    span: Span = field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Block:
    options: tuple[Option, ...]
    span: Span = field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Super:
    """One supercategory: several bare words (`teddy bear`) or one quoted phrase."""

    words: tuple[Bare, ...] | Str
    span: Span = field(default=NOWHERE, compare=False, repr=False)

    @property
    def text(self) -> str:
        if isinstance(self.words, Str):
            return self.words.value
        return " ".join(w.text for w in self.words)


@dataclass(frozen=True, slots=True)
class Model:
    source: Str
    span: Span = field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Use:
    path: Str
    span: Span = field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Let:
    name: str
    items: ListV
    name_span: Span = field(default=NOWHERE, compare=False, repr=False)
    span: Span = field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Defaults:
    block: Block
    span: Span = field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Learn:
    pattern: Str | Bare
    token: str
    supers: tuple[Super, ...]
    adjectives: ListV | None
    block: Block | None
    token_span: Span = field(default=NOWHERE, compare=False, repr=False)
    span: Span = field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Generate:
    template: Str
    count: Bare | None
    block: Block | None
    span: Span = field(default=NOWHERE, compare=False, repr=False)


Statement = Model | Use | Let | Defaults | Learn | Generate


@dataclass(frozen=True, slots=True)
class Comment:
    """A `#` comment, kept beside the tree for `perfusion fmt`."""

    text: str
    span: Span = field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Module:
    statements: tuple[Statement, ...]
    comments: tuple[Comment, ...] = field(default=(), compare=False, repr=False)


def walk(node: object) -> Iterator[object]:
    """Every node under `node` (itself included), depth first, in source order."""
    yield node
    if isinstance(node, tuple):
        for item in node:
            yield from walk(item)
    elif hasattr(node, "__dataclass_fields__") and not isinstance(node, Span | Comment):
        for name in node.__dataclass_fields__:
            if name != "span" and not name.endswith("_span"):
                yield from walk(getattr(node, name))


_Node = TypeVar("_Node")
_FIELDS: dict[type, tuple[str, ...]] = {}


def moved(node: _Node, offset: int, lines: int) -> _Node:
    """A copy of `node` (a node, a tuple of them, or a leaf) whose spans start `offset`
    characters and `lines` lines later; columns are kept, so it is for text moved by whole
    lines (a statement parsed on its own, then placed in its file)."""
    if isinstance(node, Span):
        return Span(node.start + offset, node.end + offset, node.line + lines,  # type: ignore[return-value]
                    node.col, node.end_line + lines, node.end_col)
    if isinstance(node, tuple):
        return tuple(moved(x, offset, lines) for x in node)  # type: ignore[return-value]
    if node is None or isinstance(node, str):
        return node
    cls: Any = type(node)
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = tuple(f.name for f in fields(cls))
    return cls(*(moved(getattr(node, name), offset, lines) for name in names))  # type: ignore[no-any-return]
