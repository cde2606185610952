"""How `learn` and `generate` options are written and checked (docs/language.md); their
types, ranges and defaults are declared once, by the plan's option models."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, get_args

from pydantic import BaseModel

from perfusion_dsl.nodes import Bare, ListV, Str, Value
from perfusion_dsl.plan import MAX_SEED, LearnOptions, RenderOptions

INT = re.compile(r"[+-]?\d+")
NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
SIZE = re.compile(r"(\d+)x(\d+)")
MAX_DIGITS = 30


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
    return f"`{shorten(value.text)}`"


def shorten(text: str, limit: int = 40) -> str:
    """`text`, cut short so that a huge value cannot flood a message."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _want(kind: str, bound: str) -> str:
    return f"{kind} ({bound})" if bound else kind


def number(value: Value, key: str, bound: str = "") -> float:
    if isinstance(value, Bare) and NUMBER.fullmatch(value.text):
        return float(value.text)
    raise Invalid(f"`{key}` must be {_want('a number', bound)}, found {describe(value)}",
                  at=value)


def integer(value: Value, key: str, bound: str = "") -> int:
    want = _want("a whole number", bound)
    if isinstance(value, Bare) and INT.fullmatch(value.text):
        if len(value.text) > MAX_DIGITS:  # int() refuses over 4,300 digits; no limit is near
            size = "small" if value.text.startswith("-") else "large"
            raise Invalid(f"`{key}` must be {want}, found a {len(value.text):,}-digit number "
                          f"(too {size})", at=value)
        return int(value.text)
    if isinstance(value, Bare) and NUMBER.fullmatch(value.text):
        raise Invalid(f"`{key}` must be {want}, found `{shorten(value.text)}`", at=value)
    raise Invalid(f"`{key}` must be {want}, found {describe(value)}", at=value)


def int_range(lo: int, hi: int) -> Callable[[Value, str], int]:
    bound = f"at least {lo:,}" if hi == MAX_SEED else f"between {lo:,} and {hi:,}"

    def parse(value: Value, key: str) -> int:
        got = integer(value, key, bound)
        if not lo <= got <= hi:
            why = f"at most {hi:,}" if got > hi and hi == MAX_SEED else bound
            raise Invalid(f"`{key}` must be {why}, found {got:,}", at=value)
        return got

    return parse


def float_range(lo: float, hi: float, lo_open: bool = False) -> Callable[[Value, str], float]:
    bound = f"greater than {lo:g} and at most {hi:g}" if lo_open else \
        f"between {lo:g} and {hi:g}"

    def parse(value: Value, key: str) -> float:
        got = number(value, key, bound)
        low_ok = got > lo if lo_open else got >= lo
        if not (low_ok and got <= hi):
            raise Invalid(f"`{key}` must be {bound}, found {value_text(value)}", at=value)
        return got

    return parse


def value_text(value: Value) -> str:
    return shorten(value.text) if isinstance(value, Bare) else describe(value)


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
    if isinstance(value, Str):
        raise Invalid(f"`{key}` is empty: it must name a folder", at=value,
                      help='write a path such as "renders/wizards", or leave `out` out for '
                           "the default folder")
    raise Invalid(f"`{key}` must be a path, found {describe(value)}", at=value)


def mask(value: Value, key: str) -> str:
    if isinstance(value, Bare) and value.text in ("none", "attention"):
        return value.text
    return path(value, key)


def captions(value: Value, key: str) -> str:
    if isinstance(value, Bare) and value.text == "none":
        return value.text
    return path(value, key)


def size(value: Value, key: str) -> str:
    m = SIZE.fullmatch(value.text) if isinstance(value, Bare) else None
    if m is None:
        raise Invalid(f"`{key}` must be WIDTHxHEIGHT such as `512x512`, found {describe(value)}",
                      at=value)
    sides = [int(g) if len(g) <= MAX_DIGITS else 0 for g in m.groups()]
    if not all(8 <= side <= 4096 and side % 8 == 0 for side in sides):
        raise Invalid(f"`{key}` sides must be multiples of 8 between 8 and 4096, "
                      f"found {shorten(m.group())}", at=value)
    return f"{sides[0]}x{sides[1]}"


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
        for i, got in enumerate(values):
            if got in values[:i]:
                first, again = value_text(value.items[values.index(got)]), \
                    value_text(value.items[i])
                raise Invalid(f"`{key}` lists {got:g} twice", at=value.items[i],
                              help=None if first == again else f"`{first}` is the same value")
        return values
    return (one(value, key),)


def templates(value: Value, key: str) -> tuple[str, ...]:
    items = value.items if isinstance(value, ListV) else (value,)
    if not items:
        raise Invalid(f"`{key}` list is empty", at=value)
    out = []
    for item in items:
        got = text(item, key)
        if (problem := template_problem(got)) is not None:
            raise Invalid(f"each of `{key}` {problem}", at=item, help=TEMPLATE_HELP)
        out.append(got)
    return tuple(out)


