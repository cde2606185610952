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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from lsprotocol import types as lsp
from pygls.exceptions import JsonRpcInvalidParams
from pygls.lsp.server import LanguageServer
from pygls.uris import from_fs_path, to_fs_path

from perfusion_dsl import __version__
from perfusion_dsl import navigation as nav
from perfusion_dsl import nodes as n
from perfusion_dsl.compiler import Compilation, UsageError, compile_paths, run_root, spec_path
from perfusion_dsl.completion import (
    Surroundings,
    complete,
    model_line,
    tokenizer_words,
    used_tokens,
)
from perfusion_dsl.config import load_config
from perfusion_dsl.diagnostics import Diagnostic
from perfusion_dsl.formatter import format_bytes
from perfusion_dsl.hover import hover as hover_text
from perfusion_dsl.hover import inlay_hints
from perfusion_dsl.limits import DEFAULT_LIMITS
from perfusion_dsl.parser import parse
from perfusion_dsl.reading import Unreadable, read_limited
from perfusion_dsl.source import BOM, decode

DEBOUNCE_SECONDS = 0.15  # after the last keystroke; a save or an open is checked at once


class PerfusionServer(LanguageServer):
    def __init__(self) -> None:
        super().__init__("perfusion", __version__)
        self.versions: dict[str, int] = {}  # uri -> edits seen, to drop stale checks
        # checked uri -> {uri of a file it found diagnostics in (its own always) -> (that
        # document's version when checked, None when not open; the diagnostics)}
        self.published: dict[str, dict[str, tuple[int | None, list[lsp.Diagnostic]]]] = {}
        self.checking: dict[str, asyncio.Event] = {}  # uri -> set when its running check ends
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


def _to_lsp(d: Diagnostic, root: Path, ranges: Sequence[lsp.Range]) -> lsp.Diagnostic:
    """`ranges`: the diagnostic's, then each label's, in the client's text (`check`)."""
    text = "\n".join([d.message, *d.extra, *([f"help: {d.help}"] if d.help else [])])
    related = [lsp.DiagnosticRelatedInformation(
        location=lsp.Location(uri=_uri(root, label.file), range=where),
        message=label.message) for label, where in zip(d.labels, ranges[1:], strict=True)]
    return lsp.Diagnostic(
        range=ranges[0], message=text,
        severity=lsp.DiagnosticSeverity.Error if d.severity == "error"
        else lsp.DiagnosticSeverity.Warning,
        code=d.code, source="perfusion", related_information=related or None)


def _whole_file(message: str) -> lsp.Diagnostic:
    return lsp.Diagnostic(range=_range([], None), message=message,
                          severity=lsp.DiagnosticSeverity.Error, source="perfusion")


def _overlay() -> dict[Path, str]:
    """Every open buffer's text, by its file's path. (A copy of the documents is iterated:
    a worker thread may call this while the event loop opens or closes one.)"""
    texts = {}
    for document in list(server.workspace.text_documents.values()):
        path = to_fs_path(document.uri)  # the client's uri: pygls's key is unquoted
        if path and path.endswith(".concept"):
            texts[Path(path)] = document.source
    return texts


