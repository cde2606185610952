"""The command line: exit codes, messages, usage errors and internal errors (D7)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
from helpers import Run, png_bytes
from regen_goldens import REPO

from perfusion_dsl import __version__, passes
from perfusion_dsl.cli import EXIT_BUG, EXIT_ERRORS, EXIT_OK, EXIT_USAGE, main
from perfusion_dsl.context import Context

Project = Callable[[Mapping[str, str | bytes]], Path]
GOOD: dict[str, str | bytes] = {
    "a.concept": ('model "toy:shapes"\n'
                  "learn photos/*.png as teddy* <teddy bear>\n"
                  'generate "teddy* in {a forest|the snow}" x 2\n'),
    "photos/1.png": png_bytes(),
}


def test_check_ok_prints_a_summary_and_exits_0(project: Project, run_cli: Run) -> None:
    result = run_cli(project(GOOD), "check", ".")
    assert result.code == EXIT_OK
    assert result.err == ""
    assert result.out == "checked 1 file(s): 1 concept(s), 4 image(s) to render; no errors\n"


def test_check_errors_exit_1_with_a_count(project: Project, run_cli: Run) -> None:
    folder = project({**GOOD, "b.concept": 'generate "a {nothing}"\n'})
    result = run_cli(folder, "check", ".")
    assert result.code == EXIT_ERRORS
    assert result.out == ""
    assert result.err.endswith("\n1 error, 0 warnings in 2 files\n")


def test_warnings_alone_do_not_fail(project: Project, run_cli: Run) -> None:
    folder = project({"a.concept": 'generate "a photo" {\n\tseed: 1\n}\n'})
    result = run_cli(folder, "check", ".")
    assert result.code == EXIT_OK
    assert "warning: indentation uses tabs" in result.err
    assert result.out.startswith("checked 1 file(s)")


def test_check_accepts_files_and_folders(project: Project, run_cli: Run) -> None:
    folder = project({**GOOD, "more/b.concept": 'generate "b"\n'})
    assert run_cli(folder, "check", "a.concept").out.startswith("checked 1 file(s)")
    assert run_cli(folder, "check", "a.concept", "more").out.startswith("checked 2 file(s)")
    assert run_cli(folder, "check", "more", "more/b.concept").out.startswith("checked 1 file(s)")


def test_a_used_file_is_loaded_but_its_generates_are_not_run(project: Project,
                                                             run_cli: Run) -> None:
    folder = project({**GOOD, "b.concept": 'use "a.concept"\ngenerate "teddy* alone"\n'})
    result = run_cli(folder, "plan", "--json", "b.concept")
    assert result.code == EXIT_OK, result.err
    assert '"prompt": "teddy* alone"' in result.out
    assert "a forest" not in result.out
    assert '"token": "teddy*"' in result.out


@pytest.mark.parametrize(("argv", "words"), [
    (["check", "missing"], "no such file or directory: missing"),
    (["check", "empty"], "no `.concept` files found under empty"),
    (["check", "notes.txt"], "not a .concept file: notes.txt"),
    (["plan", "missing"], "no such file or directory: missing"),
])
def test_usage_errors_exit_2(argv: list[str], words: str, project: Project,
                             run_cli: Run) -> None:
    folder = project({"notes.txt": "hi\n", "empty/readme.md": "\n"})
    result = run_cli(folder, *argv)
    assert result.code == EXIT_USAGE
    assert result.err.startswith("perfusion: error: ")
    assert words in result.err


@pytest.mark.parametrize("argv", [[], ["check"], ["frobnicate", "."], ["plan", "--jsn", "."]])
def test_bad_command_lines_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == EXIT_USAGE
    assert "usage: perfusion" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "words"), [
    (["run", ".", "--device", "quantum"], "argument --device: unknown device 'quantum'"),
    (["run", ".", "--batch-size", "99999999999999999999"],
     "argument --batch-size: must be a whole number between 1 and 4,096"),
    (["run", ".", "--batch-size", "0"], "argument --batch-size: must be a whole number"),
    (["run", ".", "--precision", "int8"], "argument --precision: invalid choice: 'int8'"),
    (["check", ".", "--root", "a.concept"], "argument --root: 'a.concept' is not a folder"),
    (["plan", ".", "--root", "nowhere"], "argument --root: 'nowhere' does not exist"),
])
def test_bad_arguments_are_usage_errors_before_anything_loads(
        argv: list[str], words: str, project: Project) -> None:
    """A real subprocess: exit 2, the argument named, no traceback, and no model library
    imported (a bad flag must not cost the seconds torch takes to load)."""
    folder = project({"a.concept": 'generate "a photo"\n'})
    code = ("import sys; from perfusion_dsl.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    print('torch' in sys.modules, file=sys.stderr); raise\n")
    done = subprocess.run([sys.executable, "-c", code, *argv], cwd=folder, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == EXIT_USAGE, done.stderr
    assert words in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.rstrip().endswith("False"), done.stderr


def test_ray_address_without_the_ray_executor_is_a_usage_error(project: Project,
                                                              run_cli: Run) -> None:
    folder = project({"a.concept": 'generate "a photo"\n'})
    result = run_cli(folder, "run", ".", "--ray-address", "auto")
    assert result.code == EXIT_USAGE
    assert "perfusion: error: --ray-address needs --executor ray" in result.err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"perfusion {__version__}\n"


def test_plan_text(project: Project, run_cli: Run) -> None:
    result = run_cli(project(GOOD), "plan", ".")
    assert result.code == EXIT_OK
    lines = result.out.splitlines()
    assert lines[:2] == ["models: 1", "  toy:shapes: built in"]
    lines = lines[2:]
    assert lines[0] == "concepts: 1 (1 to train)"
    assert lines[1].split() == ["teddy*", "new"]
    assert lines[2].split()[:2] == ["1", "image(s),"] and "(a.concept:2, key " in lines[2]
    assert lines[3:] == ["images: 4 (4 to render)",
                         "  a.concept:3: 4 image(s) → renders/a/ (4 new)"]


def test_plan_json_matches_check(project: Project, run_cli: Run) -> None:
    folder = project(GOOD)
    result = run_cli(folder, "plan", "--json", ".")
    assert result.code == EXIT_OK
    assert result.out.count('"prompt"') == 4


def test_root_option_sets_the_run_root(project: Project, run_cli: Run) -> None:
    folder = project({"sub/a.concept": 'generate "a photo" {\n  out: "../shots"\n}\n'})
    assert run_cli(folder / "sub", "check", ".").code == EXIT_ERRORS  # outside sub/
    result = run_cli(folder / "sub", "check", "--root", "..", ".")
    assert result.code == EXIT_OK, result.err


def test_perfusion_toml_above_sets_the_root(project: Project, run_cli: Run) -> None:
    folder = project({"perfusion.toml": '[project]\noutput_root = "out"\n',
                      "specs/a.concept": 'generate "a photo"\n'})
    result = run_cli(folder / "specs", "plan", "--json", ".")
    assert result.code == EXIT_OK, result.err
    assert '"file": "specs/a.concept"' in result.out
    assert '"out": "out/a/a-photo_seed0_s0.5.png"' in result.out


def test_compile_paths_from_elsewhere_roots_at_the_given_folder(
        project: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No perfusion.toml and a current folder that does not hold the specs (a notebook
    elsewhere): the run root is the given folder, so its default outputs are inside it."""
    from perfusion_dsl.compiler import compile_paths

    folder = project({"specs/a.concept": 'generate "a photo"\n'})
    elsewhere = tmp_path / "notebooks"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    compilation = compile_paths([folder / "specs"])
    assert compilation.ok, [d.code for d in compilation.diagnostics]
    assert compilation.context.root == (folder / "specs").resolve()
    assert compile_paths([folder / "specs" / "a.concept"]).context.root == \
        (folder / "specs").resolve()
    monkeypatch.chdir(folder)  # the current folder holds the specs: it stays the root
    assert compile_paths([Path("specs")]).context.root == folder.resolve()


