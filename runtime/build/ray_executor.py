"""The Ray executor: each train and render job is one Ray task, run in parallel on a cluster."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from .executor import Emit, RenderFailed, TrainDone, counted
from .progress import Reporter
from .stop import Stop, Stopped

if TYPE_CHECKING:
    from .jobs import Pipelines, Rendered, RenderJob, Trained, TrainJob

# A multi-machine cluster: every worker must have perfusion-concepts (with its `runtime`
# extra) installed, and reach the store and the run root at the same paths (a shared
# filesystem): a train task reads the images under the run root and publishes its artifact
# into the store itself; a render task reads artifacts from the store. Output images and
# manifests are written by the driver only.

POLL_SECONDS = 0.2  # how often the driver checks stop() while it waits for tasks
NEEDS_RAY = "the ray executor needs Ray: pip install 'perfusion-concepts[ray]'"

J = TypeVar("J")

# per worker process: loaded base models, by device and precision
_PIPES: dict[tuple[str, str], Pipelines] = {}


class RayUnavailable(RuntimeError):
    """Ray is not installed (it is the optional extra `ray`)."""


def _pipelines(device: str, precision: str = "auto") -> Pipelines:
    """This worker's cache of base models for `device`; on the CPU, one torch thread."""
    from .jobs import Pipelines

    if (device, precision) not in _PIPES:
        _PIPES[device, precision] = Pipelines(device, precision)
    pipes = _PIPES[device, precision]
    if pipes.precision.device.type == "cpu":
        import torch

        torch.set_num_threads(1)  # num_cpus=1 per task: do not oversubscribe the machine
    return pipes


def _work(job: TrainJob | RenderJob, device: str, precision: str = "auto"
          ) -> Trained | list[Rendered]:
    """The body of every Ray task (one function: GPU workers and their models are shared)."""
    from .jobs import RenderJob, render_job, train_job

    pipes = _pipelines(device, precision)
    if not isinstance(job, RenderJob):
        return train_job(job, pipes)
    images: list[Rendered] = []
    render_job(job, pipes, images.extend)
    return images


def _cause(err: BaseException) -> BaseException:
    """The task's own exception, so a failure reads like the local executor's."""
    from ray.exceptions import RayTaskError

    if isinstance(err, RayTaskError) and isinstance(err.cause, Exception):
        return err.cause
    return err


class RayExecutor:
    """Jobs as Ray tasks (one GPU each on a GPU cluster, else one CPU); results reported
    through the callbacks on this thread as the tasks finish."""

    def __init__(self, device: str, reporter: Reporter, stop: Stop, *,
                 address: str | None = None, precision: str = "auto") -> None:
        try:
            import ray
        except ImportError as exc:
            raise RayUnavailable(NEEDS_RAY) from exc
        self.reporter, self.stop = reporter, stop
        self.started = not ray.is_initialized()
        if self.started:
            _init(ray, address)
        gpus = device != "cpu" and ray.cluster_resources().get("GPU", 0) > 0
        # A GPU task sees only the GPU Ray gave it, as cuda:0. max_calls=0 keeps the worker
        # (and the models it loaded) for the next job; Ray's default for GPU tasks is a
        # fresh process per task.
        self.task = ray.remote(**({"num_gpus": 1, "max_calls": 0} if gpus
                                  else {"num_cpus": 1}))(_work)
        self.task_device = "cuda" if gpus else device
        self.precision = precision

    def train_all(self, jobs: Sequence[TrainJob], done: TrainDone) -> None:
        bar = self.reporter.bar("training", len(jobs), "concept")
        count = 0

        def finished(job: TrainJob, result: Any) -> None:
            nonlocal count
            done(job, result)
            count += 1
            bar.update(count)

        try:
            self._run(jobs, finished, finished)
        finally:
            bar.close()

    def render_all(self, jobs: Sequence[RenderJob], emit: Emit, failed: RenderFailed) -> None:
        with counted(self.reporter, jobs, emit) as emitted:
            self._run(jobs, emitted, failed)

    def _run(self, jobs: Sequence[J], ok: Callable[[J, Any], None],
             bad: Callable[[J, BaseException], None]) -> None:
        """Submit every job, then hand each result to `ok` (or its error to `bad`) as it
        arrives; on stop, or when a callback raises, cancel what is still running."""
        import ray

        pending: dict[Any, J] = {self.task.remote(job, self.task_device, self.precision): job
                                 for job in jobs}
        try:
            while pending:
                if self.stop():
                    raise Stopped
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_SECONDS)
                for ref in ready:
                    job = pending.pop(ref)
                    _deliver(ray, ref, job, ok, bad)
        finally:
            for ref in pending:
                ray.cancel(ref)

    def close(self) -> None:
        """Disconnect from Ray (stopping the local instance it started) if this executor
        connected; a Ray this process had already initialised is left as it was."""
        import ray

        if self.started and ray.is_initialized():
            ray.shutdown()
        self.started = False


def _init(ray: Any, address: str | None) -> None:
    """Join the cluster at `address`; without one Ray's own default: $RAY_ADDRESS, else a
    cluster started on this machine by `ray start`, else a new local instance."""
    ray.init(address=address, include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR)


def _deliver(ray: Any, ref: Any, job: J, ok: Callable[[J, Any], None],
             bad: Callable[[J, BaseException], None]) -> None:
    try:
        result = ray.get(ref)
    except ray.exceptions.RayError as err:
        bad(job, _cause(err))
        return
    ok(job, result)
