"""`perfusion lsp` end to end, past diagnostics: hover, go to definition across a `use`,
find references, rename across files and inlay hints (the images a generate makes, a
learn's status against a real store record), with a real server and a real client."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import LSP_MOON as MOON
from helpers import LSP_TILE as TILE
from lsprotocol import types as lsp
from pytest_lsp import LanguageClient
from test_lsp import _open

from perfusion_dsl.compiler import compile_paths

ID = lsp.TextDocumentIdentifier


def _pos(text: str, needle: str, nth: int = 0) -> lsp.Position:
    offset = -1
    for _ in range(nth + 1):
        offset = text.index(needle, offset + 1)
    line = text.count("\n", 0, offset)
    return lsp.Position(line=line, character=offset - (text.rfind("\n", 0, offset) + 1))


@pytest.mark.asyncio
async def test_hover_on_a_token_a_template_and_an_option(client: LanguageClient,
                                                         tmp_path: Path) -> None:
    uri = _open(client, tmp_path / "project" / "tile.concept", TILE)

    async def shown(needle: str, nth: int = 0) -> str:
        got = await client.text_document_hover_async(lsp.HoverParams(
            text_document=ID(uri=uri), position=_pos(TILE, needle, nth)))
        assert got is not None and isinstance(got.contents, lsp.MarkupContent)
        assert got.contents.kind == lsp.MarkupKind.Markdown
        return got.contents.value

    token = await shown("moon*")
    assert "learned in `moon.concept:2`" in token and "supercategories: crescent" in token
    assert "store: new" in token  # no store yet
    template = await shown("at the")
    assert "**4 images** from 2 prompts" in template  # x 2 and "- a moon* at the right" in template
    assert "sampling steps" in await shown("steps")


@pytest.mark.asyncio
async def test_definition_across_a_use_and_of_the_use_path(client: LanguageClient,
                                                           tmp_path: Path) -> None:
    project = tmp_path / "project"
    uri = _open(client, project / "tile.concept", TILE)
    found = await client.text_document_definition_async(lsp.DefinitionParams(
        text_document=ID(uri=uri), position=_pos(TILE, "moon*")))
    assert isinstance(found, lsp.Location)
    assert found.uri == (project / "moon.concept").as_uri()
    assert found.range.start == _pos(MOON, "moon*")
    assert found.range.end.character - found.range.start.character == len("moon*")
    used = await client.text_document_definition_async(lsp.DefinitionParams(
        text_document=ID(uri=uri), position=_pos(TILE, "moon.concept")))
    assert isinstance(used, lsp.Location) and used.uri == (project / "moon.concept").as_uri()
    let = await client.text_document_definition_async(lsp.DefinitionParams(
        text_document=ID(uri=uri), position=_pos(TILE, "places}")))
    assert isinstance(let, lsp.Location) and let.uri == uri
    assert let.range.start == _pos(TILE, "places")


@pytest.mark.asyncio
async def test_references_and_rename_reach_files_not_open(client: LanguageClient,
                                                           tmp_path: Path) -> None:
    """Renaming moon* from moon.concept edits tile.concept too, though only moon.concept
    is open; applying the edits gives specs that compile, with the new token."""
    project = tmp_path / "project"
    uri = _open(client, project / "moon.concept", MOON)
    refs = await client.text_document_references_async(lsp.ReferenceParams(
        text_document=ID(uri=uri), position=_pos(MOON, "moon*"),
        context=lsp.ReferenceContext(include_declaration=True)))
    assert refs is not None
    assert sorted((r.uri.rsplit("/", 1)[1], r.range.start.line)
                  for r in refs) == [("moon.concept", 1), ("tile.concept", 2)]
    prepared = await client.text_document_prepare_rename_async(lsp.PrepareRenameParams(
        text_document=ID(uri=uri), position=_pos(MOON, "moon*")))
    assert isinstance(prepared, lsp.Range) and prepared.start == _pos(MOON, "moon*")
    edit = await client.text_document_rename_async(lsp.RenameParams(
        text_document=ID(uri=uri), position=_pos(MOON, "moon*"), new_name="luna*"))
    assert edit is not None and edit.changes is not None
    assert set(edit.changes) == {uri, (project / "tile.concept").as_uri()}
    for target, edits in edit.changes.items():
        path = project / target.rsplit("/", 1)[1]
        lines = path.read_text("utf-8").split("\n")
        for e in sorted(edits, key=lambda e: (-e.range.start.line, -e.range.start.character)):
            line = lines[e.range.start.line]
            assert line[e.range.start.character:e.range.end.character] == "moon*"
            lines[e.range.start.line] = (line[:e.range.start.character] + e.new_text
                                         + line[e.range.end.character:])
        path.write_text("\n".join(lines), "utf-8")
    comp = compile_paths([project], root=project)
    assert comp.ok, comp.diagnostics
    assert {c.token for c in comp.plan().concepts} == {"luna*"}


@pytest.mark.asyncio
async def test_a_rename_to_a_taken_name_is_refused_with_the_reason(client: LanguageClient,
                                                                   tmp_path: Path) -> None:
    text = MOON + "learn p/*.png as sun* <star>\n"
    uri = _open(client, tmp_path / "project" / "moon.concept", text)
    with pytest.raises(Exception, match="already defined"):
        await client.text_document_rename_async(lsp.RenameParams(
            text_document=ID(uri=uri), position=_pos(text, "moon*"), new_name="sun"))


@pytest.mark.asyncio
async def test_inlay_hints_show_images_and_the_store_status(client: LanguageClient,
                                                            tmp_path: Path) -> None:
    """The learn's hint is the status `perfusion plan` gives, from a real build record:
    `changed` with the option that changed since the last build."""
    from perfusion_runtime.build.status import concept_inputs, store_key, write_history
    from perfusion_runtime.files.store import Store, cache_root

    project = tmp_path / "project"
    built = MOON.replace("<crescent>", "<crescent> { steps: 300 }")
    (project / "moon.concept").write_text(built, "utf-8")
    (step,) = compile_paths([project / "moon.concept"], root=project).plan().concepts
    write_history(Store(cache_root(None, project)), step.token, store_key(step),
                  concept_inputs(step, project))
    edited = built.replace("300", "400")
    uri = _open(client, project / "moon.concept", edited + 'generate "a moon*" x 3\n')
    hints = await client.text_document_inlay_hint_async(lsp.InlayHintParams(
        text_document=ID(uri=uri), range=lsp.Range(start=lsp.Position(line=0, character=0),
                                                    end=lsp.Position(line=10, character=0))))
    assert hints is not None
    assert [(h.position.line, h.label) for h in hints] == [
        (1, "changed: `steps` 300 → 400"), (2, "→ 3 images in renders/moon/")]
    assert hints[1].position.character == len('generate "a moon*" x 3')


@pytest.mark.asyncio
async def test_completion_of_used_tokens_paths_and_supercategory_words(
        client: LanguageClient, tmp_path: Path) -> None:
    """In tile.concept, moon* comes from moon.concept; `use "` lists the spec files;
    `<ci` offers the built-in toy:shapes model's single-token words (its tokenizer file)."""
    project = tmp_path / "project"
    text = TILE + 'generate "a m\nuse "\nlearn p/*.png as sun* <ci\n'
    uri = _open(client, project / "tile.concept", text)

    async def items(line: int, character: int) -> list[lsp.CompletionItem]:
        result = await client.text_document_completion_async(lsp.CompletionParams(
            text_document=ID(uri=uri), position=lsp.Position(line=line, character=character)))
        return list(result.items if isinstance(result, lsp.CompletionList) else result or [])

    lines = text.split("\n")
    at = len(lines) - 4
    assert [(i.label, i.detail) for i in await items(at, len(lines[at]))] == [
        ("sun*", "learned in this file"), ("moon*", "learned in moon.concept")]
    assert [i.label for i in await items(at + 1, len(lines[at + 1]))] == [
        "moon.concept", "p/", "tile.concept"]
    words = await items(at + 2, len(lines[at + 2]))
    assert "circle" in {i.label for i in words}
    assert all(i.label.startswith("ci") for i in words)
    edit = words[0].text_edit
    assert isinstance(edit, lsp.TextEdit)
    assert edit.range.start.character == len(lines[at + 2]) - 2  # replaces the typed `ci`


