"""Fuzzing the front end: grammar-generated specs (F1) and mutated specs, text and bytes (F3).

F1 generates programs from `grammar/concept.lark` with `hypothesis.extra.lark.from_lark` and
parses every one with the production parser (`parser()`: LALR, contextual lexer). `from_lark`
ignores the lexer and joins terminals with nothing between them, so every terminal gets an
explicit strategy here that produces text the contextual lexer reads back as that terminal:

- word-like terminals (keywords, NAME, TOKEN, BARE, GLOB) carry trailing blanks, so
  `learn` + `photos/*.png` + `as` never run together into one GLOB;
- `COMMENT` is `%ignore`d, and `from_lark` may put an ignored terminal after any symbol,
  where a `#` would swallow the rest of the line; comments are generated inside `_NL`
  instead (a trailing comment before the newline, comment-only lines after it);
- BARE/GLOB values are drawn mostly from realistic values (numbers, `none`, `local`, sizes,
  globs that match the workspace's images) and sometimes from the terminal's own regex.

Every generated text must parse with zero diagnostics and compile (`compile_paths`) raising
nothing; F3 feeds mutations of valid specs and random text/bytes through `decode` + `parse`
and `compile_paths`: only diagnostics or a plan may come out, quickly, and every diagnostic
must read well (no Lark terminal names, no `-1`) and point inside the file.

Profiles: `PERFUSION_FUZZ=thorough` for 2,000 examples per property (see fuzz_profiles.py).
Each property prints how many examples ran and the slowest one.
"""

from __future__ import annotations

import re
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers import with_spans
from hypothesis import example, given, target
from hypothesis import strategies as st
from hypothesis.extra.lark import from_lark
from lark import Lark
from PIL import Image

from perfusion_dsl.compiler import compile_paths
from perfusion_dsl.diagnostics import Diagnostic, render_all
from perfusion_dsl.limits import DEFAULT_LIMITS
from perfusion_dsl.parser import Parsed, parse, parser
from perfusion_dsl.source import Source, decode, point

try:
    from fuzz_profiles import FUZZ_SETTINGS, MAX_EXAMPLES, PROFILE
except ImportError:  # pragma: no cover - when tests/ becomes a package
    from tests.fuzz_profiles import FUZZ_SETTINGS, MAX_EXAMPLES, PROFILE

SPEC_NAME = "x.concept"
TARGET_SECONDS = 1.0  # per example, decode + parse + compile (F3, D8)
MAX_SECONDS = 5.0  # what the tests assert, so that slow CI machines do not flake
FORBIDDEN = ("$END", "_NL", "RBRACE", "Token(", "-1:")

# ------------------------------------------------------------------------------- seeds

LANGUAGE_EXAMPLE = """\
# specs/teddy.concept
model "toy:shapes"

let outfits = [wizard, pirate, "space cadet"]

defaults {
  seed: 7
}

learn photos/teddy/*.png as teddy* <teddy bear> adjectives: [fluffy, brown] {
  steps: 400
  lock: local
}

learn myface*.png as me* <person, human> adjectives: [tall, bearded, stocky]

generate "a photo of teddy* dressed as a {outfits}" x 4 {
  strength: [0.3, 0.6, 0.9]
}

generate "me* hugging teddy* in {a forest|the snow}"
"""

SHARED_SPEC = """\
learn "../photos/teddy/0.png" as lib* <toy>
"""

EVERY_OPTION = """\
use "lib/shared.concept"
let colors = [
  red
  "sky blue",   # a phrase
  3,
]
defaults { seed: 1, steps: 20, guidance: 2.5 }

learn "photos/teddy/[01].png" as my-dog* <"small dog", pet> {
  steps: 3, batch: 2, lr: 3e-4, embedding_lr: 0.006
  lock: global
  mask: masks/*.png
  resolution: 8
  flip: false
  seed: 0
  templates: ["a photo of {}", "a {} on a table"]
  beta: 0.75, tau: 0.1
}

generate "my-dog* and lib* in \\{braces\\} \\| {colors} {red|green}" x 2 {
  strength: 1, size: 16x16, negative: "blurry \\"text\\"", out: renders/dogs
}
"""

