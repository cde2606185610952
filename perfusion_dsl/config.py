"""Finds and validates the optional `perfusion.toml` that holds a project's defaults."""

# A project may set its default model, where renders go, and raise or lower the safety limits
# within `CEILINGS`. Spec files have no syntax that touches limits, so a spec is never able to
# loosen a safety limit from inside a spec: only the person who owns the run root can, and
# only up to the ceilings.

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time
from pathlib import Path, PurePosixPath, PureWindowsPath

from perfusion_dsl.diagnostics import Diagnostic, did_you_mean, error
from perfusion_dsl.limits import CEILINGS, DEFAULT_LIMITS, Limits
from perfusion_dsl.nodes import Span
from perfusion_dsl.reading import Unreadable, read_limited
from perfusion_dsl.source import point, span_at

CONFIG_NAME = "perfusion.toml"
MAX_CONFIG_BYTES = 1_048_576
DEFAULT_MODEL = "toy:shapes"

SYNTAX = "config-syntax"
UNKNOWN_KEY = "config-unknown-key"
TYPE = "config-type"
RANGE = "config-range"
PATH = "config-path"

PROJECT_KEYS = ("model", "output_root")
TABLES = ("project", "limits", "checkpoints")
CHECKPOINT_KEYS = ("config",)
BOM = "\ufeff"

_HEADER = re.compile(
    r"^[\s\ufeff]*(?P<open>\[\[?)\s*(\"?)(?P<name>[A-Za-z0-9_.-]+)\2\s*\]\]?\s*(?:#.*)?$"
)
_AT = re.compile(r"\s*\(at (?:line (\d+), column (\d+)|end of document)\)$")


@dataclass(frozen=True, slots=True)
class ProjectConfig:
    """Project defaults; `file` is the `perfusion.toml` that was read, if any."""

    root: Path
    model: str = DEFAULT_MODEL
    output_root: str | None = None
    limits: Limits = DEFAULT_LIMITS
    file: Path | None = None
    # `[checkpoints]`: a single-file model (as specs name it) → its diffusers configuration,
    # a folder relative to the run root or a model id (docs/models.md)
    checkpoint_configs: tuple[tuple[str, str], ...] = ()


def find_root(start: Path) -> Path:
    """The nearest directory from `start` upwards holding `perfusion.toml`, else `start`.

    `start` is resolved first; when it is a file, the search begins at its folder.
    """
    here = start.resolve()
    if here.exists() and not here.is_dir():
        here = here.parent
    for folder in (here, *here.parents):
        if (folder / CONFIG_NAME).is_file():
            return folder
    return here


def load_config(
    root: Path, display: Callable[[Path], str]
) -> tuple[ProjectConfig, list[Diagnostic]]:
    """Read `root/perfusion.toml`; every problem is a diagnostic, none is raised.

    With errors, the config is the default one plus whatever fields were valid. Spans are
    positions in the file's text as stored on disk (a leading BOM counts as one column).
    """
    path = root / CONFIG_NAME
    if not os.path.lexists(path):
        return ProjectConfig(root=root), []
    file = display(path)
    text, diags = _read_text(path, file)
    if text is None:
        return ProjectConfig(root=root, file=path), diags
    try:
        data = tomllib.loads(text.removeprefix(BOM))
    except tomllib.TOMLDecodeError as exc:
        return ProjectConfig(root=root, file=path), [_syntax_error(exc, text, file)]
    checker = _Checker(text, file, root)
    checker.check(data)
    config = ProjectConfig(root, checker.model, checker.output_root,
                           replace(DEFAULT_LIMITS, **checker.limits), path,
                           tuple(sorted(checker.checkpoint_configs.items())))
    return config, checker.diags


# --- reading -------------------------------------------------------------------------------