@pytest.mark.asyncio
async def test_ranges_count_a_bom_as_the_client_does(client: LanguageClient,
                                                     tmp_path: Path) -> None:
    """The compiler drops a BOM; the client's text keeps it as its first character. A
    definition in, a hint on and symbols of the first line point at the client's
    characters."""
    project = tmp_path / "project"
    moon = "\ufefflearn p/*.png as moon* <crescent>\n"
    (project / "moon.concept").write_text(moon, "utf-8")
    own = _open(client, project / "moon.concept", moon)
    found = await client.text_document_definition_async(lsp.DefinitionParams(
        text_document=ID(uri=_open(client, project / "tile.concept", TILE)),
        position=_pos(TILE, "moon*")))
    assert isinstance(found, lsp.Location) and found.uri == own
    assert found.range.start == lsp.Position(line=0, character=moon.index("moon*"))
    text = '\ufeffgenerate "a {x|y}"\n'
    hints = await client.text_document_inlay_hint_async(lsp.InlayHintParams(
        text_document=ID(uri=_open(client, project / "bom.concept", text)),
        range=lsp.Range(start=lsp.Position(line=0, character=0),
                        end=lsp.Position(line=1, character=0))))
    assert hints is not None and [h.position.character for h in hints] == [len(text) - 1]
    listed = "\ufefflet a = [b]\nlet c = [d]\n"
    symbols = await client.text_document_document_symbol_async(lsp.DocumentSymbolParams(
        text_document=ID(uri=_open(client, project / "symbols.concept", listed))))
    assert symbols is not None
    assert [(s.selection_range.start.line, s.selection_range.start.character)
            for s in symbols if isinstance(s, lsp.DocumentSymbol)] == [(0, 5), (1, 4)]