SMALL = """\
model "toy:shapes"
learn myface*.png as me* <person> {mask: attention}
generate "me*"
generate "plain\\tprompt\\n" {strength: [0, 0.5, 1], steps: 1, size: 8x8}
"""

SEEDS = (LANGUAGE_EXAMPLE, EVERY_OPTION, SMALL)

# ----------------------------------------------------------------------------- workspace


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run root with images the seeds' patterns match, and a spec they can `use`."""
    root = tmp_path_factory.mktemp("fuzz")
    for folder, stems in (("photos/teddy", "01"), ("masks", "01"), (".", "0")):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for stem in stems:
            name = f"myface{stem}.png" if folder == "." else f"{stem}.png"
            Image.new("RGB", (8, 8), (40 * int(stem), 90, 160)).save(root / folder / name)
    (root / "lib").mkdir()
    (root / "lib" / "shared.concept").write_text(SHARED_SPEC, "utf-8")
    (root / SPEC_NAME).write_text(LANGUAGE_EXAMPLE, "utf-8")
    return root


@dataclass
class Tally:
    """What one property saw; printed after it ran (`-s` not needed)."""

    name: str
    examples: int = 0
    ok: int = 0  # compiled without errors (a plan was built)
    diagnostics: int = 0
    slowest: float = 0.0
    codes: set[str] = field(default_factory=set)
    statements: set[str] = field(default_factory=set)
    known_bugs: int = 0  # crashes with an xfail test of their own (see KNOWN_BUGS)
    over_target: int = 0  # examples slower than TARGET_SECONDS (reported, not failed)

    slowest_input: str = ""

    def timed(self, started: float, sample: str | bytes, steer: bool = False) -> None:
        """One example done: it must take under MAX_SECONDS, all stages together."""
        elapsed = time.perf_counter() - started
        assert elapsed < MAX_SECONDS, f"example took {elapsed:.2f} s"
        if steer:  # F3: steer the search towards slow inputs
            target(elapsed, label="seconds per example")
        if elapsed > self.slowest:
            self.slowest = elapsed
            self.slowest_input = f"{len(sample):,} long: {sample[:60]!r}"
        self.over_target += elapsed >= TARGET_SECONDS

    def line(self, elapsed: float) -> str:
        return (f"{self.name} [{PROFILE}]: {self.examples} examples in {elapsed:.1f} s, "
                f"{self.ok} compiled to a plan, {self.diagnostics} diagnostics "
                f"({len(self.codes)} codes), slowest example {self.slowest * 1000:.0f} ms "
                f"({self.slowest_input})"
                f", {self.over_target} over {TARGET_SECONDS:g} s"
                + (f", {self.known_bugs} hit a known bug" if self.known_bugs else ""))


@pytest.fixture
def tally(request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str],
          record_property: Callable[[str, object], None]) -> Iterable[Tally]:
    seen = Tally(request.node.name.removeprefix("test_"))
    started = time.perf_counter()
    yield seen
    elapsed = time.perf_counter() - started
    record_property("fuzz_examples", seen.examples)
    record_property("fuzz_seconds", round(elapsed, 2))
    with capsys.disabled():
        print("\n" + seen.line(elapsed))


# ------------------------------------------------------------------------------ checks


def _lines(text: str) -> list[str]:
    return text.split("\n")


def _check_span(diag: Diagnostic, span: Any, text: str | None) -> None:
    where = f"{diag.code} {diag.message!r} at {span}"
    assert span.line >= 1 and span.col >= 1, where
    assert span.end_line >= span.line, where
    if text is None:
        return
    lines = _lines(text)
    assert span.line <= len(lines) + 1, f"{where}: file has {len(lines)} lines"
    # The caret is drawn from line/col, tools use the offset: they must agree.
    at = point(text, span.start)
    assert (at.line, at.col) == (span.line, span.col), f"{where}: offset is at {at}"
    if span.line <= len(lines):
        # One past the end of the line is where "end of line" errors point.
        assert span.col <= len(lines[span.line - 1]) + 2, \
            f"{where}: line {span.line} is {lines[span.line - 1]!r}"


