"""The README's main job end to end: `perfusion run specs/` on a copy of the bundled examples
with the tiny model (a few minutes: `-m slow`), then the no-op rerun (R4)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_readme_main_job_builds_specs_then_does_nothing(tmp_path: Path) -> None:
    shutil.copytree(REPO / "specs", tmp_path / "specs",
                    ignore=shutil.ignore_patterns(".perfusion", "renders"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PERFUSION_CACHE", None)
    first = subprocess.run([sys.executable, "-m", "perfusion_dsl", "run", "specs/"],
                           cwd=tmp_path, capture_output=True, text=True, env=env, timeout=1500)
    assert first.returncode == 0, first.stderr[-3000:]
    plan = json.loads(subprocess.run(
        [sys.executable, "-m", "perfusion_dsl", "plan", "--json", "specs/"], cwd=tmp_path,
        capture_output=True, text=True, env=env, check=True).stdout)
    concepts, renders = len(plan["concepts"]), len(plan["renders"])
    assert all(c["up_to_date"] for c in plan["concepts"])
    assert f"trained {concepts} concept(s), 0 up to date; rendered {renders} image(s)" \
        in first.stdout
    root = tmp_path / "specs"
    assert all((root / r["out"]).is_file() for r in plan["renders"])
    statements = {(r["file"], r["line"]) for r in plan["renders"]}
    assert len(list(root.rglob("contact-sheet_*.png"))) == len(statements)
    assert "contact sheet: specs/renders/" in first.stdout
    noop = textwrap.dedent("""
        import sys
        from perfusion_dsl.cli import main
        code = main(["run", "specs/"])
        print("HEAVY", code, sorted(m for m in sys.modules if m.split(".")[0] in
                                    {"torch", "diffusers", "transformers"}))
    """)
    again = subprocess.run([sys.executable, "-c", noop], cwd=tmp_path, capture_output=True,
                           text=True, env=env, timeout=120)
    assert again.returncode == 0, again.stderr
    assert f"trained 0 concept(s), {concepts} up to date; rendered 0 image(s), {renders} up " \
           "to date" in again.stdout
    assert "HEAVY 0 []" in again.stdout
