"""Diagnostics scenarios D1-D8 (docs/build.md): goldens, ordering, positions, hints, limits.

D1 fixtures live in tests/fixtures/diagnostics/<code>[--variant]/: the spec files and
`expected.txt`, the exact stderr of `perfusion check .` run in that folder. Rewrite them
with `tests/regen_goldens.py --write` and read the diff before committing.
"""

from __future__ import annotations

import ast
import os
import re
import time
import tracemalloc
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
from helpers import Run, assert_clean, png_bytes
from regen_goldens import (
    CHECK_ARGV,
    DIAGNOSTICS,
    code_of,
    diagnostic_cases,
    injected,
    normalise,
)

from perfusion_dsl import passes
from perfusion_dsl.compiler import compile_paths

Project = Callable[[Mapping[str, str | bytes]], Path]
CASES = diagnostic_cases()
PACKAGE = Path(passes.__file__).resolve().parent.parent
# Fixtures whose only diagnostics are warnings: `check` succeeds.
WARNING_ONLY = {"bom", "crlf", "tab-indent", "empty-file", "duplicate-render", "flip-captions"}
# Codes no spec can make `check` emit, and why; each is tested where it can happen.
NOT_FROM_CHECK = {
    "fmt-unstable": "only `perfusion fmt`, only when the formatter itself has a bug",
}
HEADER = re.compile(r"^(?P<file>[^\s:]+):(?P<line>\d+):(?P<col>\d+): (?P<sev>error|warning): "
                    r"(?P<msg>.*)$", re.MULTILINE)


def emitted_codes() -> set[str]:
    """Every diagnostic code the compiler can emit, read from its source with `ast`:
    the first argument of each error()/warning()/report() call, through module constants
    and `a if c else b`."""
    found: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text("utf-8"))
        consts = {t.id: n.value.value for n in ast.walk(tree) if isinstance(n, ast.Assign)
                  for t in n.targets if isinstance(t, ast.Name)
                  and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)}
        for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call) and n.args):
            func = call.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name not in ("error", "warning", "make", "report"):
                continue
            first = call.args[0]
            options = [first.body, first.orelse] if isinstance(first, ast.IfExp) else [first]
            for node in options:
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    found.add(node.value)
                elif isinstance(node, ast.Name) and node.id in consts:
                    found.add(consts[node.id])
    return {c for c in found if re.fullmatch(r"[a-z][a-z0-9-]*", c)}