def _check_diagnostics(diags: list[Diagnostic], texts: dict[str, str]) -> None:
    for diag in diags:
        assert isinstance(diag, Diagnostic)
        words = " ".join((diag.message, diag.help or "", *diag.extra,
                          *(label.message for label in diag.labels)))
        for bad in FORBIDDEN:  # unless quoting the author's own text
            assert bad not in words or bad in texts.get(diag.file, ""), \
                f"{bad!r} shown to the user: {diag}"
        if diag.span is not None:
            _check_span(diag, diag.span, texts.get(diag.file))
        for label in diag.labels:
            _check_span(diag, label.span, texts.get(label.file))


def _compile(root: Path, data: bytes, tally: Tally) -> list[Diagnostic]:
    """Compile the workspace with `x.concept` holding `data`: diagnostics or a plan, fast."""
    (root / SPEC_NAME).write_bytes(data)
    started = time.perf_counter()
    try:
        result = compile_paths([root], root=root)
    except Exception as exc:
        if not _known_bug(exc):
            raise
        tally.known_bugs += 1
        return []
    diags = result.diagnostics
    if result.ok:
        result.plan()
        tally.ok += 1
    shown = render_all(diags, result.context.sources())
    elapsed = time.perf_counter() - started
    assert isinstance(shown, str)
    assert elapsed < MAX_SECONDS, f"compiling took {elapsed:.2f} s"
    source, _ = decode(data, SPEC_NAME, DEFAULT_LIMITS.max_spec_bytes)
    texts = {u.file: u.source.text for u in result.context.units.values()}
    texts[SPEC_NAME] = source.text if source else data.decode("utf-8", errors="replace")
    _check_diagnostics(diags, texts)
    tally.diagnostics += len(diags)
    tally.codes.update(d.code for d in diags)
    return diags


# Crashes already found, each with an xfail(strict=True) test below that reproduces it: the
# fuzz properties skip them (and count them) so they keep hunting for new ones. When a fix
# lands, its xfail test XPASSes and fails: delete it and its entry here.
KNOWN_BUGS: tuple[tuple[type[BaseException], str, str], ...] = ()


def _known_bug(exc: BaseException) -> bool:
    frames = traceback.extract_tb(exc.__traceback__)
    last = frames[-1] if frames else None
    return last is not None and any(
        isinstance(exc, kind) and last.filename.endswith(file) and last.name == func
        for kind, file, func in KNOWN_BUGS)


def _parse_checked(source: Source, tally: Tally) -> Parsed:
    started = time.perf_counter()
    parsed = parse(source)
    elapsed = time.perf_counter() - started
    assert elapsed < MAX_SECONDS, f"parsing took {elapsed:.2f} s"
    _check_diagnostics(list(parsed.diagnostics), {source.file: source.text})
    # an editor's buffer is parsed statement by statement: the same tree, spans and errors
    again = parse(source, by_statement=True)
    assert with_spans(again.module) == with_spans(parsed.module)
    assert (again.diagnostics, again.broken_names) == (parsed.diagnostics, parsed.broken_names)
    return parsed


# ------------------------------------------------------------------- F1: from the grammar


def generation_grammar() -> Lark:
    """The production parser itself: it keeps its grammar even when loaded from Lark's cache
    (`cache_grammar=True`; see test_F1_production_parser_keeps_its_grammar)."""
    return parser()


KEYWORDS = ("model", "use", "let", "defaults", "learn", "generate", "as", "adjectives", "x")
OPTION_KEYS = ("steps", "batch", "lr", "embedding_lr", "lock", "mask", "resolution", "flip",
               "seed", "templates", "beta", "tau", "strength", "guidance", "size", "negative",
               "out", "stepz", "Seed")
LET_NAMES = ("outfits", "colors", "places")
CONCEPTS = ("teddy*", "me*", "my-dog*", "lib*", "learn*", "x*", "tedy*")
WORDS = ("fluffy", "brown", "wizard", "pirate", "teddy", "bear", "person", "human", "red")
NUMBERS = ("0", "1", "4", "7", "400", "0.5", "0.75", "3e-4", "1e-4", "-1", "+2", "1.5e3",
           "1e309", "99999999999999999999", "nan", "inf", "1_000", "0x10", "00", ".5")
