"""What an editor may offer at a cursor in a `.concept` file (`perfusion lsp`): statement
keywords at the start of a line, the option names of the enclosing `learn` or `generate`
block (closest to what is typed first), the values of options with a fixed set, `let` names
inside a template's `{…}`, concept tokens elsewhere in a template (the file's and, given in
`Surroundings`, those of the files it `use`s), file paths in `use` and in learn patterns,
and supercategory words (the base model's single-token words, given in `Surroundings`).
It reads the text before the cursor (a file being typed rarely parses); only paths read the
file system."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher
from pathlib import Path
from typing import Literal, get_args

from perfusion_dsl.options import SCHEMA
from perfusion_dsl.plan import LearnOptions
from perfusion_dsl.templates import NAME, TOKEN

Kind = Literal["keyword", "option", "value", "list", "token", "file", "folder", "word"]

KEYWORDS = ("learn", "generate", "let", "use", "model", "defaults")
# options whose values are a fixed set (mask and captions also take a glob of files); lock's are the
# plan's own choices, as `options` checks them
VALUES = {"lock": get_args(LearnOptions.model_fields["lock"].annotation),
          "mask": ("none", "attention"), "captions": ("none",), "flip": ("true", "false")}
_FIRST_WORD = re.compile(r"(?m)^([a-z]+)\b")
_LET = re.compile(rf"(?m)^[ \t]*let[ \t]+({NAME.pattern})")  # the names templates accept
_TOKEN = re.compile(rf"\bas[ \t]+({TOKEN.pattern})")
_KEY_TYPED = re.compile(r"^[ \t]*([a-z_]+)[ \t]*:[ \t]*[a-z]*$")
_WORD_TYPED = re.compile(r"(?:^|[,{][ \t]*)[ \t]*([a-z_]*)$")
_USE_PATH = re.compile(r'^[ \t]*use[ \t]+"([^"]*)$')
_LEARN_PATH = re.compile(r'^[ \t]*learn[ \t]+"?([^"\s]*)$')
_SUPER_TYPED = re.compile(rf"\bas[ \t]+{TOKEN.pattern}[ \t]*<[^>]*?([A-Za-z0-9_.-]*)$")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MAX_PATHS = 200  # a folder of 20,000 pictures offers its first entries, not all
MAX_WORDS = 100
CLOSE = 0.6  # a typed option name this similar to a real one still offers it (a typo)


@dataclass(frozen=True, slots=True)
class Item:
    label: str
    kind: Kind
    detail: str
    replace: int = 0  # characters before the cursor it replaces (a path's last segment)
    filter: str | None = None  # what the client filters on, when not the label (a typo)


@dataclass(frozen=True, slots=True)
class Surroundings:
    """What completion needs beyond the text: the file's folder (for paths), the tokens of
    the files it `use`s (token, file), and the base model's single-token words."""

    folder: Path | None = None
    used_tokens: tuple[tuple[str, str], ...] = ()
    words: Callable[[], Sequence[str]] = tuple  # read only where words are offered


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


def _paths(folder: Path | None, typed: str, suffixes: tuple[str, ...]) -> list[Item]:
    """Entries of the folder `typed` points into that start with its last segment: folders
    and files with one of `suffixes`; hidden ones only when the segment starts with `.`."""
    if folder is None:
        return []
    head, _, prefix = typed.rpartition("/")
    where = folder / head if head else folder
    found: list[Item] = []
    try:
        with os.scandir(where) as entries:
            for entry in entries:
                if not entry.name.startswith(prefix) or \
                        (entry.name.startswith(".") and not prefix.startswith(".")):
                    continue
                if entry.is_dir():
                    found.append(Item(entry.name + "/", "folder", "folder", len(prefix)))
                elif entry.name.lower().endswith(suffixes):
                    found.append(Item(entry.name, "file", "file", len(prefix)))
                if len(found) >= MAX_PATHS:
                    break
    except OSError:
        return []
    return sorted(found, key=lambda item: item.label)


_USE = re.compile(r'(?m)^[ \t]*use[ \t]+"([^"\n]+)"')
_MODEL = re.compile(r'(?m)^[ \t]*model[ \t]+"([^"\n]*)"')
_WHOLE_WORD = re.compile(r"([a-z]{2,})</w>")


