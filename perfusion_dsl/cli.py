"""The `perfusion` command line: check, plan, run, fmt, cache (exit 0 ok, 1 spec errors or
failed jobs, 2 usage, 70 bug, 128+N stopped by signal N)."""

from __future__ import annotations

import argparse
import gc
import os
import re
import signal
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
from perfusion_dsl.terminal import visible

EXIT_OK, EXIT_ERRORS, EXIT_USAGE, EXIT_BUG = 0, 1, 2, 70


def _parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="perfusion", description="Build personal "
                                  "text-to-image concepts from .concept spec files.")
    top.add_argument("--version", action="version", version=f"perfusion {__version__}")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = sub.add_parser("check", help="parse and validate specs; loads no model")
    check.add_argument("--format", choices=("text", "json", "sarif"), default="text",
                       help="text (for people, on stderr), or json / sarif on stdout (for "
                            "CI and editors)")
    plan = sub.add_parser("plan", help="show what would be trained and rendered, and why")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    run = sub.add_parser("run", help="train what is missing or changed, render images, skip "
                         "what is up to date")
    fmt = sub.add_parser("fmt", help="rewrite specs in canonical form (comments kept)")
    fmt.add_argument("--check", action="store_true", help="only report files that would change")
    sub.add_parser("lsp", help="a language server over stdio, for editors (needs the `lsp` "
                   "extra; docs/editors.md)")
    cache = sub.add_parser("cache", help="check or clean the concept store")
    actions = cache.add_subparsers(dest="action", required=True, metavar="ACTION")
    verify = actions.add_parser("verify", help="re-hash every stored concept (exit 1 on "
                                "corruption)")
    gc = actions.add_parser("gc", help="remove stored concepts the specs under PATH do not "
                            "reference")
    for p in (check, plan, run, fmt):
        p.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                       help="spec files or folders (searched for *.concept)")
    gc.add_argument("paths", nargs="*", type=Path, metavar="PATH", default=[Path(".")],
                    help="the specs whose concepts to keep (default: the current folder)")
    verify.add_argument("paths", nargs="*", type=Path, metavar="PATH", default=[],
                        help="a project folder or spec paths, to find its store like `run` "
                             "does (default: the current folder)")
    verify.add_argument("--root", type=_folder, default=None, help="run root, as for `run`")
    for p in (check, plan, run, gc, fmt):
        p.add_argument("--root", type=_folder, default=None,
                       help="run root (default: the nearest folder with perfusion.toml "
                            "above the current folder or the given paths, else the current "
                            "folder)")
    for p in (check, plan, run, gc):
        p.add_argument("--model", default=None, metavar="SOURCE",
                       help="default base model for specs without a `model` line "
                            "(overrides perfusion.toml)")
    for p in (plan, run, verify, gc):
        p.add_argument("--cache", type=Path, default=None, metavar="DIR",
                       help="the concept store (default: $PERFUSION_CACHE, else .perfusion/ "
                            "in the run root)")
    _run_options(run)
    gc.add_argument("--wait", action="store_true", help="wait for a running build instead of "
                    "exiting")
    return top


_DEVICE = re.compile(r"auto|cpu|cuda(:\d{1,4})?")
MAX_BATCH_SIZE = 4096


def _device(text: str) -> str:
    """Checked before anything loads; which devices exist is for the runtime to say."""
    if not _DEVICE.fullmatch(text.strip().lower()):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: expected \"auto\", "
                                         "\"cpu\", \"cuda\" or \"cuda:N\"")
    return text


def _batch_size(text: str) -> int:
    if not re.fullmatch(r"\d{1,9}", text.strip()) or not 1 <= int(text) <= MAX_BATCH_SIZE:
        raise argparse.ArgumentTypeError(f"must be a whole number between 1 and "
                                         f"{MAX_BATCH_SIZE:,}, found {text[:40]!r}")
    return int(text)


def _folder(text: str) -> Path:
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text!r} does not exist")
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not a folder")
    return path


def _run_options(run: argparse.ArgumentParser) -> None:
    run.add_argument("--quiet", "-q", action="store_true", help="print only the results")
    run.add_argument("--wait", action="store_true", help="if another run holds the cache "
                     "lock, wait for it (default: exit 1 naming its pid)")
    going = run.add_mutually_exclusive_group()
    going.add_argument("--keep-going", dest="keep_going", action="store_true", default=True,
                       help="after a failed job, go on with the work that does not need it "
                            "(default)")
    going.add_argument("--fail-fast", dest="keep_going", action="store_false",
                       help="stop at the first failed job")
    run.add_argument("--device", default="auto", type=_device,
                     help='"auto" (default: CUDA when present), "cpu", "cuda" or "cuda:N"')
    run.add_argument("--batch-size", type=_batch_size, default=None, metavar="N",
                     help="images per pipeline call (default: 1 on the CPU, which keeps every "
                          "image independent of the others; 8 on CUDA)")
    run.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                     help="weights and activations on CUDA (default auto: bf16, fp16 before "
                          "Ampere); the CPU always computes in fp32")
    run.add_argument("--gradient-checkpointing", action="store_true",
                     help="train with the UNet's activations recomputed in the backward pass: "
                          "less memory, more time, the same concepts (default: only after "
                          "running out of memory)")
    run.add_argument("--executor", choices=("local", "ray"), default="local",
                     help="run jobs in this process (default) or as Ray tasks "
                          "(`pip install 'perfusion-concepts[ray]'`)")
    run.add_argument("--ray-address", default=None, metavar="ADDRESS",
                     help="the Ray cluster to join (default: start a local one)")


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
    if args.format != "text":
        return _check_for_machines(args)
    comp, status = _compiled(args)
    if status == EXIT_OK:
        ctx = comp.context
        print(f"checked {len(ctx.requested)} file(s): {len(ctx.concepts)} concept(s), "
              f"{len(ctx.outputs)} image(s) to render; no errors")
    return status


