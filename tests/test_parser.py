"""The parser builds the documented tree for every construct of docs/language.md."""

from __future__ import annotations

import pytest
from helpers import with_spans

from perfusion_dsl import nodes as n
from perfusion_dsl import parser as parser_module
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


# --------------------------------------------------- an editor's buffer, statement by statement

BUFFER = """\
# a header comment
let places = [left,
  right]   # a list over two lines

learn "p/*.png" as moon* <crescent> adjectives: [thin] {
  steps: 300
  # a comment inside the block
  lr: 0.05
}
generate "a moon* at the {places}" x 2 { strength: [0.4, 0.6] }
  generate "indented, so it stays with the statement above"
learn img[0-9].png as dot* <dot>
"""


def _both(text: str) -> tuple[object, object]:
    whole, parts = parse(Source("t.concept", text)), parse(Source("t.concept", text),
                                                           by_statement=True)
    assert (parts.diagnostics, parts.broken_names) == (whole.diagnostics, whole.broken_names)
    return with_spans(whole.module), with_spans(parts.module)


@pytest.mark.parametrize("text", [
    BUFFER, BUFFER.replace("\n", "\r\n"), BUFFER.rstrip("\n"), "", "\n\n# only a comment\n",
    BUFFER.replace("lr: 0.05", "lr: 0.05 {"),  # a block never closed: the whole-file errors
    BUFFER.replace("generate", "generat"),  # a syntax error in the middle
    "let a = [\nlearn,\ngenerate]\n",  # keywords in column 0 inside a list
], ids=["buffer", "crlf", "no-final-newline", "empty", "comment", "unclosed", "error",
        "keywords-in-list"])
def test_by_statement_gives_the_whole_parse_with_spans_and_errors(text: str) -> None:
    whole, parts = _both(text)
    assert parts == whole


def test_by_statement_reparses_only_the_edited_statement() -> None:
    lines = [f'generate "statement {i}" x 2 {{\n  seed: {i}\n}}' for i in range(200)]
    before = "\n".join(lines) + "\n"
    parse(Source("t.concept", before), by_statement=True)
    remembered = dict(parser_module._STATEMENTS)
    # the first statement grows by two characters: every later one moves
    after = before.replace("seed: 0\n", "seed: 100\n", 1)
    edited = parse(Source("t.concept", after), by_statement=True)
    new = [chunk for chunk in parser_module._STATEMENTS if chunk not in remembered]
    assert new == ['generate "statement 0" x 2 {\n  seed: 100\n}\n']
    assert with_spans(edited.module) == with_spans(parse(Source("t.concept", after)).module)
    assert edited.module.statements[-1].span.start == len(after) - len(lines[-1]) - 1


def test_by_statement_shares_no_node_between_parses() -> None:
    """Passes group renders by their `generate` node's identity, so two files with the same
    text (or two parses of one) must not share nodes."""
    first = parse(Source("a.concept", BUFFER), by_statement=True).module.statements
    second = parse(Source("b.concept", BUFFER), by_statement=True).module.statements
    assert first == second
    assert all(a is not b for a, b in zip(first, second, strict=True))
