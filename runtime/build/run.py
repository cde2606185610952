"""`perfusion run`: train what is missing or changed, render what is, like a build system.

Torch is imported only when there is work: a run whose work is done reads the store and the
output manifests and stops."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from perfusion_dsl.plan import PLAN_VERSION, ConceptStep, Plan, RenderStep

from ..files.atomic import file_sha256
from ..files.lock import build_lock
from ..files.store import Store
from .executor import Executor
from .models import ModelUnavailable, resolve, source_of
from .progress import Reporter, duration
from .status import (
    Manifests,
    PlanStatus,
    concept_inputs,
    forget_stamp,
    plan_status,
    tool_version,
    write_history,
)
from .stop import Stopped

if TYPE_CHECKING:
    from .jobs import Rendered, RenderJob, Trained, TrainJob

RENDER_JOB_SIZE = 16  # images per render job: a unit of parallel work for a distributed run


class FailFast(Exception):  # control flow: the first failure ends the run
    pass


@dataclass(frozen=True)
class RunOptions:
    store: Path
    device: str = "auto"
    batch_size: int | None = None
    captions: Path | None = None
    keep_going: bool = True
    wait: bool = False
    executor: str = "local"  # "local" or "ray"
    ray_address: str | None = None
    gradient_checkpointing: bool = False  # from the start (else only when memory runs out)
    precision: str = "auto"  # on CUDA: "auto" (bf16, fp16 before Ampere), "bf16", "fp16", "fp32"


@dataclass
class Summary:
    trained: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    rendered: list[str] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)  # copied from the store's render cache
    up_to_date: int = 0
    failures: list[str] = field(default_factory=list)
    skipped: int = 0  # renders not attempted because a concept they use failed
    sheets: list[str] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)
    stopped: bool = False


def _where(file: str, line: int) -> str:
    return f"{file}:{line}"


# Failures a user can act on; anything else in a job is a bug, reported with a crash log.
_EXPECTED = ("TrainingError", "NonFiniteLoss", "OutOfMemory", "ModelUnavailable",
             "StoreError", "OutputError", "ArtifactError", "CheckpointError", "DeviceError",
             "CorruptConcept", "InputChanged")


def _message(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if type(exc).__name__ in _EXPECTED or isinstance(exc, OSError):
        return text
    return f"internal error (a bug): {type(exc).__name__}: {text}; crash log: {_crash_log(exc)}"


def _crash_log(exc: BaseException) -> str:
    import os
    import tempfile
    import traceback

    fd, path = tempfile.mkstemp(prefix="perfusion-crash-", suffix=".log")
    with os.fdopen(fd, "w") as handle:
        handle.write("".join(traceback.format_exception(exc)))
    return path


@dataclass
class _Build:
    """The state of one run, shared by its phases."""

    plan: Plan
    root: Path
    options: RunOptions
    reporter: Reporter
    stop: Callable[[], bool]
    store: Store
    status: PlanStatus
    summary: Summary = field(default_factory=Summary)
    failed_tokens: set[str] = field(default_factory=set)
    manifests: Manifests | None = None
    executor: Executor | None = None
    # render jobs stopped by a stored concept that failed its load check (moved aside):
    # trained again and rendered again once, in this run
    corrupt: list[RenderJob] = field(default_factory=list)
    retried: bool = False

    def fail(self, text: str) -> None:
        self.summary.failures.append(text)
        self.reporter.error(text)
        if not self.options.keep_going:
            raise FailFast(text)

    def get_executor(self) -> Executor:
        if self.executor is None:
            self.executor = make_executor(self.options, self.reporter, self.stop)
        return self.executor


def make_executor(options: RunOptions, reporter: Reporter,
                  stop: Callable[[], bool]) -> Executor:
    if options.executor == "ray":
        from .ray_executor import RayExecutor

        return RayExecutor(options.device, reporter, stop, address=options.ray_address,
                           precision=options.precision)
    from .executor import LocalExecutor

    return LocalExecutor(options.device, reporter, stop, precision=options.precision)


def run(plan: Plan, root: Path, options: RunOptions, reporter: Reporter,
        stop: Callable[[], bool] = lambda: False) -> Summary:
    """Build `plan` (paths relative to `root`) under the store's lock."""
    store = Store(options.store)
    store.check_layout()
    with build_lock(store.root, wait=options.wait, waiting=lambda pid: reporter.line(
            f"waiting for process {pid if pid is not None else '(unknown)'} to finish its "
            "build (it holds the cache lock)")):
        captions = file_sha256(options.captions) if options.captions else None
        if options.captions and captions is None:
            raise FileNotFoundError(f"cannot read the caption file {options.captions}")
        _resolve_models(plan)
        build = _Build(plan, root, options, reporter, stop, store,
                       plan_status(plan, root, store, captions))
        try:
            _train(build)
            _render(build)
            _sheets(build)
        except Stopped:
            build.summary.stopped = True
        except FailFast:
            pass
        finally:
            if build.executor is not None:
                build.executor.close()
        return build.summary


