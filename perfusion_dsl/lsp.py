"""`perfusion lsp`: a language server over stdio (pygls), for editors.

It runs the compiler on what the editor holds: every open buffer, saved or not, replaces its
file (`compile_paths(overlay=…)`), so a document is checked with the unsaved edits of the
files it `use`s, and its diagnostics are exactly `perfusion check`'s on that text (the
diagnostics of used files and of perfusion.toml are published to those files). Typing is
debounced, and the compiler runs in a worker thread, so a slow glob never blocks the
server. It also completes (`completion.complete`), formats documents (`perfusion fmt`'s
formatter), lists their statements as symbols, and answers hover, go to definition, find
references, rename (`navigation`, over every spec of the run root) and inlay hints
(`hover`: images per generate, a learn's status against the store, read-only). It never
loads a model. Setup for editors: docs/editors.md.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path

from lsprotocol import types as lsp
from pygls.exceptions import JsonRpcInvalidParams
from pygls.lsp.server import LanguageServer
from pygls.uris import from_fs_path, to_fs_path

from perfusion_dsl import __version__
from perfusion_dsl import navigation as nav
from perfusion_dsl import nodes as n
from perfusion_dsl.compiler import Compilation, UsageError, compile_paths, run_root, spec_path
from perfusion_dsl.completion import complete
from perfusion_dsl.context import Context
from perfusion_dsl.diagnostics import Diagnostic
from perfusion_dsl.formatter import format_bytes
from perfusion_dsl.hover import hover as hover_text
from perfusion_dsl.hover import inlay_hints
from perfusion_dsl.limits import DEFAULT_LIMITS
from perfusion_dsl.parser import parse
from perfusion_dsl.source import BOM, decode

DEBOUNCE_SECONDS = 0.15  # after the last keystroke; a save or an open is checked at once


class PerfusionServer(LanguageServer):
    def __init__(self) -> None:
        super().__init__("perfusion", __version__)
        self.versions: dict[str, int] = {}  # uri -> edits seen, to drop stale checks
        self.published: dict[str, set[str]] = {}  # checked uri -> uris it published to
        self.tasks: set[asyncio.Task[None]] = set()  # held: the loop keeps only weak refs


server = PerfusionServer()


def _lines(text: str) -> list[str]:
    return text.split("\n")


def _position(lines: Sequence[str], line: int, col: int) -> lsp.Position:
    """A 1-based line and code-point column as the client counts (UTF-16 by default)."""
    codec = server.workspace.position_codec
    return codec.position_to_client_units(lines, lsp.Position(line=line - 1,
                                                              character=col - 1))


def _range(lines: Sequence[str], span: n.Span | None) -> lsp.Range:
    if span is None:  # the whole file: its first character
        return lsp.Range(start=lsp.Position(line=0, character=0),
                         end=lsp.Position(line=0, character=0))
    return lsp.Range(start=_position(lines, span.line, span.col),
                     end=_position(lines, span.end_line, span.end_col))


def _uri(root: Path, file: str) -> str:
    path = Path(file) if Path(file).is_absolute() else root / file
    return from_fs_path(str(path)) or path.as_uri()


def _to_lsp(d: Diagnostic, root: Path, sources: dict[str, str]) -> lsp.Diagnostic:
    text = "\n".join([d.message, *d.extra, *([f"help: {d.help}"] if d.help else [])])
    related = [lsp.DiagnosticRelatedInformation(
        location=lsp.Location(uri=_uri(root, label.file),
                              range=_range(_lines(sources.get(label.file, "")), label.span)),
        message=label.message) for label in d.labels]
    return lsp.Diagnostic(
        range=_range(_lines(sources.get(d.file, "")), d.span), message=text,
        severity=lsp.DiagnosticSeverity.Error if d.severity == "error"
        else lsp.DiagnosticSeverity.Warning,
        code=d.code, source="perfusion", related_information=related or None)


def _whole_file(message: str) -> lsp.Diagnostic:
    return lsp.Diagnostic(range=_range([], None), message=message,
                          severity=lsp.DiagnosticSeverity.Error, source="perfusion")


def _overlay() -> dict[Path, str]:
    """Every open buffer's text, by its file's path."""
    texts = {}
    for uri, document in server.workspace.text_documents.items():
        path = to_fs_path(uri)
        if path and path.endswith(".concept"):
            texts[Path(path)] = document.source
    return texts


def check(uri: str) -> dict[str, list[lsp.Diagnostic]]:
    """The diagnostics of checking the document at `uri`, by the uri of each file they are
    in (the document's own uri always present)."""
    path = to_fs_path(uri)
    if not path:
        return {}
    found: dict[str, list[lsp.Diagnostic]] = {uri: []}
    try:
        comp = compile_paths([Path(path)], overlay=_overlay())
    except UsageError as exc:  # e.g. more spec files than the limit: say it on the file
        found[uri].append(_whole_file(str(exc)))
        return found
    ctx = comp.context
    sources = ctx.sources()
    own = _uri(ctx.root, ctx.display(spec_path(Path(path))))
    for d in comp.diagnostics:
        target = _uri(ctx.root, d.file)
        found.setdefault(uri if target == own else target, []).append(
            _to_lsp(d, ctx.root, sources))
    return found


async def _publish(uri: str, version: int, *, wait: float) -> None:
    if wait:
        await asyncio.sleep(wait)
    if server.versions.get(uri) != version:
        return  # a later edit will publish
    try:
        found = await asyncio.to_thread(check, uri)
    except Exception as exc:  # a compiler bug must not take the server down
        server.window_log_message(lsp.LogMessageParams(
            type=lsp.MessageType.Error, message=f"perfusion: internal error checking {uri}: "
                                                f"{type(exc).__name__}: {exc}"))
        found = {uri: [_whole_file(f"internal error (a bug): {type(exc).__name__}: {exc}")]}
    if server.versions.get(uri) != version:
        return
    stale = server.published.get(uri, set()) - set(found)
    for target in stale:  # files that had diagnostics from this document and have none now
        found[target] = []
    server.published[uri] = {t for t, diags in found.items() if diags}
    for target, diags in found.items():
        server.text_document_publish_diagnostics(
            lsp.PublishDiagnosticsParams(uri=target, diagnostics=diags))


def _schedule(uri: str, wait: float) -> None:
    version = server.versions.get(uri, 0) + 1
    server.versions[uri] = version
    task = asyncio.get_running_loop().create_task(_publish(uri, version, wait=wait))
    server.tasks.add(task)
    task.add_done_callback(server.tasks.discard)


def _recheck_open(wait: float) -> None:
    """Check every open document: an edit to one may change another that `use`s it."""
    for uri in list(server.workspace.text_documents):
        _schedule(uri, wait)


@server.feature(lsp.INITIALIZED)
def initialized(params: lsp.InitializedParams) -> None:
    """Run roots are found as `perfusion check` finds them from the workspace's folder."""
    root = server.workspace.root_path
    if root and os.path.isdir(root):
        os.chdir(root)


@server.feature(lsp.TEXT_DOCUMENT_DID_OPEN)
async def did_open(params: lsp.DidOpenTextDocumentParams) -> None:
    _recheck_open(0)


@server.feature(lsp.TEXT_DOCUMENT_DID_CHANGE)
async def did_change(params: lsp.DidChangeTextDocumentParams) -> None:
    _recheck_open(DEBOUNCE_SECONDS)


@server.feature(lsp.TEXT_DOCUMENT_DID_SAVE)
async def did_save(params: lsp.DidSaveTextDocumentParams) -> None:
    _recheck_open(0)


@server.feature(lsp.TEXT_DOCUMENT_DID_CLOSE)
async def did_close(params: lsp.DidCloseTextDocumentParams) -> None:
    uri = params.text_document.uri
    server.versions.pop(uri, None)
    for target in server.published.pop(uri, set()) | {uri}:
        server.text_document_publish_diagnostics(
            lsp.PublishDiagnosticsParams(uri=target, diagnostics=[]))
    _recheck_open(0)  # the others now read the file from disk


@server.feature(lsp.TEXT_DOCUMENT_FORMATTING)
def formatting(params: lsp.DocumentFormattingParams) -> list[lsp.TextEdit] | None:
    """The whole document in `perfusion fmt`'s form; nothing when it does not parse."""
    document = server.workspace.get_text_document(params.text_document.uri)
    text, _ = format_bytes(document.source.encode("utf-8", "surrogatepass"), document.uri)
    if text is None or text == document.source:
        return None
    lines = document.lines
    whole = lsp.Range(start=lsp.Position(line=0, character=0),
                      end=lsp.Position(line=len(lines), character=0))
    return [lsp.TextEdit(range=whole, new_text=text)]


_KINDS = {"keyword": lsp.CompletionItemKind.Keyword, "option": lsp.CompletionItemKind.Property,
          "value": lsp.CompletionItemKind.EnumMember, "list": lsp.CompletionItemKind.Variable,
          "token": lsp.CompletionItemKind.Class}


@server.feature(lsp.TEXT_DOCUMENT_COMPLETION,
                lsp.CompletionOptions(trigger_characters=["{", ":", "\""]))
def completion(params: lsp.CompletionParams) -> list[lsp.CompletionItem]:
    """Keywords, the block's option names, fixed option values, `let` names in `{…}`,
    tokens in templates (`completion.complete`)."""
    document = server.workspace.get_text_document(params.text_document.uri)
    offset = document.offset_at_position(params.position)
    return [lsp.CompletionItem(label=item.label, kind=_KINDS[item.kind], detail=item.detail)
            for item in complete(document.source, offset)]


def _symbol(statement: n.Statement, lines: Sequence[str]) -> lsp.DocumentSymbol | None:
    whole = _range(lines, statement.span)
    if isinstance(statement, n.Learn):
        supers = ", ".join(s.text for s in statement.supers)
        return lsp.DocumentSymbol(name=statement.token, kind=lsp.SymbolKind.Class, range=whole,
                                  selection_range=_range(lines, statement.token_span),
                                  detail=f"learn <{supers}>" if supers else "learn")
    if isinstance(statement, n.Generate):
        return lsp.DocumentSymbol(name=f'"{statement.template.raw}"', kind=lsp.SymbolKind.Event,
                                  range=whole, detail="generate",
                                  selection_range=_range(lines, statement.template.span))
    if isinstance(statement, n.Let):
        return lsp.DocumentSymbol(name=statement.name, kind=lsp.SymbolKind.Array, range=whole,
                                  selection_range=_range(lines, statement.name_span),
                                  detail="let")
    return None


@server.feature(lsp.TEXT_DOCUMENT_DOCUMENT_SYMBOL)
def document_symbols(params: lsp.DocumentSymbolParams) -> list[lsp.DocumentSymbol]:
    """An outline: each learn (its token), generate (its template) and let (its name)."""
    document = server.workspace.get_text_document(params.text_document.uri)
    source, _ = decode(document.source.encode("utf-8", "surrogatepass"), document.uri,
                       DEFAULT_LIMITS.max_spec_bytes)
    if source is None:
        return []
    module = parse(source).module
    lines = _lines(source.text)
    return [s for s in (_symbol(st, lines) for st in module.statements) if s is not None]

# ---------------------------------------------------------------- navigation and hints


def _compile_for(uri: str, *, whole_root: bool = False) -> Compilation | None:
    """The document compiled with every open buffer; with `whole_root`, every spec under the
    run root too (references and renames reach files that use this one)."""
    path = to_fs_path(uri)
    if not path:
        return None
    paths = [Path(path)]
    if whole_root:
        paths.insert(0, run_root(paths))
    try:
        return compile_paths(paths, overlay=_overlay())
    except UsageError:
        if not whole_root:
            return None
        return _compile_for(uri)


def _cursor(uri: str, position: lsp.Position) -> tuple[Path, int, int]:
    """The document's compiler path and the 1-based line and code-point column at
    `position` (counted as the compiler counts: a BOM is not a column)."""
    document = server.workspace.get_text_document(uri)
    point = server.workspace.position_codec.position_from_client_units(document.lines,
                                                                        position)
    col = point.character + 1
    if point.line == 0 and document.source.startswith(BOM):
        col -= 1
    return spec_path(Path(to_fs_path(uri) or "")), point.line + 1, col


def _file_range(ctx: Context, path: Path, span: n.Span | None) -> lsp.Range:
    unit = ctx.units.get(path)
    return _range(_lines(unit.source.text if unit else ""), span)


async def _symbol_at(uri: str, position: lsp.Position, *, whole_root: bool = False
                     ) -> tuple[Compilation, list[nav.Occurrence], nav.Occurrence | None] | None:
    """The compilation, its occurrences and the one under the cursor (None for none)."""
    comp = await asyncio.to_thread(_compile_for, uri, whole_root=whole_root)
    if comp is None:
        return None
    occs = nav.occurrences(comp.context)
    return comp, occs, nav.at(occs, *_cursor(uri, position))


def _statuses(comp: Compilation) -> dict[str, str]:
    """Each learned concept's status against the store, as `perfusion plan` words it; none
    while the specs have errors (there is no plan) or without the runtime package."""
    if not comp.ok:
        return {}
    try:
        from perfusion_runtime.build.status import concept_statuses
        from perfusion_runtime.files.store import Store, cache_root
    except ImportError:
        return {}
    root = comp.context.root
    try:
        store = Store(cache_root(None, root))
        statuses: dict[str, str] = concept_statuses(comp.plan(), store, root)
        return statuses
    except Exception as exc:  # an unreadable store must not cost the hints of the file
        server.window_log_message(lsp.LogMessageParams(
            type=lsp.MessageType.Warning, message=f"perfusion: store status: {exc}"))
        return {}


@server.feature(lsp.TEXT_DOCUMENT_HOVER)
async def hover(params: lsp.HoverParams) -> lsp.Hover | None:
    """Keywords, options (the docs' table), `let` names, tokens (their learn, images and
    store status) and templates (how many images, the first prompts)."""
    uri = params.text_document.uri
    found = await _symbol_at(uri, params.position)
    if found is None:
        return None
    comp, occs, _ = found
    path, line, col = _cursor(uri, params.position)
    statuses = await asyncio.to_thread(_statuses, comp)
    text = hover_text(comp.context, occs, path, line, col, statuses)
    if text is None:
        return None
    return lsp.Hover(contents=lsp.MarkupContent(kind=lsp.MarkupKind.Markdown, value=text))


@server.feature(lsp.TEXT_DOCUMENT_DEFINITION)
async def definition(params: lsp.DefinitionParams) -> lsp.Location | None:
    """A token's learn, a `let`'s name, a `use`d file."""
    found = await _symbol_at(params.text_document.uri, params.position)
    if found is None:
        return None
    comp, _, occ = found
    if occ is None:
        return None
    where = nav.definition(comp.context, occ)
    if where is None:
        return None
    path, span = where
    return lsp.Location(uri=_uri(comp.context.root, str(path)),
                        range=_file_range(comp.context, path, span))


@server.feature(lsp.TEXT_DOCUMENT_REFERENCES)
async def references(params: lsp.ReferenceParams) -> list[lsp.Location]:
    """Every place the token, `let` name or used file is named, in every spec of the run
    root and every open buffer."""
    found = await _symbol_at(params.text_document.uri, params.position, whole_root=True)
    if found is None:
        return []
    comp, occs, occ = found
    if occ is None:
        return []
    ctx = comp.context
    return [lsp.Location(uri=_uri(ctx.root, str(o.path)),
                         range=_file_range(ctx, o.path, o.span))
            for o in nav.references(occs, occ,
                                    include_definition=params.context.include_declaration)]


@server.feature(lsp.TEXT_DOCUMENT_PREPARE_RENAME)
async def prepare_rename(params: lsp.PrepareRenameParams) -> lsp.Range | None:
    found = await _symbol_at(params.text_document.uri, params.position)
    if found is None or found[2] is None or found[2].kind == "use":
        return None
    return _file_range(found[0].context, found[2].path, found[2].span)


@server.feature(lsp.TEXT_DOCUMENT_RENAME)
async def rename(params: lsp.RenameParams) -> lsp.WorkspaceEdit | None:
    """A token across every spec of the run root, or a `let` name in its file; refused
    (with the reason) when the new name is not valid or already taken."""
    found = await _symbol_at(params.text_document.uri, params.position, whole_root=True)
    if found is None:
        return None
    comp, occs, occ = found
    if occ is None:
        return None
    try:
        edits = nav.rename(occs, occ, params.new_name)
    except nav.RenameRefused as exc:
        raise JsonRpcInvalidParams(str(exc)) from None
    ctx = comp.context
    return lsp.WorkspaceEdit(changes={
        _uri(ctx.root, str(path)): [lsp.TextEdit(range=_file_range(ctx, path, span),
                                                 new_text=text) for span, text in spans]
        for path, spans in edits.items()})


@server.feature(lsp.TEXT_DOCUMENT_INLAY_HINT)
async def inlay_hint(params: lsp.InlayHintParams) -> list[lsp.InlayHint]:
    """After each `generate`: `→ 8 images in renders/moon/`; after each `learn`: its status
    against the store (`new`, `up to date`, `changed: steps 300 → 400`)."""
    uri = params.text_document.uri
    comp = await asyncio.to_thread(_compile_for, uri)
    if comp is None:
        return []
    statuses = await asyncio.to_thread(_statuses, comp)
    path = spec_path(Path(to_fs_path(uri) or ""))
    unit = comp.context.units.get(path)
    lines = _lines(unit.source.text if unit else "")
    first, last = params.range.start.line + 1, params.range.end.line + 1
    return [lsp.InlayHint(position=_position(lines, h.line, h.col), label=h.label,
                          padding_left=True)
            for h in inlay_hints(comp.context, path, statuses) if first <= h.line <= last]



def main() -> int:
    server.start_io()
    return 0
