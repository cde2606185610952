"""Executors run train and render jobs; the local one runs them in this process, in order."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

from .progress import Reporter
from .stop import Stop, Stopped

if TYPE_CHECKING:
    from ..method.trainer import Progress
    from .jobs import Pipelines, Rendered, RenderJob, Trained, TrainJob

TrainDone = Callable[["TrainJob", "Trained | BaseException"], None]
Emit = Callable[["RenderJob", "list[Rendered]"], None]
RenderFailed = Callable[["RenderJob", BaseException], None]

# What a job may fail with and the run goes on (keep-going); anything else stops the run.
# Stopped and KeyboardInterrupt are never a job's failure.
JOB_ERRORS: tuple[type[BaseException], ...] = (Exception,)


class Executor(Protocol):
    """Runs jobs and reports each result through callbacks (which may raise to abort)."""

    def train_all(self, jobs: Sequence[TrainJob], done: TrainDone) -> None: ...

    def render_all(self, jobs: Sequence[RenderJob], emit: Emit, failed: RenderFailed) -> None: ...

    def close(self) -> None: ...


class LocalExecutor:
    """One job at a time in this process, base models loaded once, with progress bars."""

    def __init__(self, device: str, reporter: Reporter, stop: Stop, *,
                 precision: str = "auto") -> None:
        from .jobs import Pipelines

        self.pipes: Pipelines = Pipelines(device, precision)
        self.reporter = reporter
        self.stop = stop
        if precision not in ("auto", "fp32") and self.pipes.precision.device.type == "cpu":
            reporter.line(f"--precision {precision} applies on CUDA; on the CPU perfusion "
                          "computes in fp32 (the same bits on every run)")

    def train_all(self, jobs: Sequence[TrainJob], done: TrainDone) -> None:
        from ..method.trainer import TrainingInterrupted
        from .jobs import train_job

        for job in jobs:
            if self.stop():
                raise Stopped
            bar = self.reporter.bar(f"training {job.step.token}", job.step.options.steps,
                                    "step")
            try:
                result: Trained | BaseException = train_job(
                    job, self.pipes, stop=self.stop,
                    progress=_progress(self.reporter, bar, job.step.token))
            except TrainingInterrupted:
                raise Stopped from None
            except JOB_ERRORS as exc:
                result = exc
            finally:
                bar.close()
            done(job, result)

    def render_all(self, jobs: Sequence[RenderJob], emit: Emit, failed: RenderFailed) -> None:
        from .jobs import render_job

        with counted(self.reporter, jobs, emit) as emitted:
            for job in jobs:
                try:
                    render_job(job, self.pipes, lambda images, job=job: emitted(job, images),  # type: ignore[misc]
                               stop=self.stop)
                except JOB_ERRORS as exc:
                    failed(job, exc)

    def close(self) -> None:
        self.pipes.loaded.clear()


def _progress(reporter: Reporter, bar: Any, token: str) -> Callable[[Progress], None]:
    """Training progress to its bar; a resume from a checkpoint is said once, as it starts."""
    announced = False

    def update(p: Progress) -> None:
        nonlocal announced
        if p.resumed_from and not announced:
            announced = True
            reporter.line(f"resuming {token} at step {p.resumed_from} of {p.steps}, from the "
                          "checkpoint of an earlier run")
        bar.update(p.step, loss=p.loss)

    return update


@contextmanager
def counted(reporter: Reporter, jobs: Sequence[RenderJob], emit: Emit) -> Iterator[Emit]:
    """`emit`, advancing one "rendering" bar over every image of `jobs` (closed after)."""
    bar = reporter.bar("rendering", sum(len(j.renders) for j in jobs), "image")
    count = 0

    def emitted(job: RenderJob, images: list[Rendered]) -> None:
        nonlocal count
        emit(job, images)
        count += len(images)
        bar.update(count)

    try:
        yield emitted
    finally:
        bar.close()

