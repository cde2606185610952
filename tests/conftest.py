"""Shared helpers: write a throwaway project, run the CLI in-process, tiny PNGs."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path

import pytest
import pytest_lsp
from helpers import LSP_MOON, LSP_TILE, Result, Run, assert_clean, png_bytes, write_tree
from lsprotocol import types as lsp
from pytest_lsp import ClientServerConfig, LanguageClient

from perfusion_dsl.cli import main

# No test reaches the Hugging Face hub or reads the user's cache of it: model ids resolve
# offline, in a cache a test makes (tests/runtime/test_model_sources.py).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = os.path.join(tempfile.gettempdir(), "perfusion-tests-no-hf-home")
os.environ.pop("HF_HUB_CACHE", None)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`slow` tests run only when a `-m` expression asks for them (`pytest -m slow`)."""
    if config.option.markexpr:
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


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


@pytest_lsp.fixture(config=ClientServerConfig(
    server_command=[sys.executable, "-m", "perfusion_dsl", "lsp"]))
async def client(lsp_client: LanguageClient, tmp_path: Path) -> AsyncIterator[None]:
    """A real `perfusion lsp` process and a real client, in a project (tmp_path/project)
    of one picture, helpers.LSP_MOON (moon.concept) and helpers.LSP_TILE (tile.concept)."""
    write_tree(tmp_path / "project", {"p/1.png": png_bytes(), "moon.concept": LSP_MOON,
                                      "tile.concept": LSP_TILE})
    await lsp_client.initialize_session(lsp.InitializeParams(
        capabilities=lsp.ClientCapabilities(),
        root_uri=(tmp_path / "project").as_uri()))
    yield
    await lsp_client.shutdown_session()
