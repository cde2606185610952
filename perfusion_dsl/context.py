"""The state the semantic passes share: loaded files in, checked facts and diagnostics out."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perfusion_dsl.config import ProjectConfig
from perfusion_dsl.diagnostics import Diagnostic
from perfusion_dsl.images import ImageInfo
from perfusion_dsl.nodes import Generate, Learn, Let, Module
from perfusion_dsl.plan import RenderOptions
from perfusion_dsl.source import Source


@dataclass(frozen=True, slots=True)
class Unit:
    """One loaded spec file."""

    path: Path  # absolute
    file: str  # as shown to the user
    source: Source
    module: Module
    broken: frozenset[str]  # names defined by statements that failed to parse
    requested: bool  # named on the command line (its generates run)
    uses: tuple[Path, ...]  # files it `use`s that exist


@dataclass(frozen=True, slots=True)
class ConceptDecl:
    unit: Unit
    index: int  # statement index within the module
    learn: Learn


@dataclass(frozen=True, slots=True)
class RenderDecl:
    """One image to render, fully expanded."""

    unit: Unit
    generate: Generate
    prompt: str
    concepts: tuple[str, ...]
    seed: int
    strength: float
    model: str
    options: RenderOptions  # shared by all renders of a statement
    out_dir: Path  # shared by all renders of a statement
    name: str  # the image's file name in out_dir (output_names.file_name)

    @property
    def out(self) -> Path:
        """The image's path: built when asked for (a plan), not for each render of a check."""
        return self.out_dir / self.name


@dataclass
class Context:
    """Mutable only in that passes append to it (each to its own tables: `check_outputs`
    appends the named renders to `outputs` rather than rewrite `renders`); what they append
    is frozen."""

    root: Path
    config: ProjectConfig
    requested: list[Path]
    units: dict[Path, Unit] = field(default_factory=dict)
    diagnostics: list[Diagnostic] = field(default_factory=list)
    models: dict[Path, str] = field(default_factory=dict)
    lets: dict[Path, dict[str, Let]] = field(default_factory=dict)
    concepts: dict[str, ConceptDecl] = field(default_factory=dict)  # first learn of a token
    duplicates: list[ConceptDecl] = field(default_factory=list)  # later learns of a token
    visible: dict[Path, dict[str, ConceptDecl]] = field(default_factory=dict)
    options: dict[tuple[Path, int], dict[str, Any]] = field(default_factory=dict)
    images: dict[tuple[Path, int], tuple[ImageInfo, ...]] = field(default_factory=dict)
    masks: dict[tuple[Path, int], tuple[ImageInfo, ...]] = field(default_factory=dict)
    # each image's caption template (in image order), where `captions:` names files
    captions: dict[tuple[Path, int], tuple[str, ...]] = field(default_factory=dict)
    renders: list[RenderDecl] = field(default_factory=list)  # every expanded prompt
    # the renders that write a file: named (`out`), without duplicates, in plan order
    outputs: list[RenderDecl] = field(default_factory=list)
    extra_sources: dict[str, str] = field(default_factory=dict)  # e.g. perfusion.toml
    # an editor's unsaved buffers by path (normalised as `requested` is): read instead of the
    # files, which need not exist (`perfusion lsp`)
    overlay: Mapping[Path, bytes] = field(default_factory=dict)

    def display(self, path: Path) -> str:
        """A path as shown to users and in the plan: relative to the run root when inside."""
        # Fast path, same result: a plan shows tens of thousands of paths under the root.
        root, text = str(self.root), str(path)
        if text.startswith(root + "/") and not root.endswith("/"):  # "/" itself: slow path
            inner = os.path.normpath(text) if ".." in text else text
            if inner.startswith(root + "/"):
                return inner[len(root) + 1:]
        try:
            return Path(os.path.relpath(path, self.root)).as_posix() \
                if path.is_relative_to(self.root) else path.as_posix()
        except ValueError:
            return path.as_posix()

    def add(self, diag: Diagnostic) -> None:
        self.diagnostics.append(diag)

    def sources(self) -> dict[str, str]:
        return self.extra_sources | {u.file: u.source.text for u in self.units.values()}

    @property
    def failed(self) -> bool:
        return any(d.severity == "error" for d in self.diagnostics)

    def statements(self, kind: type[Any]) -> list[tuple[Unit, int, Any]]:
        """(unit, index, statement) for every statement of `kind`, files in path order."""
        return [
            (unit, i, stmt)
            for unit in sorted(self.units.values(), key=lambda u: u.file)
            for i, stmt in enumerate(unit.module.statements)
            if isinstance(stmt, kind)
        ]


def use_target(unit_path: Path, value: str) -> Path:
    """Where `use "value"` in the file at `unit_path` points (absolute, normalised)."""
    return Path(os.path.normpath(os.path.join(unit_path.parent, value)))
