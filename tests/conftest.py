"""Shared helpers: write a throwaway project, run the CLI in-process, tiny PNGs."""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from perfusion_dsl.cli import main


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`slow` tests run only when a `-m` expression asks for them (`pytest -m slow`)."""
    if config.option.markexpr:
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


# What Lark or Python would leak into a message if a translation were missing (D3, D4, D7).
INTERNALS = ("$END", "RBRACE", "LBRACE", "_NL", "Token(", "line -1", "Traceback",
             "UnexpectedToken", "UnexpectedCharacters", "lark.")


def png_bytes(color: tuple[int, int, int] = (200, 30, 30), size: int = 8) -> bytes:
    """A tiny valid PNG (under 100 bytes)."""
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def write_tree(root: Path, files: Mapping[str, str | bytes]) -> Path:
    """Write `files` ({relative path: text or bytes}) under `root`; returns `root`."""
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_bytes(content.encode("utf-8"))
    return root


def assert_clean(text: str) -> None:
    """No internal name, parser terminal or traceback reaches the user."""
    leaked = [word for word in INTERNALS if word in text]
    assert not leaked, f"output leaks {leaked}:\n{text}"


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


Run = Callable[..., Result]


@pytest.fixture
def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Run:
    """run_cli(folder, *argv): `perfusion ARGV` in-process with cwd = folder."""

    def run(folder: Path, *argv: str) -> Result:
        capsys.readouterr()  # drop anything printed before
        with monkeypatch.context() as patch:
            patch.chdir(folder)
            code = main(list(argv))
        captured = capsys.readouterr()
        assert_clean(captured.out + captured.err)
        return Result(code, captured.out, captured.err)

    return run


@pytest.fixture
def project(tmp_path: Path) -> Callable[[Mapping[str, str | bytes]], Path]:
    """project({path: content}) writes a project folder under tmp_path and returns it."""
    counter = iter(range(1_000_000))

    def make(files: Mapping[str, str | bytes]) -> Path:
        return write_tree(tmp_path / f"p{next(counter)}", files)

    return make