SYMBOLS = ("true", "false", "none", "attention", "local", "global", "yes")
SIZES = ("512x512", "8x8", "16x8", "0x0", "64x", "1x99999999", "8X8")
GLOBS = ("photos/teddy/*.png", "photos/**/*.png", "photos/teddy/[01].png", "*.png",
         "myface*.png", "masks/*.png", "photos/teddy/0.png", "nothing/*.png", "photos",
         "renders/out", "../outside", "lib/shared.concept", "**", "?yface0.png")
STRINGS = ('"toy:shapes"', '"toy:other"', '"lib/shared.concept"', '"x.concept"',
           '"lib/gen.concept"', '"../x.concept"', '"gen.concept"',
           '"missing.concept"', '"photos/teddy/*.png"', '"../escape"', '""', '"renders"',
           '"a photo of {}"', '"{} and {}"')
TEMPLATE_PIECES = ("a photo of", "teddy*", "me*", "lib*", "tedy*", "{outfits}", "{colors}",
                   "{a forest|the snow}", "{a|b|c}", "\\{", "\\}", "\\|", '\\"', "\\\\",
                   "\\n", "\\t", "\\q", "{}", "{ }", "{nope}", "{|}", "{a|{b}}", "}", "{",
                   "é", "🧸", "in", "{}")

_BLANK = st.sampled_from((" ", " ", "  ", "\t", " \f"))
_MAYBE_BLANK = st.sampled_from(("", "", " ", "\t"))


def _regex(name: str, pattern: str) -> st.SearchStrategy[str]:
    """Texts the production lexer reads, entirely, as the terminal `name`."""
    whole = re.compile(pattern)
    alphabet = st.characters(codec="utf-8")
    return st.from_regex(pattern, fullmatch=True, alphabet=alphabet).filter(
        lambda s: (m := whole.match(s)) is not None and m.end() == len(s)).filter(
        _inside_workspace)


def _inside_workspace(s: str) -> bool:
    """Random paths and globs stay inside the workspace: a pattern such as `/**/x.png`
    walks the whole disk (seconds; see the report in the fuzzing notes)."""
    return not s.lstrip('"').startswith("/") and ".." not in s


