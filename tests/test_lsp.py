"""`perfusion lsp` end to end: a real server process (`python -m perfusion_dsl lsp`) and a
real client (pytest-lsp). Diagnostics equal `perfusion check` on the same text, unsaved
buffers count, a fix clears them, formatting is `perfusion fmt`'s, symbols list the
statements, and bad input never stops the server."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from helpers import LSP_MOON as MOON
from helpers import LSP_TILE as TILE
from lsprotocol import types as lsp
from pytest_lsp import LanguageClient

from perfusion_dsl.compiler import compile_paths
from perfusion_dsl.formatter import format_bytes


def _open(client: LanguageClient, path: Path, text: str, version: int = 1) -> str:
    uri = path.as_uri()
    client.text_document_did_open(lsp.DidOpenTextDocumentParams(
        lsp.TextDocumentItem(uri=uri, language_id="perfusion", version=version, text=text)))
    return uri


def _change(client: LanguageClient, uri: str, text: str, version: int) -> None:
    client.text_document_did_change(lsp.DidChangeTextDocumentParams(
        text_document=lsp.VersionedTextDocumentIdentifier(uri=uri, version=version),
        content_changes=[lsp.TextDocumentContentChangeWholeDocument(text=text)]))


async def _diagnostics(client: LanguageClient, uri: str,
                       ready: Callable[[Sequence[lsp.Diagnostic]], bool],
                       timeout: float = 20.0) -> Sequence[lsp.Diagnostic]:
    """The uri's published diagnostics once `ready` accepts them."""
    async def poll() -> Sequence[lsp.Diagnostic]:
        while True:
            found = client.diagnostics.get(uri)
            if found is not None and ready(found):
                return found
            await asyncio.sleep(0.05)

    return await asyncio.wait_for(poll(), timeout)


def _check_on_disk(folder: Path, files: dict[str, str], name: str) -> list[tuple[str, int,
                                                                                 int, str]]:
    """(code, line, column, message) of `perfusion check` with `files` saved in a copy."""
    copy = folder.parent / f"{folder.name}-saved"
    shutil.copytree(folder, copy)
    for rel, text in files.items():
        (copy / rel).write_text(text, encoding="utf-8")
    comp = compile_paths([copy / name], root=copy)
    return [(d.code, d.span.line if d.span else 0, d.span.col if d.span else 0,
             d.message) for d in comp.diagnostics if d.file == name]


def _seen(diags: Sequence[lsp.Diagnostic]) -> list[tuple[str, int, int, str]]:
    return [(str(d.code), d.range.start.line + 1, d.range.start.character + 1,
             d.message.split("\n")[0]) for d in diags]


@pytest.mark.asyncio
async def test_diagnostics_equal_check_and_a_fix_clears_them(client: LanguageClient,
                                                             tmp_path: Path) -> None:
    project = tmp_path / "project"
    broken = TILE.replace("steps: 3", "stepz: 3").replace("{places}", "{place}")
    uri = _open(client, project / "tile.concept", broken)
    found = await _diagnostics(client, uri, lambda d: len(d) > 0)
    assert _seen(found) == _check_on_disk(project, {"tile.concept": broken}, "tile.concept")
    assert {str(d.code) for d in found} >= {"unknown-option", "unknown-let"}, _seen(found)
    assert all(d.source == "perfusion" for d in found)
    _change(client, uri, TILE, 2)
    assert list(await _diagnostics(client, uri, lambda d: len(d) == 0)) == []


@pytest.mark.asyncio
async def test_an_unsaved_edit_of_a_used_file_counts(client: LanguageClient,
                                                     tmp_path: Path) -> None:
    project = tmp_path / "project"
    tile = _open(client, project / "tile.concept", TILE)
    assert list(await _diagnostics(client, tile, lambda d: True)) == []
    moon = _open(client, project / "moon.concept", MOON)
    _change(client, moon, MOON.replace("moon*", "sun*"), 2)  # not saved
    found = await _diagnostics(client, tile, lambda d: len(d) > 0)
    assert any(d.code == "unknown-concept" and "moon*" in d.message for d in found)
    assert (project / "moon.concept").read_text("utf-8") == MOON


