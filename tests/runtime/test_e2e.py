"""End to end on the CPU: a spec written in tmp_path, compiled to a plan, built by build.run
with the built-in random tiny model (`tiny:random`); M2 and M7 at the build level."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image, ImageDraw
from torch import nn

from perfusion_dsl.compiler import compile_paths
from perfusion_dsl.plan import Plan
from perfusion_runtime.build import jobs as jobs_module
from perfusion_runtime.build.jobs import ModelUnavailable, load_pipeline
from perfusion_runtime.build.progress import Reporter
from perfusion_runtime.build.run import RunOptions, Summary, run
from perfusion_runtime.method import artifact
from perfusion_runtime.method.covariance import cinv_for
from perfusion_runtime.method.device import choose
from perfusion_runtime.method.fingerprint import base_fingerprint
from perfusion_runtime.method.layers import cross_attention_layers
from perfusion_runtime.method.processor import PerfusionAttnProcessor
from perfusion_runtime.method.tiny import tiny_pipeline
from perfusion_runtime.method.trainer import Recipe

SPEC = """\
model "tiny:random"

learn images/*.png as teddy* <teddy bear> adjectives: [brown] {
  steps: 3
  batch: 2
  mask: masks/*.png
}

generate "a photo of teddy* {on a beach|in the snow}" x 2 {
  steps: 2
  out: renders
}

# the same concepts and steps with another guidance (None beside 1.0 when grouping)
generate "a photo of teddy* at night" {
  steps: 2
  guidance: 1
  out: renders
}

generate "a plain red cube" {
  steps: 2
}
"""



def key_weights(pipe: Any) -> dict[str, Any]:
    """The pipeline's W_K per layer: a file with locked keys rebuilds o*_K from them."""
    return {n: a.to_k.weight for n, a in cross_attention_layers(pipe.unet).items()}

def write_project(root: Path) -> Path:
    """The spec, three photos (40×48, cropped to 32×32 by training) and their masks."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(3):
        photo = Image.new("RGB", (40, 48), (40 + 60 * i, 110, 170))
        ImageDraw.Draw(photo).ellipse((6, 10 + 2 * i, 32, 40), fill=(200, 140, 40))
        photo.save(root / "images" / f"photo{i}.png")
        mask = Image.new("L", (40, 48), 0)
        ImageDraw.Draw(mask).ellipse((6, 10 + 2 * i, 32, 40), fill=255 - 60 * i)
        mask.save(root / "masks" / f"photo{i}.png")
    (root / "project.concept").write_text(SPEC, encoding="utf-8")
    return root


def build(plan: Plan, root: Path, cache: Path, **options: Any) -> Summary:
    return run(plan, root, RunOptions(store=cache, device="cpu", **options), Reporter(quiet=True))


def artifact_path(cache: Path, key: str) -> Path:
    return cache / "concepts" / key / "artifact.safetensors"


def compile_plan(root: Path) -> Plan:
    compilation = compile_paths([root], root)
    assert compilation.ok, compilation.diagnostics
    return compilation.plan()


def fresh_cache(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """An empty cache folder holding only the shipped corpus' C⁻¹ for the tiny model, which
    is estimated once per session (a folder shared by the runtime test files)."""
    shared = tmp_path_factory.getbasetemp() / "cinv-cache"
    cinv_for(tiny_pipeline(0), shared)
    cache = tmp_path_factory.mktemp(name)
    shutil.copytree(shared / "cinv", cache / "cinv")
    return cache


def spy_pipelines(patch: pytest.MonkeyPatch) -> list[Any]:
    """The pipelines a build loads from now on (the real load_pipeline is called)."""
    loaded: list[Any] = []
    real = jobs_module.load_pipeline

    def spy(source: str, precision: Any, config: str | None = None) -> Any:
        loaded.append(real(source, precision, config))
        return loaded[-1]

    patch.setattr(jobs_module, "load_pipeline", spy)
    return loaded


@pytest.fixture
def pipes(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    return spy_pipelines(monkeypatch)


def assert_pristine(pipe: Any) -> None:
    """Bit-identical to a fresh `tiny:random`, with diffusers' own processors and embedding."""
    fresh = tiny_pipeline(0)
    for name in ("unet", "vae", "text_encoder"):
        mine, theirs = getattr(pipe, name).state_dict(), getattr(fresh, name).state_dict()
        assert list(mine) == list(theirs), name
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs), name
    assert type(pipe.text_encoder.get_input_embeddings()) is nn.Embedding
    assert [type(p) for p in pipe.unet.attn_processors.values()] == \
        [type(p) for p in fresh.unet.attn_processors.values()]


@dataclasses.dataclass
class FirstRun:
    root: Path
    cache: Path
    plan: Plan
    result: Summary
    rendered: dict[Path, bytes]
    pipes: list[Any]  # the pipeline it trained and rendered with


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> FirstRun:
    root = write_project(tmp_path_factory.mktemp("project"))
    cache = fresh_cache(tmp_path_factory, "cache")
    plan = compile_plan(root)
    with pytest.MonkeyPatch.context() as patch:
        pipes = spy_pipelines(patch)
        result = build(plan, root, cache, batch_size=4)
    rendered = {root / out: (root / out).read_bytes() for out in result.rendered}
    return FirstRun(root, cache, plan, result, rendered, pipes)


def test_e2e_cpu_train_save_reload_render(first_run: FirstRun, pipes: list[Any]) -> None:
    root, cache, plan, result = first_run.root, first_run.cache, first_run.plan, first_run.result
    (step,) = plan.concepts
    assert step.options.mask == tuple(f"masks/photo{i}.png" for i in range(3))  # per image
    assert result.trained == ["teddy*"] and result.reused == []
    (pipe,) = first_run.pipes
    assert_pristine(pipe)  # after training, saving, loading the concept and rendering
    # one PNG per planned render, at its planned path, and nothing else
    planned = {root / r.out for r in plan.renders}
    assert len(planned) == len(plan.renders) == 6
    assert {root / out for out in result.rendered} == planned
    assert len(result.rendered) == len(planned)
    sheets = {root / sheet for sheet in result.sheets}  # one per generate statement
    assert len(sheets) == 3 and set(root.rglob("contact-sheet_*.png")) == sheets
    assert set(root.rglob("*.png")) - sheets - set(root.glob("[im]*/*.png")) == planned
    for path in planned:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (32, 32)
    # the concept artifact, in the cache, valid for this base model
    path = artifact_path(cache, step.key)
    assert sorted(p.name for p in (cache / "concepts").iterdir()) == [step.key]
    tiny = tiny_pipeline(0)
    concept = artifact.load(path, expect_base_fingerprint=base_fingerprint(tiny),
                            key_weights=key_weights(tiny))
    assert concept.token == "teddy*" and concept.i_super is not None  # keys locked
    # what explains the concept is in the store's manifest, not in the file
    manifest = json.loads((path.parent / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["key"] == step.key
    assert manifest["inputs"]["options"]["mask"] == list(step.options.mask)
    assert manifest["inputs"]["supercategories"] == list(step.supercategories)

    # a second run reuses the artifact, and renders the same bytes (the render cache is
    # emptied too, or the images would be copied out of it)
    for out in planned:
        out.unlink()
    shutil.rmtree(cache / "renders")
    # the first run's batch size: on the CPU another one may change the last bit of a pixel
    # (docs/runtime.md, "One image per pipeline call on the CPU")
    again = build(plan, root, cache, batch_size=4)
    assert again.trained == [] and again.reused == ["teddy*"]
    assert {root / p: (root / p).read_bytes() for p in again.rendered} == first_run.rendered
    (pipe,) = pipes
    assert_pristine(pipe)


def test_user_caption_file_changes_cinv_so_the_concept_is_retrained(
        first_run: FirstRun, tmp_path: Path) -> None:
    """A caption file of the user's own replaces the shipped corpus: another C⁻¹ (another
    fingerprint), so the artifact trained with the shipped one is not reused."""
    captions = tmp_path / "captions.txt"
    captions.write_text("a photo of a dog\na red car on a road\nan old house in the snow\n",
                        encoding="utf-8")
    cache = shutil.copytree(first_run.cache, tmp_path / "cache")  # leave the shared one alone
    key = first_run.plan.concepts[0].key
    shipped = artifact.load(artifact_path(cache, key), key_weights=key_weights(tiny_pipeline(0)))
    again = build(first_run.plan, first_run.root, cache, captions=captions)
    assert again.trained == ["teddy*"] and again.reused == []
    (entry,) = {p.name for p in (cache / "concepts").iterdir()} - {key}  # its own store key
    mine = artifact.load(artifact_path(cache, entry), key_weights=key_weights(tiny_pipeline(0)))
    assert mine.cinv_fingerprint != shipped.cinv_fingerprint
    assert len(list((cache / "cinv").iterdir())) == 2


def test_M2_build_publishes_nothing_when_training_fails(
        tmp_path_factory: pytest.TempPathFactory, pipes: list[Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A real NaN loss inside a build: the spec's lr is raised to 1e37 on its way to the
    trainer (the compiler caps `lr` at 10); the failure names the concept, its spec line and
    the step; no artifact, no temp file and no image appear."""
    root = write_project(tmp_path_factory.mktemp("nan-project"))
    cache = fresh_cache(tmp_path_factory, "nan-cache")
    real = jobs_module.train

    def huge_lr(pipe: Any, subject: Any, recipe: Recipe, *args: Any, **kwargs: Any) -> Any:
        return real(pipe, subject, dataclasses.replace(recipe, lr=1e37), *args, **kwargs)

    monkeypatch.setattr(jobs_module, "train", huge_lr)
    summary = build(compile_plan(root), root, cache)
    (failure,) = summary.failures
    assert failure.startswith("while training `teddy*` (project.concept:3): the loss became")
    assert "at step 2" in failure and summary.skipped == 5  # keep-going: the rest is built
    assert summary.rendered == ["renders/project/a-plain-red-cube_seed0_s0.5.png"]
    kept = sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*")
                  if p.is_file() and not p.is_relative_to(cache / "renders"))
    assert kept == sorted(["lock"] + [f"cinv/{p.name}" for p in (cache / "cinv").iterdir()])
    assert not any((root / "renders").rglob("*teddy*"))
    (pipe,) = pipes
    assert_pristine(pipe)


def test_M7_missing_base_model_is_a_clear_error_within_a_second(tmp_path: Path) -> None:
    cpu = choose("cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    for source, why in ((str(tmp_path / "no-such-model"), "does not exist"),
                        ("runwayml/stable-diffusion-v1-5", "not in the Hugging Face cache"),
                        (str(empty), "has no model_index.json")):
        started = time.perf_counter()
        with pytest.raises(ModelUnavailable, match=why) as caught:  # offline in the tests
            load_pipeline(source, cpu)
        assert time.perf_counter() - started < 1.0
        assert source in str(caught.value)


def test_M7_local_diffusers_folder_loads_and_broken_one_is_unavailable(tmp_path: Path) -> None:
    original = tiny_pipeline(0)
    folder = tmp_path / "tiny-sd"
    original.save_pretrained(folder, safe_serialization=True)
    pipe = load_pipeline(str(folder), choose("cpu"))
    assert base_fingerprint(pipe) == base_fingerprint(original)
    assert not any(isinstance(p, PerfusionAttnProcessor)
                   for p in pipe.unet.attn_processors.values())
    for weights in (folder / "unet").glob("*.safetensors"):  # S8: no other format is tried
        weights.unlink()
    with pytest.raises(ModelUnavailable, match="tiny-sd"):
        load_pipeline(str(folder), choose("cpu"))