def _read_text(path: Path, file: str) -> tuple[str | None, list[Diagnostic]]:
    """The file's text, or None with a diagnostic when it is unreadable, too big or not UTF-8."""
    try:
        data = read_limited(path, MAX_CONFIG_BYTES)
    except Unreadable as exc:
        return None, [error(SYNTAX, f"cannot read {CONFIG_NAME}: {exc.reason}", file, None)]
    if len(data) > MAX_CONFIG_BYTES:
        msg = f"{CONFIG_NAME} is larger than the limit of {MAX_CONFIG_BYTES:,} bytes"
        return None, [error(SYNTAX, msg, file, None,
                            help="it holds a few settings; is this the right file?")]
    try:
        return data.decode("utf-8"), []
    except UnicodeDecodeError as exc:
        good = data[: exc.start].decode("utf-8")
        msg = f"{CONFIG_NAME} is not valid UTF-8 at byte {exc.start}"
        return None, [error(SYNTAX, msg, file, point(good, len(good)),
                            help="save the file as UTF-8")]


def _syntax_error(exc: tomllib.TOMLDecodeError, text: str, file: str) -> Diagnostic:
    """Translate tomllib's message (`Reason (at line L, column C)`) into a located diagnostic."""
    message = str(getattr(exc, "msg", None) or exc)
    found = _AT.search(message)
    reason = message[: found.start()] if found else message
    line: int | None = getattr(exc, "lineno", None)
    col: int | None = getattr(exc, "colno", None)
    if line is None and found and found.group(1):
        line, col = int(found.group(1)), int(found.group(2))
    if line is None or col is None:
        span = point(text, len(text))  # "at end of document"
    else:
        shift = 1 if line == 1 and text.startswith(BOM) else 0  # tomllib never saw the BOM
        span = _at_line_col(text, line, col + shift)
    reason = reason[:1].lower() + reason[1:]
    hint = "strings need double quotes, e.g. `model = \"toy:shapes\"`"
    return error(SYNTAX, f"invalid TOML: {reason}", file, span,
                 help=hint if reason.startswith("invalid value") else None)


# --- spans ---------------------------------------------------------------------------------


def _at_line_col(text: str, line: int, col: int) -> Span:
    """A one-character span at 1-based `line`/`col`, clamped to the text."""
    starts = [0] + [m.end() for m in re.finditer("\n", text)]
    line = min(max(line, 1), len(starts))
    offset = min(starts[line - 1] + max(col, 1) - 1, len(text))
    return point(text, offset)


def _lines(text: str) -> Iterator[tuple[int, str]]:
    """(offset of the line's start, line without its newline) for every line."""
    offset = 0
    for line in text.split("\n"):
        yield offset, line
        offset += len(line) + 1


def _locate(text: str, table: str | None, key: str | None) -> Span:
    """Where `key` is set inside `[table]` (or the table's header when key is None).

    tomllib keeps no positions, so this scans lines; dotted top-level keys
    (`limits.max_concepts = 1`) and headers (`[project.sub]`) are found too.
    Falls back to the table's header, then to line 1, column 1.
    """
    section: str | None = None  # None = before any header, i.e. the top level
    target = table if key is None else key if table is None else f"{table}.{key}"
    wanted = _key_pattern(table, key)
    for offset, line in _lines(text):
        header = _HEADER.match(line)
        if header:  # an array of tables `[[x]]` is never one of our tables
            # `[tool.black]` defines the table `tool` too: the first such header is its place
            if header["name"] == target or (key is None and target is not None
                                            and header["name"].startswith(f"{target}.")):
                return span_at(text, offset + header.start("name"), len(header["name"]))
            section = header["name"] if header["open"] == "[" else "[[array]]"
            continue
        if key is None or section not in (table, None):
            continue
        pattern = wanted[0] if section == table else wanted[1]
        found = pattern.match(line) if pattern else None
        if found:
            return span_at(text, offset + found.start("key"), len(found.group("key")))
    if table is not None and key is not None:
        return _locate(text, table, None)
    return span_at(text, 0, 1)


def _key_pattern(table: str | None, key: str | None) -> tuple[re.Pattern[str] | None, ...]:
    """(the key as written inside its table, the key as a dotted top-level key)."""
    if key is None:
        return (None, None)
    bare = rf"(\"?)(?P<key>{re.escape(key)})\1\s*[=.]"  # `.`: a dotted key, `x.y = 1`
    inner = re.compile(rf"^[\s\ufeff]*{bare}")
    if table is None:
        return (inner, inner)
    dotted = re.compile(rf"^[\s\ufeff]*\"?{re.escape(table)}\"?\s*\.\s*{bare}")
    return (inner, dotted)


