"""Tests for `perfusion.toml`: discovery, defaults, and one diagnostic per problem."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from perfusion_dsl.config import (
    CONFIG_NAME,
    ProjectConfig,
    find_root,
    load_config,
)
from perfusion_dsl.diagnostics import Diagnostic, render
from perfusion_dsl.limits import CEILINGS, DEFAULT_LIMITS


def _display(path: Path) -> str:
    return path.name


def _write(root: Path, text: str) -> Path:
    path = root / CONFIG_NAME
    path.write_text(text, encoding="utf-8")
    return path


def _load(root: Path, text: str) -> tuple[ProjectConfig, list[Diagnostic]]:
    _write(root, text)
    return load_config(root, _display)


def _one(diags: list[Diagnostic]) -> Diagnostic:
    assert len(diags) == 1, diags
    return diags[0]


def test_absent_file_gives_defaults(tmp_path: Path) -> None:
    config, diags = load_config(tmp_path, _display)
    assert diags == []
    assert config == ProjectConfig(root=tmp_path)
    assert config.model == "toy:shapes"
    assert config.output_root is None
    assert config.limits == DEFAULT_LIMITS
    assert config.file is None


def test_full_valid_file(tmp_path: Path) -> None:
    text = """\
# project defaults
[project]
model = "runwayml/sd-v1-5"
output_root = "out/renders/"