def _word(values: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.tuples(values, _BLANK).map("".join)


def _punct(symbol: str) -> st.SearchStrategy[str]:
    return st.tuples(st.just(symbol), _MAYBE_BLANK).map("".join)


_COMMENT_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\n\r"), max_size=12)
_COMMENT = st.tuples(_MAYBE_BLANK, _COMMENT_TEXT).map(lambda t: f"{t[0]}#{t[1]}")
_EOL = st.sampled_from(("\n", "\n", "\n", "\r\n"))
_INDENT = st.sampled_from(("", "", "  ", "\t", " \t ", "\f"))


@st.composite
def _newline(draw: st.DrawFn) -> str:
    """`_NL`: an optional trailing comment, then newlines with blank/comment-only lines."""
    out = draw(st.one_of(st.just(""), st.tuples(_MAYBE_BLANK, _COMMENT).map("".join)))
    out += draw(_EOL)
    for _ in range(draw(st.integers(0, 2))):
        out += draw(_INDENT) + draw(st.one_of(st.just(""), _COMMENT)) + draw(_EOL)
    return out + draw(_INDENT)


@st.composite
def _template(draw: st.DrawFn) -> str:
    pieces = draw(st.lists(st.sampled_from(TEMPLATE_PIECES), max_size=6))
    return '"' + " ".join(pieces) + '"'


def terminal_strategies(grammar: Lark) -> dict[str, st.SearchStrategy[str]]:
    patterns = {t.name: t.pattern.to_regexp() for t in grammar.terminals}
    value_pool = NUMBERS + SYMBOLS + SIZES + WORDS
    strategies: dict[str, st.SearchStrategy[str]] = {
        kw.upper(): _word(st.just(kw)) for kw in KEYWORDS
    }
    strategies.update({
        "EQUALS": _punct("="), "COLON": _punct(":"), "COMMA": _punct(","),
        "LANGLE": _punct("<"), "RANGLE": _punct(">"), "LBRACE": _punct("{"),
        "RBRACE": _punct("}"), "LBRACK": _punct("["), "RBRACK": _punct("]"),
        "NAME": _word(st.one_of(st.sampled_from(OPTION_KEYS), st.sampled_from(LET_NAMES),
                                st.sampled_from(KEYWORDS), _regex("NAME", patterns["NAME"]))),
        "TOKEN": _word(st.one_of(st.sampled_from(CONCEPTS), _regex("TOKEN", patterns["TOKEN"]))),
        "STRING": _word(st.one_of(_template(), st.sampled_from(STRINGS),
                                  _regex("STRING", patterns["STRING"]))),
        "GLOB": _word(st.one_of(st.sampled_from(value_pool + GLOBS),
                                _regex("GLOB", patterns["GLOB"]))),
        "BARE": _word(st.one_of(st.sampled_from(value_pool + CONCEPTS + ("x", "as")),
                                _regex("BARE", patterns["BARE"]))),
        "_NL": _newline(),
        "WS": _BLANK,
        # Ignored terminals land anywhere; a comment there would eat the rest of the line.
        "COMMENT": _BLANK,
    })
    return strategies


_GRAMMAR = generation_grammar()
_EXPLICIT = terminal_strategies(_GRAMMAR)
GENERATED_SPECS = from_lark(_GRAMMAR, start="start", explicit=_EXPLICIT)


def test_F1_every_terminal_has_an_explicit_strategy() -> None:
    """A new terminal in the grammar needs a strategy here (what the lexer will read back)."""
    assert {t.name for t in _GRAMMAR.terminals} == set(_EXPLICIT)
    prod = parser()
    assert prod.options.lexer == "contextual" and prod.options.parser == "lalr"
    assert {(t.name, t.pattern.to_regexp()) for t in prod.terminals} == \
        {(t.name, t.pattern.to_regexp()) for t in _GRAMMAR.terminals}


@given(st.data())
@FUZZ_SETTINGS
def test_F1_terminal_strategies_lex_as_their_terminal(data: st.DataObject) -> None:
    """Each explicit strategy's output (blanks stripped) fully matches its terminal."""
    patterns = {t.name: re.compile(t.pattern.to_regexp()) for t in _GRAMMAR.terminals}
    for name in sorted(_EXPLICIT):
        text = data.draw(_EXPLICIT[name], label=name)
        if name in ("WS", "COMMENT", "_NL"):
            continue
        core = text.rstrip(" \t\f")
        assert patterns[name].fullmatch(core), (name, text)


def test_F1_generated_specs_parse_and_compile(workspace: Path, tally: Tally) -> None:
    other = workspace / "lib" / "gen.concept"  # a second file, for `use` between them

    # A second file a quarter of the time: its errors would keep most runs from a plan.
    @given(spec=GENERATED_SPECS, second=st.sampled_from((None, None, None, "")).flatmap(
        lambda none: st.none() if none is None else GENERATED_SPECS))
    @FUZZ_SETTINGS
    def check(spec: str, second: str | None) -> None:
        tally.examples += 1
        started = time.perf_counter()
        for text in (spec, second or ""):
            parsed = _parse_checked(Source(SPEC_NAME, text), tally)
            diags = parsed.diagnostics
            assert diags == (), f"generated spec does not parse: {diags[0].message}\n{text}"
            parser().parse(text)  # the production Lark object itself, tree and all
            tally.statements.update(type(s).__name__ for s in parsed.module.statements)
        if second is None:
            other.unlink(missing_ok=True)
        else:
            other.write_text(second, "utf-8")
        out = _compile(workspace, spec.encode("utf-8"), tally)
        # decode() only normalises (CRLF, NUL, tabs): it never makes valid text invalid.
        assert not [d for d in out if d.code == "syntax"], out
        tally.timed(started, spec)

    check()
    other.unlink(missing_ok=True)
    assert tally.examples >= min(MAX_EXAMPLES, 100)
    # A guard against a degenerate strategy: every statement kind was generated.
    assert tally.statements >= {"Model", "Use", "Let", "Defaults", "Learn", "Generate"}


def test_F1_seeds_are_valid(workspace: Path) -> None:
    """The F3 seeds compile to a plan: mutations start from valid specs."""
    for seed in SEEDS:
        assert parse(Source(SPEC_NAME, seed)).diagnostics == ()
        (workspace / SPEC_NAME).write_text(seed, "utf-8")
        result = compile_paths([workspace], root=workspace)
        assert result.ok, render_all(result.diagnostics, result.context.sources())
        assert result.plan() is not None


def test_F1_parser_builds_in_strict_mode() -> None:
    """`strict=True` (needs `interegular`) rejects terminal collisions Lark would resolve
    silently; the grammar must build under it and parse like the production parser."""
    import interegular  # noqa: F401  (strict mode is meaningless without it)

    strict = parser(strict=True)
    assert strict.options.strict
    assert strict.options.lexer == "contextual"
    for seed in SEEDS:
        assert strict.parse(seed) == parser().parse(seed)


def test_F1_production_parser_keeps_its_grammar(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    parser.__wrapped__(False)  # builds and writes the cache file
    cached = parser.__wrapped__(False)  # what every later process gets
    from_lark(cached, start="start", explicit=_EXPLICIT).validate()


# ----------------------------------------------------------------------- F3: mutations

HOSTILE = ("\0", "\r", "\ufeff", "\u2028", "\x85", "\x0b", "\x0c", "\t", "\\", '"', "{", "}",
           "[", "]", "<", ">", "#", "*", ",", ":", "=", "|", "\n", " ", "é", "🧸", "\u0301",
           "\U0010ffff", "\ud7ff", "\u200b", "$", "-", "1", "a", "x")
VOCAB = (*KEYWORDS, "=", ":", ",", "<", ">", "{", "}", "[", "]", "\n", "\r\n", '"', '"a"',
         '"{a|b}"', '"unterminated', "teddy*", "400", "-1", "1e999", "\\", "#", "# c\n",
         "{outfits}", "*", "**", "\0", "\ufeff", "$END", "_NL", "\t")
_PIECE = re.compile(r'"(?:[^"\\\n]|\\.)*"?|[A-Za-z0-9_.\-/*?+]+|[ \t]+|.', re.DOTALL)


def _pos(draw: st.DrawFn, text: str | bytes) -> int:
    return draw(st.integers(0, len(text)))


@st.composite
def mutated_text(draw: st.DrawFn) -> str:
    text = draw(st.sampled_from(SEEDS))
    hostile = st.text(st.one_of(st.sampled_from(HOSTILE), st.characters(codec="utf-8")),
                      min_size=1, max_size=8)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(("delete", "insert", "duplicate", "swap", "truncate",
                                   "token-delete", "token-duplicate", "token-swap",
                                   "token-insert", "token-replace", "line-from-seed")))
        i = _pos(draw, text)
        n = draw(st.integers(1, 24))
        pieces = _PIECE.findall(text)
        k = draw(st.integers(0, max(0, len(pieces) - 1)))
        m = draw(st.integers(0, max(0, len(pieces) - 1)))
        if op == "delete":
            text = text[:i] + text[i + n:]
        elif op == "insert":
            text = text[:i] + draw(hostile) + text[i:]
        elif op == "duplicate":
            text = text[:i] + text[i:i + n] + text[i:]
        elif op == "swap" and text:
            j = draw(st.integers(0, len(text) - 1))
            i = min(i, len(text) - 1)
            chars = list(text)
            chars[i], chars[j] = chars[j], chars[i]
            text = "".join(chars)
        elif op == "truncate":
            text = text[:i]
        elif op == "line-from-seed":
            lines = draw(st.sampled_from(SEEDS)).split("\n")
            text = text[:i] + draw(st.sampled_from(lines)) + "\n" + text[i:]
        elif pieces:
            if op == "token-delete":
                del pieces[k]
            elif op == "token-duplicate":
                pieces.insert(k, pieces[k])
            elif op == "token-swap":
                pieces[k], pieces[m] = pieces[m], pieces[k]
            elif op == "token-insert":
                pieces.insert(k, draw(st.sampled_from(VOCAB)))
            elif op == "token-replace":
                pieces[k] = draw(st.one_of(st.sampled_from(VOCAB), hostile))
            text = "".join(pieces)
    return text


BAD_BYTES = (b"\xff", b"\xfe", b"\x80", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80",
             b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\x00", b"\r", b"\r\n", b"\xef\xbb\xbf")


@st.composite
def mutated_bytes(draw: st.DrawFn) -> bytes:
    data = draw(st.one_of(st.sampled_from(SEEDS), mutated_text())).encode("utf-8")
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(("insert", "flip", "bom", "crlf", "truncate", "delete")))
        i = _pos(draw, data)
        if op == "insert":
            data = data[:i] + draw(st.sampled_from(BAD_BYTES)) + data[i:]
        elif op == "flip" and data:
            i = min(i, len(data) - 1)
            data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1:]
        elif op == "bom":
            data = b"\xef\xbb\xbf" + data
        elif op == "crlf":
            data = data.replace(b"\n", b"\r\n")
        elif op == "truncate":
            data = data[:i]
        elif op == "delete":
            data = data[:i] + data[i + draw(st.integers(1, 8)):]
    return data


