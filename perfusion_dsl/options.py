"""The option schema of `learn` and `generate`: types, ranges, defaults (LANGUAGE.md)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from perfusion_dsl.nodes import Bare, ListV, Str, Value

INT = re.compile(r"[+-]?\d+")
NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
SIZE = re.compile(r"(\d+)x(\d+)")
MAX_SEED = 2**63 - 1

DEFAULT_TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a good photo of a {}",
    "a photo of one {}",
    "a rendition of the {}",
)


class Invalid(Exception):
    """A value that does not fit its option; the message says what is allowed."""

    def __init__(self, message: str, help: str | None = None, at: Value | None = None):
        super().__init__(message)
        self.message = message
        self.help = help
        self.at = at


def describe(value: Value) -> str:
    if isinstance(value, ListV):
        return "a list"
    if isinstance(value, Str):
        return "a string"
    return f"`{value.text}`"


def number(value: Value, key: str) -> float:
    if isinstance(value, Bare) and NUMBER.fullmatch(value.text):
        return float(value.text)
    raise Invalid(f"`{key}` must be a number, found {describe(value)}", at=value)


def integer(value: Value, key: str) -> int:
    if isinstance(value, Bare) and INT.fullmatch(value.text):
        return int(value.text)
    if isinstance(value, Bare) and NUMBER.fullmatch(value.text):
        raise Invalid(f"`{key}` must be a whole number, found `{value.text}`", at=value)
    raise Invalid(f"`{key}` must be a whole number, found {describe(value)}", at=value)


def int_range(lo: int, hi: int) -> Callable[[Value, str], int]:
    def parse(value: Value, key: str) -> int:
        got = integer(value, key)
        if not lo <= got <= hi:
            bound = f"at least {lo:,}" if hi == MAX_SEED else f"between {lo:,} and {hi:,}"
            raise Invalid(f"`{key}` must be {bound}, found {got:,}", at=value)
        return got

    return parse


def float_range(lo: float, hi: float, lo_open: bool = False) -> Callable[[Value, str], float]:
    def parse(value: Value, key: str) -> float:
        got = number(value, key)
        low_ok = got > lo if lo_open else got >= lo
        if not (low_ok and got <= hi):
            bound = f"greater than {lo:g} and at most {hi:g}" if lo_open else \
                f"between {lo:g} and {hi:g}"
            raise Invalid(f"`{key}` must be {bound}, found {value_text(value)}", at=value)
        return got

    return parse


def value_text(value: Value) -> str:
    return value.text if isinstance(value, Bare) else describe(value)


def choice(*allowed: str) -> Callable[[Value, str], str]:
    def parse(value: Value, key: str) -> str:
        if isinstance(value, Bare) and value.text in allowed:
            return value.text
        options = " or ".join(f"`{a}`" for a in allowed)
        raise Invalid(f"`{key}` must be {options}, found {describe(value)}", at=value)

    return parse


def boolean(value: Value, key: str) -> bool:
    if isinstance(value, Bare) and value.text in ("true", "false"):
        return value.text == "true"
    raise Invalid(f"`{key}` must be `true` or `false`, found {describe(value)}", at=value)


def text(value: Value, key: str) -> str:
    if isinstance(value, Str):
        return value.value
    raise Invalid(f"`{key}` must be a quoted string, found {describe(value)}", at=value)


def path(value: Value, key: str) -> str:
    if isinstance(value, Str | Bare) and value.value:
        return value.value
    raise Invalid(f"`{key}` must be a path, found {describe(value)}", at=value)


def mask(value: Value, key: str) -> str:
    if isinstance(value, Bare) and value.text in ("none", "attention"):
        return value.text
    return path(value, key)


def size(value: Value, key: str) -> str:
    m = SIZE.fullmatch(value.text) if isinstance(value, Bare) else None
    if m is None:
        raise Invalid(f"`{key}` must be WIDTHxHEIGHT such as `512x512`, found {describe(value)}",
                      at=value)
    for side in (int(m.group(1)), int(m.group(2))):
        if not (8 <= side <= 4096 and side % 8 == 0):
            raise Invalid(f"`{key}` sides must be multiples of 8 between 8 and 4096, "
                          f"found {m.group()}", at=value)
    return f"{int(m.group(1))}x{int(m.group(2))}"


def resolution(value: Value, key: str) -> int:
    got = int_range(8, 4096)(value, key)
    if got % 8:
        raise Invalid(f"`{key}` must be a multiple of 8, found {got}", at=value)
    return got


def strength(value: Value, key: str) -> tuple[float, ...]:
    one = float_range(0.0, 1.0)
    if isinstance(value, ListV):
        if not value.items:
            raise Invalid(f"`{key}` list is empty", at=value)
        values = tuple(one(item, key) for item in value.items)
        if len(set(values)) != len(values):
            raise Invalid(f"`{key}` lists a value twice", at=value)
        return values
    return (one(value, key),)


def templates(value: Value, key: str) -> tuple[str, ...]:
    items = value.items if isinstance(value, ListV) else (value,)
    if not items:
        raise Invalid(f"`{key}` list is empty", at=value)
    out = []
    for item in items:
        got = text(item, key)
        if got.count("{}") != 1:
            raise Invalid(f"each of `{key}` must contain `{{}}` exactly once, found "
                          f"{got.count('{}')}", at=item,
                          help='`{}` is replaced by the concept, e.g. "a photo of a {}"')
        out.append(got)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class OptionSpec:
    parse: Callable[[Value, str], Any]
    default: Any
    kinds: frozenset[str]


LEARN, GENERATE = "learn", "generate"
_L, _G = frozenset({LEARN}), frozenset({GENERATE})

SCHEMA: dict[str, OptionSpec] = {
    "steps": OptionSpec(int_range(1, 1_000_000), None, frozenset({LEARN, GENERATE})),
    "seed": OptionSpec(int_range(0, MAX_SEED), 0, frozenset({LEARN, GENERATE})),
    "batch": OptionSpec(int_range(1, 4096), 16, _L),
    "lr": OptionSpec(float_range(0.0, 10.0, lo_open=True), 0.03, _L),
    "embedding_lr": OptionSpec(float_range(0.0, 10.0, lo_open=True), 0.006, _L),
    "lock": OptionSpec(choice("local", "global"), "local", _L),
    "mask": OptionSpec(mask, "none", _L),
    "resolution": OptionSpec(resolution, None, _L),
    "flip": OptionSpec(boolean, True, _L),
    "templates": OptionSpec(templates, DEFAULT_TEMPLATES, _L),
    "beta": OptionSpec(float_range(0.0, 1.0), 0.75, _L),
    "tau": OptionSpec(float_range(0.0, 1.0, lo_open=True), 0.1, _L),
    "strength": OptionSpec(strength, (0.5,), _G),
    "guidance": OptionSpec(float_range(0.0, 100.0), None, _G),
    "size": OptionSpec(size, None, _G),
    "negative": OptionSpec(text, "", _G),
    "out": OptionSpec(path, None, _G),
}
# Defaults that differ by statement kind (learn steps follow the Perfusion recipe;
# sampling steps default to the model's own).
KIND_DEFAULTS: dict[str, dict[str, Any]] = {LEARN: {"steps": 400}, GENERATE: {"steps": None}}


def defaults_for(kind: str) -> dict[str, Any]:
    """Every option of `kind` with its default value."""
    base = {k: s.default for k, s in SCHEMA.items() if kind in s.kinds}
    base.update(KIND_DEFAULTS[kind])
    return base
