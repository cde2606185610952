"""Turns Lark's parse errors into diagnostics in the spec author's words."""

from __future__ import annotations

import re

from lark import Token, UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from perfusion_dsl.diagnostics import Diagnostic, did_you_mean, error
from perfusion_dsl.source import Source, span_at

# Every statement keyword of grammar/concept.lark, with what must follow it for a line to
# start that statement (so a list item `learn` or `model,` on a line of its own does not).
STATEMENT_STARTS = {"model": '[ \t]+"', "use": '[ \t]+"', "let": "[ \t]+[A-Za-z_]",
                    "defaults": "[ \t]*\\{", "learn": "[ \t]+\\S", "generate": '[ \t]+"'}
STATEMENTS = tuple(STATEMENT_STARTS)

# What each terminal of grammar/concept.lark is called in messages.
DESCRIBE = {
    "MODEL": "`model`", "USE": "`use`", "LET": "`let`", "DEFAULTS": "`defaults`",
    "LEARN": "`learn`", "GENERATE": "`generate`", "AS": "`as`",
    "ADJECTIVES": "`adjectives:`", "X": "`x COUNT`", "EQUALS": "`=`", "COLON": "`:`",
    "COMMA": "`,`", "LANGLE": "`<`", "RANGLE": "`>`", "LBRACE": "`{`", "RBRACE": "`}`",
    "LBRACK": "`[`", "RBRACK": "`]`", "NAME": "a name", "TOKEN": "a concept token (`name*`)",
    "STRING": "a quoted string", "GLOB": "a value", "BARE": "a word",
    "_NL": "end of line", "$END": "end of file",
}
_ORDER = list(DESCRIBE)
_STRING = re.compile(r'"(?:[^"\\\n\r]|\\[^\n\r])*"')  # as in grammar/concept.lark
_WORD = re.compile(r'"[^"\n]*"?|[^\s\[\]{}<>,:=#"]+|\S')
HELP = {
    "TOKEN": "a concept token is a name followed by `*`, e.g. `teddy*`",
    "STRING": 'put the text in double quotes, e.g. "a photo of teddy*"',
    "COLON": "options are written `key: value`",
}


def _expected(names: set[str]) -> str:
    known = sorted((x for x in names if x in DESCRIBE), key=_ORDER.index)
    if set(STATEMENTS) <= {x.lower() for x in known}:
        return f"a statement ({_either([DESCRIBE[s.upper()] for s in STATEMENTS])})"
    words = [DESCRIBE[x] for x in known if x not in ("MODEL", "USE", "LET", "DEFAULTS")]
    return _either(words) if words else "something else"


def _either(words: list[str]) -> str:
    """`a`, `a or b`, `a, b or c`."""
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _found(text: str, offset: int) -> tuple[str, int]:
    """How to name what sits at `offset`, and its length."""
    if offset >= len(text.rstrip("\n")):
        return "end of file", 0
    if text[offset] == "\n":
        return "end of line", 0
    m = _WORD.match(text, offset)
    word = m.group() if m else text[offset]
    shown = word if len(word) <= 30 else word[:27] + "..."
    return f"`{shown}`", len(word)


def _where(exc: UnexpectedInput, text: str) -> int:
    token = getattr(exc, "token", None)
    if isinstance(token, Token) and token.type != "$END" and token.start_pos is not None:
        return int(token.start_pos)
    pos = getattr(exc, "pos_in_stream", None)
    if isinstance(exc, UnexpectedCharacters) and pos is not None and pos >= 0:
        return int(pos)
    return len(text.rstrip("\n"))


def _expected_names(exc: UnexpectedInput) -> set[str]:
    if isinstance(exc, UnexpectedToken):
        return set(exc.expected)
    if isinstance(exc, UnexpectedCharacters):
        return set(exc.allowed or ())
    return set(getattr(exc, "expected", ()) or ())


# Help keyed by the word just before the error (on the same line): advice that depends on
# where the author is, e.g. after `model` a string is the model name, not a prompt.
AFTER = {
    "model": 'the model name is quoted: `model "toy:shapes"`',
    "use": 'the path is quoted: `use "other.concept"`',
    "generate": 'the prompt template is quoted: `generate "a photo of teddy*"`',
    "adjectives": "write `adjectives: [fluffy, brown]`",
    "x": "`x` is followed by the number of images, e.g. `x 4`",
}
_LAST_WORD = re.compile(r"([A-Za-z_][A-Za-z0-9_-]*\*?|\S)[ \t]*$")


def _previous(text: str, offset: int) -> str:
    """The word or mark just before `offset` on its line ("" at the start of a line)."""
    line_start = text.rfind("\n", 0, offset) + 1
    m = _LAST_WORD.search(text, line_start, offset)
    return m.group(1) if m else ""


def _contextual_help(text: str, offset: int, names: set[str], found: str) -> str | None:
    previous = _previous(text, offset)
    if (previous in AFTER and previous != "x") or (previous == "x" and names == {"BARE"}):
        return AFTER[previous]
    if found == "`{`" and not previous:
        return "a `{` block starts on the same line as its statement"
    if names >= {"LANGLE"} and previous.endswith("*"):
        return "the supercategories follow the token in angle brackets: `teddy* <teddy bear>`"
    if previous == "," and names & {"BARE", "STRING"}:
        return "a supercategory or item is missing after the `,`"
    return None


def translate(exc: UnexpectedInput, source: Source) -> Diagnostic:
    """One syntax-error diagnostic; never mentions Lark's terminal names or line -1."""
    text = source.text if source.text.endswith("\n") else source.text + "\n"
    offset = _where(exc, text)
    names = _expected_names(exc)
    found, length = _found(text, offset)
    expected = _expected(names)
    if names == {"BARE"} and _previous(text, offset) == "x":
        expected = "the number of images"
    if text.startswith('"', offset) and not _STRING.match(text, offset):
        # An unterminated string is the problem wherever it stands, not what was expected.
        end = text.find("\n", offset)
        return error("syntax", "string is not closed before the end of the line", source.file,
                     span_at(text, offset, end - offset),
                     help='add the closing `"`; a string cannot span lines '
                          '(write `\\n` for a line break)')
    message = f"expected {expected}, found {found}"
    help_text = _contextual_help(text, offset, names, found) or next(
        (HELP[x] for x in names if x in HELP and len(names - {"_NL"}) == 1), None)
    if expected.startswith("a statement") and found.startswith("`"):
        hint = did_you_mean(found.strip("`"), STATEMENTS)
        message += hint
    if found == "end of file" and names & {"RBRACE", "RBRACK"}:
        help_text = "a `{` block or `[` list is not closed"
    return error("syntax", message, source.file, span_at(text, offset, length), help=help_text)
