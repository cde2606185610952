"""Helpers the compiler tests import (a module of its own: pytest loads every conftest.py as
`conftest`, so importing from one is ambiguous once tests/runtime/ has its own)."""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

# What Lark or Python would leak into a message if a translation were missing (D3, D4, D7).
INTERNALS = ("$END", "RBRACE", "LBRACE", "_NL", "Token(", "line -1", "Traceback",
             "UnexpectedToken", "UnexpectedCharacters", "lark.")


def png_bytes(color: tuple[int, int, int] = (200, 30, 30), size: int = 8) -> bytes:
    """A tiny valid PNG (under 100 bytes)."""
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def write_tree(root: Path, files: Mapping[str, str | bytes]) -> Path:
    """Write `files` ({relative path: text or bytes}) under `root`; returns `root`."""
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_bytes(content.encode("utf-8"))
    return root


def assert_clean(text: str) -> None:
    """No internal name, parser terminal or traceback reaches the user."""
    leaked = [word for word in INTERNALS if word in text]
    assert not leaked, f"output leaks {leaked}:\n{text}"


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


Run = Callable[..., Result]


# The project every `perfusion lsp` end-to-end test starts from (the `client` fixture):
# tile.concept uses moon.concept's moon* and has its own `places`.
LSP_MOON = 'let places = [left, right]\nlearn p/*.png as moon* <crescent>\n'
LSP_TILE = ('use "moon.concept"\nlet places = [left, right]\n'
            'generate "a moon* at the {places}" x 2 {\n  steps: 3\n}\n')


def with_spans(node: object) -> object:
    """`node` as nested tuples that include every span (node equality leaves spans out), for
    checking that two parses agree on positions too."""
    if isinstance(node, tuple):
        return tuple(with_spans(x) for x in node)
    if hasattr(node, "__dataclass_fields__"):
        return (type(node).__name__,
                *(with_spans(getattr(node, name)) for name in node.__dataclass_fields__))
    return node