# --- validation ----------------------------------------------------------------------------


def _toml_type(value: object) -> str:
    """The TOML name of a parsed value's type, for messages."""
    kinds: tuple[tuple[type, str], ...] = (
        (bool, "a boolean"), (int, "an integer"), (float, "a float"), (str, "a string"),
        (dict, "a table"), (list, "an array"), (datetime, "a date-time"),
        (date, "a date"), (time, "a time"),
    )
    return next((name for kind, name in kinds if isinstance(value, kind)), "a value")


@dataclass(slots=True)
class _Checker:
    """Validates parsed TOML against the schema, keeping every valid field."""

    text: str
    file: str
    root: Path
    diags: list[Diagnostic] = field(default_factory=list)
    model: str = DEFAULT_MODEL
    output_root: str | None = None
    limits: dict[str, int] = field(default_factory=dict)
    checkpoint_configs: dict[str, str] = field(default_factory=dict)

    def report(self, code: str, message: str, table: str | None, key: str | None,
               help: str | None = None) -> None:
        span = _locate(self.text, table, key)
        self.diags.append(error(code, message, self.file, span, help=help))

    def check(self, data: dict[str, object]) -> None:
        for name, value in data.items():
            if name not in TABLES:
                self.unknown_top(name, value)
            elif not isinstance(value, dict):
                self.report(TYPE, f"`{name}` must be a table `[{name}]`, not "
                            f"{_toml_type(value)}", None, name)
            elif name == "project":
                self.check_project(value)
            elif name == "checkpoints":
                self.check_checkpoints(value)
            else:
                self.check_limits(value)

    def unknown_top(self, name: str, value: object) -> None:
        if isinstance(value, dict) or (
            isinstance(value, list) and value and all(isinstance(v, dict) for v in value)
        ):
            span = _locate(self.text, name, None)
            written = self.text[span.start:span.end]  # `tool.black` for `[tool.black]`
            if not (written == name or written.startswith(f"{name}.")):
                written = name  # a dotted key or an inline table: no header of its own
            shown = f"[{written}]" if isinstance(value, dict) else f"[[{written}]]"
            message = f"unknown table `{shown}`{did_you_mean(name, TABLES)}"
            self.diags.append(error(UNKNOWN_KEY, message, self.file, span,
                                    help="the tables are `[project]`, `[limits]` and "
                                         "`[checkpoints]`"))
            return
        home = "project" if name in PROJECT_KEYS else "limits" if name in Limits.names() else None
        hint = f"put it under `[{home}]`" if home else "settings go under `[project]` or `[limits]`"
        self.report(UNKNOWN_KEY, f"unknown top-level key `{name}`", None, name, help=hint)

    def check_project(self, table: dict[str, object]) -> None:
        for key, value in table.items():
            if key == "model":
                self.check_model(value)
            elif key == "output_root":
                self.check_output_root(value)
            elif key in Limits.names():
                self.report(UNKNOWN_KEY, f"unknown key `{key}` in `[project]`", "project", key,
                            help="limits go under `[limits]`")
            else:
                message = f"unknown key `{key}` in `[project]`{did_you_mean(key, PROJECT_KEYS)}"
                self.report(UNKNOWN_KEY, message, "project", key,
                            help="`[project]` accepts `model` and `output_root`")

    def check_model(self, value: object) -> None:
        if not isinstance(value, str):
            self.report(TYPE, f"`model` must be a string, not {_toml_type(value)}",
                        "project", "model", help='e.g. `model = "toy:shapes"`')
        elif not value.strip():
            self.report(RANGE, "`model` must not be empty", "project", "model",
                        help=f'leave the key out for the default, `"{DEFAULT_MODEL}"`')
        else:
            self.model = value

    def check_output_root(self, value: object) -> None:
        if not isinstance(value, str):
            self.report(TYPE, f"`output_root` must be a string, not {_toml_type(value)}",
                        "project", "output_root", help='e.g. `output_root = "renders"`')
            return
        problem = _output_root_problem(value, self.root)
        if problem:
            self.report(PATH, f"`output_root` {problem}", "project", "output_root",
                        help="give a folder relative to the folder holding perfusion.toml")
        else:
            self.output_root = PurePosixPath(value).as_posix()

    def check_checkpoints(self, table: dict[str, object]) -> None:
        example = '`"models/x.safetensors" = { config = "models/x-config" }`'
        for name, value in table.items():
            if not name.lower().endswith(".safetensors"):
                self.report(PATH, f"`[checkpoints]` is for single `.safetensors` files, not "
                            f"`{name}`", "checkpoints", name,
                            help="a diffusers folder or a model id carries its own configuration")
                continue
            if not isinstance(value, dict):
                self.report(TYPE, f"`{name}` must be a table, not {_toml_type(value)}",
                            "checkpoints", name, help=f"e.g. {example}")
                continue
            for key in value:
                if key not in CHECKPOINT_KEYS:
                    self.report(UNKNOWN_KEY, f"unknown key `{key}` for `{name}`"
                                f"{did_you_mean(key, CHECKPOINT_KEYS)}", "checkpoints", name,
                                help="a checkpoint accepts `config`")
            config = value.get("config")
            if not isinstance(config, str) or not config.strip():
                self.report(TYPE, f"`{name}` needs `config`: a diffusers folder or a model id",
                            "checkpoints", name, help=f"e.g. {example}")
            elif (problem := _config_problem(config.strip(), self.root)) is not None:
                self.report(PATH, f"the config of `{name}` {problem}", "checkpoints", name,
                            help="give a diffusers folder (with model_index.json), relative "
                                 "to the folder holding perfusion.toml, or a model id")
            else:
                self.checkpoint_configs[name] = config.strip()

    def check_limits(self, table: dict[str, object]) -> None:
        names = Limits.names()
        for key, value in table.items():
            if key not in names:
                message = f"unknown limit `{key}`{did_you_mean(key, names)}"
                self.report(UNKNOWN_KEY, message, "limits", key,
                            help="the limits are " + ", ".join(f"`{n}`" for n in names))
                continue
            ceiling: int = getattr(CEILINGS, key)
            if not isinstance(value, int) or isinstance(value, bool):
                self.report(TYPE, f"`{key}` must be an integer, not {_toml_type(value)}",
                            "limits", key, help=f"e.g. `{key} = {getattr(DEFAULT_LIMITS, key)}`")
            elif not 1 <= value <= ceiling:
                self.report(RANGE, f"`{key}` must be between 1 and {ceiling:,}, not {value:,}",
                            "limits", key, help="the ceilings keep the compiler safe to run")
            else:
                self.limits[key] = value


