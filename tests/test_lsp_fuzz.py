"""`perfusion lsp` under random typing: one real server process for the module, a valid
multi-statement document (and the file it `use`s) open, then random edits (keywords,
punctuation, option names, numbers, line ends of every kind, a BOM, NUL, characters past
U+FFFF, a lone surrogate, any text), each sent as a didChange; at the middle and at the end of
each sequence the diagnostics published for that version must be `perfusion check`'s on
the same text saved to disk: code, headline and place, the place mapped independently
(through offsets) into the client's text as a client counts it (lines end at \\n, \\r\\n or
\\r; characters in UTF-16 units; the BOM the compiler drops is the client's first character).

Hypothesis drives a synchronous test; the server and its client live on an event loop of
this module's own (a pytest-lsp client fixture is per test, not per example)."""

from __future__ import annotations

import asyncio
import itertools
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import LSP_MOON, png_bytes, write_tree
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lsprotocol import types as lsp
from pygls.protocol import default_converter
from pytest_lsp import LanguageClient
from test_lsp import _change, _open
from test_lsp_robustness import _client_position

from perfusion_dsl.compiler import compile_paths

BASE = ('use "moon.concept"\nlet places = [left, right]\n'
        'learn p/*.png as star* <star> {\n  steps: 3\n  lock: local\n}\n'
        '# a comment\ngenerate "a moon* at the {places}" x 2 {\n  steps: 3\n  seed: 7\n}\n'
        'generate "a star* and a moon*"\n')

FRAGMENTS = [
    "use", "let", "learn", "generate", "defaults", "model", "as", " x ", "x 2", "*", "moon*",
    "star*", "{", "}", "{places}", '"', ":", "<", ">", "[", "]", ",", "=", "#", "/", "p/*.png",
    '"moon.concept"', "0", "7", "42", "0.5", "-1", "steps", "seed", "strength", "lock", "mask",
    "flip", "out", "guidance", "local", "global", " ", "  ", "\t", "\n", "\r\n", "\r", "\ufeff",
    "\x00", "é", "🌙", "\u2028", "\udc80",
]

Edit = tuple[str, int, int, str]  # (insert | delete | replace, where, how many, what)

# Edits lean to the start of the text (a BOM matters there only; line 1 is where it moves
# columns) and to the line ends that clients and the compiler count differently.
edits = st.lists(st.tuples(
    st.sampled_from(["insert", "delete", "replace"]),
    st.one_of(st.just(0), st.integers(0, 60), st.integers(0, 10_000)), st.integers(0, 12),
    st.one_of(st.sampled_from(FRAGMENTS), st.sampled_from(["\ufeff", "\r", "\r\n"]),
              st.text(max_size=4))),
    min_size=1, max_size=8)


def _apply(text: str, edit: Edit) -> str:
    kind, where, length, fragment = edit
    at = where % (len(text) + 1)
    if kind == "insert":
        return text[:at] + fragment + text[at:]
    if kind == "delete":
        return text[:at] + text[at + length:]
    return text[:at] + fragment + text[at + length:]


@dataclass
class _Session:
    loop: asyncio.AbstractEventLoop
    client: LanguageClient
    project: Path
    copies: Path
    published: dict[str, tuple[int | None, Sequence[lsp.Diagnostic]]] = field(
        default_factory=dict)
    tile: str = ""
    version: int = 1
    saved: Iterator[int] = field(default_factory=itertools.count)


async def _start(session: _Session) -> None:
    client = session.client

    @client.feature(lsp.TEXT_DOCUMENT_PUBLISH_DIAGNOSTICS)
    def record(params: lsp.PublishDiagnosticsParams) -> None:
        session.published[params.uri] = (params.version, params.diagnostics)

    await client.start_io(sys.executable, "-m", "perfusion_dsl", "lsp")
    await client.initialize_session(lsp.InitializeParams(
        capabilities=lsp.ClientCapabilities(), root_uri=session.project.as_uri()))
    _open(client, session.project / "moon.concept", LSP_MOON)
    session.tile = _open(client, session.project / "tile.concept", BASE)


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Session]:
    base = tmp_path_factory.mktemp("lsp-fuzz")
    project = write_tree(base / "server" / "project", {"p/1.png": png_bytes(),
                                                       "moon.concept": LSP_MOON,
                                                       "tile.concept": BASE})
    loop = asyncio.new_event_loop()
    client = LanguageClient(converter_factory=default_converter)
    session = _Session(loop, client, project, base / "saved")
    try:
        loop.run_until_complete(_start(session))
        yield session
        loop.run_until_complete(client.shutdown_session())
    finally:
        loop.run_until_complete(client.stop())
        loop.close()


def _expected(session: _Session, text: str) -> list[tuple[str, lsp.Position, str]]:
    """`perfusion check tile.concept` with `text` saved in a copy of the project: (code,
    the start as the client counts it, headline) of each diagnostic in tile.concept."""
    copy = session.copies / str(next(session.saved)) / "project"
    shutil.copytree(session.project, copy)
    (copy / "tile.concept").write_bytes(text.encode("utf-8", "surrogatepass"))
    comp = compile_paths([copy / "tile.concept"], root=copy)
    mine = [d for d in comp.diagnostics if d.file == "tile.concept"]
    decoded = comp.context.sources().get("tile.concept", "")
    undecodable = any(d.code == "invalid-utf8" for d in mine)
    dropped = text.startswith("\ufeff") and not undecodable

    def start(code: str, line: int, col: int) -> lsp.Position:
        if code == "bom":  # the BOM itself
            return lsp.Position(line=0, character=0)
        rows = decoded.split("\n")
        offset = sum(len(row) + 1 for row in rows[:line - 1]) + col - 1
        at = int(dropped)
        if not undecodable:  # the compiler read CRLF as one character, LF
            for _ in range(offset):
                at += 2 if text.startswith("\r\n", at) else 1
        else:  # the text up to the bad byte is the client's own
            at = offset
        return _client_position(text, at)

    return [(d.code, start(d.code, d.span.line, d.span.col) if d.span else
             lsp.Position(line=0, character=0),
             d.message.split("\n")[0].replace(str(copy), str(session.project)))
            for d in mine]


async def _settled(session: _Session, text: str) -> None:
    """The diagnostics published for the latest version equal `perfusion check`'s."""
    async def published() -> Sequence[lsp.Diagnostic]:
        while True:
            version, diags = session.published.get(session.tile, (None, []))
            if version == session.version:
                return diags
            await asyncio.sleep(0.02)

    diags = await asyncio.wait_for(published(), 20)
    seen = [(str(d.code), d.range.start, d.message.split("\n")[0]) for d in diags]
    assert seen == _expected(session, text), repr(text)


async def _type(session: _Session, sequence: list[Edit]) -> None:
    text = BASE
    session.version += 1
    _change(session.client, session.tile, text, session.version)
    for i, edit in enumerate(sequence, 1):
        text = _apply(text, edit)
        session.version += 1
        _change(session.client, session.tile, text, session.version)
        if i == len(sequence) // 2:  # once on the way: a debounced, then a checked version
            await _settled(session, text)
    await _settled(session, text)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sequence=edits)
def test_random_typing_publishes_perfusion_checks_diagnostics(session: _Session,
                                                              sequence: list[Edit]) -> None:
    session.loop.run_until_complete(_type(session, sequence))
