"""`perfusion fmt`: golden files, round-trip properties (F2) on fixtures and fuzzed specs, CLI."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from perfusion_dsl import nodes as n
from perfusion_dsl.diagnostics import Diagnostic
from perfusion_dsl.formatter import format_bytes, format_module
from perfusion_dsl.parser import Parsed, parse
from perfusion_dsl.source import decode


def format_text(text: str, file: str) -> tuple[str | None, list[Diagnostic]]:
    """`format_bytes` of text in memory (lone surrogates kept, to reach the decoder)."""
    return format_bytes(text.encode("utf-8", errors="surrogatepass"), file)


TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
GOLDEN = TESTS / "fixtures" / "fmt"
FUZZ_EXAMPLES = int(os.environ.get("PERFUSION_FUZZ_EXAMPLES", "200"))


def _parse(text: str) -> Parsed:
    source, diags = decode(text.encode("utf-8"), "t.concept", 1 << 30)
    assert source is not None, diags
    return parse(source)


def _comments(parsed: Parsed) -> list[str]:
    return [c.text.rstrip() for c in parsed.module.comments]


def assert_canonical(src: str, out: str) -> None:
    """F2 and the shape of canonical text: same tree, same comments, a fixed point."""
    before, after = _parse(src), _parse(out)
    assert not after.diagnostics
    assert after.module == before.module
    assert _comments(after) == _comments(before)
    assert Counter(_comments(after)) == Counter(_comments(before))
    again, diags = format_text(out, "t.concept")
    assert again == out, diags
    assert out == "" or (out.endswith("\n") and not out.endswith("\n\n"))
    assert not out.startswith(("\n", "\ufeff")) and "\n\n\n" not in out and "\r\n" not in out
    for line in out.split("\n"):
        assert line == line.rstrip(), repr(line)
        assert not line.startswith("\t"), repr(line)


def _format(src: str) -> str:
    out, diags = format_text(src, "t.concept")
    assert out is not None, diags
    return out


# ---------------------------------------------------------------------------------------------
# Golden files


def golden_cases() -> list[str]:
    names = sorted(p.name.removesuffix(".input.concept") for p in GOLDEN.glob("*.input.concept"))
    assert names, f"no golden inputs in {GOLDEN}"
    return names


@pytest.mark.parametrize("name", golden_cases())
def test_golden(name: str) -> None:
    data = (GOLDEN / f"{name}.input.concept").read_bytes()
    expected = (GOLDEN / f"{name}.expected.concept").read_bytes().decode("utf-8")
    out, diags = format_bytes(data, f"{name}.input.concept")
    assert out == expected, diags
    assert_canonical(data.decode("utf-8").removeprefix("\ufeff"), out)


def test_every_golden_input_has_an_expected_file() -> None:
    inputs = {p.name.removesuffix(".input.concept") for p in GOLDEN.glob("*.input.concept")}
    outputs = {p.name.removesuffix(".expected.concept") for p in GOLDEN.glob("*.expected.concept")}
    assert inputs == outputs
    assert len(inputs) >= 8


def test_language_example_is_already_canonical() -> None:
    text = (GOLDEN / "teddy.input.concept").read_text("utf-8")
    assert text.startswith("# specs/teddy.concept\nmodel ")
    assert _format(text) == text


def test_golden_crlf_and_bom_inputs_really_have_them() -> None:
    # guards against a checkout that normalised the line endings of the fixtures
    assert b"\r\n" in (GOLDEN / "crlf.input.concept").read_bytes()
    assert (GOLDEN / "bom.input.concept").read_bytes().startswith(b"\xef\xbb\xbf")


def _repo_specs() -> list[Path]:
    found = sorted((REPO / "specs").rglob("*.concept"))
    found += sorted((TESTS / "fixtures").rglob("*.concept"))
    return [p for p in found if p.parent != GOLDEN]


@pytest.mark.parametrize("path", _repo_specs(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_parseable_spec_in_the_repo_round_trips(path: Path) -> None:
    data = path.read_bytes()
    out, diags = format_bytes(data, path.name)
    if out is None:
        assert any(d.severity == "error" for d in diags)
        return
    assert_canonical(data.decode("utf-8").removeprefix("\ufeff"), out)


# ---------------------------------------------------------------------------------------------
# Specific behaviour


def test_list_wraps_only_past_100_columns() -> None:
    fits = "let xs = [" + ", ".join(["abcdefgh"] * 8) + ", abcdefghi]"
    assert len(fits) == 100
    assert _format(fits) == fits + "\n"
    wrapped = _format(fits.replace("abcdefghi]", "abcdefghij]"))
    assert wrapped.startswith("let xs = [\n  abcdefgh,\n")
    assert wrapped.endswith("  abcdefghij,\n]\n")


def test_option_list_wraps_one_level_deeper() -> None:
    items = ", ".join(f'"template number {i} of {{}}"' for i in range(4))
    out = _format(f"learn a.png as a* <cat> {{templates: [{items}]}}")
    assert out.splitlines()[1:4] == ["  templates: [", '    "template number 0 of {}",',
                                     '    "template number 1 of {}",']
    assert out.endswith('    "template number 3 of {}",\n  ]\n}\n')


def test_learn_adjectives_wrap_keeps_block_on_closing_line() -> None:
    words = ", ".join(f"adjective{i:02}" for i in range(8))
    out = _format(f"learn photos/*.png as me* <person> adjectives: [{words}] {{steps: 1}}")
    assert "\n] {\n  steps: 1\n}\n" in out


def test_syntax_error_is_not_formatted() -> None:
    out, diags = format_text('model "x"\nlearn a.png as <cat>\n', "bad.concept")
    assert out is None
    assert [d.code for d in diags if d.severity == "error"] == ["syntax"]


@pytest.mark.parametrize("data", [b"model \"\xff\"\n", b"model \"a\0b\"\n"], ids=["utf8", "nul"])
def test_undecodable_file_is_not_formatted(data: bytes) -> None:
    out, diags = format_bytes(data, "bad.concept")
    assert out is None
    assert any(d.severity == "error" for d in diags)


def test_lone_surrogate_text_is_reported_not_raised() -> None:
    out, diags = format_text('model "\udcff"\n', "bad.concept")
    assert out is None and diags


def test_format_module_without_spans_or_comments() -> None:
    block = n.Block((n.Option("steps", n.Bare("10")), n.Option("flip", n.Bare("false"))))
    module = n.Module((
        n.Model(n.Str("toy:shapes")),
        n.Let("xs", n.ListV((n.Bare("a"), n.Str("b c")))),
        n.Learn(n.Str("my dog/*.png"), "dog*", (n.Super((n.Bare("good"), n.Bare("dog"))),),
                n.ListV((n.Bare("fluffy"),)), block),
        n.Generate(n.Str("a dog*"), n.Bare("2"), n.Block(())),
    ))
    out = format_module(module)
    assert out == ('model "toy:shapes"\nlet xs = [a, "b c"]\n'
                   'learn "my dog/*.png" as dog* <good dog> adjectives: [fluffy] {\n'
                   '  steps: 10\n  flip: false\n}\ngenerate "a dog*" x 2 {}\n')
    assert _parse(out).module == module


def test_comment_that_looks_like_code_and_hash_in_strings() -> None:
    src = 'generate "a # b" # generate "c"\n# learn x as y* <z>\n'
    out = _format(src)
    assert out == 'generate "a # b"  # generate "c"\n# learn x as y* <z>\n'
    assert_canonical(src, out)


# ---------------------------------------------------------------------------------------------
# Fuzzing: random valid specs with random spacing, newlines and comments


SP = st.sampled_from(["", "", " ", "  ", "\t", " \f"])
RSP = st.sampled_from([" ", " ", "  ", "\t", " \t "])
IDENT = st.from_regex(r"[A-Za-z_][A-Za-z0-9_-]{0,6}", fullmatch=True) | st.sampled_from(
    ["x", "as", "model", "learn", "adjectives", "defaults", "true"])
BARE = st.from_regex(r"[A-Za-z0-9_.\-/*?+]{1,8}", fullmatch=True) | IDENT
GLOB = st.from_regex(r"[A-Za-z0-9_.\-/*?+][A-Za-z0-9_.\-/*?+\[\]]{0,8}", fullmatch=True)
_STR_PIECE = st.sampled_from([*"ab {}|#é🙂\t*<>,", '\\"', "\\\\", "\\n", "\\{", "\\|"])
STRING = st.lists(_STR_PIECE, max_size=8).map(lambda ps: '"' + "".join(ps) + '"')
COMMENT = st.text(st.sampled_from(list("ab #\"{[é\t ")), max_size=10).map(lambda t: "#" + t)


@st.composite
def newline(draw: st.DrawFn) -> str:
    """A line break: maybe a trailing comment, maybe blank or comment-only lines, indentation."""
    out = draw(st.one_of(st.just(""), st.tuples(SP, COMMENT).map("".join)))
    for _ in range(draw(st.integers(0, 2))):
        out += "\n" + draw(st.sampled_from(["", "  ", "\t"]))
        out += draw(st.one_of(st.just(""), COMMENT))
    return out + "\n" + draw(st.sampled_from(["", "  ", "    ", "\t"]))


@st.composite
def separated(draw: st.DrawFn, element: st.SearchStrategy[str], opener: str, closer: str) -> str:
    """`[ … ]` or `{ … }`: elements separated by commas and/or newlines, as the grammar allows."""
    sep = st.one_of(st.tuples(SP, st.just(","), SP).map("".join),
                    st.tuples(SP, st.just(","), newline()).map("".join), newline())
    out = opener + draw(SP) + draw(st.one_of(st.just(""), newline()))
    items = draw(st.lists(element, max_size=4))
    if items:
        out += "".join(item + draw(sep) for item in items[:-1]) + items[-1]
        out += draw(st.one_of(st.just(""), sep))
    return out + draw(SP) + closer


def listv() -> st.SearchStrategy[str]:
    return separated(BARE | STRING, "[", "]")


def block() -> st.SearchStrategy[str]:
    option = st.tuples(IDENT, SP, st.just(":"), SP, GLOB | STRING | listv()).map("".join)
    return separated(option, "{", "}")


def _maybe(strategy: st.SearchStrategy[str], before: st.SearchStrategy[str] = SP
           ) -> st.SearchStrategy[str]:
    return st.one_of(st.just(""), st.tuples(before, strategy).map("".join))


def learn() -> st.SearchStrategy[str]:
    word_super = st.lists(BARE, min_size=1, max_size=3).flatmap(
        lambda ws: RSP.map(lambda s: s.join(ws)))
    supers = st.lists(word_super | STRING, min_size=1, max_size=3).flatmap(
        lambda ss: st.tuples(SP, SP).map(lambda s: f"{s[0]},{s[1]}".join(ss)))
    adjectives = st.tuples(st.just("adjectives"), SP, st.just(":"), SP, listv()).map("".join)
    return st.tuples(st.just("learn"), RSP, GLOB | STRING, RSP, st.just("as"), RSP,
                     IDENT.map(lambda i: i + "*"), SP, st.just("<"), SP, supers, SP,
                     st.just(">"), _maybe(adjectives), _maybe(block())).map("".join)


def statement() -> st.SearchStrategy[str]:
    count = st.tuples(st.just("x"), RSP, BARE).map("".join)
    return st.one_of(
        st.tuples(st.just("model"), SP, STRING).map("".join),
        st.tuples(st.just("use"), SP, STRING).map("".join),
        st.tuples(st.just("let"), RSP, IDENT, SP, st.just("="), SP, listv()).map("".join),
        st.tuples(st.just("defaults"), SP, block()).map("".join),
        learn(),
        st.tuples(st.just("generate"), SP, STRING, _maybe(count), _maybe(block())).map("".join),
    )


@st.composite
def spec_text(draw: st.DrawFn) -> str:
    out = draw(st.one_of(st.just(""), newline()))
    for stmt in draw(st.lists(statement(), max_size=5)):
        out += stmt + draw(newline())
    if draw(st.booleans()):
        out = out.rstrip(" \t\n")
    if draw(st.booleans()):
        out = out.replace("\n", "\r\n")
    return ("\ufeff" if draw(st.booleans()) else "") + out


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec_text())
def test_fuzzed_specs_round_trip(text: str) -> None:
    normalised = text.removeprefix("\ufeff").replace("\r\n", "\n")
    assert not _parse(normalised).diagnostics, "the generator made an invalid spec"
    assert_canonical(normalised, _format(text))


# ---------------------------------------------------------------------------------------------
# Command line


def _fmt(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "perfusion_dsl", "fmt", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, check=False)


MESSY = 'model   "toy:shapes"\ndefaults {seed: 1}  # s\n'
CANONICAL = 'model "toy:shapes"\ndefaults {\n  seed: 1\n}  # s\n'


def test_cli_check_reports_and_does_not_write(tmp_path: Path) -> None:
    messy, tidy = tmp_path / "messy.concept", tmp_path / "tidy.concept"
    messy.write_text(MESSY)
    tidy.write_text(CANONICAL)
    result = _fmt("--check", tmp_path)
    assert result.returncode == 1, result.stderr
    assert f"would reformat {messy}" in result.stdout
    assert str(tidy) not in result.stdout
    assert "1 file would be reformatted, 1 file would be left unchanged" in result.stdout
    assert messy.read_text() == MESSY
    assert _fmt("--check", tidy).returncode == 0


def test_cli_rewrites_in_place_keeping_the_mode(tmp_path: Path) -> None:
    spec = tmp_path / "a.concept"
    spec.write_bytes(MESSY.replace("\n", "\r\n").encode())
    spec.chmod(0o640)
    result = _fmt(spec)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"reformatted {spec}", "1 file reformatted, "
                                          "0 files left unchanged"]
    assert spec.read_bytes() == CANONICAL.encode()
    assert stat.S_IMODE(spec.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.concept"]  # no temp file left
    again = _fmt(spec)
    assert again.returncode == 0 and "0 files reformatted, 1 file left unchanged" in again.stdout


def test_cli_formats_through_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real.concept"
    real.write_text(MESSY)
    link = tmp_path / "link.concept"
    link.symlink_to(real)
    assert _fmt(link).returncode == 0
    assert link.is_symlink() and real.read_text() == CANONICAL


def test_S2_fmt_never_rewrites_a_file_outside_the_run_root_through_a_link(
        tmp_path: Path) -> None:
    project, outside = tmp_path / "project", tmp_path / "outside"
    project.mkdir()
    outside.mkdir()
    (outside / "fm.concept").write_text(MESSY)
    (project / "l.concept").symlink_to(outside / "fm.concept")
    (project / "own.concept").write_text(MESSY)
    result = _fmt(".", cwd=project)
    assert result.returncode == 0, result.stderr
    assert (outside / "fm.concept").read_text() == MESSY
    assert (project / "own.concept").read_text() == CANONICAL
    assert f"l.concept: skipped: it is a symbolic link to {outside / 'fm.concept'}, outside " \
           f"the run root {project}" in result.stderr
    assert "1 file reformatted, 0 files left unchanged, 1 file skipped (links to files " \
           "outside the run root)" in result.stdout


def test_cli_syntax_error_leaves_file_untouched(tmp_path: Path) -> None:
    bad, good = tmp_path / "bad.concept", tmp_path / "good.concept"
    bad.write_text('model   "x"\nlearn a.png as <cat>\n')
    good.write_text(MESSY)
    before = bad.stat().st_mtime_ns
    result = _fmt(tmp_path)
    assert result.returncode == 1
    assert f"{bad}:2:" in result.stderr and "error" in result.stderr
    assert "Traceback" not in result.stderr
    assert bad.read_text() == 'model   "x"\nlearn a.png as <cat>\n'
    assert bad.stat().st_mtime_ns == before
    assert good.read_text() == CANONICAL  # other files are still formatted
    assert "1 file with errors" in result.stdout


@pytest.mark.parametrize("args", [["missing.concept"], ["empty-dir"], ["notes.txt"]])
def test_cli_usage_errors(tmp_path: Path, args: list[str]) -> None:
    (tmp_path / "empty-dir").mkdir()
    (tmp_path / "notes.txt").write_text("hi")
    result = _fmt(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("perfusion: error: ")


def _plan_keys(root: Path) -> list[str]:
    result = subprocess.run([sys.executable, "-m", "perfusion_dsl", "plan", "--json",
                             "--root", ".", "."], capture_output=True, text=True, cwd=root,
                            check=False)
    assert result.returncode == 0, result.stderr
    return [c["key"] for c in json.loads(result.stdout)["concepts"]]


def test_cli_fmt_keeps_the_cache_keys(tmp_path: Path) -> None:
    """F2: formatting a spec changes no concept's cache key."""
    root = tmp_path / "specs"
    shutil.copytree(REPO / "specs", root, ignore=shutil.ignore_patterns("renders"))
    for spec in root.glob("*.concept"):
        text = spec.read_text("utf-8")
        spec.write_bytes(("\n\n" + text.replace("\n", "  \r\n")).encode("utf-8"))
    keys = _plan_keys(root)
    assert keys
    assert _fmt(root).returncode == 0
    assert _plan_keys(root) == keys
