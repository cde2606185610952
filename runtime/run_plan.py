"""Runs a compiled plan: trains its concepts, then renders its images (a small entry point;
the incremental build system with its store arrives later)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any

from perfusion_dsl.plan import ConceptStep, Plan, RenderStep

from .artifact import ArtifactError, load, save
from .covariance import cinv_for
from .device import Precision, choose
from .fingerprint import base_fingerprint
from .render import apply_concepts, default_cache_dir
from .trainer import Progress, Recipe, Subject, train

BUILTIN_TEST_MODEL = "tiny:random"  # a random tiny pipeline, for tests and CPU benches


class ModelUnavailable(RuntimeError):
    """The base model cannot be loaded (never downloaded: M7)."""


def load_pipeline(source: str, precision: Precision) -> Any:
    """A StableDiffusionPipeline for a plan's model name, from local files only."""
    if source == BUILTIN_TEST_MODEL:
        from .tiny import tiny_pipeline

        return tiny_pipeline(0).to(precision.device)
    if source.startswith("toy:"):
        raise ModelUnavailable(f"the built-in model {source!r} is not bundled yet")
    folder = Path(source).expanduser()
    if not (folder / "model_index.json").is_file():
        raise ModelUnavailable(f"model {source!r} is not a local diffusers folder (no "
                               "model_index.json); perfusion never downloads weights: download "
                               "it yourself and give its path")
    from diffusers import StableDiffusionPipeline

    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            folder, local_files_only=True, use_safetensors=True, safety_checker=None,
            requires_safety_checker=False, dtype=precision.dtype)
    except (OSError, ValueError) as exc:  # missing or unusable files; nothing is downloaded
        raise ModelUnavailable(f"cannot load the diffusers folder {str(folder)!r}: {exc}") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(precision.device)


@dataclass
class RunResult:
    trained: list[str] = field(default_factory=list)  # tokens trained in this run
    reused: list[str] = field(default_factory=list)  # tokens whose artifact was already there
    rendered: list[Path] = field(default_factory=list)


def _subject(step: ConceptStep, root: Path) -> Subject:
    mask = step.options.get("mask", "none")
    masks = tuple(root / m for m in mask) if isinstance(mask, list) else None
    return Subject(step.token, tuple(step.supercategories), tuple(step.adjectives),
                   tuple(root / i for i in step.images), masks, step.key, step.model)


@dataclass
class _ModelRun:
    """One base model's share of a plan run."""

    pipe: Any
    root: Path
    cache: Path
    precision: Precision
    captions: Path | None
    progress: Callable[[str, Progress], None] | None
    result: RunResult
    base: str = ""
    cinv: tuple[Any, str] | None = None  # (C⁻¹, its fingerprint), computed when first needed

    def cinv_for(self) -> tuple[Any, str]:
        if self.cinv is None:
            self.cinv = cinv_for(self.pipe, self.cache, self.captions)
        return self.cinv


def _concept_file(run: _ModelRun, step: ConceptStep) -> Path:
    """The artifact of `step`: reused when a valid one made with this model's C⁻¹ exists."""
    path = run.cache / "concepts" / f"{step.key}.safetensors"
    cinv, cinv_print = run.cinv_for()
    try:
        if load(path, expect_base_fingerprint=run.base).cinv_fingerprint == cinv_print:
            run.result.reused.append(step.token)
            return path
    except ArtifactError:
        pass  # missing or unusable: (re)train
    progress = run.progress
    concept = train(run.pipe, _subject(step, run.root), Recipe.from_options(step.options), cinv,
                    cinv_fingerprint=cinv_print, base_fingerprint=run.base,
                    options=step.options, precision=run.precision,
                    progress=None if progress is None else lambda p: progress(step.token, p))
    path.parent.mkdir(parents=True, exist_ok=True)
    save(concept, path)
    run.result.trained.append(step.token)
    return path


def _render_key(r: RenderStep) -> tuple[Any, ...]:
    o = r.options
    return (tuple(r.concepts), r.strength, o.get("steps"), o.get("guidance"), o.get("size"),
            o.get("negative", ""))


def _pipe_options(r: RenderStep) -> dict[str, Any]:
    o, out = r.options, dict[str, Any]()
    if o.get("steps") is not None:
        out["num_inference_steps"] = int(o["steps"])
    if o.get("guidance") is not None:
        out["guidance_scale"] = float(o["guidance"])
    if o.get("size"):
        width, height = (int(x) for x in str(o["size"]).split("x"))
        out["width"], out["height"] = width, height
    return out


def _render_all(run: _ModelRun, renders: Sequence[RenderStep], files: dict[str, Path],
                batch_size: int | None) -> None:
    with apply_concepts(run.pipe, list(files.values()), cache_dir=run.cache,
                        captions=run.captions, batch_size=batch_size) as applied:
        # repr: the keys mix None with numbers (an option left to the model's default)
        ordered = sorted(renders, key=lambda r: repr(_render_key(r)))
        for _, group in groupby(ordered, key=_render_key):
            batch = list(group)
            first = batch[0]
            images = applied([r.prompt for r in batch], seed=[r.seed for r in batch],
                             strength=first.strength,
                             negative_prompt=first.options.get("negative", ""),
                             **_pipe_options(first))
            for render, image in zip(batch, images, strict=True):
                out = run.root / render.out
                out.parent.mkdir(parents=True, exist_ok=True)
                image.save(out)
                run.result.rendered.append(out)


def run_plan(plan: Plan, *, root: Path, cache_dir: Path | None = None, device: str = "auto",
             batch_size: int | None = None, captions: Path | None = None,
             progress: Callable[[str, Progress], None] | None = None) -> RunResult:
    """Train every concept of `plan` that has no artifact yet, then render every image.

    Paths in the plan are relative to `root` (the run root). `captions` replaces the shipped
    caption corpus for C⁻¹ (it changes C⁻¹'s fingerprint, so concepts are retrained)."""
    cache = cache_dir or default_cache_dir()
    precision = choose(device)
    result = RunResult()
    models = sorted({c.model for c in plan.concepts} | {r.options["model"] for r in plan.renders})
    for model in models:
        pipe = load_pipeline(model, precision)
        run = _ModelRun(pipe, root, cache, precision, captions, progress, result,
                        base_fingerprint(pipe))
        files = {c.token: _concept_file(run, c) for c in plan.concepts if c.model == model}
        renders = [r for r in plan.renders if r.options["model"] == model]
        if renders:
            _render_all(run, renders, files, batch_size)
    return result
