"""What `perfusion lsp` offers at a cursor (`perfusion_dsl.completion.complete`), read from
the text before the cursor as it is being typed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import png_bytes, write_tree

from perfusion_dsl.completion import (
    KEYWORDS,
    MAX_PATHS,
    Surroundings,
    complete,
    tokenizer_words,
    used_tokens,
)
from perfusion_dsl.options import SCHEMA

HEAD = 'let places = [left, right]\nlearn p/*.png as moon* <crescent>\n'


def labels(text: str) -> list[str]:
    """The labels offered at the end of `text` (where `‸` is, when there is one)."""
    cursor = text.index("‸") if "‸" in text else len(text)
    return [item.label for item in complete(text.replace("‸", "", 1), cursor)]


def test_keywords_at_the_start_of_a_line() -> None:
    assert labels(HEAD + "ge") == list(KEYWORDS)
    assert labels(HEAD + "generate \"a\" x") == []  # mid-statement: nothing to guess


@pytest.mark.parametrize(("statement", "kind"), [
    ("learn p/*.png as sun* <star> {\n  ", "learn"),
    ('generate "a moon*" { steps: 3, ', "generate"),
])
def test_option_names_of_the_enclosing_block(statement: str, kind: str) -> None:
    assert labels(HEAD + statement) == [name for name, spec in SCHEMA.items()
                                        if kind in spec.kinds]


def test_a_typed_option_name_ranks_the_closest_first_and_keeps_typos() -> None:
    offered = complete(HEAD + 'generate "a moon*" {\n  st', len(HEAD) + 25)
    names = [item.label for item in offered]
    assert names[:2] == ["steps", "strength"]  # the prefix matches first
    assert sorted(names) == sorted(k for k, s in SCHEMA.items() if "generate" in s.kinds)
    typo = HEAD + "learn p/*.png as sun* <star> {\n  stpes"
    first = complete(typo, len(typo))[0]
    assert first.label == "steps" and first.filter == "stpes"  # the client keeps it


def test_defaults_offer_every_option() -> None:
    assert labels("defaults {\n  ") == list(SCHEMA)


@pytest.mark.parametrize(("typed", "values"), [
    ("lock: ", ["local", "global"]), ("mask: a", ["none", "attention"]),
    ("flip:", ["true", "false"]), ("steps: ", []),
])
def test_values_of_options_with_a_fixed_set(typed: str, values: list[str]) -> None:
    assert labels(HEAD + "learn p/*.png as sun* <star> {\n  " + typed) == values


def test_let_names_inside_a_template_slot_and_tokens_elsewhere() -> None:
    assert labels(HEAD + 'generate "a moon* at the {pl') == ["places"]
    assert labels(HEAD + 'generate "a mo') == ["moon*"]
    assert labels(HEAD + 'generate "a {left|right} mo') == ["moon*"]  # the slot is closed


def test_nothing_in_comments_and_the_cursor_counts_not_the_rest() -> None:
    assert labels(HEAD + "# ge") == []
    assert labels(HEAD + 'generate "a {pl‸" x 2\nlet other = [x]\n') == ["places", "other"]
    assert labels('learn p/*.png as ab* <x>\ngenerate "\\"{‸') == []  # no let: no names


def test_used_tokens_are_read_through_the_reader(tmp_path: Path) -> None:
    texts = {tmp_path / "sun.concept": "learn a/*.png as sun* <star>\n",
             tmp_path / "sub" / "b.concept": "learn a/*.png as b* <x>\nlearn a as sun* <y>\n"}
    text = 'use "sun.concept"\nuse "sub/../sub/b.concept"\nuse "gone.concept"\n'
    assert used_tokens(text, tmp_path, texts.get) == (
        ("sun*", "sun.concept"), ("b*", "sub/../sub/b.concept"))


def test_tokens_of_used_files_follow_the_file_s_own() -> None:
    around = Surroundings(used_tokens=(("sun*", "sun.concept"), ("moon*", "other.concept")))
    offered = complete(HEAD + 'generate "a ', len(HEAD) + 12, around)
    assert [(i.label, i.detail) for i in offered] == [
        ("moon*", "learned in this file"), ("sun*", "learned in sun.concept")]


def test_paths_in_use_and_in_learn_patterns(tmp_path: Path) -> None:
    write_tree(tmp_path, {"moon.concept": "", "notes.txt": "", "images/a.png": png_bytes(),
                          "images/b.txt": "", "images/.hidden.png": png_bytes(),
                          "images/sub/c.png": png_bytes(), "shared/x.concept": ""})
    around = Surroundings(folder=tmp_path)

    def offered(text: str) -> list[tuple[str, str, int]]:
        return [(i.label, i.kind, i.replace) for i in complete(text, len(text), around)]

    assert offered('use "') == [("images/", "folder", 0), ("moon.concept", "file", 0),
                                ("shared/", "folder", 0)]
    assert offered('use "shared/x') == [("x.concept", "file", 1)]
    assert offered("learn images/") == [("a.png", "file", 0), ("sub/", "folder", 0)]
    assert offered('learn "images/s') == [("sub/", "folder", 1)]
    assert offered("learn images/.") == [(".hidden.png", "file", 1)]
    assert offered("learn nowhere/") == []


def test_a_huge_folder_offers_a_bounded_number_of_paths(tmp_path: Path) -> None:
    for i in range(MAX_PATHS + 50):
        (tmp_path / f"{i:04d}.png").write_bytes(b"")
    assert len(complete("learn ", 6, Surroundings(folder=tmp_path))) == MAX_PATHS


def test_supercategory_words_from_the_model_s_tokenizer() -> None:
    around = Surroundings(words=lambda: ("circle", "crescent", "cross", "square"))
    text = "learn p/*.png as sun* <circle, cr"
    offered = complete(text, len(text), around)
    assert [(i.label, i.replace) for i in offered] == [("crescent", 2), ("cross", 2)]
    assert complete("learn p/*.png as sun* <", 23, around) == []  # a letter first
    assert complete("learn p/*.png as sun* <circle> ", 31, around) == []  # closed


def test_tokenizer_words_are_the_single_token_words_of_its_vocabulary(tmp_path: Path) -> None:
    """From either file layout a diffusers folder may have (slow or fast tokenizer)."""
    vocab = {"a": 0, "circle</w>": 1, "cr": 2, "crescent</w>": 3, "<|endoftext|>": 4,
             "square": 5, "x</w>": 6, "9</w>": 7}
    write_tree(tmp_path, {"slow/tokenizer/vocab.json": json.dumps(vocab),
                          "fast/tokenizer/tokenizer.json": json.dumps(
                              {"model": {"type": "BPE", "vocab": vocab}})})
    for layout in ("slow", "fast"):
        assert tokenizer_words(tmp_path / layout) == ("circle", "crescent")
    assert tokenizer_words(tmp_path / "none") == ()
