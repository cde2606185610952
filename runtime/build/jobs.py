"""The two kinds of work an executor runs: train one concept, render a group of images."""

from __future__ import annotations

import json
import logging
import os
import time

# transformers warns on import that torchvision is absent (on purpose: it pulls CUDA builds)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any

import torch

from perfusion_dsl.plan import ConceptStep, RenderStep

from ..files.store import Store, StoreError
from ..method.artifact import ArtifactError, Concept, encode
from ..method.covariance import cinv_for
from ..method.device import Precision, choose
from ..method.fingerprint import base_fingerprint
from ..method.render import apply_concepts, load_for
from ..method.trainer import Progress, Recipe, Subject, train
from .models import (
    BUILTIN_MODELS,
    CONFIG_FILES,
    UNET_PREFIX,
    VAE_PREFIX,
    ModelUnavailable,
    checkpoint_family,
    checkpoint_tensors,
    download_command,
    fetch,
    source_of,
)
from .status import concept_inputs, tool_version
from .stop import Stop, Stopped


def default_captions(model: str) -> Path | None:
    """The caption corpus a built-in model ships for C⁻¹ (`<folder>/captions.txt`: prompts of
    its own world, which is what its users write), or None: the general corpus."""
    folder = BUILTIN_MODELS.get(model)
    if folder is None or not (folder / "captions.txt").is_file():
        return None
    return folder / "captions.txt"


log = logging.getLogger(__name__)


class OutOfMemory(RuntimeError):
    """Out of memory even at the smallest batch; the message says what to try."""


def load_pipeline(source: str, precision: Precision, config: str | None = None) -> Any:
    """A Stable Diffusion 1.x/2.x or SDXL pipeline for a plan's model name
    (`models.source_of`): built in, a
    local diffusers folder, a model id from the Hugging Face cache (downloaded on first use),
    or a single `.safetensors` checkpoint read with `config` (a diffusers folder or a model
    id: `[checkpoints]` in perfusion.toml). ModelUnavailable says what is missing and how to
    get it."""
    model = source_of(source)
    if model.kind == "tiny":
        from ..method.tiny import tiny_pipeline

        return tiny_pipeline(0).to(precision.device)
    if model.kind == "builtin":
        if model.path is None or not (model.path / "model_index.json").is_file():
            known = ", ".join(sorted(BUILTIN_MODELS))
            raise ModelUnavailable(f"{source!r} is not a built-in model here (built in: "
                                   f"{known}; its weights ship in the package)")
        return _from_folder(model.path, precision)
    if model.kind == "hub":
        folder = fetch(model)
        try:
            return _from_folder(folder, precision)
        except ModelUnavailable as exc:
            raise ModelUnavailable(f"model {source!r} (Hugging Face cache, snapshot "
                                   f"{folder.name[:12]}) is incomplete or unreadable: {exc}; "
                                   f"`{download_command(model)}` fetches what is missing"
                                   ) from exc
    if model.kind == "file":
        assert model.path is not None
        return _from_single_file(source, model.path, config, precision)
    assert model.path is not None
    if not (model.path / "model_index.json").is_file():
        what = "does not exist" if not model.path.exists() else "has no model_index.json"
        raise ModelUnavailable(
            f"model {source!r} is not a diffusers folder ({what}); a model is a built-in name "
            "(toy:shapes), a local diffusers folder, a .safetensors checkpoint, or a Hugging "
            "Face model id such as stable-diffusion-v1-5/stable-diffusion-v1-5")
    return _from_folder(model.path, precision)


# The pipelines perfusion trains and renders with, by model_index.json's `_class_name`
PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


