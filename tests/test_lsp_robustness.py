"""`perfusion lsp` under bad input, end to end (a real server process, a real client): binary
content, a 10 MB buffer, files deleted from disk while open or used, a `use` cycle of unsaved
buffers and a glob over a huge folder. Each gets its diagnostic, and the server keeps
answering: other documents still get their formatting, symbols and diagnostics, promptly.
And a BOM, a CRLF or a lone CR in the client's text does not move a diagnostic's range."""

from __future__ import annotations

import asyncio
import random
import re
import shutil
import time
from pathlib import Path

import pytest
from helpers import LSP_TILE as TILE
from helpers import png_bytes, write_tree
from lsprotocol import types as lsp
from pytest_lsp import LanguageClient
from test_lsp import _change, _diagnostics, _open, _seen

from perfusion_dsl.compiler import compile_paths

OK = 'let places = [left, right]\n'


def _utf16(text: str) -> int:
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def _client_position(text: str, offset: int) -> lsp.Position:
    """Where `offset` of `text` is as an LSP client counts: lines end at \\r\\n, \\r or \\n,
    characters in UTF-16 code units."""
    breaks = list(re.finditer(r"\r\n|\r|\n", text[:offset]))
    start = breaks[-1].end() if breaks else 0
    return lsp.Position(line=len(breaks), character=_utf16(text[start:offset]))


def _covered(text: str, range_: lsp.Range) -> str:
    """The client's text under `range_`."""
    def offset(position: lsp.Position) -> int:
        lines = re.split(r"(?<=\r\n)|(?<=\r)(?!\n)|(?<=\n)", text)
        line = lines[position.line]
        units, i = 0, 0
        while units < position.character:
            units += _utf16(line[i])
            i += 1
        return sum(len(x) for x in lines[: position.line]) + i

    return text[offset(range_.start):offset(range_.end)]


def _saved(project: Path, files: dict[str, str], name: str, by: str | None = None
           ) -> list[tuple[str, int, int, str]]:
    """(code, line, column, message) of `perfusion check BY` (default: NAME) in the file
    NAME, with `files` saved in a fresh copy of the project."""
    copy = project.parent / f"saved-{len(list(project.parent.glob('saved-*')))}"
    shutil.copytree(project, copy)
    for rel, text in files.items():
        (copy / rel).write_bytes(text.encode("utf-8", "surrogatepass"))
    comp = compile_paths([copy / (by or name)], root=copy)
    return [(d.code, d.span.line if d.span else 0, d.span.col if d.span else 0,
             d.message) for d in comp.diagnostics if d.file == name]


async def _still_answers(client: LanguageClient, project: Path, name: str) -> None:
    """The server answers a request on another document, and a fresh valid document gets
    its (empty) diagnostics."""
    other = _open(client, project / "tile.concept", TILE.replace("x 2", "x   2"))
    edits = await client.text_document_formatting_async(lsp.DocumentFormattingParams(
        text_document=lsp.TextDocumentIdentifier(uri=other),
        options=lsp.FormattingOptions(tab_size=2, insert_spaces=True)))
    assert edits and edits[0].new_text == TILE
    fresh = _open(client, project / f"{name}.concept", OK)
    symbols = await client.text_document_document_symbol_async(
        lsp.DocumentSymbolParams(text_document=lsp.TextDocumentIdentifier(uri=fresh)))
    assert symbols and symbols[0].name == "places"
    assert list(await _diagnostics(client, fresh, lambda d: True)) == []