# ----------------------------------------------------------------------------- D7


def _boom(ctx: Context) -> None:
    raise RuntimeError("pass exploded")


def test_D7_internal_bug_exits_70_with_a_crash_log_and_no_traceback(
        project: Project, run_cli: Run, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(logs))
    monkeypatch.setattr(passes, "PASSES", (*passes.PASSES, ("boom", _boom)))
    result = run_cli(project(GOOD), "check", ".")  # run_cli asserts no "Traceback"
    assert result.code == EXIT_BUG
    assert result.out == ""
    assert result.err.startswith("perfusion: internal error (this is a bug): "
                                 "RuntimeError: pass exploded\n")
    assert len(result.err.splitlines()) == 2
    (log,) = logs.iterdir()
    assert str(log) in result.err
    text = log.read_text()
    assert "Traceback" in text and "pass exploded" in text and "_boom" in text


def test_D7_interrupt_exits_130(project: Project, run_cli: Run,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupt(ctx: Context) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(passes, "PASSES", (("interrupt", interrupt),))
    result = run_cli(project(GOOD), "plan", ".")
    assert result.code == 130
    assert result.err == "perfusion: interrupted\n"


def test_D7_user_errors_never_show_a_traceback(project: Project, run_cli: Run) -> None:
    bad: dict[str, str | bytes] = {"a.concept": b'\xff\x00{[<"', "b.concept": 'learn "" as * <>\n',
           "c.concept": 'generate "{{}}}" x -1 { strength: [] }\n', "d.concept": "}}}]]]\n"}
    result = run_cli(project(bad), "check", ".")  # run_cli asserts no internals leak
    assert result.code == EXIT_ERRORS


def test_module_entry_point_runs(project: Project) -> None:
    folder = project(GOOD)
    done = subprocess.run([sys.executable, "-m", "perfusion_dsl", "check", "."], cwd=folder,
                          capture_output=True, text=True, timeout=60, check=False,
                          env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert done.returncode == EXIT_OK, done.stderr
    assert done.stdout.startswith("checked 1 file(s)")


def test_toy_shapes_has_its_own_defaults_and_other_models_the_general_ones(
        project: Project, run_cli: Run) -> None:
    """The compiler fills in toy:shapes' defaults (world-word templates, 150 training steps,
    15 sampling steps at guidance 5), so the plan shows them; a model given by path keeps
    the general ones; the spec's own values win over both."""
    import json

    from perfusion_dsl.options import TOY_TEMPLATES
    from perfusion_dsl.plan import DEFAULT_TEMPLATES

    folder = project({
        "toy.concept": GOOD["a.concept"],
        "own.concept": ('model "toy:shapes"\nlearn photos/*.png as own* <circle> '
                        '{ templates: ["a big {}"] }\ngenerate "own*" { steps: 9 }\n'),
        "path/b.concept": ('model "/models/sd15"\nlearn ../photos/*.png as b* <dog>\n'
                           'generate "b*"\n'),
        "photos/1.png": png_bytes()})
    plan = json.loads(run_cli(folder, "plan", "--json", "--cache", "/dev/null/x", ".").out)
    learn = {c["token"]: c["options"] for c in plan["concepts"]}
    render = {r["concepts"][0]: r["options"] for r in plan["renders"]}
    assert tuple(learn["teddy*"]["templates"]) == TOY_TEMPLATES
    assert (learn["teddy*"]["steps"], learn["b*"]["steps"]) == (150, 400)
    assert (render["teddy*"]["steps"], render["teddy*"]["guidance"]) == (15, 5.0)
    assert learn["own*"]["templates"] == ["a big {}"] and render["own*"]["steps"] == 9
    assert tuple(learn["b*"]["templates"]) == DEFAULT_TEMPLATES
    assert (render["b*"]["steps"], render["b*"]["guidance"]) == (None, None)