def _pipeline_class(folder: Path) -> str:
    """The diffusers pipeline class a folder declares; ModelUnavailable for another kind."""
    try:
        name = json.loads((folder / "model_index.json").read_text("utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelUnavailable(f"cannot read {folder / 'model_index.json'}: {exc}") from exc
    if name not in PIPELINES:
        raise ModelUnavailable(f"the model in {str(folder)!r} is a {name}; perfusion trains "
                               "and renders Stable Diffusion 1.x, 2.x and SDXL pipelines "
                               f"({', '.join(PIPELINES)})")
    return str(name)


def _pipeline_kind(folder: Path) -> tuple[Any, dict[str, Any]]:
    """The diffusers class a folder declares, and the keywords loading it takes (SD's
    pipeline also has a safety checker, which perfusion does not load)."""
    import diffusers

    kind = getattr(diffusers, _pipeline_class(folder))
    return kind, {} if kind is diffusers.StableDiffusionXLPipeline else {
        "safety_checker": None, "requires_safety_checker": False}


def _from_folder(folder: Path, precision: Precision) -> Any:
    kind, extra = _pipeline_kind(folder)
    try:
        pipe = kind.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                    dtype=precision.dtype, **extra)
    except (OSError, ValueError) as exc:  # missing or unusable files; nothing is downloaded
        raise ModelUnavailable(f"cannot load the diffusers folder {str(folder)!r}: {exc}") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(precision.device)


def _from_single_file(source: str, path: Path, config: str | None, precision: Precision) -> Any:
    """A checkpoint in the original layout (A1111, civitai), read through diffusers'
    `from_single_file` with a local configuration only, and checked whole: diffusers leaves
    a weight the file lacks at its random start without a word, so the file must hold at
    least as many UNet and VAE tensors as the configuration's modules have (more is
    allowed: some files carry extra copies under those prefixes)."""
    tensors = checkpoint_tensors(path)
    try:
        family = checkpoint_family(tensors)
    except ValueError as exc:
        raise ModelUnavailable(f"the checkpoint {source!r} is not a Stable Diffusion model: "
                               f"{exc}") from exc
    if config is None:
        raise ModelUnavailable(
            f"the checkpoint {source!r} ({_FAMILY_NAMES[family]}) needs its diffusers "
            f"configuration to be read without a network: in perfusion.toml, add `[checkpoints]` "
            f'and `"{source}" = {{ config = "<diffusers folder or model id>" }}` (for example '
            f'"{_FAMILY_REPOS[family]}")')
    folder = Path(config)
    if not folder.is_dir():
        try:
            hub = source_of(config)
        except ModelUnavailable:
            hub = None
        if hub is None or hub.kind != "hub":
            raise ModelUnavailable(f"the configuration {config!r} of {source!r} is neither a "
                                   "folder nor a model id")
        folder = fetch(hub, CONFIG_FILES)
    kind, extra = _pipeline_kind(folder)
    if (kind.__name__ == "StableDiffusionXLPipeline") != (family == "sdxl"):
        raise ModelUnavailable(f"the checkpoint {source!r} is {_FAMILY_NAMES[family]} but its "
                               f"configuration {config!r} is a {kind.__name__}")
    try:
        pipe = kind.from_single_file(str(path), config=str(folder), local_files_only=True,
                                     torch_dtype=precision.dtype, **extra)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[:3]  # a shape mismatch lists every tensor
        raise ModelUnavailable(f"cannot read the checkpoint {source!r} with the configuration "
                               f"{config!r} (another model family or size?): "
                               + " ".join(line.strip() for line in first)[:400]) from exc
    for name, prefix, module in (("UNet", UNET_PREFIX, pipe.unet),
                                 ("VAE", VAE_PREFIX, pipe.vae)):
        have = sum(k.startswith(prefix) for k in tensors)
        want = len(module.state_dict())
        if have < want:
            raise ModelUnavailable(
                f"the checkpoint {source!r} does not match its configuration {config!r}: its "
                f"{name} has {have} tensors where the configuration's has {want}, so "
                f"{want - have} would stay random (a damaged file, or another model family "
                "or size?)")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(precision.device)


_FAMILY_NAMES = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "SDXL"}
_FAMILY_REPOS = {"sd1": "stable-diffusion-v1-5/stable-diffusion-v1-5",
                 "sd2": "stabilityai/stable-diffusion-2-1",
                 "sdxl": "stabilityai/stable-diffusion-xl-base-1.0"}


@dataclass
class Pipelines:
    """Loaded base models, kept for the jobs of one process (a worker keeps its own)."""

    device: str = "auto"
    preferred: str = "auto"  # `perfusion run --precision`: "auto", "bf16", "fp16" or "fp32"
    # (model, checkpoint config) → (pipe, print)
    loaded: dict[tuple[str, str | None], tuple[Any, str]] = field(default_factory=dict)

    @property
    def precision(self) -> Precision:
        """On CUDA the preferred dtype ("auto": bf16, fp16 before Ampere); the CPU is fp32."""
        return choose(self.device, "bf16" if self.preferred == "auto" else self.preferred)

    def get(self, model: str, config: str | None = None) -> tuple[Any, str]:
        """(pipeline, base fingerprint) for `model`, loading it on first use."""
        if (model, config) not in self.loaded:
            pipe = load_pipeline(model, self.precision, config)
            self.loaded[model, config] = (pipe, base_fingerprint(pipe))
        return self.loaded[model, config]


