"""Progress of a run: tqdm bars on a terminal, plain log lines otherwise, nothing with --quiet."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from perfusion_dsl.terminal import visible

PLAIN_EVERY_SECONDS = 10.0  # plain mode: at most one progress line per bar this often


def duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Bar:
    """One task's progress; `update(done, **fields)` then `close()`."""

    def __init__(self, reporter: Reporter, label: str, total: int, unit: str) -> None:
        self.reporter, self.label, self.total, self.unit = reporter, label, total, unit
        self.started = self._last = time.monotonic()
        self.done = 0
        self._bar: Any = None
        if reporter.tty and not reporter.quiet:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=label, unit=unit, file=reporter.stream,
                             leave=False, dynamic_ncols=True)

    def update(self, done: int, **fields: float | str) -> None:
        step, self.done = done - self.done, done
        if self._bar is not None:
            self._bar.set_postfix({k: _short(v) for k, v in fields.items()}, refresh=False)
            self._bar.update(step)
            return
        now = time.monotonic()
        if self.reporter.quiet or (now - self._last < PLAIN_EVERY_SECONDS and done < self.total):
            return
        self._last = now
        elapsed = now - self.started
        eta = elapsed / max(done, 1) * (self.total - done)
        extra = "".join(f", {k} {_short(v)}" for k, v in fields.items())
        self.reporter.line(f"  {self.label}: {self.unit} {done}/{self.total}{extra}, "
                           f"ETA {duration(eta)}")

    def close(self) -> float:
        """Stop the bar; return the seconds it ran."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        return time.monotonic() - self.started


def _short(value: float | str) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Reporter:
    """Where a run talks: results on stdout, progress and warnings on stderr."""

    def __init__(self, *, quiet: bool = False, stream: TextIO | None = None,
                 out: TextIO | None = None, tty: bool | None = None) -> None:
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.out = out or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty

    def line(self, text: str) -> None:
        """A progress line (stderr); dropped with --quiet."""
        if not self.quiet:
            self._write(self.stream, text)

    def result(self, text: str) -> None:
        """A result line (stdout); kept with --quiet."""
        self._write(self.out, text)

    def warn(self, text: str) -> None:
        self._write(self.stream, f"perfusion: warning: {text}")

    def error(self, text: str) -> None:
        self._write(self.stream, f"perfusion: error: {text}")

    def bar(self, label: str, total: int, unit: str) -> Bar:
        return Bar(self, label, total, unit)

    def _write(self, stream: TextIO, text: str) -> None:
        text = visible(text)  # prompts, paths and errors come from the user's files
        if self.tty and stream is self.stream:
            from tqdm import tqdm

            tqdm.write(text, file=stream)  # above any open bar, not through it
        else:
            print(text, file=stream, flush=True)