def checkpoint_config(build: _Build, model: str) -> str | None:
    """A single-file model's configuration from the plan (`[checkpoints]` of perfusion.toml):
    a folder, made absolute from the run root, or a model id as written."""
    config = build.plan.checkpoint_configs.get(model)
    if config is None:
        return None
    folder = build.root / Path(config).expanduser()
    return str(folder) if folder.exists() else config


def _resolve_models(plan: Plan) -> None:
    """Model ids' revisions are resolved to commits before any key is made (one small
    request each; nothing is downloaded until a step needs the weights), so that keys carry
    the revision really used: a new revision rebuilds, the same one never does, and a run
    with nothing to do downloads nothing. One that cannot be resolved is left to fail in
    the steps that use it, each naming its spec line."""
    for name in sorted({c.model for c in plan.concepts} | {r.model for r in plan.renders}):
        try:
            source = source_of(name)
        except ModelUnavailable:
            continue
        if source.kind == "hub":
            resolve(source)
            forget_stamp(name)


# ---------------------------------------------------------------- training


def _train(build: _Build) -> None:
    plan, status = build.plan, build.status
    todo = [c for c in plan.concepts if status.concepts[c.token].state != "up to date"]
    for c in plan.concepts:
        if c.token not in {t.token for t in todo}:
            build.summary.reused.append(c.token)
            write_history(build.store, c.token, status.concept_keys[c.token],
                          concept_inputs(c, build.root))
    for c in todo:
        build.reporter.line(f"training {c.token} ({_where(c.file, c.line)}): "
                            f"{status.concepts[c.token]}")
    _train_steps(build, todo)


def _train_steps(build: _Build, steps: Sequence[ConceptStep]) -> None:
    if not steps:
        return
    from .jobs import TrainJob

    captions = str(build.options.captions) if build.options.captions else None
    jobs = [TrainJob(c, build.status.concept_keys[c.token], str(build.root),
                     str(build.store.root), captions, checkpoint_config(build, c.model),
                     build.options.gradient_checkpointing)
            for c in steps]
    build.get_executor().train_all(jobs, lambda job, result: _trained(build, job, result))


def _trained(build: _Build, job: TrainJob, result: Trained | BaseException) -> None:
    step = job.step
    if isinstance(result, BaseException):
        build.failed_tokens.add(step.token)
        build.fail(f"while training `{step.token}` ({_where(step.file, step.line)}): "
                   f"{_message(result)}")
        return
    write_history(build.store, step.token, job.key, concept_inputs(step, build.root))
    build.summary.trained.append(step.token)
    resumed = f", resumed at step {result.resumed_from}" if result.resumed_from else ""
    build.reporter.line(f"trained {step.token} in {duration(result.seconds)}{resumed}")


# ---------------------------------------------------------------- rendering


def _render(build: _Build) -> None:
    plan, status = build.plan, build.status
    todo: list[int] = []
    for i, (r, s) in enumerate(zip(plan.renders, status.renders, strict=True)):
        if s.state == "up to date" and not (set(r.concepts) & set(build.summary.trained)):
            build.summary.up_to_date += 1
        elif set(r.concepts) & build.failed_tokens:
            build.summary.skipped += 1
        else:
            todo.append(i)
    if build.summary.skipped:
        build.reporter.error(f"{build.summary.skipped} image(s) not rendered: a concept they "
                             "use failed to train")
    build.manifests = Manifests(build.root)
    todo = _restore(build, todo) if todo else todo
    if not todo:
        return
    jobs = _render_jobs(build, todo)
    positions = {id(job): idx for job, idx in jobs}
    _render_all(build, [job for job, _ in jobs], positions)
    _rebuild_corrupt(build, positions)


def _render_all(build: _Build, jobs: Sequence[RenderJob], positions: dict[int, list[int]]
                ) -> None:
    build.get_executor().render_all(
        jobs, lambda job, images: _rendered(build, positions[id(job)], images),
        lambda job, exc: _render_failed(build, job, exc))


