"""Reads a spec file's bytes into text, reporting encoding and size problems."""

from __future__ import annotations

import re
from dataclasses import dataclass

from perfusion_dsl.diagnostics import Diagnostic, error, warning
from perfusion_dsl.nodes import Span

BOM = "\ufeff"
_INDENT_TAB = re.compile(r"^[ ]*\t", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class Source:
    """Decoded text of one file: LF line endings, no BOM, NULs blanked."""

    file: str
    text: str


def span_at(text: str, offset: int, length: int = 1) -> Span:
    """The span of `length` characters at `offset` of `text` (on one line), with its line and
    column (1-based); a zero length still shows one column, for a caret."""
    line = text.count("\n", 0, offset) + 1
    col = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return Span(offset, offset + length, line, col, line, col + max(length, 1))


def point(text: str, offset: int) -> Span:
    """A one-character span at `offset` of `text`."""
    return span_at(text, offset, 1)


def _utf8_error(data: bytes, exc: UnicodeDecodeError, file: str) -> Diagnostic:
    good = data[: exc.start].decode("utf-8", errors="replace")
    return error(
        "invalid-utf8",
        f"file is not valid UTF-8 at byte {exc.start}",
        file,
        point(good, len(good)),
        help="save the file as UTF-8",
    )


def decode(data: bytes, file: str, max_bytes: int) -> tuple[Source | None, list[Diagnostic]]:
    """Decode `data`; None when the file cannot be parsed at all."""
    if len(data) > max_bytes:
        msg = f"spec file is {len(data):,} bytes; the limit is {max_bytes:,}"
        return None, [error("spec-too-large", msg, file, None,
                            help="split it into several files, or raise "
                                 "`max_spec_bytes` in perfusion.toml")]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, [_utf8_error(data, exc, file)]
    diags: list[Diagnostic] = []
    if text.startswith(BOM):
        text = text[1:]
        diags.append(warning("bom", "file starts with a UTF-8 byte order mark; it is ignored",
                             file, point(text, 0), help="`perfusion fmt` removes it"))
    if "\r\n" in text:
        diags.append(warning("crlf", "file uses CRLF line endings", file,
                             point(text, text.index("\r\n")),
                             help="`perfusion fmt` rewrites them as LF"))
        text = text.replace("\r\n", "\n")
    nul = text.find("\0")
    if nul >= 0:
        diags.append(error("nul-byte", "file contains a NUL byte", file, point(text, nul),
                           help="spec files are text; remove the NUL bytes"))
        text = text.replace("\0", " ")
    tab = _indent_tab(text)
    if tab >= 0:
        diags.append(warning("tab-indent", "indentation uses tabs", file, point(text, tab),
                             help="`perfusion fmt` indents with spaces"))
    return Source(file, text), diags


def _indent_tab(text: str) -> int:
    """Offset of the first tab used for indentation, or -1."""
    found = _INDENT_TAB.search(text)
    return found.end() - 1 if found else -1