EXPANSION_BOMB = ("let a = [" + ", ".join(str(i) for i in range(100)) + "]\n"
                  'generate "{a}{a}{a}{a}{a}" x 1000 {strength: [0, 0.1, 0.2, 0.3]}\n')


def _front_end(data: bytes, text: str | None, workspace: Path, tally: Tally) -> None:
    """decode + parse, the raw text through parse, then the whole compiler."""
    tally.examples += 1
    started = time.perf_counter()
    source, diags = decode(data, SPEC_NAME, DEFAULT_LIMITS.max_spec_bytes)
    if source is not None:
        _check_diagnostics(diags, {SPEC_NAME: source.text})
        _parse_checked(source, tally)
    if text is not None:  # undecoded: BOM, CR, NUL left in place
        _parse_checked(Source(SPEC_NAME, text), tally)
    _compile(workspace, data, tally)
    tally.timed(started, data, steer=True)


def test_F3_mutated_and_random_text(workspace: Path, tally: Tally) -> None:
    @given(text=st.one_of(mutated_text(), mutated_text(),
                          st.text(max_size=300),
                          st.lists(st.sampled_from(HOSTILE + VOCAB), max_size=80).map("".join)))
    @example(text="")
    @example(text="\ufeff")
    @example(text="\n" * 3 + "generate")
    @example(text="[" * 10_000)
    @example(text="{" * 10_000 + "}" * 10_000)
    @example(text='generate "' + "{a|b}" * 2_000 + '"\n')
    @example(text=EXPANSION_BOMB)
    @example(text="learn " * 5_000)
    @FUZZ_SETTINGS
    def check(text: str) -> None:
        _front_end(text.encode("utf-8"), text, workspace, tally)

    check()
    assert tally.examples >= min(MAX_EXAMPLES, 100)