[limits]
max_renders_total = 50000
max_concepts = 10
"""
    config, diags = _load(tmp_path, text)
    assert diags == []
    assert config.model == "runwayml/sd-v1-5"
    assert config.output_root == "out/renders"
    assert config.limits.max_renders_total == 50_000
    assert config.limits.max_concepts == 10
    assert config.limits.max_spec_bytes == DEFAULT_LIMITS.max_spec_bytes
    assert config.file == tmp_path / CONFIG_NAME
    assert config.root == tmp_path


def test_limit_at_its_ceiling_is_accepted(tmp_path: Path) -> None:
    config, diags = _load(tmp_path, f"[limits]\nmax_renders_total = {CEILINGS.max_renders_total}\n")
    assert diags == []
    assert config.limits.max_renders_total == CEILINGS.max_renders_total


def test_find_root_from_nested_dir(tmp_path: Path) -> None:
    _write(tmp_path, "[project]\n")
    nested = tmp_path / "specs" / "people" / "deep"
    nested.mkdir(parents=True)
    assert find_root(nested) == tmp_path.resolve()
    assert find_root(tmp_path / "specs" / ".." / "specs") == tmp_path.resolve()


def test_find_root_without_config_is_start(tmp_path: Path) -> None:
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    assert find_root(nested) == nested.resolve()


def test_find_root_prefers_nearest(tmp_path: Path) -> None:
    _write(tmp_path, "")
    inner = tmp_path / "inner"
    inner.mkdir()
    _write(inner, "")
    (inner / "x").mkdir()
    assert find_root(inner / "x") == inner.resolve()


def test_invalid_toml_points_at_line_and_column(tmp_path: Path) -> None:
    config, diags = _load(tmp_path, "[project]\nmodel = toy\n")
    d = _one(diags)
    assert d.code == "config-syntax"
    assert d.severity == "error"
    assert d.span is not None
    assert (d.span.line, d.span.col) == (2, 9)
    assert d.message.startswith("invalid TOML: ")
    assert "(at line" not in d.message
    assert config == ProjectConfig(root=tmp_path, file=tmp_path / CONFIG_NAME)


def test_invalid_toml_at_end_of_document(tmp_path: Path) -> None:
    _, diags = _load(tmp_path, '[project]\nmodel = "unterminated')
    d = _one(diags)
    assert d.code == "config-syntax"
    assert d.span is not None
    assert d.span.line == 2


def test_unknown_limit_suggests_spelling(tmp_path: Path) -> None:
    config, diags = _load(tmp_path, "[limits]\nmax_concepts = 5\n\nmax_render_total = 10\n")
    d = _one(diags)
    assert d.code == "config-unknown-key"
    assert "`max_render_total`" in d.message
    assert "(did you mean `max_renders_total`?)" in d.message
    assert d.span is not None
    assert (d.span.line, d.span.col, d.span.end_col) == (4, 1, 17)
    assert config.limits.max_concepts == 5  # the valid field is kept


def test_unknown_project_key_and_table(tmp_path: Path) -> None:
    _, diags = _load(tmp_path, '[project]\nmodle = "x"\n\n[limit]\nmax_concepts = 3\n')
    assert [d.code for d in diags] == ["config-unknown-key"] * 2
    first, second = diags
    assert "(did you mean `model`?)" in first.message
    assert first.span is not None and first.span.line == 2
    assert "unknown table `[limit]`" in second.message
    assert "(did you mean `limits`?)" in second.message
    assert second.span is not None and (second.span.line, second.span.col) == (4, 2)


def test_top_level_key_is_unknown_with_a_home(tmp_path: Path) -> None:
    _, diags = _load(tmp_path, '# defaults\nmodel = "x"\n')
    d = _one(diags)
    assert d.code == "config-unknown-key"
    assert d.span is not None and d.span.line == 2
    assert d.help == "put it under `[project]`"


def test_limit_in_project_table_is_redirected(tmp_path: Path) -> None:
    _, diags = _load(tmp_path, "[project]\nmax_concepts = 3\n")
    d = _one(diags)
    assert d.code == "config-unknown-key"
    assert d.help == "limits go under `[limits]`"


def test_bool_is_not_an_int(tmp_path: Path) -> None:
    config, diags = _load(tmp_path, "[limits]\nmax_concepts = true\n")
    d = _one(diags)
    assert d.code == "config-type"
    assert d.message == "`max_concepts` must be an integer, not a boolean"
    assert d.span is not None and (d.span.line, d.span.col) == (2, 1)
    assert config.limits == DEFAULT_LIMITS


@pytest.mark.parametrize("value", ['"100"', "1.5", "[1]"])
def test_limit_wrong_type(tmp_path: Path, value: str) -> None:
    _, diags = _load(tmp_path, f"[limits]\nmax_concepts = {value}\n")
    assert _one(diags).code == "config-type"


def test_model_wrong_type(tmp_path: Path) -> None:
    _, diags = _load(tmp_path, "[project]\n  model = 3\n")
    d = _one(diags)
    assert d.code == "config-type"
    assert d.span is not None and (d.span.line, d.span.col) == (2, 3)


def test_model_empty(tmp_path: Path) -> None:
    config, diags = _load(tmp_path, '[project]\nmodel = ""\n')
    d = _one(diags)
    assert d.code == "config-range"
    assert d.span is not None and d.span.line == 2
    assert config.model == "toy:shapes"


def test_table_of_wrong_type(tmp_path: Path) -> None:
    _, diags = _load(tmp_path, 'project = "x"\n')
    d = _one(diags)
    assert d.code == "config-type"
    assert d.span is not None and d.span.line == 1


def test_limit_above_ceiling_states_range(tmp_path: Path) -> None:
    _, diags = _load(tmp_path, "[limits]\nmax_renders_total = 2000000\n")
    d = _one(diags)
    assert d.code == "config-range"
    assert "`max_renders_total` must be between 1 and 1,000,000" in d.message
    assert d.span is not None and d.span.line == 2


@pytest.mark.parametrize("value", ["0", "-3"])
def test_limit_not_positive(tmp_path: Path, value: str) -> None:
    _, diags = _load(tmp_path, f"[limits]\nmax_concepts = {value}\n")
    d = _one(diags)
    assert d.code == "config-range"
    assert "between 1 and 10,000" in d.message


@pytest.mark.parametrize(
    "value", ["/tmp/out", "../out", "a/../../out", "C:/out", "~/out", "a\\b", ""]
)
def test_output_root_must_stay_inside(tmp_path: Path, value: str) -> None:
    escaped = value.replace("\\", "\\\\")
    config, diags = _load(tmp_path, f'[project]\n\noutput_root = "{escaped}"\n')
    d = _one(diags)
    assert d.code == "config-path"
    assert d.span is not None and (d.span.line, d.span.col) == (3, 1)
    assert config.output_root is None


def test_output_root_may_use_dotdot_inside(tmp_path: Path) -> None:
    config, diags = _load(tmp_path, '[project]\noutput_root = "a/../b"\n')
    assert diags == []
    assert config.output_root == "a/../b"


def test_output_root_through_link_outside(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (root / "link").symlink_to(outside)
    _write(root, '[project]\noutput_root = "link/renders"\n')
    _, diags = load_config(root, _display)
    assert _one(diags).code == "config-path"


def test_not_utf8(tmp_path: Path) -> None:
    (tmp_path / CONFIG_NAME).write_bytes(b'[project]\nmodel = "caf\xe9"\n')
    config, diags = load_config(tmp_path, _display)
    d = _one(diags)
    assert d.code == "config-syntax"
    assert "UTF-8" in d.message
    assert d.span is not None and (d.span.line, d.span.col) == (2, 13)
    assert config.model == "toy:shapes"


def test_too_large(tmp_path: Path) -> None:
    (tmp_path / CONFIG_NAME).write_bytes(b"#" * (1024 * 1024) + b"\n")
    _, diags = load_config(tmp_path, _display)
    d = _one(diags)
    assert d.code == "config-syntax"
    assert "1,048,576" in d.message


def test_dotted_top_level_key_is_located(tmp_path: Path) -> None:
    _, diags = _load(tmp_path, "# x\nlimits.max_concepts = 0\n")
    d = _one(diags)
    assert d.span is not None and (d.span.line, d.span.col) == (2, 8)


def test_bom_is_accepted(tmp_path: Path) -> None:
    config, diags = _load(tmp_path, '\ufeff[project]\nmodel = "m"\n')
    assert diags == []
    assert config.model == "m"


def test_several_errors_all_reported(tmp_path: Path) -> None:
    text = """\