def compiled_codes(case: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """(code, severity) of every diagnostic `check` reports for the fixture."""
    monkeypatch.chdir(case)
    with injected(case):
        comp = compile_paths([Path(".")], Path("."))
    return [(d.code, d.severity) for d in comp.diagnostics]


# ----------------------------------------------------------------------------- D1


def test_D1_every_code_has_a_fixture_and_every_fixture_a_code() -> None:
    codes = emitted_codes() - set(NOT_FROM_CHECK)
    assert len(codes) >= 40, f"the code scan found too little: {sorted(codes)}"
    fixtures = {code_of(case) for case in CASES}
    assert not codes - fixtures, f"codes without a fixture: {sorted(codes - fixtures)}"
    assert not fixtures - codes, f"fixtures for unknown codes: {sorted(fixtures - codes)}"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_D1_golden(case: Path, run_cli: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = (case / "expected.txt").read_text("utf-8")
    with injected(case):
        result = run_cli(case, *CHECK_ARGV)
    assert normalise(result.err, case) == expected, (
        f"stderr differs from {case.name}/expected.txt; if the change is intended, run "
        "tests/regen_goldens.py --write and review the diff")
    codes = compiled_codes(case, monkeypatch)
    # One fixture, one code: anything else in the output would be a cascade.
    assert {c for c, _ in codes} == {code_of(case)}, codes
    has_error = any(sev == "error" for _, sev in codes)
    assert result.code == (1 if has_error else 0)
    assert (case.name in WARNING_ONLY) == (not has_error)
    if not has_error:
        assert result.out.startswith("checked "), result.out
    assert_clean(expected)


def test_D1_fixtures_are_small() -> None:
    for path in DIAGNOSTICS.parent.rglob("*.png"):
        assert path.stat().st_size < 1024, path


# ----------------------------------------------------------------------------- D2


def headers(err: str) -> list[tuple[str, int, int, str, str]]:
    return [(m["file"], int(m["line"]), int(m["col"]), m["sev"], m["msg"])
            for m in HEADER.finditer(err)]


def test_D2_errors_in_several_files_reported_once_sorted_without_cascades(
        project: Project, run_cli: Run) -> None:
    folder = project({
        "photos/1.png": png_bytes(),
        "b.concept": (
            "learn photos/*.png as teddy* <teddy bear\n"  # `>` missing
            'generate "teddy* in the snow"\n'  # teddy* is broken, not unknown
            'generate "a photo" {\n  seeed: 1\n}\n'
        ),
        "a.concept": (
            "let outfits [wizard, pirate]\n"  # `=` missing
            'generate "a {outfits}"\n'  # outfits is broken, not unknown
            'generate "a photo" {\n  strength: 2\n}\n'
        ),
        "c.concept": 'use "b.concept"\ngenerate "teddy* at {home|work}" x 0\n',
    })
    result = run_cli(folder, "check", ".")
    assert result.code == 1
    found = headers(result.err)
    assert found == sorted(found), "diagnostics are not sorted by file, line, column"
    assert [(f, line, sev) for f, line, _, sev, _ in found] == [
        ("a.concept", 1, "error"),  # syntax
        ("a.concept", 4, "error"),  # strength range
        ("b.concept", 1, "error"),  # syntax
        ("b.concept", 4, "error"),  # seeed
        ("c.concept", 2, "error"),  # x 0
    ], result.err
    assert "unknown concept" not in result.err
    assert "unknown list" not in result.err
    assert "5 errors, 0 warnings in 3 files" in result.err


def test_D2_unclosed_list_is_one_error_at_its_bracket(project: Project, run_cli: Run) -> None:
    folder = project({"a.concept": "let outfits = [wizard, pirate\n"
                                   'generate "a {outfits}"\n'
                                   'generate "a photo" {\n  seed: 1\n}\n'})
    result = run_cli(folder, "check", ".")
    assert [h[:3] for h in headers(result.err)] == [("a.concept", 1, 15)], result.err


def test_D2_unclosed_learn_block_does_not_cascade(project: Project, run_cli: Run) -> None:
    """The learn whose block is never closed is one error; its token is not then reported
    as unknown by the generate below it, and the deep list is reported where it nests."""
    folder = project({"a.concept": 'learn a.png as me* <person> {\n  steps: 3\n'
                                   'generate "me* at the beach"\n'
                                   "let deep = [[a]]\n"})
    result = run_cli(folder, "check", ".")
    assert [h[:3] for h in headers(result.err)] == [("a.concept", 1, 29),
                                                    ("a.concept", 4, 13)], result.err
    assert "this `{` is never closed" in result.err
    assert "unknown concept" not in result.err


def test_D2_a_file_that_is_not_utf8_does_not_cascade_into_its_users(
        project: Project, run_cli: Run) -> None:
    folder = project({
        "photos/1.png": png_bytes(),
        "toys.concept": b"# caf\xe9\nlearn photos/*.png as teddy* <teddy bear>\n",
        "scene.concept": 'use "toys.concept"\ngenerate "teddy* in the snow"\n',
    })
    result = run_cli(folder, "check", ".")
    assert result.code == 1
    assert [h[:3] for h in headers(result.err)] == [("toys.concept", 1, 6)], result.err
    assert "not valid UTF-8 at byte 5" in result.err


def test_D2_unreadable_file_gives_one_diagnostic(project: Project, run_cli: Run) -> None:
    folder = project({"unreadable.concept": 'generate "a photo"\n'})
    with injected(Path("unreadable")):
        result = run_cli(folder, "check", ".")
    assert result.code == 1
    assert result.err.startswith("unreadable.concept: error: cannot read spec file: "
                                 "Permission denied\n")
    assert "1 error, 0 warnings" in result.err


# ----------------------------------------------------------------------------- D3 / D4


def caret_column(err: str) -> int:
    """1-based column of the first caret under the first excerpt."""
    carets = next(line for line in err.splitlines() if line.lstrip(" ").startswith("|")
                  and "^" in line)
    source = next(line for line in err.splitlines() if re.match(r"^ \d+ \| ", line))
    return carets.index("^") - source.index("|") - 1


POSITIONS = [
    # (spec text, line, col, words in the message)
    ('generate "a photo" x\ngenerate "b"\n', 1, 21, "found end of line"),
    ('generate "a photo" x\n', 1, 21, "found end of file"),
    ("learn a.png as me*\n", 1, 19, "expected `<`"),
    ('generate "a photo" {\n  seed:\n}\n', 2, 8, "found end of line"),
    # a bracket still open at the end of the file is reported at its opening
    ("let xs = [a, b", 1, 10, "this `[` is never closed"),
    ('generate "a photo" {\n  seed: 3', 1, 20, "this `{` is never closed"),
    ('model "toy:shapes"\n\n\ndefaults {\n', 4, 10, "this `{` is never closed"),
    ('generate "a photo', 1, 10, "string is not closed"),
    ('generate "a photo" {\n  negative: "blurry\n}\n', 2, 13, "string is not closed"),
    ("model", 1, 6, "expected a quoted string, found end of file"),
]


@pytest.mark.parametrize(("text", "line", "col", "words"), POSITIONS,
                         ids=[f"pos{i}" for i in range(len(POSITIONS))])
def test_D3_D4_end_of_line_and_end_of_file_positions(
        text: str, line: int, col: int, words: str, project: Project, run_cli: Run) -> None:
    folder = project({"a.concept": text})
    result = run_cli(folder, "check", ".")
    assert result.code == 1
    first = headers(result.err)[0]
    assert first[:4] == ("a.concept", line, col, "error"), result.err
    assert words in first[4], result.err
    assert caret_column(result.err) == col, result.err
    assert "-1" not in result.err


def test_control_and_bidi_characters_never_reach_the_terminal(project: Project,
                                                               run_cli: Run) -> None:
    """A spec that sets the window title, clears the screen and reverses the text: every
    such character is shown as `\\u{hex}`, and the caret still points at the option."""
    hostile = "a \x1b]0;pwned\x07\x1b[2J \u202e circle\x7f\x9b"
    folder = project({"a.concept": f'model "toy:shapes"\ngenerate "{hostile}" {{ stepz: 3 }}\n',
                      "\x1b[31mred\u202e.concept": 'generate "a photo" { stepz: 3 }\n'})
    result = run_cli(folder, "check", ".")
    assert result.code == 1
    assert not any(c in result.err for c in "\x1b\x07\x7f\x9b\u202e"), result.err
    shown = 'generate "a \\u{1b}]0;pwned\\u{7}\\u{1b}[2J \\u{202e} circle\\u{7f}\\u{9b}"'
    assert f" 2 | {shown} {{ stepz: 3 }}" in result.err
    line = result.err.splitlines()
    carets = line[line.index(f" 2 | {shown} {{ stepz: 3 }}") + 1]
    assert carets == "   | " + " " * len(f"{shown} {{ ") + "^^^^^"
    assert "\\u{1b}[31mred\\u{202e}.concept:1:22: error: unknown option `stepz`" in result.err


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_use_of_something_that_is_not_a_file_says_what_it_is(project: Project, run_cli: Run,
                                                             kind: str) -> None:
    folder = project({"a.concept": 'use "b.concept"\n'})
    if kind == "directory":
        (folder / "b.concept").mkdir()
    else:
        os.mkfifo(folder / "b.concept")
    result = run_cli(folder, "check", "a.concept")
    assert result.code == 1
    shown = "a directory" if kind == "directory" else "a FIFO"
    assert f"a.concept:1:5: error: `b.concept` is {shown}, not a spec file" in result.err


def test_an_empty_out_says_it_is_empty(project: Project, run_cli: Run) -> None:
    folder = project({"a.concept": 'generate "a photo" {\n  out: ""\n}\n'})
    result = run_cli(folder, "check", ".")
    assert result.code == 1
    assert "a.concept:2:8: error: `out` is empty: it must name a folder" in result.err


def test_many_bad_images_of_one_pattern_are_one_diagnostic_with_a_count(
        project: Project, run_cli: Run) -> None:
    """12 unusable files used to be 12 errors (10,000 made 1.3 MB of output)."""
    files: dict[str, str | bytes] = {f"photos/{i:02}.png": "not an image\n" for i in range(12)}
    files["a.concept"] = "learn photos/*.png as teddy* <teddy bear>\n"
    result = run_cli(project(files), "check", ".")
    assert result.code == 1
    assert result.err.count("error: ") == 1, result.err
    assert "error: 12 of the 12 files this pattern matches are not usable images" in result.err
    assert "`photos/00.png` is not a readable image" in result.err
    assert "`photos/05.png`" not in result.err and "... and 7 more" in result.err


def test_an_astronomical_expansion_is_said_in_powers_of_ten(project: Project,
                                                           run_cli: Run) -> None:
    """700 groups of 20 is a 911-digit count, which used to be printed in full, with all
    700 factors."""
    spec = "let n = [" + ", ".join(f"w{i}" for i in range(20)) + "]\n"
    spec += 'generate "' + "{n}" * 700 + '"\n'
    result = run_cli(project({"a.concept": spec}), "check", ".")
    assert result.code == 1
    assert "error: this template expands to more than 10^910 images; the limit is 10,000" \
        in result.err
    assert "× … (692 more)" in result.err and len(result.err) < 4000, len(result.err)


# ----------------------------------------------------------------------------- D5

SUGGEST = [
    ('generate "a photo" {\n  seeed: 1\n}\n', "unknown option `seeed` (did you mean `seed`?)"),
    ('generate "a photo" {\n  Strength: 1\n}\n',
     "unknown option `Strength` (did you mean `strength`?)"),
    ("learn p/*.png as teddy* <bear> {\n  embeding_lr: 0.1\n}\n",
     "unknown option `embeding_lr` (did you mean `embedding_lr`?)"),
    ("learn p/*.png as teddy* <bear>\n" 'generate "a tedy* photo"\n',
     "unknown concept `tedy*` in template (did you mean `teddy*`?)"),
    ('let outfits = [a, b]\ngenerate "a {outfit}"\n',
     "unknown list `outfit` in template (did you mean `outfits`?)"),
    ('lern p/*.png as teddy* <bear>\n', "(did you mean `learn`?)"),
]
NO_SUGGESTION = [
    ('generate "a photo" {\n  colour: red\n}\n', "unknown option `colour`"),
    ("learn p/*.png as teddy* <bear>\n" 'generate "a zebra* photo"\n',
     "unknown concept `zebra*` in template"),
    ('let outfits = [a, b]\ngenerate "a {places}"\n', "unknown list `places` in template"),
]


@pytest.mark.parametrize(("text", "message"), SUGGEST, ids=[f"s{i}" for i in range(6)])
def test_D5_did_you_mean(text: str, message: str, project: Project, run_cli: Run) -> None:
    folder = project({"a.concept": text, "p/1.png": png_bytes()})
    result = run_cli(folder, "check", ".")
    assert result.code == 1
    assert message in result.err, result.err


@pytest.mark.parametrize(("text", "message"), NO_SUGGESTION, ids=["option", "concept", "let"])
def test_D5_no_suggestion_for_unrelated_words(text: str, message: str, project: Project,
                                              run_cli: Run) -> None:
    folder = project({"a.concept": text, "p/1.png": png_bytes()})
    result = run_cli(folder, "check", ".")
    assert result.code == 1
    assert message in result.err, result.err
    assert "did you mean" not in result.err, result.err


# ----------------------------------------------------------------------------- D6

RANGES = [
    # (kind, option line, the allowed range as the message states it)
    ("learn", "steps: 0", "between 1 and 1,000,000"),
    ("learn", "batch: 5000", "between 1 and 4,096"),
    ("learn", "lr: 0", "greater than 0 and at most 10"),
    ("learn", "embedding_lr: 1e3", "greater than 0 and at most 10"),
    ("learn", "lr: inf", "greater than 0 and at most 10"),
    ("learn", "beta: 1.5", "between 0 and 1"),
    ("learn", "tau: nan", "greater than 0 and at most 1"),
    ("learn", "resolution: 4", "between 8 and 4,096"),
    ("learn", "resolution: 100", "multiple of 8"),
    ("learn", "seed: -1", "at least 0"),
    ("generate", "strength: 1.01", "between 0 and 1"),
    ("generate", "strength: [0.5, -0.5]", "between 0 and 1"),
    ("generate", "guidance: 1000", "between 0 and 100"),
    ("generate", "steps: 99999999999999999999999999999999999999999", "between 1 and 1,000,000"),
    ("generate", "size: 4104x8", "multiples of 8 between 8 and 4096"),
    ("generate", "seed: 9999999999999999999999", "at most 9,223,372,036,854,775,807"),
]


@pytest.mark.parametrize(("kind", "option", "allowed"), RANGES,
                         ids=[o.split(":")[0] + str(i) for i, (_, o, _) in enumerate(RANGES)])
def test_D6_range_errors_point_at_the_value_and_state_the_range(
        kind: str, option: str, allowed: str, project: Project, run_cli: Run) -> None:
    head = "learn p/*.png as teddy* <bear>" if kind == "learn" else 'generate "a photo"'
    folder = project({"a.concept": f"{head} {{\n  {option}\n}}\n", "p/1.png": png_bytes()})
    result = run_cli(folder, "check", ".")
    assert result.code == 1
    found = headers(result.err)
    assert len(found) == 1, result.err
    _, line, col, _, message = found[0]
    value = option.split(": ", 1)[1]
    bad = value.strip("[]").split(", ")[-1] if value.startswith("[") else value
    assert line == 2
    assert col == 3 + len(option) - len(value) + value.index(bad), result.err
    assert caret_column(result.err) == col
    assert allowed in message, message
    carets = next(x for x in result.err.splitlines() if "^" in x)
    assert carets.count("^") == len(bad), result.err


def test_a_huge_line_is_shown_cut_with_its_carets_inside_the_cut(project: Project,
                                                                run_cli: Run) -> None:
    """A 3,000-character pattern: the excerpt is cut to a window ending in `...`, the carets
    stop where the shown text stops, and the message quotes the pattern shortened."""
    folder = project({"a.concept": f"learn {'a' * 3000}*.png as teddy* <bear>\n"})
    result = run_cli(folder, "check", ".")
    assert result.code == 1
    lines = result.err.splitlines()
    assert max(len(line) for line in lines) < 250, result.err
    source = next(line for line in lines if line.startswith(" 1 | "))
    carets = next(line for line in lines if "^" in line)
    assert source.endswith("...") and source.startswith(" 1 | learn aaa")
    assert carets.index("^") == source.index("aaa")
    assert len(carets.rstrip()) <= len(source) - len("...")
    assert "matches no files" in lines[0]


def test_D6_count_range(project: Project, run_cli: Run) -> None:
    folder = project({"a.concept": 'generate "a photo" x 20000\n'})
    result = run_cli(folder, "check", ".")
    assert headers(result.err)[0][1:3] == (1, 22)
    assert "`x COUNT` must be between 1 and 10,000, found 20,000" in result.err


# ----------------------------------------------------------------------------- D8


def timed(run_cli: Run, folder: Path, label: str) -> tuple[str, float]:
    start = time.perf_counter()
    result = run_cli(folder, "check", ".")
    elapsed = time.perf_counter() - start
    print(f"D8 {label}: {elapsed:.3f} s")
    assert elapsed < 5, f"{label} took {elapsed:.1f} s"  # < 1 s expected; CI machines vary
    return result.err, elapsed


HOSTILE: dict[str, tuple[bytes, str, int]] = {
    # name: (file bytes, text the diagnostic must contain, exit code)
    "bom": (b'\xef\xbb\xbfgenerate "a photo"\n', "byte order mark", 0),
    "crlf": (b'generate "a photo" {\r\n  seed: 1\r\n}\r\n', "CRLF line endings", 0),
    "tabs": (b'generate "a photo" {\n\tseed: 1\n}\n', "indentation uses tabs", 0),
    "invalid-utf8": (b'generate "a photo"\n# \xff\xfe\n', "not valid UTF-8 at byte 21", 1),
    "truncated-utf8": (b'generate "caf\xc3', "not valid UTF-8 at byte 13", 1),
    "nul": (b'generate "a\x00photo"\n', "NUL byte", 1),
    "5mb": (b"# " + b"x" * (5 * 1024 * 1024) + b"\n", "spec file is 5,242,883 bytes", 1),
    "deep-list": (b"let xs = " + b"[" * 10_000 + b"\n", "expected", 1),
    "deep-list-closed": (b"let xs = " + b"[" * 10_000 + b"]" * 10_000 + b"\n", "expected", 1),
    "deep-block": (b"defaults " + b"{" * 10_000 + b"\n", "expected", 1),
    "deep-block-closed": (b"defaults " + b"{" * 10_000 + b"}" * 10_000 + b"\n", "expected", 1),
    "deep-template": (b'generate "' + b"{" * 10_000 + b'"\n', "groups cannot be nested", 1),
    "empty": (b"", "file declares nothing", 0),
    "whitespace-only": (b"\n \n\t\n", "file declares nothing", 0),
    "binary": (bytes(range(256)) * 16, "not valid UTF-8 at byte 128", 1),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_D8_hostile_input_gives_a_diagnostic_quickly(name: str, project: Project,
                                                     run_cli: Run) -> None:
    data, words, code = HOSTILE[name]
    folder = project({"a.concept": data})
    err, _ = timed(run_cli, folder, name)
    assert words in err, err[:2000]
    assert headers(err) or err.startswith("a.concept: "), err[:2000]
    errors = int(re.findall(r"^(\d+) errors?, ", err, re.MULTILINE)[-1])
    assert (errors > 0) == (code == 1), err[-300:]
    assert len(err) < 20_000, "a huge input must not flood the terminal"


def test_D8_invalid_utf8_caret_is_on_the_bad_byte(project: Project, run_cli: Run) -> None:
    folder = project({"a.concept": 'model "toy:shapes"\ngenerate "caf\xe9 crème"\n'
                      .encode("latin-1")})
    result = run_cli(folder, "check", ".")
    assert "a.concept:2:14: error: file is not valid UTF-8 at byte 32" in result.err
    assert caret_column(result.err) == 14
    assert '\ufffd' in result.err  # the bad byte is shown, not an empty line


def test_D8_long_lines_are_shown_as_a_window(project: Project, run_cli: Run) -> None:
    items = ", ".join(f"w{i}" for i in range(2000))
    folder = project({"a.concept": f"let xs = [{items}, ./bad, {items}]\n"})
    result = run_cli(folder, "check", ".")
    assert "found `./bad`" in result.err
    excerpt = [line for line in result.err.splitlines() if line.startswith(" 1 | ")]
    assert len(excerpt[0]) < 250, excerpt
    assert excerpt[0][caret_column(result.err) + 4:].startswith("./bad")


# ----------------------------------------------------------------------------- S1, S6


def test_S6_expansion_bomb_is_rejected_quickly_without_allocating(
        project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    items = ", ".join(f"w{i}" for i in range(1000))
    folder = project({"a.concept": f"let n = [{items}]\n"
                                   'generate "{n} {n} {n} {n} {n} {n}" x 10000 {\n'
                                   "  strength: [0.1, 0.2, 0.3]\n}\n"})
    monkeypatch.chdir(folder)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        comp = compile_paths([Path(".")], Path("."))
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"S6 bomb of 3e22 images: {elapsed:.3f} s, peak {peak / 1e6:.1f} MB")
    (diag,) = comp.diagnostics
    assert diag.code == "expansion-too-large"
    assert "30,000,000,000,000,000,000,000 images" in diag.message
    assert diag.extra == ("= " + " × ".join(["`{n}` (1,000)"] * 6)
                          + " × x 10000 (10,000) × strength values (3)",)
    assert peak < 50_000_000
    assert elapsed < 5
    assert not comp.context.renders


def test_S1_out_through_a_symlink_leaving_the_root_is_refused(
        project: Project, run_cli: Run, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    folder = project({"a.concept": 'generate "a photo" {\n  out: "gallery/shots"\n}\n'})
    (folder / "gallery").symlink_to(outside, target_is_directory=True)
    result = run_cli(folder, "check", ".")
    assert result.code == 1
    assert "a.concept:2:8: error: output folder `gallery/shots` is outside the run root" \
        in result.err
    assert not any(outside.iterdir())


CONTEXTUAL_HELP = [
    ("learn a.png as me* <person> adjectives [tall]\n", "write `adjectives: [fluffy, brown]`"),
    ('learn a.png as me* <person>\n{ steps: 3 }\n', "starts on the same line"),
    ("generate a photo\n", 'the prompt template is quoted: `generate "a photo of teddy*"`'),
    ("model toy\n", 'the model name is quoted: `model "toy:shapes"`'),
    ("use other.concept\n", 'the path is quoted: `use "other.concept"`'),
    ('generate "a photo" x\n', "`x` is followed by the number of images"),
    ("learn a.png as me* person\n", "follow the token in angle brackets"),
    ("learn a.png as me* <person, >\n", "missing after the `,`"),
]


@pytest.mark.parametrize(("text", "advice"), CONTEXTUAL_HELP,
                         ids=[t.split("\n")[0][:30] for t, _ in CONTEXTUAL_HELP])
def test_D5_syntax_help_depends_on_where_the_author_is(text: str, advice: str,
                                                      project: Project, run_cli: Run) -> None:
    result = run_cli(project({"a.concept": text}), "check", ".")
    assert result.code == 1
    syntax = [h for h in headers(result.err) if "matches no files" not in h[4]]
    assert len(syntax) == 1, result.err  # one syntax error, at the mistake
    assert f"help: {advice}" in result.err or advice in result.err, result.err