@pytest.mark.asyncio
async def test_nul_bytes_and_random_bytes_get_a_diagnostic_at_the_bad_character(
        client: LanguageClient, tmp_path: Path) -> None:
    """NUL bytes, random bytes read as Latin-1, and random bytes that are not UTF-8 (they
    reach the server as lone surrogates, as a client sends undecodable bytes): each gets its
    diagnostic, at the bad character of the client's text; the server keeps answering."""
    project = tmp_path / "project"
    junk = random.Random(7).randbytes(20_000)
    nul_text = OK + "let b\x00 = [c]\x01\n" + "\x00" * 50
    nul = _open(client, project / "nul.concept", nul_text)
    latin = _open(client, project / "latin.concept", junk.decode("latin-1"))
    raw_text = "let a = [é]\n" + junk.decode("utf-8", "surrogateescape")
    raw = _open(client, project / "raw.concept", raw_text)
    for uri in (nul, latin, raw):
        assert await _diagnostics(client, uri, lambda d: len(d) > 0)
    found = client.diagnostics[nul]
    assert [d.code for d in found if d.code == "nul-byte"] == ["nul-byte"]
    nul_diag = next(d for d in found if d.code == "nul-byte")
    assert nul_diag.range.start == _client_position(nul_text, nul_text.index("\x00"))
    assert _covered(nul_text, nul_diag.range) == "\x00"
    assert any(d.severity == lsp.DiagnosticSeverity.Error for d in client.diagnostics[latin])
    (bad,) = client.diagnostics[raw]
    first = next(i for i, c in enumerate(raw_text) if "\ud800" <= c <= "\udfff")
    assert bad.code == "invalid-utf8"
    assert bad.range.start == _client_position(raw_text, first)
    for uri in (nul, latin, raw):  # formatting and symbols of the bad documents still answer
        await client.text_document_formatting_async(lsp.DocumentFormattingParams(
            text_document=lsp.TextDocumentIdentifier(uri=uri),
            options=lsp.FormattingOptions(tab_size=2, insert_spaces=True)))
        await client.text_document_document_symbol_async(
            lsp.DocumentSymbolParams(text_document=lsp.TextDocumentIdentifier(uri=uri)))
    await _still_answers(client, project, "fresh")


@pytest.mark.asyncio
async def test_a_10_mb_buffer_gets_spec_too_large_and_the_server_keeps_answering(
        client: LanguageClient, tmp_path: Path) -> None:
    """Opened, then edited (still 10 MB): `spec-too-large` each time; its own formatting and
    symbols answer (nothing to offer); other documents are served."""
    project = tmp_path / "project"
    huge_text = 'generate "a photo"\n' * 550_000
    assert len(huge_text) > 10_000_000
    huge = _open(client, project / "huge.concept", huge_text)
    found = await _diagnostics(client, huge, lambda d: len(d) > 0, timeout=60)
    assert [d.code for d in found] == ["spec-too-large"]
    _change(client, huge, huge_text + "generate \"x\" { stepz: 1 }\n", 2)
    await _still_answers(client, project, "fresh")
    assert [d.code for d in client.diagnostics[huge]] == ["spec-too-large"]
    assert await client.text_document_formatting_async(lsp.DocumentFormattingParams(
        text_document=lsp.TextDocumentIdentifier(uri=huge),
        options=lsp.FormattingOptions(tab_size=2, insert_spaces=True))) is None
    assert await client.text_document_document_symbol_async(
        lsp.DocumentSymbolParams(text_document=lsp.TextDocumentIdentifier(uri=huge))) == []


@pytest.mark.asyncio
async def test_files_deleted_from_disk_while_open_or_used(client: LanguageClient,
                                                          tmp_path: Path) -> None:
    """A document deleted from disk while open is still checked from its buffer (its edits
    too); a document that `use`s it sees its buffer until it is closed, then `use-missing`;
    one that `use`s a file deleted from disk (never opened) gets `use-missing` too."""
    project = tmp_path / "project"
    write_tree(project, {"gone.concept": "learn p/*.png as gone* <thing>\n",
                         "dep.concept": "learn p/*.png as dep* <thing>\n"})
    gone = _open(client, project / "gone.concept", "learn p/*.png as gone* <thing>\n")
    user_text = 'use "gone.concept"\nuse "dep.concept"\ngenerate "a gone* and a dep*"\n'
    user = _open(client, project / "user.concept", user_text)
    assert list(await _diagnostics(client, user, lambda d: True)) == []
    (project / "gone.concept").unlink()
    (project / "dep.concept").unlink()
    gone_text = "learn p/*.png as gone* <thing> {\n  stepz: 1\n}\n"
    _change(client, gone, gone_text, 2)
    found = await _diagnostics(client, gone, lambda d: len(d) > 0)
    assert [(d.code, d.range.start.line) for d in found] == [("unknown-option", 1)]
    found = await _diagnostics(client, user, lambda d: len(d) > 0)
    assert _seen(found) == _saved(project, {"gone.concept": gone_text, "user.concept": user_text},
                                  "user.concept")
    assert [d.code for d in found] == ["use-missing", "unknown-concept"]  # dep*, not gone*
    client.text_document_did_close(lsp.DidCloseTextDocumentParams(
        text_document=lsp.TextDocumentIdentifier(uri=gone)))
    found = await _diagnostics(client, user, lambda d: len(d) == 4)
    assert _seen(found) == _saved(project, {"user.concept": user_text}, "user.concept")
    assert [d.code for d in found].count("use-missing") == 2
    assert list(client.diagnostics[gone]) == []
    await _still_answers(client, project, "fresh")


