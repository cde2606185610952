"""Go to definition, references, rename, hover and inlay hints as pure functions of a
compilation (`perfusion_dsl.navigation`, `perfusion_dsl.hover`), and the options table that
hover and docs/language.md share (`perfusion_dsl.option_docs`)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import png_bytes, write_tree

from perfusion_dsl import navigation as nav
from perfusion_dsl.compiler import Compilation, compile_paths, spec_path
from perfusion_dsl.hover import KEYWORD_DOCS, hover, inlay_hints
from perfusion_dsl.option_docs import OPTION_DOCS, docs_for, markdown_table
from perfusion_dsl.options import SCHEMA, defaults_for
from perfusion_dsl.plan import LearnOptions, RenderOptions

DOCS = Path(__file__).resolve().parent.parent / "docs" / "language.md"
MOON = ('let places = [left, "top right"]\n'
        'learn p/*.png as moon* <crescent> adjectives: [thin] {\n  steps: 300\n}\n'
        'generate "a moon* at the { places }" x 2\n')
TILE = ('use "moon.concept"\nlet places = [left, right]\nlet with = ["moon* and sky"]\n'
        'learn p/*.png as tile* <square>\n'
        'generate "moon* beside tile* on the {places}, {with}" {  # two concepts\n'
        '  strength: [0.2, 0.8]\n  out: wide\n}\n')


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return write_tree(tmp_path, {"p/1.png": png_bytes(), "p/2.png": png_bytes(),
                                 "moon.concept": MOON, "tile.concept": TILE})


def _compile(project: Path, *names: str) -> Compilation:
    return compile_paths([project / n for n in names] or [project], root=project)


def _at(text: str, needle: str, nth: int = 0) -> tuple[int, int]:
    """(line, column), 1-based, of the nth occurrence of `needle` in `text`."""
    offset = -1
    for _ in range(nth + 1):
        offset = text.index(needle, offset + 1)
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def _occurrence(comp: Compilation, project: Path, name: str, text: str, needle: str,
                nth: int = 0) -> nav.Occurrence:
    found = nav.at(nav.occurrences(comp.context), spec_path(project / name),
                   *_at(text, needle, nth))
    assert found is not None, needle
    return found


def test_a_token_in_a_template_goes_to_its_learn_in_the_used_file(project: Path) -> None:
    comp = _compile(project, "tile.concept")
    assert comp.ok, comp.diagnostics
    occ = _occurrence(comp, project, "tile.concept", TILE, "moon* beside")
    path, span = nav.definition(comp.context, occ) or (None, None)
    assert path == spec_path(project / "moon.concept") and span is not None
    assert (span.line, span.col) == _at(MOON, "moon*")
    # inside a `let` item too, and the cursor just after the token counts
    line, col = _at(TILE, "moon* and sky")
    occ = nav.at(nav.occurrences(comp.context), spec_path(project / "tile.concept"),
                 line, col + len("moon*"))
    assert occ is not None and occ.name == "moon*"


def test_a_let_name_goes_to_its_own_file_s_let(project: Path) -> None:
    comp = _compile(project, "tile.concept")
    occ = _occurrence(comp, project, "tile.concept", TILE, "places}")
    path, span = nav.definition(comp.context, occ) or (None, None)
    assert path == spec_path(project / "tile.concept") and span is not None
    assert (span.line, span.col) == _at(TILE, "places =")  # not moon.concept's `places`


def test_a_use_path_goes_to_the_file(project: Path) -> None:
    comp = _compile(project, "tile.concept")
    occ = _occurrence(comp, project, "tile.concept", TILE, "moon.concept")
    assert nav.definition(comp.context, occ) == (spec_path(project / "moon.concept"), None)


def test_references_of_a_token_span_every_file(project: Path) -> None:
    comp = _compile(project)
    occ = _occurrence(comp, project, "moon.concept", MOON, "moon*")
    refs = [(o.path.name, o.span.line, o.span.col, o.definition)
            for o in nav.references(nav.occurrences(comp.context), occ)]
    assert refs == [("moon.concept", *_at(MOON, "moon*"), True),
                    ("moon.concept", *_at(MOON, "moon*", 1), False),
                    ("tile.concept", *_at(TILE, "moon*"), False),
                    ("tile.concept", *_at(TILE, "moon*", 1), False)]
    without = nav.references(nav.occurrences(comp.context), occ, include_definition=False)
    assert len(without) == 3 and not any(o.definition for o in without)


def test_rename_a_token_across_files_and_the_result_compiles(project: Path) -> None:
    comp = _compile(project)
    occs = nav.occurrences(comp.context)
    occ = _occurrence(comp, project, "tile.concept", TILE, "moon*", 1)
    edits = nav.rename(occs, occ, "luna")  # the `*` is added
    assert {p.name for p in edits} == {"moon.concept", "tile.concept"}
    for path, spans in edits.items():
        text = path.read_text("utf-8")
        for span, new in sorted(spans, key=lambda e: -e[0].start):
            assert text[span.start:span.end] == "moon*"
            text = text[:span.start] + new + text[span.end:]
        path.write_text(text, "utf-8")
    after = _compile(project)
    assert after.ok, after.diagnostics
    assert "moon*" not in (project / "tile.concept").read_text("utf-8")
    assert {c.token for c in after.plan().concepts} == {"luna*", "tile*"}


def test_rename_a_let_stays_in_its_file(project: Path) -> None:
    comp = _compile(project)
    occs = nav.occurrences(comp.context)
    occ = _occurrence(comp, project, "tile.concept", TILE, "places")
    edits = nav.rename(occs, occ, "spots")
    assert list(edits) == [spec_path(project / "tile.concept")]
    assert [(s.line, s.col) for s, _ in edits[spec_path(project / "tile.concept")]] == [
        _at(TILE, "places"), _at(TILE, "places", 1)]


@pytest.mark.parametrize(("needle", "wanted", "why"), [
    ("moon*", "tile", "already defined"), ("moon*", "9lives", "not a concept token"),
    ("places", "with", "already defined"), ("places", "two words", "not a list name"),
    ("moon.concept", "x.concept", "renaming the file")])
def test_a_rename_that_would_break_the_specs_is_refused(project: Path, needle: str,
                                                        wanted: str, why: str) -> None:
    comp = _compile(project)
    occ = _occurrence(comp, project, "tile.concept", TILE, needle)
    with pytest.raises(nav.RenameRefused, match=why):
        nav.rename(nav.occurrences(comp.context), occ, wanted)


def _hover(comp: Compilation, project: Path, name: str, text: str, needle: str,
           shift: int = 0, statuses: dict[str, str] | None = None) -> str | None:
    line, col = _at(text, needle)
    return hover(comp.context, nav.occurrences(comp.context), spec_path(project / name),
                 line, col + shift, statuses)


def test_hover_on_a_token_shows_its_learn_images_and_status(project: Path) -> None:
    comp = _compile(project, "tile.concept")
    shown = _hover(comp, project, "tile.concept", TILE, "moon* beside",
                   statuses={"moon*": "changed: steps 300 → 400"})
    assert shown is not None
    assert "learned in `moon.concept:2`" in shown
    assert "learn p/*.png as moon* <crescent> adjectives: [thin] {" in shown
    assert "supercategories: crescent" in shown and "adjectives: thin" in shown
    assert "images: 2" in shown and "store: changed: steps 300 → 400" in shown


def test_hover_on_a_let_an_option_a_keyword_and_a_template(project: Path) -> None:
    comp = _compile(project, "moon.concept")
    let = _hover(comp, project, "moon.concept", MOON, "places }")
    assert let is not None and "2 items" in let and "- top right" in let
    option = _hover(comp, project, "moon.concept", MOON, "steps")
    assert option is not None and "optimisation steps" in option and "`400`" in option
    assert "sampling" not in option  # the learn row only
    assert _hover(comp, project, "moon.concept", MOON, "learn") == KEYWORD_DOCS["learn"]
    template = _hover(comp, project, "moon.concept", MOON, "at the")
    assert template is not None
    assert "**4 images** from 2 prompts → renders/moon/" in template
    assert "- a moon* at the left" in template and "- a moon* at the top right" in template
    assert _hover(comp, project, "moon.concept", MOON, "crescent", 3) is None


def test_inlay_hints_count_images_and_show_statuses(project: Path) -> None:
    comp = _compile(project, "tile.concept")
    hints = inlay_hints(comp.context, spec_path(project / "tile.concept"),
                        {"tile*": "new", "moon*": "up to date"})
    learn_line, _ = _at(TILE, "learn")
    gen_line, _ = _at(TILE, "generate")
    gen_text = TILE.split("\n")[gen_line - 1]
    assert [(h.line, h.label) for h in hints] == [
        (learn_line, "new"), (gen_line, "→ 4 images in wide/")]  # 2 places × 2 strengths
    # after the template, before the block's `{` and its comment
    assert hints[1].col == gen_text.index('" {') + 2


def test_the_docs_options_table_is_the_hover_table() -> None:
    assert markdown_table() in DOCS.read_text("utf-8")


def test_every_option_of_each_kind_has_one_row_and_its_default() -> None:
    for kind in ("learn", "generate"):
        keys = {k for k, spec in SCHEMA.items() if kind in spec.kinds}
        assert {d.key for d in OPTION_DOCS if d.kind in (kind, "both")} == keys
        for key in keys:
            (row,) = docs_for(key, kind)
            for model in (None, "toy:shapes"):
                value = defaults_for(kind, model)[key]
                if key in ("templates", "out"):
                    continue  # described in words
                if isinstance(value, tuple):
                    value = value[0]
                shown = "null" if value is None else str(value).lower() \
                    if isinstance(value, bool) else f"{value:g}" \
                    if isinstance(value, float) else str(value)
                assert f"`{shown}`" in row.default or f"`{shown}`" == row.default \
                    or (value == "" and row.default == '`""`'), (key, kind, model, shown)


def test_numeric_ranges_in_the_table_are_the_plan_s() -> None:
    for model in (LearnOptions, RenderOptions):
        for key, field in model.model_fields.items():
            bounds = [getattr(r, a) for r in field.metadata for a in ("ge", "gt", "le")
                      if getattr(r, a, None) is not None]
            rows = [d for d in OPTION_DOCS if d.key == key]
            for bound in bounds:
                if bound > 10**12:
                    continue  # 2⁶³−1 is written as a power
                written = f"{bound:,}" if isinstance(bound, int) else f"{bound:g}"
                assert any(re.search(rf"(?<![\d,]){re.escape(written)}(?!\d|,\d)", d.type)
                           for d in rows), (key, written)
