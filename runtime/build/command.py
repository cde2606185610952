"""The runtime's side of the command line: `run`, `cache verify|gc`, and `plan`'s statuses."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path, PurePosixPath
from types import FrameType

from perfusion_dsl.plan import Plan
from perfusion_dsl.terminal import visible

from ..files.lock import LockHeld, build_lock
from ..files.store import Store, StoreError, StoreUnusable, cache_root
from .models import describe as describe_model
from .progress import Reporter
from .run import RunOptions, Summary, run
from .status import PlanStatus, plan_status, store_key

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2  # as the CLI's (perfusion_dsl/cli.py)
RUNTIME_MODULES = ("torch", "diffusers", "transformers", "safetensors", "numpy", "tqdm")
# ---------------------------------------------------------------- plan


def with_status(plan: Plan, root: Path, cache: Path | None) -> tuple[Plan, PlanStatus]:
    """The plan with `up_to_date` filled in from the store, and every step's status."""
    status = plan_status(plan, root, Store(cache_root(cache, root)))
    concepts = [c.model_copy(update={"up_to_date": status.concepts[c.token].state ==
                                     "up to date"}) for c in plan.concepts]
    return plan.model_copy(update={"concepts": concepts}), status


def describe(plan: Plan, status: PlanStatus) -> str:
    """`perfusion plan` for people: each concept and each generate statement, with why."""
    train, render = status.counts()
    models = sorted({c.model for c in plan.concepts} | {r.model for r in plan.renders})
    lines = [f"models: {len(models)}"]
    lines += [f"  {model}: {describe_model(model)}" for model in models]
    lines.append(f"concepts: {len(plan.concepts)} ({train} to train)")
    for c in plan.concepts:
        lines.append(f"  {c.token:<16} {status.concepts[c.token]}")
        lines.append(f"  {'':<16} {len(c.images)} image(s), {c.options.steps} steps, lock "
                     f"{c.options.lock} ({c.file}:{c.line}, key {c.key[:12]})")
    lines.append(f"images: {len(plan.renders)} ({render} to render)")
    indexed = list(enumerate(plan.renders))
    for (file, line), group in groupby(indexed, key=lambda p: (p[1].file, p[1].line)):
        items = list(group)
        folders = sorted({str(PurePosixPath(r.out).parent) for _, r in items})
        states = [status.renders[i] for i, _ in items]
        counts = {s: sum(x.state == s for x in states) for s in ("new", "changed", "up to date")}
        shown = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        lines.append(f"  {file}:{line}: {len(items)} image(s) → {', '.join(folders)}/ "
                     f"({shown})")
        reasons = sorted({r for s in states for r in s.reasons})
        lines += [f"      {reason}" for reason in reasons[:5]]
        if len(reasons) > 5:
            lines.append(f"      … and {len(reasons) - 5} more")
    return "\n".join(lines)


# ---------------------------------------------------------------- run


@dataclass
class StopFlag:
    """Set by the first Ctrl-C or SIGTERM: work stops at the next step, cleanly; a second
    one stops at once (KeyboardInterrupt)."""

    signum: int = 0

    def __call__(self) -> bool:
        return self.signum != 0


class StopNow(KeyboardInterrupt):
    """A second signal: stop at once; the CLI exits 128 + `signum` (130, or 143 for
    SIGTERM)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def stop_on_signals(flag: StopFlag, reporter: Reporter) -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        if flag.signum:
            raise StopNow(signum)
        flag.signum = signum
        reporter.error(f"{signal.Signals(signum).name}: stopping after the current training "
                       "or denoising step; finished concepts and images are kept (send it "
                       "again to stop now)")

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class _Warnings(logging.Handler):
    """The runtime's logged warnings (corrupt cache entries, manifests) as user warnings."""

    def __init__(self, reporter: Reporter) -> None:
        super().__init__(logging.WARNING)
        self.reporter = reporter

    def emit(self, record: logging.LogRecord) -> None:
        self.reporter.warn(record.getMessage())