_MODEL_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?")


def _config_problem(value: str, root: Path) -> str | None:
    """Why `value` is neither a diffusers folder under `root` nor a model id, or None."""
    folder = (root / value).expanduser() if not value.startswith("~") else Path(value).expanduser()
    if (folder / "model_index.json").is_file():
        return None
    if folder.exists():
        return f"`{value}` is not a diffusers folder (no model_index.json)"
    if _MODEL_ID.fullmatch(value) and not value.startswith("."):
        return None
    return f"`{value}` does not exist"


def _output_root_problem(value: str, root: Path) -> str | None:
    """Why `value` is not a folder inside `root`, or None when it is."""
    if not value.strip():
        return 'must not be empty (use "." for the run root itself)'
    if "\\" in value:
        return "must use `/` as the separator"
    if (PurePosixPath(value).is_absolute() or PureWindowsPath(value).drive
            or value.startswith("~")):
        return f"must be relative to the run root, not absolute (`{value}`)"
    depth = 0
    for part in PurePosixPath(value).parts:
        depth += -1 if part == ".." else 0 if part == "." else 1
        if depth < 0:
            return f"must stay inside the run root; `{value}` climbs out with `..`"
    if not (root / value).resolve().is_relative_to(root.resolve()):
        return f"must stay inside the run root; `{value}` leads outside through a link"
    return None