def used_tokens(text: str, folder: Path, read: Callable[[Path], str | None]
                ) -> tuple[tuple[str, str], ...]:
    """(token, file) for the tokens learned in the files `text` `use`s, read with `read`
    (an editor's buffer, else the disk; None for unreadable)."""
    found: dict[str, str] = {}
    for path in dict.fromkeys(_USE.findall(text)):
        used = read(Path(os.path.normpath(folder / path)))
        for token in _TOKEN.findall(used or ""):
            found.setdefault(token, path)
    return tuple(found.items())


def model_line(text: str) -> str | None:
    """The model a file names on its `model` line, if any."""
    found = _MODEL.search(text)
    return found.group(1).strip() if found else None


def tokenizer_words(folder: Path) -> tuple[str, ...]:
    """The words a diffusers model's CLIP tokenizer keeps whole (one token each), from its
    vocabulary file alone (`tokenizer/vocab.json`, else `tokenizer/tokenizer.json`), sorted.
    A word-final piece of a longer word (`abric` of `fabric`) is one token too and cannot be
    told apart from the file, so completion offers words once a letter is typed. Nothing is
    loaded but the JSON."""
    for name, key in (("vocab.json", None), ("tokenizer.json", "model")):
        try:
            data = json.loads((folder / "tokenizer" / name).read_text("utf-8"))
        except (OSError, ValueError):
            continue
        vocab = data.get(key, {}).get("vocab") if key else data
        if isinstance(vocab, dict):
            return tuple(sorted({m.group(1) for entry in vocab
                                 if (m := _WHOLE_WORD.fullmatch(entry))}))
    return ()


def _options(kinds: set[str], typed: str) -> list[Item]:
    """The block's option names; with a word typed, the closest first, and a close misspelling
    still offers the real name (`stpes` → `steps`)."""
    items = [(name, spec) for name, spec in SCHEMA.items() if spec.kinds & kinds]
    if not typed:
        return [Item(name, "option", ", ".join(sorted(spec.kinds))) for name, spec in items]

    def score(name: str) -> float:
        return 2.0 if name.startswith(typed) else SequenceMatcher(None, typed, name).ratio()

    ranked = sorted(items, key=lambda pair: -score(pair[0]))
    return [Item(name, "option", ", ".join(sorted(spec.kinds)),
                 filter=typed if not name.startswith(typed) and score(name) >= CLOSE
                 else None) for name, spec in ranked]


def complete(text: str, offset: int, around: Surroundings | None = None) -> list[Item]:
    """The items to offer at code-point `offset` of `text`."""
    around = around or Surroundings()
    before = text[:offset]
    state = scan(before)
    line = before[before.rfind("\n") + 1:]
    if state.in_comment:
        return []
    if state.in_string:
        if (path := _USE_PATH.match(line)) and state.depth == 0:
            return _paths(around.folder, path.group(1), (".concept",))
        if (path := _LEARN_PATH.match(line)) and state.depth == 0:
            return _paths(around.folder, path.group(1), IMAGE_SUFFIXES)
        if state.in_slot:
            return [Item(name, "list", "let") for name in dict.fromkeys(_LET.findall(text))]
        own = [Item(token, "token", "learned in this file")
               for token in dict.fromkeys(_TOKEN.findall(text))]
        seen = {item.label for item in own}
        return own + [Item(token, "token", f"learned in {file}")
                      for token, file in around.used_tokens if token not in seen]
    if state.depth > 0 and state.statement in ("learn", "generate", "defaults"):
        typed = _KEY_TYPED.match(line)
        if typed:
            return [Item(value, "value", typed.group(1))
                    for value in VALUES.get(typed.group(1), ())]
        if word := _WORD_TYPED.search(line):
            kinds = {"learn", "generate"} if state.statement == "defaults" \
                else {state.statement}
            return _options(kinds, word.group(1))
        return []
    if state.depth == 0 and (path := _LEARN_PATH.match(line)):
        return _paths(around.folder, path.group(1), IMAGE_SUFFIXES)
    if state.depth == 0 and (sup := _SUPER_TYPED.search(line)):
        prefix = sup.group(1).lower()
        if not prefix:
            return []
        return [Item(word, "word", "one token of the base model", len(prefix))
                for word in around.words() if word.startswith(prefix)][:MAX_WORDS]
    if state.depth == 0 and re.fullmatch(r"[a-z]*", line):
        return [Item(word, "keyword", "statement") for word in KEYWORDS]
    return []
