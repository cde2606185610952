"""The VS Code extension's TextMate grammar (editors/vscode/), run by the engine VS Code runs:
vscode-textmate on vscode-oniguruma, driven by tests/textmate/tokenize.mjs under node.

Every `.concept` file of specs/ and tests/fixtures/ has a golden token listing in
tests/textmate/golden/ (the same relative path, plus `.tokens`). A fixture that is not valid
UTF-8 (tests/fixtures/diagnostics/invalid-utf8/) has none: VS Code would not show its bytes
as this text, and the tokenizer refuses it, which a test checks.

    cd tests/textmate && npm ci                          # the engine, once
    REGEN_TEXTMATE=1 .venv/bin/python -m pytest -q tests/test_textmate.py   # rewrite goldens

As with tests/regen_goldens.py, a rewritten golden is blessed by a person: read its diff.
The engine tests skip only when node or tests/textmate/node_modules is missing; CI installs
both (.ci/run).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from perfusion_dsl.completion import VALUES
from perfusion_dsl.nodes import Bare
from perfusion_dsl.options import SCHEMA
from perfusion_dsl.templates import TOKEN

REPO = Path(__file__).resolve().parent.parent
EXTENSION = REPO / "editors" / "vscode"
MANIFEST = EXTENSION / "package.json"
TEXTMATE = REPO / "tests" / "textmate"
TOKENIZE = TEXTMATE / "tokenize.mjs"
GOLDEN = TEXTMATE / "golden"
LARK = REPO / "grammar" / "concept.lark"
REGEN = os.environ.get("REGEN_TEXTMATE") == "1"
NODE = shutil.which("node")

KEY_SCOPE = "support.type.property-name.option.perfusion"
CONCEPT_SCOPE = "entity.name.type.concept.perfusion"


def _engine_missing() -> str | None:
    if NODE is None:
        return "node is not installed (the TextMate engine runs under node)"
    for package in ("vscode-textmate", "vscode-oniguruma"):
        if not (TEXTMATE / "node_modules" / package).is_dir():
            return f"tests/textmate/node_modules lacks {package}: run `cd tests/textmate && npm ci`"
    return None


_MISSING = _engine_missing()
needs_engine = pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")


# ------------------------------------------------------------------ files and goldens


def _utf8(path: Path) -> bool:
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


ALL_SOURCES = sorted([*(REPO / "specs").glob("*.concept"),
                      *(REPO / "tests" / "fixtures").rglob("*.concept")])
SOURCES = [p for p in ALL_SOURCES if _utf8(p)]
UNDECODABLE = [p for p in ALL_SOURCES if not _utf8(p)]


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def golden_path(source: Path) -> Path:
    return GOLDEN / f"{_rel(source)}.tokens"


# ------------------------------------------------------------------ running the engine


@dataclass(frozen=True)
class Token:
    line: int
    col: int
    text: str
    scopes: tuple[str, ...]

    def has(self, prefix: str) -> bool:
        """Whether a scope is `prefix` or starts with `prefix.` (TextMate selector rule)."""
        return any(s == prefix or s.startswith(prefix + ".") for s in self.scopes)


def _node(args: list[str]) -> subprocess.CompletedProcess[str]:
    assert NODE is not None
    return subprocess.run([NODE, str(TOKENIZE), *args], capture_output=True, text=True,
                          encoding="utf-8", timeout=300, check=False)


def run_engine(paths: list[Path]) -> dict[str, dict[str, Any]]:
    """{path as given: {"tokens": [...], "golden": text}} for every file, in one node run."""
    done = _node(["--json", *map(str, paths)])
    assert done.returncode == 0, done.stderr
    return {entry["file"]: entry for entry in json.loads(done.stdout)}


def _tokens(entry: Mapping[str, Any]) -> list[Token]:
    return [Token(t["line"], t["col"], t["text"], tuple(t["scopes"])) for t in entry["tokens"]]


def tokenize(tmp_path: Path, samples: Mapping[str, str]) -> dict[str, list[Token]]:
    """Each sample text written to a file and tokenized; {sample name: tokens}."""
    paths = {}
    for name, text in samples.items():
        paths[name] = tmp_path / f"{name}.concept"
        paths[name].write_bytes(text.encode("utf-8"))
    out = run_engine(list(paths.values()))
    return {name: _tokens(out[str(path)]) for name, path in paths.items()}


def tokenize_one(tmp_path: Path, text: str) -> list[Token]:
    return tokenize(tmp_path, {"sample": text})["sample"]


def find(tokens: list[Token], text: str, line: int | None = None) -> list[Token]:
    return [t for t in tokens if t.text == text and (line is None or t.line == line)]


def scoped(tokens: list[Token], text: str, scope: str, line: int | None = None) -> bool:
    """Whether some token with exactly `text` (on `line`) has `scope`."""
    return any(t.has(scope) for t in find(tokens, text, line))


@cache
def _all_goldens() -> dict[str, dict[str, Any]]:
    return run_engine(SOURCES)


# ------------------------------------------------------------------ goldens


@needs_engine
@pytest.mark.parametrize("source", SOURCES, ids=_rel)
def test_golden(source: Path) -> None:
    now = _all_goldens()[str(source)]["golden"]
    golden = golden_path(source)
    if REGEN:
        golden.parent.mkdir(parents=True, exist_ok=True)
        if not golden.exists() or golden.read_text("utf-8") != now:
            golden.write_text(now, "utf-8", newline="\n")
    assert golden.exists(), f"no golden for {_rel(source)}: run with REGEN_TEXTMATE=1"
    assert golden.read_text("utf-8") == now, \
        f"{_rel(golden)} differs from the engine's output; if the change is meant, " \
        "rerun with REGEN_TEXTMATE=1 and read the diff"


def test_every_golden_has_its_source() -> None:
    wanted = {golden_path(p) for p in SOURCES}
    stale = sorted(_rel(p) for p in GOLDEN.rglob("*.tokens") if p not in wanted)
    if REGEN:
        for rel in stale:
            (REPO / rel).unlink()
        stale = []
    assert not stale, f"goldens without a source file (delete them): {stale}"


@needs_engine
@pytest.mark.parametrize("source", UNDECODABLE, ids=_rel)
def test_invalid_utf8_is_refused_and_has_no_golden(source: Path) -> None:
    """Skipped on purpose: bytes that are not UTF-8 are not text the grammar could see."""
    done = _node([str(source)])
    assert done.returncode == 1
    assert f"{source}: not valid UTF-8; skipped" in done.stderr
    assert done.stdout == ""
    assert not golden_path(source).exists()


def test_the_goldens_cover_the_examples_and_fixture_kinds() -> None:
    rels = {_rel(p) for p in SOURCES}
    assert {"specs/moon.concept", "specs/tile.concept", "specs/badge.concept"} <= rels
    for kind in ("diagnostics", "fmt", "plans"):
        assert any(r.startswith(f"tests/fixtures/{kind}/") for r in rels), kind
    # the deliberately broken fixtures that are still text are covered
    assert {"tests/fixtures/diagnostics/nul-byte/a.concept",
            "tests/fixtures/diagnostics/bom/a.concept",
            "tests/fixtures/diagnostics/crlf/a.concept"} <= rels
    # the one fixture skipped for not being UTF-8; another one would be skipped silently, so
    # it must be added here on purpose
    assert [_rel(p) for p in UNDECODABLE] == ["tests/fixtures/diagnostics/invalid-utf8/a.concept"]


# ------------------------------------------------------------------ keywords

ALL_KEYWORDS = """\
model "toy:shapes"
use "other.concept"
let outfits = [wizard, pirate]
defaults {
  seed: 7
}
learn photos/*.png as teddy* <teddy bear> adjectives: [fluffy, brown] {
  steps: 400
}
generate "a photo of teddy* as a {outfits}" x 4 {
  strength: [0.3, 0.6]
}
"""


def lark_keywords() -> dict[str, str]:
    """{terminal: word} of every keyword terminal of the grammar (`MODEL: "model"`)."""
    found = re.findall(r'^([A-Z][A-Z_]*):\s*"([A-Za-z]+)"\s*$', LARK.read_text("utf-8"),
                       flags=re.MULTILINE)
    return dict(found)


def test_lark_keywords_are_read() -> None:
    keywords = lark_keywords()
    assert keywords["MODEL"] == "model" and keywords["X"] == "x", keywords
    assert len(keywords) >= 9


@needs_engine
@pytest.mark.parametrize("terminal", sorted(lark_keywords()))
def test_every_keyword_terminal_gets_a_keyword_scope(tmp_path: Path, terminal: str) -> None:
    word = lark_keywords()[terminal]
    tokens = tokenize_one(tmp_path, ALL_KEYWORDS)
    uses = find(tokens, word)
    assert uses, f"add a use of `{word}` ({terminal}) to ALL_KEYWORDS"
    assert any(t.has("keyword") for t in uses), [(t.text, t.scopes) for t in uses]


@needs_engine
def test_keywords_are_not_reserved(tmp_path: Path) -> None:
    """`let x = [a]` is fine (docs/language.md): a keyword elsewhere is a name, word or text."""
    words = sorted(set(lark_keywords().values()))
    text = (f"let x = [{', '.join(words)}]\n"
            f'generate "{" ".join(words)}" x 2\n'
            f"# {' '.join(words)}\n")
    tokens = tokenize_one(tmp_path, text)
    assert scoped(tokens, "x", "entity.name.variable.list", line=1)
    for word in words:
        assert scoped(tokens, word, "string.unquoted.word", line=1), word
    keywords = [(t.line, t.text) for t in tokens
                if t.has("keyword.control") or t.has("keyword.other")]
    assert keywords == [(1, "let"), (2, "generate"), (2, "x")]
    string = [t for t in tokens if t.line == 2 and t.has("string.quoted.double")]
    assert "".join(t.text for t in string) == f'"{" ".join(words)}"'


# ------------------------------------------------------------------ options


def _option_sample(name: str, value: str) -> str:
    kinds = SCHEMA[name].kinds if name in SCHEMA else {"generate"}
    if "learn" in kinds:
        return f"learn a/*.png as a* <cat> {{\n  {name}: {value}\n}}\n"
    return f'generate "a photo" {{\n  {name}: {value}\n}}\n'


@needs_engine
def test_every_option_name_gets_the_option_key_scope(tmp_path: Path) -> None:
    samples = {f"{name}-in-own-block": _option_sample(name, "1") for name in SCHEMA}
    samples |= {f"{name}-in-defaults": f"defaults {{ {name}: 1, seed: 2 }}\n" for name in SCHEMA}
    samples["unknown"] = _option_sample("colour", "red")
    samples["misspelled"] = _option_sample("stesp", "100")
    got = tokenize(tmp_path, samples)
    for name in SCHEMA:
        for where in ("in-own-block", "in-defaults"):
            tokens = got[f"{name}-{where}"]
            assert scoped(tokens, name, KEY_SCOPE), (name, where, tokens)
            assert scoped(tokens, ":", "punctuation.separator.key-value"), name
    for name, key in (("unknown", "colour"), ("misspelled", "stesp")):
        tokens = got[name]
        assert not scoped(tokens, key, KEY_SCOPE)
        assert scoped(tokens, key, "variable.other.property")


@needs_engine
def test_every_value_of_an_enumerated_option_gets_a_constant_scope(tmp_path: Path) -> None:
    # VALUES: the options with a fixed set of values, as completion offers them; each value
    # must be one the option accepts
    assert set(VALUES) <= set(SCHEMA)
    pairs = [(key, value) for key, values in VALUES.items() for value in values]
    for key, value in pairs:
        SCHEMA[key].parse(Bare(value), key)
    got = tokenize(tmp_path, {f"{k}-{v}": _option_sample(k, v) for k, v in pairs})
    for key, value in pairs:
        tokens = got[f"{key}-{value}"]
        assert scoped(tokens, value, "constant"), (key, value, find(tokens, value))
    # a path that happens to be named like a choice of another option is a path
    tokens = tokenize_one(tmp_path, _option_sample("out", "none"))
    assert scoped(tokens, "none", "string.unquoted") and not scoped(tokens, "none", "constant")


# ------------------------------------------------------------------ constructs


@needs_engine
def test_a_token_inside_a_template_string(tmp_path: Path) -> None:
    tokens = tokenize_one(tmp_path, 'generate "a moon* at the {places}, {a|b} tile*"\n')
    for token in ("moon*", "tile*"):
        (hit,) = find(tokens, token)
        assert hit.has(CONCEPT_SCOPE) and hit.has("string.quoted.double.perfusion"), hit
    assert scoped(tokens, "a ", "string.quoted.double")
    # `5 * 3` and `4*` are text (docs/language.md, templates); the edge cases are the
    # compiler's own
    template = "5 * 3, 4*, 9a*, -q*, x-y*z, _b*, éq*, {c*|d*}"
    tokens = tokenize_one(tmp_path, f'generate "{template}"\n')
    marked = [t.text for t in tokens if t.has(CONCEPT_SCOPE)]
    assert marked == TOKEN.findall(template) == ["x-y*", "_b*", "q*", "c*", "d*"]


@needs_engine
def test_a_token_is_one_token_wherever_it_is_named(tmp_path: Path) -> None:
    tokens = tokenize_one(tmp_path, 'learn a.png as my-dog* <dog>\nlet x = ["my-dog* in a hat"]\n'
                                    'generate "{my-dog*|a cat}"\n')
    assert [t.line for t in tokens if t.text == "my-dog*" and t.has(CONCEPT_SCOPE)] == [1, 2, 3]


@needs_engine
def test_template_slots(tmp_path: Path) -> None:
    tokens = tokenize_one(tmp_path, 'generate "in {a forest|the snow} as {  outfits }"\n')
    (bar,) = find(tokens, "|")
    assert bar.has("keyword.operator.alternation") and bar.has("meta.template.slot")
    for alternative in ("a forest", "the snow"):
        (alt,) = find(tokens, alternative)
        assert alt.has("meta.template.slot") and alt.has("string.quoted.double"), alt
    (name,) = find(tokens, "outfits")
    assert name.has("variable.other.list") and name.has("meta.template.slot")
    braces = [t for t in tokens if t.text in ("{", "}")]
    assert len(braces) == 4
    assert all(t.has("punctuation.definition.template-expression") for t in braces)


@needs_engine
def test_template_escapes_and_errors(tmp_path: Path) -> None:
    tokens = tokenize_one(tmp_path, 'generate "\\{x\\} \\| \\"q\\" \\\\ \\n \\t \\q}"\n')
    for escape in ("\\{", "\\}", "\\|", '\\"', "\\\\", "\\n", "\\t"):
        assert scoped(tokens, escape, "constant.character.escape"), escape
    assert scoped(tokens, "\\q", "invalid.illegal.escape")
    assert scoped(tokens, "}", "invalid.illegal.unmatched-brace")
    assert not any(t.has("meta.template.slot") for t in tokens)
    tokens = tokenize_one(tmp_path, 'generate "{a {b|c} d|e}"\n')
    assert scoped(tokens, "{", "invalid.illegal.nested-group")


@needs_engine
def test_supercategories(tmp_path: Path) -> None:
    tokens = tokenize_one(tmp_path, 'learn a.png as dog* <teddy bear, "golden retriever", dog>\n')
    for super_ in ("teddy bear", "golden retriever", "dog"):
        (hit,) = find(tokens, super_)
        assert hit.has("entity.name.class.supercategory") and hit.has("meta.supercategories")
    assert scoped(tokens, "<", "punctuation.definition.supercategories.begin")
    assert scoped(tokens, ">", "punctuation.definition.supercategories.end")
    assert len([t for t in tokens if t.text == "," and t.has("punctuation.separator")]) == 2


@needs_engine
def test_comments(tmp_path: Path) -> None:
    tokens = tokenize_one(tmp_path, '# a note\ngenerate "# not a comment" {  # a comment\n'
                                    "  seed: 1  # seed\n}  # done\n")
    comments = {t.line: t.text for t in tokens if t.has("comment.line.number-sign")
                and not t.has("punctuation.definition.comment")}
    assert comments == {1: " a note", 2: " a comment", 3: " seed", 4: " done"}
    assert scoped(tokens, "# not a comment", "string.quoted.double")


@needs_engine
def test_numbers_sizes_booleans(tmp_path: Path) -> None:
    values = {"400": "integer", "-1": "integer", "+5": "integer", "0.75": "float",
              ".5": "float", "3e-4": "float", "1E+3": "float", "7.": "float"}
    text = "".join(f'generate "a" {{ guidance: {v} }}\n' for v in values)
    text += 'generate "b" { size: 512x512, strength: [0.2, 1] }\n'
    text += 'generate "c" { guidance: inf, out: 64x64/renders }\n'
    tokens = tokenize_one(tmp_path, text + "learn a.png as a* <b> { flip: true }\n")
    for value, kind in values.items():
        assert scoped(tokens, value, f"constant.numeric.{kind}"), value
    assert scoped(tokens, "512x512", "constant.numeric.size")
    assert scoped(tokens, "0.2", "constant.numeric.float")
    assert scoped(tokens, "1", "constant.numeric.integer")
    assert scoped(tokens, "true", "constant.language.boolean")
    # `inf` is not a number (docs/language.md); a path that starts like a size is a path
    assert not any(t.has("constant") for t in find(tokens, "inf"))
    assert scoped(tokens, "64x64/renders", "string.unquoted.path")


@needs_engine
def test_count_after_a_template(tmp_path: Path) -> None:
    tokens = tokenize_one(tmp_path, 'generate "x"x 4{seed: 1}\ngenerate "y"\tx\t2\n')
    assert scoped(tokens, "x", "keyword.other.count", line=1)
    assert scoped(tokens, "4", "constant.numeric.integer", line=1)
    assert scoped(tokens, "x", "string.quoted.double", line=1)
    assert scoped(tokens, "x", "keyword.other.count", line=2)
    assert scoped(tokens, "2", "constant.numeric.integer", line=2)


@needs_engine
def test_let_lists_and_patterns(tmp_path: Path) -> None:
    tokens = tokenize_one(tmp_path, 'let sizes = [\n  small, 3\n  "very {large}"\n]\n'
                                    "learn photos/**/[ab]?.png as a* <b> { mask: m/*.png }\n")
    assert scoped(tokens, "sizes", "entity.name.variable.list")
    assert scoped(tokens, "=", "keyword.operator.assignment")
    assert scoped(tokens, "small", "string.unquoted.word")
    assert scoped(tokens, "3", "constant.numeric.integer")
    # braces in a `let` item are plain text, not a group (docs/language.md)
    assert scoped(tokens, "very {large}", "string.quoted.double")
    assert not any(t.has("meta.template.slot") for t in tokens)
    assert scoped(tokens, "]", "punctuation.definition.list.end", line=4)
    for wildcard in ("**", "[ab]", "?", "*"):
        assert any(t.text == wildcard and t.has("keyword.operator.glob")
                   and t.has("string.unquoted.path") for t in tokens), wildcard
    assert scoped(tokens, "photos/", "string.unquoted.path")
    assert scoped(tokens, "m/", "string.unquoted.path")


@needs_engine
def test_caption_templates(tmp_path: Path) -> None:
    tokens = tokenize_one(tmp_path, 'learn a.png as a* <b> {\n  templates: ["a {} here", "x"]\n}\n')
    assert scoped(tokens, "{}", "constant.other.placeholder")


@needs_engine
def test_an_unclosed_block_or_list_stops_at_the_next_statement(tmp_path: Path) -> None:
    tokens = tokenize_one(tmp_path, 'generate "a" {\n  seed: 1\nlet xs = [a,\n'
                                    'learn b.png as b* <c>\ngenerate "d*"\n')
    assert scoped(tokens, "let", "keyword.control", line=3)
    (learn,) = find(tokens, "learn")
    assert learn.has("keyword.control") and not learn.has("meta.block")
    assert not learn.has("meta.list")
    assert scoped(tokens, "d*", CONCEPT_SCOPE)


@needs_engine
def test_line_endings_and_byte_order_mark_do_not_change_tokens(tmp_path: Path) -> None:
    text = (REPO / "specs" / "moon.concept").read_text("utf-8")
    got = tokenize(tmp_path, {"lf": text, "crlf": text.replace("\n", "\r\n"),
                              "bom": "\ufeff" + text})
    assert got["crlf"] == got["lf"]
    assert got["bom"] == got["lf"]


@needs_engine
def test_specs_tokens_are_exactly_the_compilers(tmp_path: Path) -> None:
    """On every `generate` line of the examples, the highlighted concept tokens are the ones
    the compiler finds (`templates.TOKEN`)."""
    out = _all_goldens()
    checked = 0
    for source in sorted((REPO / "specs").glob("*.concept")):
        tokens = _tokens(out[str(source)])
        for number, line in enumerate(source.read_text("utf-8").splitlines(), 1):
            if not line.lstrip().startswith("generate"):
                continue
            template = line.split('"', 1)[1].rsplit('"', 1)[0]
            marked = [t.text for t in tokens if t.line == number and t.has(CONCEPT_SCOPE)]
            assert marked == TOKEN.findall(template), (source.name, number)
            checked += len(marked)
    assert checked >= 5


# ------------------------------------------------------------------ manifest and JSON files


def _json(path: Path) -> Any:
    return json.loads(path.read_text("utf-8"))


def test_extension_manifest_is_consistent() -> None:
    manifest = _json(MANIFEST)
    assert manifest["name"] == "perfusion-concepts"
    assert manifest["publisher"] == "perfusion"
    assert manifest["engines"]["vscode"] == "^1.85.0"
    assert (EXTENSION / manifest["main"]).is_file()
    assert manifest["dependencies"]["vscode-languageclient"].startswith("^9.")
    (language,) = manifest["contributes"]["languages"]
    (grammar,) = manifest["contributes"]["grammars"]
    assert language["id"] == grammar["language"] == "perfusion"
    assert language["extensions"] == [".concept"]
    assert language["aliases"]
    tm = _json(EXTENSION / grammar["path"])
    assert grammar["scopeName"] == tm["scopeName"] == "source.perfusion"
    configuration = _json(EXTENSION / language["configuration"])
    assert configuration["comments"]["lineComment"] == "#"
    setting = manifest["contributes"]["configuration"]["properties"]["perfusion.server.path"]
    assert setting["type"] == "string" and setting["default"] == "perfusion"
    # it names a program to run: an untrusted workspace may not set it
    untrusted = manifest["capabilities"]["untrustedWorkspaces"]
    assert untrusted["restrictedConfigurations"] == ["perfusion.server.path"]
    # the server is started for that language id and with the setting
    extension_js = (EXTENSION / manifest["main"]).read_text("utf-8")
    assert 'language: "perfusion"' in extension_js
    assert 'getConfiguration("perfusion").get("server.path")' in extension_js
    assert 'args: ["lsp"]' in extension_js
    for command in manifest["contributes"]["commands"]:
        assert f'"{command["command"]}"' in extension_js


def test_language_configuration() -> None:
    configuration = _json(EXTENSION / "language-configuration.json")
    pairs = {p["open"]: p for p in configuration["autoClosingPairs"]}
    assert set(pairs) == {"{", "[", '"', "<"}
    assert "string" in pairs['"']["notIn"]
    assert configuration["brackets"] == [["{", "}"], ["[", "]"], ["<", ">"]]
    # the word pattern (a JS regex; these constructs mean the same in Python) keeps a
    # token one word, and a number one word
    word = re.compile(configuration["wordPattern"])
    assert word.findall("a moon* at my-dog* 0.75 3e-4") == \
        ["a", "moon*", "at", "my-dog*", "0.75", "3e-4"]
    for rule in configuration["indentationRules"].values():
        re.compile(rule)


def _includes(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["include"]] if "include" in node else []
        return own + [i for value in node.values() for i in _includes(value)]
    if isinstance(node, list):
        return [i for value in node for i in _includes(value)]
    return []


def test_grammar_includes_resolve_and_every_rule_is_used() -> None:
    tm = _json(EXTENSION / "syntaxes" / "perfusion.tmLanguage.json")
    repository = tm["repository"]
    used = {i.removeprefix("#") for i in _includes(tm)}
    assert all(i in repository for i in used), sorted(used - set(repository))
    assert set(repository) <= used, sorted(set(repository) - used)
    # every name ends with the language's suffix, as TextMate conventions ask
    names = re.findall(r'"(?:name|contentName)": "([^"]+)"', json.dumps(repository))
    assert names and all(part.endswith(".perfusion") for n in names for part in n.split())


def test_the_test_engine_is_pinned() -> None:
    package = _json(TEXTMATE / "package.json")
    lock = _json(TEXTMATE / "package-lock.json")
    pinned = package["devDependencies"]
    assert set(pinned) == {"vscode-textmate", "vscode-oniguruma"}
    for name, version in pinned.items():
        assert re.fullmatch(r"\d+\.\d+\.\d+", version), (name, version)
        assert lock["packages"][f"node_modules/{name}"]["version"] == version
    assert "node_modules/" in (TEXTMATE / ".gitignore").read_text("utf-8").split()
