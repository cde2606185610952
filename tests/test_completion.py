"""What `perfusion lsp` offers at a cursor (`perfusion_dsl.completion.complete`), read from
the text before the cursor as it is being typed."""

from __future__ import annotations

import pytest

from perfusion_dsl.completion import KEYWORDS, complete
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
    ('generate "a moon*" {\n  st', "generate"),
    ('generate "a moon*" { steps: 3, ', "generate"),
])
def test_option_names_of_the_enclosing_block(statement: str, kind: str) -> None:
    assert labels(HEAD + statement) == [name for name, spec in SCHEMA.items()
                                        if kind in spec.kinds]


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
