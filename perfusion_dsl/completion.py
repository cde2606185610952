"""What an editor may offer at a cursor in a `.concept` file (`perfusion lsp`): statement
keywords at the start of a line, the option names of the enclosing `learn` or `generate`
block, the values of options with a fixed set, `let` names inside a template's `{…}`, and
the file's concept tokens elsewhere in a template. It reads the text before the cursor
only (a file being typed rarely parses), so it is a pure function of text and offset."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, get_args

from perfusion_dsl.options import SCHEMA
from perfusion_dsl.plan import LearnOptions
from perfusion_dsl.templates import NAME, TOKEN

Kind = Literal["keyword", "option", "value", "list", "token"]

KEYWORDS = ("learn", "generate", "let", "use", "model", "defaults")
# options whose values are a fixed set (mask also takes a glob of mask files); lock's are the
# plan's own choices, as `options` checks them
VALUES = {"lock": get_args(LearnOptions.model_fields["lock"].annotation),
          "mask": ("none", "attention"), "flip": ("true", "false")}
_FIRST_WORD = re.compile(r"(?m)^([a-z]+)\b")
_LET = re.compile(rf"(?m)^[ \t]*let[ \t]+({NAME.pattern})")  # the names templates accept
_TOKEN = re.compile(rf"\bas[ \t]+({TOKEN.pattern})")
_KEY_TYPED = re.compile(r"^[ \t]*([a-z_]+)[ \t]*:[ \t]*[a-z]*$")
_WORD_TYPED = re.compile(r"(?:^|[,{][ \t]*)[ \t]*[a-z_]*$")


@dataclass(frozen=True, slots=True)
class Item:
    label: str
    kind: Kind
    detail: str


@dataclass
class State:
    """Where a cursor is, from the text before it."""

    in_string: bool = False
    in_slot: bool = False  # inside `{…}` of a string
    in_comment: bool = False
    depth: int = 0  # option blocks open outside strings
    statement: str = ""  # keyword of the statement the cursor is in


def scan(before: str) -> State:
    """Strings, `{…}` slots, comments and blocks open at the end of `before`."""
    state = State()
    escaped = False
    at_line_start = True
    for i, ch in enumerate(before):
        if state.in_comment:
            if ch == "\n":
                state.in_comment, at_line_start = False, True
            continue
        if state.in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"' or ch == "\n":
                state.in_string = state.in_slot = False
            elif ch == "{":
                state.in_slot = True
            elif ch == "}":
                state.in_slot = False
            continue
        if at_line_start and state.depth == 0:
            word = _FIRST_WORD.match(before, i)
            if word and word.group(1) in KEYWORDS:
                state.statement = word.group(1)
        at_line_start = ch == "\n"
        if ch == '"':
            state.in_string = True
        elif ch == "#":
            state.in_comment = True
        elif ch == "{":
            state.depth += 1
        elif ch == "}":
            state.depth = max(0, state.depth - 1)
    return state


def complete(text: str, offset: int) -> list[Item]:
    """The items to offer at code-point `offset` of `text`."""
    before = text[:offset]
    state = scan(before)
    line = before[before.rfind("\n") + 1:]
    if state.in_comment:
        return []
    if state.in_string:
        if state.in_slot:
            return [Item(name, "list", "let") for name in dict.fromkeys(_LET.findall(text))]
        return [Item(token, "token", "learned in this file")
                for token in dict.fromkeys(_TOKEN.findall(text))]
    if state.depth > 0 and state.statement in ("learn", "generate", "defaults"):
        typed = _KEY_TYPED.match(line)
        if typed:
            return [Item(value, "value", typed.group(1))
                    for value in VALUES.get(typed.group(1), ())]
        if _WORD_TYPED.search(line):
            kinds = {"learn", "generate"} if state.statement == "defaults" \
                else {state.statement}
            return [Item(name, "option", ", ".join(sorted(spec.kinds)))
                    for name, spec in SCHEMA.items() if spec.kinds & kinds]
        return []
    if state.depth == 0 and re.fullmatch(r"[a-z]*", line):
        return [Item(word, "keyword", "statement") for word in KEYWORDS]
    return []