@pytest.mark.asyncio
async def test_a_use_cycle_of_two_open_unsaved_documents(client: LanguageClient,
                                                         tmp_path: Path) -> None:
    """a.concept uses b.concept uses a.concept, both open and unsaved (neither on disk).
    Each check ends and reports the cycle once, as `perfusion check` does (at b's `use`).
    Each file shows its own check's diagnostics, though the other's check, which sees less
    of it (a used file's renders are not expanded: no `duplicate-render`), finishes in any
    order, edit after edit; breaking the cycle in one buffer clears it."""
    project = tmp_path / "project"
    a_text = 'use "b.concept"\nlearn p/*.png as a* <thing>\ngenerate "an a* and a b*"\n'
    b_text = ('use "a.concept"\nlearn p/*.png as b* <thing> { stepz: 1 }\n'
              'generate "a b* and an a*"\ngenerate "a b* and an a*"\n')
    a = _open(client, project / "a.concept", a_text)
    b = _open(client, project / "b.concept", b_text)
    a_text += "# unsaved\n"
    _change(client, a, a_text, 2)
    # a's first check, before b was open, found b missing: wait until a's check with b open
    # has replaced it, or a later wait for "some diagnostics" would take that old publish
    assert list(await _diagnostics(client, a, lambda d: len(d) == 0)) == []
    files = {"a.concept": a_text, "b.concept": b_text}
    own_b = _saved(project, files, "b.concept")
    assert [c for c, *_ in own_b] == ["use-cycle", "unknown-option", "duplicate-render"]
    assert [c for c, *_ in _saved(project, files, "b.concept", by="a.concept")] == [
        "use-cycle", "unknown-option"]
    for round_ in range(3):  # edits of a: both files are checked again, in either order
        error = f"learn p/*.png as c{round_}* <thing> {{ stepz: 1 }}\n"
        _change(client, a, a_text + error, 3 + 2 * round_)
        found = await _diagnostics(client, a, lambda d: len(d) > 0)
        assert [d.code for d in found] == ["unknown-option"]
        _change(client, a, a_text, 4 + 2 * round_)
        assert list(await _diagnostics(client, a, lambda d: len(d) == 0)) == []
        await asyncio.sleep(0.3)  # both checks of a's fix are done
        assert _seen(client.diagnostics[b]) == own_b, round_
    b_text = b_text.replace('use "a.concept"\n', "")  # the cycle broken: a* is unknown in b
    _change(client, b, b_text, 2)
    files["b.concept"] = b_text
    own_b = _saved(project, files, "b.concept")
    found = await _diagnostics(client, b, lambda d: _seen(d) == own_b)
    assert [d.code for d in found] == ["unknown-option", "unknown-concept",
                                       "duplicate-render", "unknown-concept"]
    assert list(client.diagnostics[a]) == []
    await _still_answers(client, project, "fresh")


def _huge_folder(folder: Path, files: int = 20_000) -> None:
    """`files` real (tiny) PNGs in 200 nested folders, and a perfusion.toml that lets one
    learn read them all (the limits raised to their ceilings' side)."""
    png = png_bytes()
    per = files // 200
    for i in range(200):
        leaf = folder / "imgs" / f"g{i // 20}" / f"f{i}"
        leaf.mkdir(parents=True)
        for j in range(per):
            (leaf / f"{j}.png").write_bytes(png)
    (folder / "perfusion.toml").write_text(
        "[limits]\nmax_glob_matches = 100000\nmax_images_per_concept = 10000\n")