def _check_for_machines(args: argparse.Namespace) -> int:
    """`check --format json|sarif`: the document on stdout, nothing on stderr, the same exit
    status as the text format."""
    import json

    from perfusion_dsl.diagnostic_formats import to_json, to_sarif

    comp = compile_paths(args.paths, args.root, args.model)
    diags = comp.diagnostics
    document = to_json(diags, len(comp.context.requested), __version__) \
        if args.format == "json" else to_sarif(diags, comp.context.root, __version__)
    print(json.dumps(document, indent=2))  # ASCII: no raw control or bidi character
    return EXIT_ERRORS if summary(diags)[0] else EXIT_OK


def _compiled(args: argparse.Namespace) -> tuple[Compilation, int]:
    comp = compile_paths(args.paths, args.root, args.model)
    return comp, _report(comp)


def cmd_plan(args: argparse.Namespace) -> int:
    comp, status = _compiled(args)
    if status != EXIT_OK:
        return status
    from perfusion_runtime.build.command import describe, with_status

    plan, states = with_status(comp.plan(), comp.context.root, args.cache)
    print(plan.to_json() if args.json else visible(describe(plan, states)))
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    if args.ray_address is not None and args.executor != "ray":
        raise UsageError("--ray-address needs --executor ray")
    comp, status = _compiled(args)
    if status != EXIT_OK:
        return status
    from perfusion_runtime.build.command import run_command
    from perfusion_runtime.build.run import RunOptions
    from perfusion_runtime.files.store import cache_root

    root = comp.context.root
    options = RunOptions(cache_root(args.cache, root), device=args.device,
                         batch_size=args.batch_size, keep_going=args.keep_going,
                         wait=args.wait, executor=args.executor, ray_address=args.ray_address,
                         gradient_checkpointing=args.gradient_checkpointing,
                         precision=args.precision)
    return int(run_command(comp.plan(), root, options, quiet=args.quiet))


def cmd_cache(args: argparse.Namespace) -> int:
    from perfusion_runtime.build import command
    from perfusion_runtime.files.store import cache_root

    if args.action == "verify":
        from perfusion_dsl.compiler import run_root

        store = cache_root(args.cache, run_root(args.paths, args.root))
        return int(command.verify_command(store))
    comp, status = _compiled(args)
    if status != EXIT_OK:
        print("perfusion: error: not collecting garbage while the specs have errors (they "
              "decide what is kept)", file=sys.stderr)
        return status
    root = comp.context.root
    return int(command.gc_command(cache_root(args.cache, root),
                                  command.keys_of(comp.plan()), wait=args.wait))


def cmd_fmt(args: argparse.Namespace) -> int:
    from perfusion_dsl.compiler import run_root
    from perfusion_dsl.formatter import format_files

    return format_files(args.paths, check=args.check, root=run_root(args.paths, args.root))


def cmd_lsp(args: argparse.Namespace) -> int:
    try:
        from perfusion_dsl.lsp import main as serve
    except ImportError as exc:
        raise UsageError(f"`perfusion lsp` needs the lsp extra: pip install "
                         f"'perfusion-concepts[lsp]' ({exc})") from None
    return serve()


COMMANDS = {"check": cmd_check, "plan": cmd_plan, "run": cmd_run, "fmt": cmd_fmt,
            "cache": cmd_cache, "lsp": cmd_lsp}


def _crash(exc: BaseException) -> int:
    """An internal bug exits 70 with a short message and a crash log, not a traceback."""
    fd, log = tempfile.mkstemp(prefix="perfusion-crash-", suffix=".log")
    with os.fdopen(fd, "w") as handle:
        handle.write(f"perfusion {__version__} crashed at {time.ctime()}\n")
        handle.write(f"argv: {sys.argv!r}\n\n")
        handle.write("".join(traceback.format_exception(exc)))
    print(visible(f"perfusion: internal error (this is a bug): {type(exc).__name__}: {exc}")
          + f"\n  the crash log is {log}; please attach it to a bug report", file=sys.stderr)
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
        os.getcwd()
    except FileNotFoundError:  # every relative path would fail later, less clearly
        print("perfusion: error: the current folder no longer exists (it was deleted or "
              "moved); cd into a folder that exists and run again", file=sys.stderr)
        return EXIT_USAGE
    try:
        with _fewer_gc_passes():
            return COMMANDS[args.command](args)
    except UsageError as exc:
        print(visible(f"perfusion: error: {exc}"), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as exc:  # a second SIGTERM during a run says which signal
        print("perfusion: interrupted", file=sys.stderr)
        return 128 + int(getattr(exc, "signum", signal.SIGINT))
    except BrokenPipeError:
        return EXIT_OK
    except Exception as exc:  # the one place that turns bugs into exit 70
        return _crash(exc)


if __name__ == "__main__":
    sys.exit(main())
