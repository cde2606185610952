"""Package boundaries: the compiler never imports torch & co; `pip install .` ships the grammar."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from regen_goldens import PLANS, REPO

from perfusion_dsl.parser import grammar_text, parser

HEAVY = ("torch", "diffusers", "transformers")
FIXTURE = PLANS / "use-multi-file"
# Left out of the copy that is installed: environments, caches, build outputs, VCS.
NOT_SOURCES = shutil.ignore_patterns(".venv", "venv", ".git", "*.egg-info", "__pycache__",
                                     ".mypy_cache", ".ruff_cache", ".pytest_cache",
                                     ".hypothesis", ".perfusion", "renders")


def _copy_sources(target: Path) -> Path:
    """The repository as a fresh clone has it: its tracked files when git can list them
    (so a git-ignored training folder or a setuptools `build/` never travels, while a
    package named `build` does), else the tree without caches and environments."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                            check=False)
    if listed.returncode != 0:
        return Path(shutil.copytree(REPO, target, ignore=NOT_SOURCES))
    for name in listed.stdout.decode("utf-8").split("\0"):
        if name and (REPO / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, target / name)
    return target


def _run(argv: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_check_and_plan_import_no_model_library(tmp_path: Path) -> None:
    folder = shutil.copytree(FIXTURE, tmp_path / "project", ignore=NOT_SOURCES)
    code = textwrap.dedent(f"""
        import contextlib, io, json, sys
        sys.path.insert(0, {str(REPO)!r})
        from perfusion_dsl.cli import main
        with contextlib.redirect_stdout(io.StringIO()) as out:
            checked = main(["check", "."])
            planned = main(["plan", "--json", "."])
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
        print(json.dumps({{"checked": checked, "planned": planned, "heavy": heavy,
                          "plan": out.getvalue().count('"token"')}}))
    """)
    done = _run([sys.executable, "-c", code], cwd=folder)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result == {"checked": 0, "planned": 0, "heavy": [], "plan": 2}


def _imports(path: Path) -> set[str]:
    """Every module a runtime source file imports, relative imports made absolute."""
    import ast

    package = ["perfusion_runtime", *path.parent.relative_to(REPO / "runtime").parts]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.add(module)
            if not node.module:  # `from . import checkpoint`: the names are modules
                found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _layer_files(layer: str) -> list[Path]:
    files = sorted((REPO / "runtime" / layer).glob("*.py"))
    assert files, f"runtime/{layer}/ has no modules"
    return files


PRODUCT_LAYERS = ("files", "method", "build")


def test_runtime_imports_only_the_plan_model_from_the_compiler() -> None:
    """The runtime reads plans (and keys them like the compiler); it never imports the
    parser, the passes or the CLI, so a build never pays for compiling twice and the two
    sides stay separable (runtime/README.md, "Boundaries")."""
    for layer in PRODUCT_LAYERS:
        for path in _layer_files(layer):
            for name in _imports(path):
                if name.split(".")[0] == "perfusion_dsl":
                    assert name in ("perfusion_dsl.plan", "perfusion_dsl.keys",
                                    "perfusion_dsl.terminal"), \
                        f"{path.name} imports {name}"


def test_durable_files_layer_imports_no_torch_and_nothing_of_ours() -> None:
    for path in _layer_files("files"):
        for name in _imports(path):
            top = name.split(".")[0]
            assert top not in (*HEAVY, "numpy", "perfusion_dsl"), f"{path.name} imports {name}"
            if top == "perfusion_runtime":
                assert name.startswith("perfusion_runtime.files"), f"{path.name} imports {name}"


def test_method_imports_no_build_code_and_product_no_toy() -> None:
    for layer in PRODUCT_LAYERS:
        for path in _layer_files(layer):
            for name in _imports(path):
                assert not name.startswith("perfusion_runtime.toy"), \
                    f"{layer}/{path.name} imports the evaluation world {name}"
                if layer == "method":
                    assert not name.startswith("perfusion_runtime.build"), \
                        f"method/{path.name} imports {name}"


def test_runtime_modules_import_no_circle() -> None:
    """No two runtime modules import each other, directly or round a longer circle (lazy
    imports count: they are the same dependency, only later)."""
    graph: dict[str, set[str]] = {}
    for layer in (*PRODUCT_LAYERS, "toy"):
        for path in _layer_files(layer):
            name = f"perfusion_runtime.{layer}.{path.stem}"
            graph[name] = {m for m in _imports(path) if m.startswith("perfusion_runtime.")}
    graph = {name: {m for m in deps if m in graph and m != name} for name, deps in graph.items()}
    done: set[str] = set()

    def visit(name: str, trail: tuple[str, ...]) -> None:
        assert name not in trail, "import circle: " + " → ".join((*trail, name))
        if name not in done:
            for dep in sorted(graph[name]):
                visit(dep, (*trail, name))
            done.add(name)

    for name in sorted(graph):
        visit(name, ())


def test_build_planning_modules_load_no_torch() -> None:
    """A no-op run and `perfusion plan` never load torch: the build's planning side and the
    durable files import none of it, even lazily at module level."""
    code = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(REPO)!r})
        import perfusion_runtime.build.run, perfusion_runtime.build.command
        import perfusion_runtime.files.store, perfusion_runtime.files.outputs
        import perfusion_runtime.files.lock
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})))
    """)
    done = _run([sys.executable, "-c", code], cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []


def test_runtime_entry_point_loads_no_parser() -> None:
    code = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(REPO)!r})
        import perfusion_runtime.build.run, perfusion_runtime.build.jobs
        import perfusion_runtime.build.command
        print(json.dumps(sorted(m for m in sys.modules
                                if m == "lark" or m.startswith(("lark.", "perfusion_dsl.")))))
    """)
    done = _run([sys.executable, "-c", code], cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == ["perfusion_dsl.keys", "perfusion_dsl.plan",
                                                        "perfusion_dsl.terminal"]


def test_grammar_builds_in_strict_mode() -> None:
    """Lark's strict mode refuses terminal collisions and shift/reduce conflicts."""
    strict = parser(strict=True)
    assert strict.options.parser == "lalr"
    assert strict.parse('model "toy:shapes"\n').data == "start"


def test_grammar_is_package_data() -> None:
    text = grammar_text()
    assert text == (REPO / "grammar" / "concept.lark").read_text("utf-8")


@pytest.mark.slow
def test_installed_package_checks_a_project(tmp_path: Path) -> None:
    """`pip install .` (not editable) into a fresh venv; the installed `perfusion` works
    outside the repository, so the grammar must have been shipped as package data."""
    source = _copy_sources(tmp_path / "src")
    venv = tmp_path / "venv"
    made = _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    python, perfusion = venv / "bin" / "python", venv / "bin" / "perfusion"
    installed = _run([str(python), "-m", "pip", "install", "--quiet", str(source)],
                     cwd=tmp_path, timeout=600)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    shutil.rmtree(source)  # nothing may still point into the source tree
    where = _run([str(python), "-c", "import importlib.util as u, perfusion_dsl; "
                  "assert u.find_spec('perfusion_grammar') and u.find_spec('perfusion_runtime'); "
                  "print(perfusion_dsl.__file__)"], cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(venv)
    project = shutil.copytree(FIXTURE, tmp_path / "project", ignore=NOT_SOURCES)
    checked = _run([str(perfusion), "check", "."], cwd=project)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.startswith("checked 2 file(s): 2 concept(s)")
    planned = _run([str(perfusion), "plan", "--json", "--root", ".", "."], cwd=project)
    assert planned.returncode == 0, planned.stderr
    assert planned.stdout == (FIXTURE / "expected.json").read_text("utf-8")