class ClientRanges:
    """Compiler spans as ranges in the client's text of their file: an open buffer as sent,
    another file as read (with the BOM the compiler dropped). The compiler counts neither
    that BOM as a column (`perfusion check` shows the column after it) nor a lone CR as a
    line break; a client counts both, and UTF-16 units by default."""

    def __init__(self, comp: Compilation | None, texts: Mapping[Path, str]) -> None:
        """`comp`'s files, as `texts` (the open buffers) hold them or as read; without a
        compilation, the files of `texts` alone, keyed by their paths."""
        if comp is None:
            self.client = {str(p): t for p, t in texts.items()}
            self.bom = {f for f, t in self.client.items() if t.startswith(BOM)}
        else:
            ctx = comp.context
            self.bom = {d.file for d in comp.diagnostics if d.code == "bom"}
            self.client = {f: BOM + t if f in self.bom else t
                           for f, t in ctx.sources().items()}
            self.client |= {f: t for p, t in texts.items()
                            if (f := ctx.display(spec_path(p))) in self.client}
        self.split: dict[str, tuple[list[str], list[int] | None]] = {}  # lines; client line

    def position(self, file: str, line: int, col: int) -> lsp.Position:
        if file not in self.split:  # once a file, not once a diagnostic
            text = self.client.get(file, "")
            rows, lone = _lines(text), 0
            starts: list[int] | None = None
            if "\r" in text:  # a lone CR starts a line for the client
                starts = []
                for i, row in enumerate(rows):
                    starts.append(i + lone)
                    lone += row.count("\r") - (i < len(rows) - 1 and row.endswith("\r"))
            self.split[file] = rows, starts
        lines, first = self.split[file]
        if not 0 < line <= len(lines):
            return lsp.Position(line=max(line - 1, 0), character=max(col - 1, 0))
        head = lines[line - 1][:col - 1]
        if line < len(lines) and head == lines[line - 1] and head.endswith("\r"):
            head = head[:-1]  # the CR of a CRLF
        tail = head[head.rfind("\r") + 1:]
        return lsp.Position(
            line=(line - 1 if first is None else first[line - 1]) + head.count("\r"),
            character=_position([tail], 1, len(tail) + 1).character)

    def range(self, file: str, span: n.Span | None, after_bom: bool = True) -> lsp.Range:
        if span is None:
            return _range([], None)
        more = after_bom and file in self.bom  # the `bom` warning's column 1 is the BOM
        return lsp.Range(
            start=self.position(file, span.line, span.col + (more and span.line == 1)),
            end=self.position(file, span.end_line, span.end_col + (more and span.end_line == 1)))


def check(uri: str, texts: dict[Path, str] | None = None) -> dict[str, list[lsp.Diagnostic]]:
    """The diagnostics of checking the document at `uri` with the open buffers `texts` (by
    default as they are now), by the uri of each file they are in (the document's own uri
    always present)."""
    path = to_fs_path(uri)
    if not path:
        return {}
    texts = _overlay() if texts is None else texts
    found: dict[str, list[lsp.Diagnostic]] = {uri: []}
    try:
        comp = compile_paths([Path(path)], overlay=texts)
    except UsageError as exc:  # e.g. more spec files than the limit: say it on the file
        found[uri].append(_whole_file(str(exc)))
        return found
    ctx = comp.context
    where = ClientRanges(comp, texts)
    own = _uri(ctx.root, ctx.display(spec_path(Path(path))))
    for d in comp.diagnostics:
        target = _uri(ctx.root, d.file)
        ranges = [where.range(d.file, d.span, d.code != "bom"),
                  *(where.range(label.file, label.span) for label in d.labels)]
        found.setdefault(uri if target == own else target, []).append(
            _to_lsp(d, ctx.root, ranges))
    return found


async def _publish(uri: str, version: int, *, wait: float) -> None:
    if wait:
        await asyncio.sleep(wait)
    # One check of a document at a time, of its newest request: a slow one (a glob over a
    # huge folder) is not started again beside itself on each edit of another document.
    while (running := server.checking.get(uri)) is not None:
        if server.versions.get(uri) != version:
            return
        await running.wait()
    if server.versions.get(uri) != version:
        return  # a later edit will publish
    done = server.checking[uri] = asyncio.Event()
    # Files by path: pygls keys documents by their uri unquoted, a check names used files by
    # `from_fs_path`'s spelling of theirs, and the client has its own (published to).
    versions = {to_fs_path(d.uri) or d.uri: d.version
                for d in list(server.workspace.text_documents.values())}
    try:
        found = await asyncio.to_thread(check, uri, _overlay())  # the buffers of `versions`
    except Exception as exc:  # a compiler bug must not take the server down
        server.window_log_message(lsp.LogMessageParams(
            type=lsp.MessageType.Error, message=f"perfusion: internal error checking {uri}: "
                                                f"{type(exc).__name__}: {exc}"))
        found = {uri: [_whole_file(f"internal error (a bug): {type(exc).__name__}: {exc}")]}
    finally:
        del server.checking[uri]
        done.set()
    documents = {to_fs_path(d.uri) or d.uri: d
                 for d in list(server.workspace.text_documents.values())}
    me = to_fs_path(uri) or uri
    if me not in documents:
        return  # closed meanwhile
    before = server.published.get(me, {})
    mine = {to_fs_path(t) or t: diags for t, diags in found.items()}
    server.published[me] = {p: (versions.get(p), diags) for p, diags in mine.items()}
    # A file shows what the checks of all open documents found in its text as it is now (a
    # used file's own check finds more in it: its renders are expanded); an open document
    # whose own check of that text is still to come waits for it. Even when this document
    # was edited meanwhile, what it found in unchanged files is published: a slow check is
    # not lost to edits elsewhere.
    for target in set(mine) | set(before):
        document = documents.get(target)
        now = document.version if document is not None else None
        own = server.published.get(target, {}).get(target)
        if document is not None and (own is None or own[0] != now):
            continue
        merged, seen = [], set()  # once a code, headline and place: its own check's first
        for checked in (server.published.get(target, {}), *server.published.values()):
            version_found, diags = checked.get(target, (now, []))
            for d in diags if version_found == now else []:
                key = (str(d.code), d.message.split("\n")[0], d.range.start.line,
                       d.range.start.character, d.range.end.line, d.range.end.character)
                if key not in seen:
                    seen.add(key)
                    merged.append(d)
        server.text_document_publish_diagnostics(lsp.PublishDiagnosticsParams(
            uri=document.uri if document is not None else from_fs_path(target) or target,
            diagnostics=merged, version=now))


