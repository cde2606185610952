"""Runs the CLI on every golden fixture and, with --write, rewrites the expected outputs.

Usage (from the repository root):

    .venv/bin/python tests/regen_goldens.py            # show which goldens differ
    .venv/bin/python tests/regen_goldens.py --write    # rewrite them; review `git diff`

A golden is blessed by a person: read every changed file before committing it. The
tests import the helpers below so that the test and this script run the CLI the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
FIXTURES = TESTS / "fixtures"
DIAGNOSTICS = FIXTURES / "diagnostics"
PLANS = FIXTURES / "plans"
SPECS = REPO / "specs"
SPECS_EXPECTED = PLANS / "specs.expected.json"

# `--root .` pins the run root to the fixture folder itself, so a perfusion.toml that
# someone adds above tests/fixtures cannot change the paths shown in the goldens. With
# no perfusion.toml above, the output is exactly that of `perfusion check .`.
CHECK_ARGV = ("check", "--root", ".", ".")
# An empty store that cannot exist, so `up_to_date` does not depend on a local build (the
# README's main command builds specs/ into specs/.perfusion/).
NO_STORE = ("--cache", "/dev/null/no-store")
PLAN_ARGV = ("plan", "--json", *NO_STORE, "--root", ".", ".")
# The examples are planned as a user would: from the repository root.
SPECS_ARGV = ("plan", "--json", *NO_STORE, "specs")


def diagnostic_cases() -> list[Path]:
    """Every fixture folder; its name is the diagnostic code, optionally `code--variant`."""
    return sorted(p for p in DIAGNOSTICS.iterdir() if p.is_dir())


def plan_cases() -> list[Path]:
    return sorted(p for p in PLANS.iterdir() if p.is_dir())


def code_of(case: Path) -> str:
    return case.name.split("--", 1)[0]


@contextlib.contextmanager
def injected(case: Path) -> Iterator[None]:
    """Conditions a fixture cannot hold in git (file modes are not versioned, and tests may
    run as root, who can read anything): `unreadable` makes opening its spec fail."""
    if code_of(case) != "unreadable":
        yield
        return
    from perfusion_dsl import reading

    real_open = reading.os.open

    def deny(path: object, *args: object, **kwargs: object) -> int:
        if str(path).endswith(".concept"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

    with mock.patch.object(reading.os, "open", deny):
        yield


def normalise(text: str, folder: Path) -> str:
    """Messages that name the run root absolutely show `$ROOT`, so goldens do not depend
    on where the repository is checked out."""
    return text.replace(folder.resolve().as_posix(), "$ROOT")


def run_cli(folder: Path, argv: tuple[str, ...]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `perfusion ARGV` run in-process with cwd = folder,
    normalised."""
    from perfusion_dsl.cli import main

    out, err = io.StringIO(), io.StringIO()
    old = Path.cwd()
    os.chdir(folder)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), injected(folder):
            code = main(list(argv))
    finally:
        os.chdir(old)
    return code, normalise(out.getvalue(), folder), normalise(err.getvalue(), folder)


def _goldens() -> Iterator[tuple[Path, str]]:
    """(expected file, what the CLI prints now) for every golden."""
    for case in diagnostic_cases():
        yield case / "expected.txt", run_cli(case, CHECK_ARGV)[2]
    for case in plan_cases():
        yield case / "expected.json", run_cli(case, PLAN_ARGV)[1]
    if any(SPECS.rglob("*.concept")):
        code, out, err = run_cli(REPO, SPECS_ARGV)
        if code != 0:
            raise SystemExit(f"specs/ does not compile; fix it first:\n{err}")
        yield SPECS_EXPECTED, out


def main() -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--write", action="store_true", help="rewrite the goldens that differ")
    write = args.parse_args().write
    changed = 0
    for path, now in _goldens():
        before = path.read_text("utf-8") if path.exists() else None
        if before == now:
            continue
        changed += 1
        shown = path.relative_to(REPO)
        print(f"{'wrote' if write else 'differs'}: {shown}")
        if write:
            path.write_text(now, "utf-8", newline="\n")
    print(f"{changed} golden(s) {'rewritten' if write else 'out of date'}")
    return 1 if changed and not write else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