@pytest.mark.asyncio
async def test_a_glob_over_20000_files_never_blocks_other_documents(
        client: LanguageClient, tmp_path: Path) -> None:
    """A learn over 20,000 images in nested folders takes seconds to check. Meanwhile
    requests on another document are answered within 2 s (the first before the slow
    diagnostics), each edit of it gets its diagnostics within 2 s (the slow check is not
    started again beside itself on each edit), a fresh document gets its own, and the slow
    document's diagnostics come (`too-many-images`)."""
    project = tmp_path / "project"
    big = project / "big"
    _huge_folder(big)
    started = time.monotonic()
    slow = _open(client, big / "slow.concept", "learn imgs/**/*.png as big* <photo>\n")
    other = _open(client, project / "tile.concept", TILE)
    answers, diagnosed, pending = [], [], []
    for i in range(4):
        sent = time.monotonic()
        symbols = await client.text_document_document_symbol_async(
            lsp.DocumentSymbolParams(text_document=lsp.TextDocumentIdentifier(uri=other)))
        answers.append(time.monotonic() - sent)
        pending.append(slow not in client.diagnostics)
        assert symbols
        broken = i % 2 == 0
        _change(client, other, TILE.replace("steps: 3", "stepz: 3") if broken else TILE, i + 2)
        sent = time.monotonic()
        await _diagnostics(client, other, lambda d, broken=broken: (len(d) > 0) == broken)
        diagnosed.append(time.monotonic() - sent)
    fresh = _open(client, project / "fresh.concept", OK)
    sent = time.monotonic()
    assert list(await _diagnostics(client, fresh, lambda d: True)) == []
    diagnosed.append(time.monotonic() - sent)
    found = await _diagnostics(client, slow, lambda d: len(d) > 0, timeout=60)
    slow_took = time.monotonic() - started
    assert [d.code for d in found] == ["too-many-images"]
    print(f"slow check {slow_took:.1f} s; answers {answers}; diagnostics {diagnosed}; "
          f"slow still pending: {pending}")
    assert pending[0], "the slow check ended before the first request: it measures nothing"
    assert max(answers) < 2.0 and max(diagnosed) < 2.0, (answers, diagnosed)


def _bom_cases() -> list[tuple[str, str, str]]:
    """(name, client text, the text the error's range must cover)."""
    return [("bom", '\ufeffgenerate "x" { stepz: 1 }\n', "stepz"),
            ("bom-utf16", '\ufeffgenerate "🌙 x" { stepz: 1 }\n', "stepz"),
            ("crlf", 'generate "x"\r\ngenerate "y" { stepz: 1 }\r\n', "stepz"),
            ("lone-cr", '# an old Mac line end\r(still the comment)\n'
                        'generate "y" { stepz: 1 }\n', "stepz")]


@pytest.mark.asyncio
async def test_a_bom_crlf_or_lone_cr_does_not_move_the_range(client: LanguageClient,
                                                             tmp_path: Path) -> None:
    """The range of an error indexes the client's text: with its BOM (U+FEFF, the client's
    first character), CRLF line ends, a lone CR (a line break to the client, not to the
    compiler), and UTF-16 units for characters past U+FFFF. The `bom` warning covers the
    BOM itself. (`perfusion check` counts code points of the text without the BOM.) A
    file read from disk (used, not open) is ranged in its text as read, its BOM included."""
    project = tmp_path / "project"
    disk_text = '\ufefflearn p/*.png as disk* <thing> { stepz: 1 }\n'
    write_tree(project, {"disk.concept": disk_text})
    _open(client, project / "user.concept", 'use "disk.concept"\ngenerate "a disk*"\n')
    for name, text, covered in [*_bom_cases(), ("disk", disk_text, "stepz")]:
        uri = (project / "disk.concept").as_uri() if name == "disk" else _open(
            client, project / f"{name}.concept", text)
        found = await _diagnostics(client, uri, lambda d: len(d) > 0)
        error = next(d for d in found if d.code == "unknown-option")
        assert _covered(text, error.range) == covered, (name, error.range)
        if text.startswith("\ufeff"):
            warning = next(d for d in found if d.code == "bom")
            assert _covered(text, warning.range) == "\ufeff"
    await _still_answers(client, project, "fresh")




@pytest.mark.asyncio
async def test_paths_with_spaces_and_accents_get_diagnostics_at_the_clients_uris(
        client: LanguageClient, tmp_path: Path) -> None:
    """In a folder `my specs é` (a uri with %20 and %C3%A9), both documents get their
    diagnostics at the uris the client opened them by, under no other spelling; the used
    file's shows what both checks found in it, once each."""
    folder = tmp_path / "project" / "my specs é"
    moon_text = ('learn ../p/*.png as moon* <crescent> { stepz: 1 }\n'
                 'generate "a moon*"\ngenerate "a moon*"\n')
    write_tree(folder, {"moon.concept": moon_text})
    tile_text = 'use "moon.concept"\ngenerate "a moon* and {nope}"\n'
    moon = _open(client, folder / "moon.concept", moon_text)
    tile = _open(client, folder / "tile.concept", tile_text)
    assert "%20" in moon and "%C3%A9" in moon
    found = await _diagnostics(client, tile, lambda d: len(d) > 0)
    assert [d.code for d in found] == ["unknown-let"]
    found = await _diagnostics(client, moon, lambda d: len(d) == 2)
    assert [d.code for d in found] == ["unknown-option", "duplicate-render"]
    await asyncio.sleep(0.3)  # anything else published would be in by now
    assert set(client.diagnostics) == {moon, tile}