def _schedule(uri: str, wait: float) -> None:
    version = server.versions.get(uri, 0) + 1
    server.versions[uri] = version
    task = asyncio.get_running_loop().create_task(_publish(uri, version, wait=wait))
    server.tasks.add(task)
    task.add_done_callback(server.tasks.discard)


def _recheck_open(wait: float) -> None:
    """Check every open document: an edit to one may change another that `use`s it."""
    for document in list(server.workspace.text_documents.values()):
        _schedule(document.uri, wait)  # the client's spelling (pygls keys it unquoted)


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
    me = to_fs_path(uri) or uri
    still = {to_fs_path(d.uri) or d.uri for d in list(server.workspace.text_documents.values())}
    for target in set(server.published.pop(me, {})) | {me}:
        if target == me or target not in still:  # an open one: its own check publishes it
            server.text_document_publish_diagnostics(lsp.PublishDiagnosticsParams(
                uri=uri if target == me else from_fs_path(target) or target, diagnostics=[]))
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
          "token": lsp.CompletionItemKind.Class, "file": lsp.CompletionItemKind.File,
          "folder": lsp.CompletionItemKind.Folder, "word": lsp.CompletionItemKind.Text}
_WORDS: dict[str, tuple[str, ...]] = {}  # model → its tokenizer's words, read once


def _spec_text(path: Path) -> str | None:
    """An open buffer's text, else the file's (bounded, as the compiler reads it)."""
    buffer = _overlay().get(path)
    if buffer is not None:
        return buffer
    try:
        return read_limited(path, DEFAULT_LIMITS.max_spec_bytes).decode("utf-8", "replace")
    except Unreadable:
        return None


def _model_words(text: str, path: Path) -> tuple[str, ...]:
    """The single-token words of the document's base model (its `model` line, else the
    project's default), from its tokenizer's vocabulary file; none for a model that is not
    a folder here (a model id not in the hub's cache, a checkpoint file, or missing)."""
    model = model_line(text)
    if not model:
        root = run_root([path])
        model = load_config(root, lambda p: str(p))[0].model
    if model not in _WORDS:
        try:
            from perfusion_runtime.build.models import local_folder
        except ImportError:  # the compiler alone: a local folder is read as such
            folder: Path | None = Path(model).expanduser()
        else:
            folder = local_folder(model)
        _WORDS[model] = tokenizer_words(folder) if folder is not None else ()
    return _WORDS[model]


@server.feature(lsp.TEXT_DOCUMENT_COMPLETION,
                lsp.CompletionOptions(trigger_characters=["{", ":", "\"", "/", "<", ","]))