@contextmanager
def warnings_to(reporter: Reporter) -> Iterator[None]:
    logger = logging.getLogger("perfusion_runtime")
    handler = _Warnings(reporter)
    logger.addHandler(handler)
    old, logger.propagate = logger.propagate, False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = old


def run_command(plan: Plan, root: Path, options: RunOptions, *, quiet: bool = False) -> int:
    reporter = Reporter(quiet=quiet)
    flag = StopFlag()
    try:
        with warnings_to(reporter), stop_on_signals(flag, reporter):
            summary = run(plan, root, options, reporter, flag)
    except LockHeld as exc:
        reporter.error(str(exc))
        return EXIT_FAILED
    except StoreUnusable as exc:
        reporter.error(str(exc))
        return EXIT_USAGE
    except StoreError as exc:
        reporter.error(str(exc))
        return EXIT_FAILED
    except ModuleNotFoundError as exc:
        if exc.name not in RUNTIME_MODULES:
            raise
        reporter.error(f"training and rendering need {exc.name}, which is not installed: "
                       "pip install 'perfusion-concepts[runtime]' (on a CPU-only machine "
                       "install the CPU build of torch first)")
        return EXIT_FAILED
    report(summary, reporter, root)
    if summary.stopped:
        reporter.error("stopped; run the same command again to resume (finished concepts and "
                       "images are kept, training resumes from its last checkpoint)")
        return 128 + (flag.signum or signal.SIGINT)
    return EXIT_FAILED if summary.failures else EXIT_OK


def report(summary: Summary, reporter: Reporter, root: Path) -> None:
    restored = f", {len(summary.restored)} from the cache" if summary.restored else ""
    skipped = f", {summary.skipped} skipped" if summary.skipped else ""
    reporter.result(f"trained {len(summary.trained)} concept(s), {len(summary.reused)} up to "
                    f"date; rendered {len(summary.rendered)} image(s){restored}, "
                    f"{summary.up_to_date} up to date{skipped}")
    for folder in summary.folders:
        reporter.result(f"  images:  {_shown(root, folder)}/")
    for sheet in summary.sheets:
        reporter.result(f"  contact sheet: {_shown(root, sheet)}")
    if summary.failures:
        reporter.result(f"{len(summary.failures)} job(s) failed:")
        for failure in summary.failures:
            reporter.result(f"  {failure}")


def _shown(root: Path, rel: str) -> str:
    path = root / rel
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------- cache


def verify_command(store: Path) -> int:
    if not store.is_dir():
        print(visible(f"{store}: no store here (nothing to verify)"))
        return EXIT_OK
    problems = Store(store).verify()
    for problem in problems:
        print(visible(f"corrupt: {problem}"), file=sys.stderr)
    root = Store(store).root
    counts = [len(list(root.glob(pattern))) for pattern in ("concepts/*", "renders/*/*",
                                                             "cinv/*")]
    print(visible(f"{store}: {counts[0]} concept(s), {counts[1]} cached render(s) and "
                  f"{counts[2]} C⁻¹ entr{'y' if counts[2] == 1 else 'ies'} checked, "
                  f"{len(problems)} problem(s)"))
    return EXIT_FAILED if problems else EXIT_OK


def gc_command(store: Path, keep: set[str], *, wait: bool = False) -> int:
    """Remove what `keep` (the keys the current specs reference) does not name, under the
    build lock so a running build's new entries are safe."""
    try:
        Store(store).check_layout()
        with build_lock(store, wait=wait):
            removed = Store(store).gc(keep)
    except (LockHeld, StoreError) as exc:
        print(visible(f"perfusion: error: {exc}"), file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, StoreUnusable) else EXIT_FAILED
    for path in removed:
        print(visible(f"removed {path}"))
    print(visible(f"{store}: removed {len(removed)}, kept {len(keep)} referenced concept(s)"))
    return EXIT_OK


def keys_of(plan: Plan) -> set[str]:
    """The store keys a plan references (with the shipped caption corpus)."""
    return {store_key(c) for c in plan.concepts}
