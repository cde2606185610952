"""The built-in toy:shapes model: it loads offline with stock diffusers and renders, and a
short Perfusion training on it makes the concept's renders look more like its images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from perfusion_runtime.build.jobs import default_captions, load_pipeline
from perfusion_runtime.build.models import BUILTIN_MODELS
from perfusion_runtime.method.covariance import cinv_for
from perfusion_runtime.method.device import choose
from perfusion_runtime.method.fingerprint import base_fingerprint
from perfusion_runtime.method.render import apply_concepts
from perfusion_runtime.method.trainer import Recipe, Subject, train
from perfusion_runtime.toy import analyze, world


@pytest.fixture(scope="module")
def toy() -> Any:
    return load_pipeline("toy:shapes", choose("cpu"))


def test_toy_shapes_loads_with_stock_diffusers_offline_and_renders(
        toy: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import StableDiffusionPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    stock = StableDiffusionPipeline.from_pretrained(BUILTIN_MODELS["toy:shapes"],
                                                    local_files_only=True)
    assert stock.unet.config.sample_size * stock.vae_scale_factor == world.SIZE
    # it samples with DPM-Solver++ on its training schedule (docs/toy.md, Speed)
    assert type(stock.scheduler).__name__ == type(toy.scheduler).__name__ == \
        "DPMSolverMultistepScheduler"
    assert stock.scheduler.config.prediction_type == "v_prediction"
    assert stock.scheduler.config.rescale_betas_zero_snr
    prompt = "a large red circle in the center, black background"
    images = [toy(prompt, num_inference_steps=10, generator=torch.Generator().manual_seed(1))
              .images[0] for _ in range(2)]
    assert images[0].size == (64, 64) and images[0].tobytes() == images[1].tobytes()
    assert analyze.read(images[0]).background == "black"


# a concept the base model has no word for: an orange crescent (a shape it never saw)
CONCEPT = world.Scene("crescent", "orange", "large", "center", "gray")
PLACES = [("left", "black"), ("top right", "white"), ("bottom", "beige"), ("center", "gray")]


def test_short_training_improves_concept_fidelity_over_the_untrained_token(
        toy: Any, tmp_path: Path) -> None:
    images = []
    for i, (where, bg) in enumerate(PLACES):
        path = tmp_path / f"moon{i}.png"
        world.render(world.with_changes(CONCEPT, position=where, background=bg)).save(path)
        images.append(path)
    cinv, cinv_print = cinv_for(toy, tmp_path / "cache", default_captions("toy:shapes"))
    subject = Subject("moon*", ("circle",), (), tuple(images), base_model="toy:shapes")
    templates = ("a {}",)  # the compiler's default for toy:shapes
    references = [world.render(world.with_changes(CONCEPT, position=w, background=b))
                  for w, b in PLACES]

    def fidelity_after(steps: int) -> float:
        recipe = Recipe(steps=steps, batch=4, flip=False, templates=templates, lr=0.03)
        concept = train(toy, subject, recipe, cinv, cinv_fingerprint=cinv_print,
                        base_fingerprint=base_fingerprint(toy))
        with apply_concepts(toy, [concept], cinv=cinv) as applied:
            renders = applied(["a large moon* in the center, black background"] * 3,
                              seed=[0, 1, 2], strength=0.8, num_inference_steps=20)
        return sum(analyze.fidelity(r, references) for r in renders) / len(renders)

    # 300 steps of 4: the untrained token draws a cyan circle (fidelity 0), the trained one
    # an orange shape (about 0.45). With the edit stopped at the prompt's end the colour
    # shows after about 300 steps, not 150 (docs/runtime.md, "Which positions the edit
    # touches")
    untrained, trained = fidelity_after(1), fidelity_after(300)
    assert trained > untrained + 0.1, (untrained, trained)


def test_toy_shapes_ships_its_world_caption_corpus_for_cinv() -> None:
    """C⁻¹ for toy:shapes comes from its world's captions (the shipped file is current), and
    the corpus is part of the model's stamp, so a different corpus changes concept keys."""
    from perfusion_runtime.build.status import model_stamp
    from perfusion_runtime.files.atomic import file_sha256
    from perfusion_runtime.method.covariance import load_captions

    path = default_captions("toy:shapes")
    assert path == BUILTIN_MODELS["toy:shapes"] / "captions.txt"
    assert load_captions(path) == world.caption_corpus(5000)
    assert default_captions("tiny:random") is None and default_captions("/some/folder") is None
    stamp = model_stamp("toy:shapes")
    assert stamp not in (None, "missing")
    assert stamp != file_sha256(BUILTIN_MODELS["toy:shapes"] / "training.json")
