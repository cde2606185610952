"""The parser builds the documented tree for every construct of docs/language.md."""

from __future__ import annotations

import pytest

from perfusion_dsl import nodes as n
from perfusion_dsl.parser import ToNodes, parse
from perfusion_dsl.source import Source


def module(text: str) -> n.Module:
    parsed = parse(Source("t.concept", text))
    assert parsed.diagnostics == (), parsed.diagnostics
    return parsed.module


def test_seed_line_bare_glob_and_token_both_with_a_star() -> None:
    (learn,) = module("learn myface*.png as me* <person, human> "
                      "adjectives: [tall, bearded, stocky]\n").statements
    assert learn == n.Learn(
        pattern=n.Bare("myface*.png"), token="me*",
        supers=(n.Super((n.Bare("person"),)), n.Super((n.Bare("human"),))),
        adjectives=n.ListV((n.Bare("tall"), n.Bare("bearded"), n.Bare("stocky"))), block=None)
    assert (learn.token_span.line, learn.token_span.col) == (1, 22)
    assert (learn.pattern.span.col, learn.pattern.span.end_col) == (7, 18)


def test_multi_word_and_quoted_supercategories() -> None:
    (learn,) = module('learn "my photos/*.png" as pip* <golden retriever, "good dog">\n')\
        .statements
    assert isinstance(learn, n.Learn)
    assert [s.text for s in learn.supers] == ["golden retriever", "good dog"]
    assert learn.pattern == n.Str("my photos/*.png")


def test_multi_line_blocks_and_lists_with_comments_anywhere() -> None:
    text = ("# head\n"
            "let xs = [  # opening\n"
            "  a,\n"
            "  # between\n"
            "  b\n"
            "  c,  # trailing comma allowed\n"
            "]\n"
            "\n"
            'generate "x {xs}" x 2 {  # count and block\n'
            "  seed: 3, strength: [0.1,\n"
            "    0.2]\n"
            "\n"
            "  negative: \"blurry\"\n"
            "}  # after\n")
    let, gen = module(text).statements
    assert let == n.Let("xs", n.ListV((n.Bare("a"), n.Bare("b"), n.Bare("c"))))
    assert isinstance(gen, n.Generate) and gen.count == n.Bare("2")
    assert gen.block is not None
    assert [o.key for o in gen.block.options] == ["seed", "strength", "negative"]
    assert len(module(text).comments) == 6


def test_escapes_are_kept_raw_and_decoded_on_demand() -> None:
    (gen,) = module(r'generate "say \"hi\" \\ \{not a group\} a\|b\tc\n"' "\n").statements
    assert isinstance(gen, n.Generate)
    assert gen.template.raw == r"say \"hi\" \\ \{not a group\} a\|b\tc\n"
    assert gen.template.value == 'say "hi" \\ {not a group} a|b\tc\n'


@pytest.mark.parametrize("name", ["x", "model", "learn", "as"])
def test_keywords_are_names_where_only_a_name_fits(name: str) -> None:
    """The contextual lexer: `let x = …` and `{ x: … }` keys are names, not keywords."""
    let, defaults = module(f"let {name} = [a]\ndefaults {{ {name}: 1 }}\n").statements
    assert isinstance(let, n.Let) and let.name == name
    assert isinstance(defaults, n.Defaults) and defaults.block.options[0].key == name


def test_last_line_without_newline_and_crlf_free_text() -> None:
    assert module('model "toy:shapes"').statements == (n.Model(n.Str("toy:shapes")),)


def test_spans_are_excluded_from_equality() -> None:
    a = module('model "m"\n').statements
    b = module('\n\nmodel    "m"\n').statements
    assert a == b
    assert a[0].span != b[0].span


def test_transformer_refuses_rules_it_does_not_know() -> None:
    with pytest.raises(NotImplementedError, match="no node builder"):
        ToNodes().__default__("mystery_rule", [], None)