def test_F3_mutated_and_random_bytes(workspace: Path, tally: Tally) -> None:
    @given(data=st.one_of(mutated_bytes(), mutated_bytes(), st.binary(max_size=400)))
    @example(data=b"\xff")
    @example(data=b"model \"toy:shapes\"\n\xed\xa0\x80\n")
    @example(data=b"\xef\xbb\xbf\xef\xbb\xbfmodel \"toy:shapes\"\r\n")
    @example(data=b"\x00" * 64)
    @example(data=b"model \"a\"\r\rlearn")
    @example(data=b"#" * (DEFAULT_LIMITS.max_spec_bytes + 1))
    @FUZZ_SETTINGS
    def check(data: bytes) -> None:
        _front_end(data, None, workspace, tally)

    check()
    assert tally.examples >= min(MAX_EXAMPLES, 100)


def test_F3_mask_in_defaults_and_a_learn_block_without_mask(workspace: Path) -> None:
    text = "defaults { mask: gone/*.png }\nlearn photos/teddy/*.png as me* <person> { steps: 3 }\n"
    (workspace / SPEC_NAME).write_text(text, "utf-8")
    result = compile_paths([workspace], root=workspace)
    _check_diagnostics(result.diagnostics, {SPEC_NAME: text})
    # the mask came from `defaults`: its problem is reported at the learn's own pattern
    missing = [d for d in result.diagnostics if "mask pattern" in d.message]
    assert missing and all(d.span is not None and d.span.line == 2 for d in missing)
