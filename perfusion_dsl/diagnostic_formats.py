"""Diagnostics for machines: `perfusion check --format json` (this project's own schema,
`docs/diagnostics.schema.json`) and `--format sarif` (SARIF 2.1.0, which code-scanning
services read). Pure functions of the diagnostics, as `diagnostics.render` is for people;
the fields are described in docs/language.md ("Machine-readable diagnostics")."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from perfusion_dsl.diagnostics import Diagnostic, Label, summary
from perfusion_dsl.nodes import Span

JSON_FORMAT_VERSION = 1
SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"


def _range(span: Span | None) -> dict[str, Any] | None:
    """1-based lines and columns (Unicode code points); the end is exclusive, as in SARIF."""
    if span is None:
        return None
    return {"start": {"line": span.line, "column": span.col},
            "end": {"line": span.end_line, "column": span.end_col}}


def _label(label: Label) -> dict[str, Any]:
    return {"file": label.file, "range": _range(label.span), "message": label.message}


def to_json(diags: Iterable[Diagnostic], files: int, tool_version: str) -> dict[str, Any]:
    """Every diagnostic, in the order `perfusion check` prints them, and the counts."""
    items = sorted(diags, key=Diagnostic.sort_key)
    errors, warnings = summary(items)
    return {
        "format": "perfusion-diagnostics", "version": JSON_FORMAT_VERSION,
        "tool": {"name": "perfusion", "version": tool_version},
        "summary": {"errors": errors, "warnings": warnings, "files": files},
        "diagnostics": [{
            "code": d.code, "severity": d.severity, "message": d.message, "file": d.file,
            "range": _range(d.span), "labels": [_label(label) for label in d.labels],
            "notes": list(d.extra), "help": d.help,
        } for d in items],
    }


def _uri(file: str) -> str:
    """A file as the diagnostics name it (relative to the run root, with `/`), as a
    relative URI reference; an absolute path (a file outside the root) as a file URI."""
    path = Path(file)
    if path.is_absolute():
        return path.as_uri()
    return quote(path.as_posix())


def _location(file: str, span: Span | None) -> dict[str, Any]:
    uri = _uri(file)
    where = {"uri": uri} if uri.startswith("file:") else {"uri": uri, "uriBaseId": "ROOT"}
    physical: dict[str, Any] = {"artifactLocation": where}
    if span is not None:
        physical["region"] = {"startLine": span.line, "startColumn": span.col,
                              "endLine": span.end_line, "endColumn": span.end_col}
    return {"physicalLocation": physical}


def to_sarif(diags: Iterable[Diagnostic], root: Path, tool_version: str) -> dict[str, Any]:
    """One SARIF run: a rule per diagnostic code, a result per diagnostic, labels as
    related locations, help and notes in the result's property bag."""
    items = sorted(diags, key=Diagnostic.sort_key)
    codes = sorted({d.code for d in items})
    rule = {code: i for i, code in enumerate(codes)}
    results = []
    for d in items:
        result: dict[str, Any] = {
            "ruleId": d.code, "ruleIndex": rule[d.code], "level": d.severity,
            "message": {"text": d.message}, "locations": [_location(d.file, d.span)],
        }
        if d.labels:
            result["relatedLocations"] = [
                {"id": i, **_location(label.file, label.span), "message": {"text": label.message}}
                for i, label in enumerate(d.labels)]
        extra: dict[str, Any] = {"help": d.help} if d.help else {}
        extra |= {"notes": list(d.extra)} if d.extra else {}
        if extra:
            result["properties"] = extra
        results.append(result)
    root_uri = root.resolve().as_uri().rstrip("/") + "/"
    return {
        "$schema": SARIF_SCHEMA, "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {
                "name": "perfusion", "version": tool_version,
                "rules": [{"id": code} for code in codes],  # docs/language.md#diagnostics
            }},
            "originalUriBaseIds": {"ROOT": {"uri": root_uri}},
            "columnKind": "unicodeCodePoints",
            "results": results,
        }],
    }