@dataclass(frozen=True)
class TrainJob:
    step: ConceptStep
    key: str  # the store key
    root: str  # the run root: the step's paths are relative to it
    store: str
    captions: str | None = None
    model_config: str | None = None  # a checkpoint's configuration (`run.checkpoint_config`)
    gradient_checkpointing: bool = False  # from the start (else only when memory runs out)


@dataclass(frozen=True)
class Trained:
    token: str
    key: str
    seconds: float
    resumed_from: int = 0  # the step a checkpoint resumed from


@dataclass(frozen=True)
class RenderJob:
    renders: tuple[RenderStep, ...]
    concepts: tuple[tuple[str, str], ...]  # (token, store key) of every concept they use
    store: str
    batch_size: int | None = None
    captions: str | None = None
    model_config: str | None = None  # a checkpoint's configuration (`run.checkpoint_config`)


@dataclass(frozen=True)
class Rendered:
    """One image of a RenderJob (by index into its renders) and the settings really used."""

    index: int
    image: Any  # a PIL image
    steps: int
    guidance: float
    width: int
    height: int
    # the prompt as the text encoder read it: each concept token after its context words
    # (docs/runtime.md, "The supercategory's leading words")
    as_read: str


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text
                                              or "can't allocate memory" in text)


def _subject(step: ConceptStep, root: Path, key: str) -> Subject:
    mask = step.options.mask
    masks = tuple(root / m for m in mask) if isinstance(mask, tuple) else None
    return Subject(step.token, tuple(step.supercategories), tuple(step.adjectives),
                   tuple(root / i for i in step.images), masks, key, step.model,
                   tuple(step.image_sha256), tuple(step.mask_sha256) if masks else None)


def _halve(size: int, what: str, advice: str) -> int:
    if size <= 1:
        raise OutOfMemory(f"out of memory even with {what} of 1 image; {advice}")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return size // 2


def train_job(job: TrainJob, pipes: Pipelines, *, progress: Callable[[Progress], None] | None
              = None, stop: Stop | None = None) -> Trained:
    """Train the job's concept and publish it in the store (unless a valid entry exists).

    Resumes from the store's checkpoint of this key when there is one. On out of memory it
    retries with gradient checkpointing (the same concept, less memory, more time), then
    with half the micro-batch (the same batch, by gradient accumulation) down to one image,
    then stops with advice; nothing is published by a failed attempt."""
    store = Store(job.store)
    started = time.monotonic()
    if store.get(job.key) is not None:
        # a run killed between publishing and removing its checkpoint left it behind
        store.checkpoint(job.key).unlink(missing_ok=True)
        return Trained(job.step.token, job.key, 0.0)
    pipe, base = pipes.get(job.step.model, job.model_config)
    cinv, cinv_print = cinv_for(pipe, Path(job.store), Path(job.captions) if job.captions
                                else default_captions(job.step.model))
    micro = Recipe.from_options(job.step.options).batch
    checkpointing = job.gradient_checkpointing
    checkpoint = store.checkpoint(job.key)
    resumed = 0

    def report(p: Progress) -> None:
        nonlocal resumed
        resumed = p.resumed_from  # the steps its checkpoint held
        if progress is not None:
            progress(p)

    while True:
        try:
            concept = train(pipe, _subject(job.step, Path(job.root), job.key),
                            Recipe.from_options(job.step.options, micro_batch=micro), cinv,
                            cinv_fingerprint=cinv_print, base_fingerprint=base,
                            options=job.step.options.model_dump(mode="json"),
                            precision=pipes.precision,
                            progress=report, checkpoint=checkpoint, stop=stop,
                            gradient_checkpointing=checkpointing)
            break
        except Exception as exc:
            if not is_oom(exc):
                raise
            if not checkpointing:
                checkpointing = True
                log.warning("%s: out of memory; training again with gradient checkpointing",
                            job.step.token)
                continue
            micro = _halve(micro, "micro-batches", "lower `resolution`, train on a "
                           "machine with more memory, or use a smaller base model")
    store.put(job.key, encode(concept), token=job.step.token, tool_version=tool_version(),
              inputs=concept_inputs(job.step, Path(job.root)))
    checkpoint.unlink(missing_ok=True)
    return Trained(job.step.token, job.key, time.monotonic() - started, resumed)


def _group_key(r: RenderStep) -> tuple[Any, ...]:
    return (tuple(r.concepts), r.strength, r.options)