def _rebuild_corrupt(build: _Build, positions: dict[int, list[int]]) -> None:
    """Train again the concepts whose stored artifact failed its load check at render (the
    job moved it aside), then render their jobs again: once, like a digest mismatch found
    when planning. The checks that need no model already ran when planning (the store's)."""
    jobs, build.corrupt, build.retried = build.corrupt, [], True
    if not jobs:
        return
    moved = {t for job in jobs for t, key in job.concepts if build.store.peek(key) is None}
    steps = [c for c in build.plan.concepts if c.token in moved]
    for c in steps:
        if c.token in build.summary.reused:
            build.summary.reused.remove(c.token)
        build.reporter.line(f"training {c.token} ({_where(c.file, c.line)}) again: its stored "
                            "artifact failed its load check")
    _train_steps(build, steps)
    again: list[RenderJob] = []
    skipped = 0
    for job in jobs:
        if {t for t, _ in job.concepts} & build.failed_tokens:
            skipped += len(job.renders)
        else:
            again.append(job)
    if skipped:
        build.summary.skipped += skipped
        build.reporter.error(f"{skipped} image(s) not rendered: a concept they use failed to "
                             "train")
    _render_all(build, again, positions)


def _render_jobs(build: _Build, todo: list[int]) -> list[tuple[RenderJob, list[int]]]:
    """One job per generate statement (and model), split into RENDER_JOB_SIZE images."""
    from .jobs import RenderJob

    plan, keys = build.plan, build.status.concept_keys
    groups: dict[tuple[str, int, str], list[int]] = {}
    for i in todo:
        r = plan.renders[i]
        groups.setdefault((r.file, r.line, r.model), []).append(i)
    jobs: list[tuple[RenderJob, list[int]]] = []
    captions = str(build.options.captions) if build.options.captions else None
    for indices in groups.values():
        for start in range(0, len(indices), RENDER_JOB_SIZE):
            part = indices[start:start + RENDER_JOB_SIZE]
            renders = tuple(plan.renders[i] for i in part)
            tokens = sorted({t for r in renders for t in r.concepts})
            jobs.append((RenderJob(renders, tuple((t, keys[t]) for t in tokens),
                                   str(build.store.root), build.options.batch_size, captions,
                                   checkpoint_config(build, renders[0].model)),
                         part))
    return jobs


def _render_failed(build: _Build, job: RenderJob, exc: BaseException) -> None:
    if type(exc).__name__ == "CorruptConcept" and not build.retried:
        build.corrupt.append(job)  # the store's warning has said why
        return
    first = job.renders[0]
    build.fail(f"while rendering {len(job.renders)} image(s) of "
               f"{_where(first.file, first.line)}: {_message(exc)}")


def provenance(r: RenderStep, image: Rendered, inputs: dict[str, Any], key: str) -> dict[str, str]:
    """The PNG text chunks of a rendered image: enough to reproduce it."""
    return {
        "prompt": r.prompt, "negative_prompt": r.options.negative,
        "seed": str(r.seed), "strength": repr(r.strength), "steps": str(image.steps),
        "guidance": repr(image.guidance), "size": f"{image.width}x{image.height}",
        "base_model": r.model,
        "concepts": json.dumps(inputs["concepts"], sort_keys=True),
        "spec": _where(r.file, r.line), "tool": tool_version(), "render_key": key,
        # which weights: a model id's commit, a built-in model's record, a folder's files
        **({"base_model_weights": inputs["model_stamp"]} if inputs.get("model_stamp") else {}),
        # only where a concept's context words were added: the prompt the encoder read
        **({"prompt_as_read": image.as_read} if image.as_read != r.prompt else {}),
    }


def _rendered(build: _Build, indices: list[int], images: list[Rendered]) -> None:
    """Write each image (provenance in its PNG chunks) and cache it, then the manifests."""
    from ..files.outputs import png_with_text

    folders: set[str] = set()
    for image in images:
        i = indices[image.index]
        r, key = build.plan.renders[i], build.status.render_keys[i]
        data = png_with_text(image.image, provenance(r, image, build.status.render_inputs[i], key))
        build.store.put_render(key, data)
        folder = _publish(build, i, data, {"steps": image.steps, "guidance": image.guidance,
                                           "size": f"{image.width}x{image.height}"})
        if folder is not None:
            folders.add(folder)
            build.summary.rendered.append(r.out)
    _write_manifests(build, folders)


