"""The `perfusion` command line: check, plan, fmt (exit 0 ok, 1 spec errors, 2 usage, 70 bug)."""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from perfusion_dsl import __version__
from perfusion_dsl.compiler import Compilation, UsageError, compile_paths
from perfusion_dsl.diagnostics import render_all, summary

EXIT_OK, EXIT_ERRORS, EXIT_USAGE, EXIT_BUG = 0, 1, 2, 70


def _parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="perfusion", description="Build personal "
                                  "text-to-image concepts from .concept spec files.")
    top.add_argument("--version", action="version", version=f"perfusion {__version__}")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = sub.add_parser("check", help="parse and validate specs; loads no model")
    plan = sub.add_parser("plan", help="show what would be trained and rendered")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    fmt = sub.add_parser("fmt", help="rewrite specs in canonical form (comments kept)")
    fmt.add_argument("--check", action="store_true", help="only report files that would change")
    for p in (check, plan, fmt):
        p.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                       help="spec files or folders (searched for *.concept)")
    for p in (check, plan):
        p.add_argument("--root", type=Path, default=None,
                       help="run root (default: the nearest folder with perfusion.toml "
                            "above the current folder or the given paths, else the current "
                            "folder)")
        p.add_argument("--model", default=None, metavar="SOURCE",
                       help="default base model for specs without a `model` line "
                            "(overrides perfusion.toml)")
    return top


def _report(comp: Compilation, quiet_ok: bool = False) -> int:
    diags = comp.diagnostics
    if diags:
        print(render_all(diags, comp.context.sources()), file=sys.stderr)
    errors, warnings = summary(diags)
    files = len(comp.context.requested)
    if errors or warnings:
        print(f"\n{errors} error{'s' * (errors != 1)}, {warnings} warning"
              f"{'s' * (warnings != 1)} in {files} file{'s' * (files != 1)}", file=sys.stderr)
    return EXIT_ERRORS if errors else EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    comp = compile_paths(args.paths, args.root, args.model)
    status = _report(comp)
    if status == EXIT_OK:
        ctx = comp.context
        print(f"checked {len(ctx.requested)} file(s): {len(ctx.concepts)} concept(s), "
              f"{len(ctx.renders)} image(s) to render; no errors")
    return status


def cmd_plan(args: argparse.Namespace) -> int:
    comp = compile_paths(args.paths, args.root, args.model)
    status = _report(comp)
    if status != EXIT_OK:
        return status
    plan = comp.plan()
    if args.json:
        print(plan.to_json())
        return EXIT_OK
    from perfusion_dsl.show_plan import describe

    print(describe(plan))
    return EXIT_OK


def cmd_fmt(args: argparse.Namespace) -> int:
    from perfusion_dsl.formatter import format_files

    return format_files(args.paths, check=args.check)


COMMANDS = {"check": cmd_check, "plan": cmd_plan, "fmt": cmd_fmt}


def _crash(exc: BaseException) -> int:
    """D7: an internal bug exits 70 with a short message and a crash log, not a traceback."""
    fd, log = tempfile.mkstemp(prefix="perfusion-crash-", suffix=".log")
    with os.fdopen(fd, "w") as handle:
        handle.write(f"perfusion {__version__} crashed at {time.ctime()}\n")
        handle.write(f"argv: {sys.argv!r}\n\n")
        handle.write("".join(traceback.format_exception(exc)))
    print(f"perfusion: internal error (this is a bug): {type(exc).__name__}: {exc}\n"
          f"  the crash log is {log}; please attach it to a bug report", file=sys.stderr)
    return EXIT_BUG


@contextmanager
def _fewer_gc_passes() -> Iterator[None]:
    """The compiler makes hundreds of thousands of small objects that reference counting
    frees; at Python's default threshold (700) the cycle collector runs hundreds of times
    over a growing heap, about a tenth of `check` on 1,000 files (docs/performance.md)."""
    old = gc.get_threshold()
    gc.set_threshold(50_000, *old[1:])
    try:
        yield
    finally:
        gc.set_threshold(*old)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        with _fewer_gc_passes():
            return COMMANDS[args.command](args)
    except UsageError as exc:
        print(f"perfusion: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("perfusion: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except Exception as exc:  # the one place that turns bugs into exit 70
        return _crash(exc)


if __name__ == "__main__":
    sys.exit(main())