def completion(params: lsp.CompletionParams) -> list[lsp.CompletionItem]:
    """Keywords, the block's option names, fixed option values, `let` names in `{…}`,
    tokens in templates (this file's and its `use`d files'), paths in `use` and learn
    patterns, supercategory words (`completion.complete`)."""
    document = server.workspace.get_text_document(params.text_document.uri)
    offset = document.offset_at_position(params.position)
    path = spec_path(Path(to_fs_path(document.uri) or "."))
    text = document.source
    around = Surroundings(folder=path.parent,
                          used_tokens=used_tokens(text, path.parent, _spec_text),
                          words=lambda: _model_words(text, path))
    items = []
    for rank, item in enumerate(complete(text, offset, around)):
        edit = None
        if item.replace:
            start = lsp.Position(line=params.position.line,
                                 character=params.position.character - item.replace)
            edit = lsp.TextEdit(range=lsp.Range(start=start, end=params.position),
                                new_text=item.label)
        items.append(lsp.CompletionItem(label=item.label, kind=_KINDS[item.kind],
                                        detail=item.detail, sort_text=f"{rank:05d}",
                                        filter_text=item.filter, text_edit=edit))
    return items


def _symbol(statement: n.Statement, at: Callable[[n.Span], lsp.Range]
            ) -> lsp.DocumentSymbol | None:
    whole = at(statement.span)
    if isinstance(statement, n.Learn):
        supers = ", ".join(s.text for s in statement.supers)
        return lsp.DocumentSymbol(name=statement.token, kind=lsp.SymbolKind.Class, range=whole,
                                  selection_range=at(statement.token_span),
                                  detail=f"learn <{supers}>" if supers else "learn")
    if isinstance(statement, n.Generate):
        return lsp.DocumentSymbol(name=f'"{statement.template.raw}"', kind=lsp.SymbolKind.Event,
                                  range=whole, detail="generate",
                                  selection_range=at(statement.template.span))
    if isinstance(statement, n.Let):
        return lsp.DocumentSymbol(name=statement.name, kind=lsp.SymbolKind.Array, range=whole,
                                  selection_range=at(statement.name_span),
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
    # ranged in the client's text: its BOM and lone CRs count
    ranges = ClientRanges(None, {Path("buffer"): document.source})
    return [s for s in (_symbol(st, lambda span: ranges.range("buffer", span))
                        for st in module.statements) if s is not None]

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


def _file_range(comp: Compilation, path: Path, span: n.Span | None,
                ranges: ClientRanges | None = None) -> lsp.Range:
    """A span of the file at `path` as a range in the client's text of that file."""
    unit = comp.context.units.get(path)
    file = unit.file if unit else comp.context.display(path)
    return (ranges or ClientRanges(comp, _overlay())).range(file, span)


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
    comp, occs, occ = found
    path, line, col = _cursor(uri, params.position)
    # the store is read only for a token's hover: keywords and options need no plan
    statuses = await asyncio.to_thread(_statuses, comp) if occ and occ.kind == "token" else {}
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
                        range=_file_range(comp, path, span))


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
    ctx, ranges = comp.context, ClientRanges(comp, _overlay())
    return [lsp.Location(uri=_uri(ctx.root, str(o.path)),
                         range=_file_range(comp, o.path, o.span, ranges))
            for o in nav.references(occs, occ,
                                    include_definition=params.context.include_declaration)]


@server.feature(lsp.TEXT_DOCUMENT_PREPARE_RENAME)
async def prepare_rename(params: lsp.PrepareRenameParams) -> lsp.Range | None:
    found = await _symbol_at(params.text_document.uri, params.position)
    if found is None or found[2] is None or found[2].kind == "use":
        return None
    return _file_range(found[0], found[2].path, found[2].span)


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
    ctx, ranges = comp.context, ClientRanges(comp, _overlay())
    return lsp.WorkspaceEdit(changes={
        _uri(ctx.root, str(path)): [lsp.TextEdit(range=_file_range(comp, path, span, ranges),
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
    first, last = params.range.start.line + 1, params.range.end.line + 1
    ranges = ClientRanges(comp, _overlay())
    return [lsp.InlayHint(position=_file_range(comp, path, n.Span(0, 0, h.line, h.col, h.line,
                                                                  h.col), ranges).start,
                          label=h.label, padding_left=True)
            for h in inlay_hints(comp.context, path, statuses) if first <= h.line <= last]



def main() -> int:
    server.start_io()
    return 0