def _restore(build: _Build, todo: list[int]) -> list[int]:
    """Renders whose image the store already holds (made before, e.g. before an edit that
    was reverted) are copied out without a model; returns the rest."""
    from ..files.outputs import read_png_text

    rest, folders = [], set()
    for i in todo:
        data = build.store.render(build.status.render_keys[i])
        if data is None:
            rest.append(i)
            continue
        folder = _publish(build, i, data, {})
        if folder is None:
            continue
        text = read_png_text(build.root / build.plan.renders[i].out)
        record = build.manifests.folder(folder)["images"] if build.manifests else {}
        name = PurePosixPath(build.plan.renders[i].out).name
        record[name].update({"steps": _int(text.get("steps")), "guidance": _float(
            text.get("guidance")), "size": text.get("size")})
        folders.add(folder)
        build.summary.restored.append(build.plan.renders[i].out)
    _write_manifests(build, folders)
    return rest


def _int(text: str | None) -> int | None:
    return int(text) if text and text.isdigit() else None


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


def _publish(build: _Build, i: int, data: bytes, settings: dict[str, Any]) -> str | None:
    """Write render i's PNG at its output path and record it; returns its folder, or None
    when that one path cannot be written (a failure naming it; the other images go on)."""
    from ..files.outputs import OutputError, write_output

    assert build.manifests is not None
    r, key = build.plan.renders[i], build.status.render_keys[i]
    try:
        path = write_output(build.root, r.out, data)
    except OutputError as exc:
        build.fail(f"while writing an image of {_where(r.file, r.line)}: {exc}")
        return None
    out = PurePosixPath(r.out)
    build.manifests.set(str(out.parent), "images", out.name, {
        "render_key": key, "plan": PLAN_VERSION, "sha256": file_sha256(path),
        "inputs": build.status.render_inputs[i],
        "spec": _where(r.file, r.line), **settings})
    return str(out.parent)


def _write_manifests(build: _Build, folders: set[str]) -> None:
    from ..files.outputs import OutputError, update_manifest

    assert build.manifests is not None
    for folder in sorted(folders):
        try:
            update_manifest(build.root, folder, *build.manifests.changes(folder))
        except (OutputError, OSError) as exc:
            build.fail(f"while writing the manifest of {folder}/: {exc} (its images are "
                       "written; the next run records them again)")


# ---------------------------------------------------------------- contact sheets


def sheet_name(r: RenderStep) -> str:
    return f"contact-sheet_{PurePosixPath(r.file).stem}_line{r.line}.png"


def _sheets(build: _Build) -> None:
    """One contact sheet per generate statement, remade when one of its images changed."""
    from ..files.outputs import OutputError

    assert build.manifests is not None
    statements: dict[tuple[str, int], list[RenderStep]] = {}
    for r in build.plan.renders:
        statements.setdefault((r.file, r.line), []).append(r)
    for renders in statements.values():
        folder = str(PurePosixPath(renders[0].out).parent)
        if folder not in build.summary.folders:
            build.summary.folders.append(folder)
        try:
            sheet = _sheet(build, renders, folder)
        except (OutputError, OSError) as exc:
            build.fail(f"while writing the contact sheet of "
                       f"{_where(renders[0].file, renders[0].line)}: {exc}")
            continue
        if sheet is not None:
            build.summary.sheets.append(sheet)


def _sheet(build: _Build, renders: Sequence[RenderStep], folder: str) -> str | None:
    assert build.manifests is not None
    manifest = build.manifests.folder(folder)
    name = sheet_name(renders[0])
    rel = f"{folder}/{name}" if folder not in ("", ".") else name
    digests = [file_sha256(build.root / r.out) for r in renders]
    present = [(r, d) for r, d in zip(renders, digests, strict=True) if d is not None]
    if not present:
        return None
    record = {"images": [PurePosixPath(r.out).name for r, _ in present],
              "sha256s": [d for _, d in present]}
    old = manifest["sheets"].get(name)
    if (isinstance(old, dict) and {k: old.get(k) for k in record} == record
            and file_sha256(build.root / rel) == old.get("sha256")):
        return rel
    from ..files.outputs import contact_sheet, png_with_text, update_manifest, write_output

    tiles = [(_open(build.root / r.out), f"seed {r.seed}  s {r.strength!r}\n{r.prompt}")
             for r, _ in present]
    title = f"{_where(renders[0].file, renders[0].line)}: {len(present)} image(s)"
    path = write_output(build.root, rel, png_with_text(contact_sheet(tiles, title),
                                                       {"spec": title}))
    build.manifests.set(folder, "sheets", name, {**record, "sha256": file_sha256(path)})
    update_manifest(build.root, folder, *build.manifests.changes(folder))
    return rel


def _open(path: Path) -> Any:
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")