[project]
model = ""
output_root = "/abs"
colour = "red"

[limits]
max_concepts = false
max_renders_total = 0
max_render_total = 3
max_glob_matches = 500
"""
    config, diags = _load(tmp_path, text)
    got = [(d.code, d.span.line if d.span else 0) for d in diags]
    assert got == [
        ("config-range", 2),
        ("config-path", 3),
        ("config-unknown-key", 4),
        ("config-type", 7),
        ("config-range", 8),
        ("config-unknown-key", 9),
    ]
    assert config.limits.max_glob_matches == 500
    assert config.limits.max_concepts == DEFAULT_LIMITS.max_concepts


def test_render_shape(tmp_path: Path) -> None:
    text = "[limits]\nmax_render_total = 10\n"
    _, diags = _load(tmp_path, text)
    shown = render(_one(diags), {CONFIG_NAME: text})
    lines = shown.split("\n")
    assert re.match(r"^perfusion\.toml:2:1: error: ", lines[0])
    assert "(did you mean `max_renders_total`?)" in lines[0]
    assert lines[1] == " 2 | max_render_total = 10"
    assert lines[2] == "   | " + "^" * len("max_render_total")


def test_array_of_tables_and_nested_table_are_located(tmp_path: Path) -> None:
    text = '[project]\nmodel = "m"\n\n[[projects]]\nx = 1\n\n[project.sub]\ny = 2\n'
    config, diags = _load(tmp_path, text)
    diags.sort(key=Diagnostic.sort_key)
    assert [d.code for d in diags] == ["config-unknown-key"] * 2
    assert "unknown table `[[projects]]` (did you mean `project`?)" in diags[0].message
    assert [(d.span.line, d.span.col) for d in diags if d.span] == [(4, 3), (7, 2)]
    assert config.model == "m"


def test_an_unknown_subtable_is_pointed_at_its_own_header(tmp_path: Path) -> None:
    """`[tool.black]` after other tables: the error names the header as written and points
    at it, not at line 1; a dotted key in `[project]` points at its own line."""
    text = '[project]\nmodel = "m"\n\n[tool.black]\nline-length = 1\n'
    _, diags = _load(tmp_path, text)
    d = _one(diags)
    assert "unknown table `[tool.black]`" in d.message
    assert d.span is not None and (d.span.line, d.span.col, d.span.end_col) == (4, 2, 12)
    _, diags = _load(tmp_path, '[project]\nmodel = "m"\nx.y = 1\n')
    d = _one(diags)
    assert "unknown key `x` in `[project]`" in d.message
    assert d.span is not None and (d.span.line, d.span.col) == (3, 1)


def test_wrong_shaped_project_table(tmp_path: Path) -> None:
    _, diags = _load(tmp_path, '[limits]\n\n[[project]]\nmodel = "m"\n')
    d = _one(diags)
    assert d.code == "config-type"
    assert d.message == "`project` must be a table `[project]`, not an array"
    assert d.span is not None and (d.span.line, d.span.col) == (3, 3)


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory"])
def test_S7_a_config_that_is_not_a_file_is_refused_at_once(tmp_path: Path, kind: str) -> None:
    """A FIFO used to block `check` forever, and /dev/zero to grow it by gigabytes: the file
    is opened without blocking, must be a regular file, and is read to its limit at most.
    A real subprocess, so a hang fails the test by its timeout."""
    import os
    import subprocess
    import sys

    (tmp_path / "a.concept").write_text('generate "a photo"\n', encoding="utf-8")
    config = tmp_path / "perfusion.toml"
    if kind == "fifo":
        os.mkfifo(config)
        shown = "a FIFO"
    elif kind == "dev-zero":
        config.symlink_to("/dev/zero")
        shown = "a character device"
    else:
        config.mkdir()
        shown = "a directory"
    done = subprocess.run([sys.executable, "-m", "perfusion_dsl", "check", "."], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1, done.stderr
    assert f"perfusion.toml: error: cannot read perfusion.toml: it is {shown}, not a file" \
        in done.stderr


def test_checkpoints_table_gives_each_file_its_config(tmp_path: Path) -> None:
    (tmp_path / "configs" / "sd15").mkdir(parents=True)
    (tmp_path / "configs" / "sd15" / "model_index.json").write_text("{}")
    config, diags = _load(tmp_path, '[checkpoints]\n'
                          '"models/a.safetensors" = { config = "configs/sd15" }\n'
                          '"models/b.safetensors" = { config = "org/sd-config@v2" }\n')
    assert diags == []
    assert config.checkpoint_configs == (("models/a.safetensors", "configs/sd15"),
                                         ("models/b.safetensors", "org/sd-config@v2"))


@pytest.mark.parametrize("entry, code, words", [
    ('"models/a" = { config = "org/x" }', "config-path", "single `.safetensors` files"),
    ('"a.safetensors" = "org/x"', "config-type", "must be a table"),
    ('"a.safetensors" = { }', "config-type", "needs `config`"),
    ('"a.safetensors" = { config = "org/x", confg = 1 }', "config-unknown-key", "`confg`"),
    ('"a.safetensors" = { config = "./nowhere" }', "config-path", "does not exist"),
    ('"a.safetensors" = { config = "plain" }', "config-path", "is not a diffusers folder"),
], ids=["not-a-file", "not-a-table", "no-config", "unknown-key", "missing-folder",
        "folder-without-index"])
def test_checkpoints_table_problems(tmp_path: Path, entry: str, code: str, words: str) -> None:
    (tmp_path / "plain").mkdir()
    _, diags = _load(tmp_path, f"[checkpoints]\n{entry}\n")
    diag = _one(diags)
    assert diag.code == code and words in diag.message, diag.message
    assert diag.span is not None and diag.span.line == 2