@pytest.mark.asyncio
async def test_formatting_is_perfusion_fmt(client: LanguageClient, tmp_path: Path) -> None:
    messy = 'generate   "a moon*"   x 2 {steps: 3}\nuse "moon.concept"\n'
    uri = _open(client, tmp_path / "project" / "tile.concept", messy)
    edits = await client.text_document_formatting_async(lsp.DocumentFormattingParams(
        text_document=lsp.TextDocumentIdentifier(uri=uri),
        options=lsp.FormattingOptions(tab_size=2, insert_spaces=True)))
    expected, _ = format_bytes(messy.encode(), "tile.concept")
    assert edits is not None and len(edits) == 1 and edits[0].new_text == expected
    assert edits[0].range.start == lsp.Position(0, 0)


@pytest.mark.asyncio
async def test_document_symbols_outline_the_statements(client: LanguageClient,
                                                       tmp_path: Path) -> None:
    uri = _open(client, tmp_path / "project" / "moon.concept", MOON + 'generate "a moon*"\n')
    symbols = await client.text_document_document_symbol_async(
        lsp.DocumentSymbolParams(text_document=lsp.TextDocumentIdentifier(uri=uri)))
    assert symbols is not None
    assert [(s.name, s.detail, s.range.start.line) for s in symbols
            if isinstance(s, lsp.DocumentSymbol)] == [
        ("places", "let", 0), ("moon*", "learn <crescent>", 1), ('"a moon*"', "generate", 2)]


@pytest.mark.asyncio
async def test_bad_input_never_stops_the_server(client: LanguageClient,
                                                tmp_path: Path) -> None:
    """Binary content, a 10 MB buffer, a file deleted while open: each gets a diagnostic,
    and the server still answers."""
    project = tmp_path / "project"
    binary = _open(client, project / "bin.concept", "\x00\x01\ufffd" * 100)
    huge = _open(client, project / "huge.concept", 'generate "a photo"\n' * 550_000)
    gone = project / "gone.concept"
    gone.write_text('generate "x" { stepz: 1 }\n', encoding="utf-8")
    deleted = _open(client, gone, 'generate "x" { stepz: 1 }\n')
    gone.unlink()
    for uri in (binary, huge, deleted):
        assert await _diagnostics(client, uri, lambda d: len(d) > 0, timeout=60)
    assert any(d.code == "spec-too-large" for d in client.diagnostics[huge])
    symbols = await client.text_document_document_symbol_async(
        lsp.DocumentSymbolParams(text_document=lsp.TextDocumentIdentifier(uri=_open(
            client, project / "ok.concept", 'let a = [b]\n'))))
    assert symbols and symbols[0].name == "a"


@pytest.mark.asyncio
async def test_completion_inside_an_options_block(client: LanguageClient,
                                                  tmp_path: Path) -> None:
    """The learn block's option names, then a fixed option's values, at the cursor."""
    text = MOON + "learn p/*.png as sun* <star> {\n  lo\n}\n"
    uri = _open(client, tmp_path / "project" / "sun.concept", text)

    async def labels(line: int, character: int) -> list[str]:
        result = await client.text_document_completion_async(lsp.CompletionParams(
            text_document=lsp.TextDocumentIdentifier(uri=uri),
            position=lsp.Position(line=line, character=character)))
        items = result.items if isinstance(result, lsp.CompletionList) else result or []
        return [item.label for item in items]

    offered = await labels(3, 4)
    assert "lock" in offered and "lr" in offered and "guidance" not in offered
    _change(client, uri, text.replace("  lo\n", "  lock: \n"), 2)
    assert await labels(3, 8) == ["local", "global"]