def pipe_options(r: RenderStep) -> dict[str, Any]:
    o, out = r.options, dict[str, Any]()
    if o.steps is not None:
        out["num_inference_steps"] = o.steps
    if o.guidance is not None:
        out["guidance_scale"] = o.guidance
    if (size := o.dimensions()) is not None:
        out["width"], out["height"] = size
    return out


def _effective(pipe: Any, options: dict[str, Any]) -> tuple[int, float, int, int]:
    """(steps, guidance, width, height) the pipeline uses for these call options."""
    native = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    return (int(options.get("num_inference_steps", 50)),
            float(options.get("guidance_scale", 7.5)),
            int(options.get("width", native)), int(options.get("height", native)))


def render_job(job: RenderJob, pipes: Pipelines, emit: Callable[[list[Rendered]], None], *,
               stop: Stop | None = None) -> None:
    """Render the job's images (all with one base model), handing each finished group of
    images to `emit` at once, so a stop or a failure keeps what is done.

    `stop()` is polled between groups and after every denoising step (Stopped). On out of
    memory the batch is halved down to one image, then OutOfMemory says what to try."""
    store = Store(job.store)
    model = job.renders[0].model
    pipe, _ = pipes.get(model, job.model_config)
    files = [_checked_concept(store, pipe, token, key, model) for token, key in job.concepts]
    captions = Path(job.captions) if job.captions else \
        default_captions(job.renders[0].model)
    order = sorted(range(len(job.renders)), key=lambda i: repr(_group_key(job.renders[i])))
    with apply_concepts(pipe, files, cache_dir=Path(job.store), captions=captions,
                        batch_size=job.batch_size) as applied:
        for _, group in groupby(order, key=lambda i: repr(_group_key(job.renders[i]))):
            if stop is not None and stop():
                raise Stopped
            emit(_render_with_retry(applied, job.renders, list(group), stop))


def _render_with_retry(applied: Any, renders: Sequence[RenderStep], indices: list[int],
                       stop: Stop | None) -> list[Rendered]:
    while True:
        try:
            return _render_group(applied, renders, indices, stop)
        except Exception as exc:
            if not is_oom(exc):
                raise
            applied.batch_size = _halve(applied.batch_size, "batches", "lower `size`, or "
                                        "render on a machine with more memory")


class CorruptConcept(RuntimeError):
    """A stored concept whose bytes match its digest but not what the plan or the pipeline
    needs (it was moved aside), or that is gone since the run was planned: the run trains it
    again and renders the job again."""


def _checked_concept(store: Store, pipe: Any, token: str, key: str, model: str) -> Concept:
    """`key`'s artifact, loaded and checked against this pipeline and tied to the plan: the
    token and base model its file and manifest name must be the ones the plan expects."""
    path = store.get(key)  # its digest checked
    if path is None:  # there when the run was planned: moved aside by another job, or deleted
        raise CorruptConcept(f"the artifact of {token} (key {key[:12]}) is no longer in the "
                             f"store {store.root}")
    try:
        concept = load_for(pipe, path)
        named = store.manifest(key).get("token")
    except (ArtifactError, StoreError, ValueError) as exc:
        why = str(exc)
    else:
        wrong = [f"{what} {got!r}" for what, got, want in (
            ("token", concept.token, token), ("manifest token", named, token),
            ("base model", concept.base_model, model)) if got != want]
        if not wrong:
            return concept
        why = f"{path}: it names {', '.join(wrong)}, not the plan's {token!r} on {model!r}"
    store.discard(key, why)
    raise CorruptConcept(f"the stored artifact of {token} (key {key[:12]}) fails its load "
                         f"check and was moved to the store's trash ({why})")


def _stop_between_steps(stop: Stop) -> Callable[..., dict[str, Any]]:
    """A diffusers step-end callback that ends a pipeline call as soon as a stop is asked
    for: a group of 16 images on a loaded CPU takes over a minute, a denoising step well
    under a second."""
    def check(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if stop():
            raise Stopped
        return tensors

    return check


def _render_group(applied: Any, renders: Sequence[RenderStep], indices: list[int],
                  stop: Stop | None = None) -> list[Rendered]:
    first = renders[indices[0]]
    options = pipe_options(first)
    if stop is not None:
        options["callback_on_step_end"] = _stop_between_steps(stop)
    images = applied([renders[i].prompt for i in indices], seed=[renders[i].seed for i in indices],
                     strength=first.strength, negative_prompt=first.options.negative,
                     **options)
    steps, guidance, width, height = _effective(applied.pipe, options)
    return [Rendered(i, image, steps, guidance, width, height,
                     applied.with_context(renders[i].prompt))
            for i, image in zip(indices, images, strict=True)]