TEMPLATE_HELP = '`{}` is replaced by the concept, e.g. "a photo of a {}"'


def template_problem(caption: str) -> str | None:
    """What is wrong with a caption template (a `templates` item, a caption file's text):
    it must hold `{}`, where the concept phrase goes, exactly once."""
    if caption.count("{}") != 1:
        return f"must contain `{{}}` exactly once, found {caption.count('{}')}"
    return None


def _bounds(model: type[BaseModel], key: str) -> tuple[Any, Any, bool]:
    """(low, high, low_open) of a numeric field as the plan's option model declares it."""
    low, high, low_open = None, None, False
    for rule in model.model_fields[key].metadata:
        if getattr(rule, "ge", None) is not None:
            low = rule.ge
        elif getattr(rule, "gt", None) is not None:
            low, low_open = rule.gt, True
        elif getattr(rule, "le", None) is not None:
            high = rule.le
    return low, high, low_open


def _int(model: type[BaseModel], key: str) -> Callable[[Value, str], int]:
    low, high, _ = _bounds(model, key)
    return int_range(low, high)


def _float(model: type[BaseModel], key: str) -> Callable[[Value, str], float]:
    low, high, low_open = _bounds(model, key)
    return float_range(low, high, lo_open=low_open)


def _choice(model: type[BaseModel], key: str) -> Callable[[Value, str], str]:
    return choice(*get_args(model.model_fields[key].annotation))


def _resolution() -> Callable[[Value, str], int]:
    within = _int(LearnOptions, "resolution")
    step = next(r.multiple_of for r in LearnOptions.model_fields["resolution"].metadata
                if getattr(r, "multiple_of", None))

    def parse(value: Value, key: str) -> int:
        got = within(value, key)
        if got % step:
            raise Invalid(f"`{key}` must be a multiple of {step}, found {got}", at=value)
        return got

    return parse


@dataclass(frozen=True, slots=True)
class OptionSpec:
    parse: Callable[[Value, str], Any]
    kinds: frozenset[str]


LEARN, GENERATE = "learn", "generate"
_L, _G = frozenset({LEARN}), frozenset({GENERATE})

# How each option is written and checked; its type, range and default are the plan's
# (`LearnOptions`, `RenderOptions`). The order is the one help messages list them in.
SCHEMA: dict[str, OptionSpec] = {
    "steps": OptionSpec(_int(LearnOptions, "steps"), frozenset({LEARN, GENERATE})),
    "seed": OptionSpec(_int(LearnOptions, "seed"), frozenset({LEARN, GENERATE})),
    "batch": OptionSpec(_int(LearnOptions, "batch"), _L),
    "lr": OptionSpec(_float(LearnOptions, "lr"), _L),
    "embedding_lr": OptionSpec(_float(LearnOptions, "embedding_lr"), _L),
    "lock": OptionSpec(_choice(LearnOptions, "lock"), _L),
    "mask": OptionSpec(mask, _L),
    "captions": OptionSpec(captions, _L),
    "resolution": OptionSpec(_resolution(), _L),
    "flip": OptionSpec(boolean, _L),
    "templates": OptionSpec(templates, _L),
    "beta": OptionSpec(_float(LearnOptions, "beta"), _L),
    "tau": OptionSpec(_float(LearnOptions, "tau"), _L),
    "strength": OptionSpec(strength, _G),
    "guidance": OptionSpec(_float(RenderOptions, "guidance"), _G),
    "size": OptionSpec(size, _G),
    "negative": OptionSpec(text, _G),
    "out": OptionSpec(path, _G),
}
# A generate statement's own options, beside the sampling ones each render carries: image
# k uses `seed + k`, one image per strength value, written under `out` (or the default
# folder when None).
GENERATE_DEFAULTS: dict[str, Any] = {"seed": 0, "strength": (0.5,), "out": None}


# The built-in toy:shapes model (docs/toy.md) speaks only its world's words, so it gets
# captions in them; its UNet's steps cost mostly a fixed overhead, so 150 steps of 16
# pictures learn its concepts as well as 300 of 8 (paired, within noise) in five sixths of
# the time or less; and its sampler, DPM-Solver++, draws at 15 steps (guidance 5) what DDIM
# drew at 25 (docs/toy.md, Speed).
TOY_TEMPLATES = ("a {}",)
MODEL_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "toy:shapes": {LEARN: {"templates": TOY_TEMPLATES, "batch": 16, "steps": 150},
                   GENERATE: {"steps": 15, "guidance": 5.0}},
}


def defaults_for(kind: str, model: str | None = None) -> dict[str, Any]:
    """Every option of `kind` with its default value (for `model`, where a built-in model
    has its own)."""
    base = LearnOptions().model_dump() if kind == LEARN else \
        RenderOptions().model_dump() | GENERATE_DEFAULTS
    base.update(MODEL_DEFAULTS.get(model or "", {}).get(kind, {}))
    return base
