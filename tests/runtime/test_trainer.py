"""The trainer on the real tiny diffusers pipeline: invariants 4 and 5 of docs/runtime.md, M2 (a
non-finite loss), seeded determinism (the basis of M3) and the per-image loss mask."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from ablations import METHODS as ABLATIONS
from PIL import Image, ImageDraw
from torch import Tensor

from perfusion_dsl.plan import LearnOptions
from perfusion_runtime.method import artifact, text, trainer
from perfusion_runtime.method import noise as forward
from perfusion_runtime.method.artifact import Concept
from perfusion_runtime.method.covariance import cinv_for
from perfusion_runtime.method.fingerprint import base_fingerprint
from perfusion_runtime.method.layers import cross_attention_layers
from perfusion_runtime.method.processor import PerfusionAttnProcessor
from perfusion_runtime.method.render import apply_concepts
from perfusion_runtime.method.tiny import tiny_pipeline
from perfusion_runtime.method.tokens import extended_embedding, placeholder, rewrite
from perfusion_runtime.method.trainer import (
    NonFiniteLoss,
    Progress,
    Recipe,
    Subject,
    masked_mse,
    super_encoding,
    train,
)

RECIPE = Recipe(steps=6, batch=2, seed=0, templates=("a photo of a {}", "a close-up of a {}"))


def write_photos(folder: Path, count: int, seed: int = 0) -> tuple[Path, ...]:
    """`count` distinct 40×48 RGB PNGs (a coloured ellipse on a background), made with PIL."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        image = Image.new("RGB", (40, 48), (30 + 40 * i, 90, 200 - 30 * seed))
        ImageDraw.Draw(image).ellipse((5 + 3 * i, 8, 30, 40 - 2 * i), fill=(220, 180 - 50 * i, 40))
        paths.append(folder / f"photo{i}.png")
        image.save(paths[-1])
    return tuple(paths)


def write_masks(folder: Path, count: int, value: int) -> tuple[Path, ...]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = tuple(folder / f"photo{i}.png" for i in range(count))
    for path in paths:
        Image.new("L", (40, 48), value).save(path)
    return paths


def shared_cinv_cache(factory: pytest.TempPathFactory, family: str) -> Path:
    """The session's C⁻¹ cache of the tiny pipeline of `family`. SD 1.x's is the folder the
    runtime test files share and copy whole (`test_e2e.fresh_cache`): it must hold the
    tiny SD 1.x entry alone, whatever order the files run in."""
    name = "cinv-cache" if family == "sd1" else f"cinv-cache-{family}"
    return factory.getbasetemp() / name


def state_dicts(pipe: Any) -> dict[str, dict[str, Tensor]]:
    """Every base weight, SDXL's second text encoder included."""
    names = ["unet", "vae", "text_encoder"]
    if getattr(pipe, "text_encoder_2", None) is not None:
        names.append("text_encoder_2")
    return {name: {k: v.detach().clone() for k, v in getattr(pipe, name).state_dict().items()}
            for name in names}


def assert_bit_identical(before: dict[str, dict[str, Tensor]], pipe: Any) -> None:
    after = state_dicts(pipe)
    for name, tensors in before.items():
        assert list(after[name]) == list(tensors), f"{name}: parameters added or removed"
        changed = [k for k, v in tensors.items() if not torch.equal(v, after[name][k])]
        assert not changed, f"{name}: changed {changed[:5]}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("trainer")


@pytest.fixture(scope="module")
def cinv(tmp_path_factory: pytest.TempPathFactory) -> tuple[Tensor, str]:
    """(C⁻¹, its fingerprint) on the shipped caption corpus, estimated once per session (a
    cache folder shared by the runtime test files)."""
    return cinv_for(tiny_pipeline(0), tmp_path_factory.getbasetemp() / "cinv-cache")


@pytest.fixture(scope="module")
def subject(workdir: Path) -> Subject:
    return Subject("teddy*", ("teddy bear", "toy"), ("brown",),
                   write_photos(workdir / "photos", 3), base_model="tiny:random")


@dataclasses.dataclass
class Trained:
    pipe: Any
    concept: Concept
    before: dict[str, dict[str, Tensor]]
    embedding: Any  # the text encoder's nn.Embedding before training
    processors: dict[str, Any]
    optimisers: list[torch.optim.Optimizer]
    runs: list[Any]  # trainer._Run of the training
    cinv: tuple[Tensor, str]  # of this pipeline's text encoder
    family: str  # tiny_pipeline(0, family=…) made it


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def trained(request: pytest.FixtureRequest, subject: Subject,
            tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """One training on a fresh tiny pipeline, with a spy on the optimiser it builds; on the
    SD 1.x tiny pipeline, the SD 2.x one and the SDXL one (`tiny_pipeline(family=…)`)."""
    pipe = tiny_pipeline(0, family=request.param)
    cinv = cinv_for(pipe, shared_cinv_cache(tmp_path_factory, request.param))
    before = state_dicts(pipe)
    embedding = pipe.text_encoder.get_input_embeddings()
    processors = dict(pipe.unet.attn_processors)
    optimisers: list[torch.optim.Optimizer] = []
    runs: list[Any] = []
    real = trainer._optimiser

    def spy(run: Any) -> torch.optim.Optimizer:
        runs.append(run)
        optimisers.append(real(run))
        return optimisers[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer, "_optimiser", spy)
        concept = train(pipe, subject, RECIPE, cinv[0], cinv_fingerprint=cinv[1],
                        base_fingerprint=base_fingerprint(pipe), options={"steps": 6})
    return Trained(pipe, concept, before, embedding, processors, optimisers, runs, cinv,
                   request.param)


def test_invariant_4_key_targets_locked(trained: Trained, subject: Subject) -> None:
    pipe, concept = trained.pipe, trained.concept
    i_super = super_encoding(pipe, subject, RECIPE.templates)  # recomputed after training
    layers = cross_attention_layers(pipe.unet)
    assert list(concept.o_k) == list(layers) and list(concept.o_v) == list(layers)
    for name, attn in layers.items():
        # one target per layer and projection, not one per token position
        assert concept.o_k[name].shape == (attn.to_k.out_features,)
        assert torch.equal(concept.o_k[name], attn.to_k.weight.float() @ i_super), name
        start = attn.to_v.weight.float() @ i_super
        assert not torch.equal(concept.o_v[name], start), f"{name}: o*_V was not trained"

    (optimiser,), (run,) = trained.optimisers, trained.runs
    optimised = [p for group in optimiser.param_groups for p in group["params"]]
    # the token's row in each text encoder (SDXL: two), and o*_V
    rows = {id(e) for e in run.embeddings}
    assert len(rows) == (2 if trained.family == "sdxl" else 1)
    assert {id(p) for p in optimised} == {id(p) for p in run.o_v.values()} | rows
    assert len(optimised) == len(layers) + len(rows)
    for name, o_k in run.o_k.items():
        assert not o_k.requires_grad and o_k.grad is None, name
        assert all(o_k is not p for p in optimised), name
        assert torch.equal(o_k, concept.o_k[name])  # never changed during training
    assert all(p.requires_grad for p in optimised)


def test_invariant_5_base_weights_bit_identical(trained: Trained) -> None:
    pipe, cinv = trained.pipe, trained.cinv
    assert_bit_identical(trained.before, pipe)  # after training
    assert pipe.text_encoder.get_input_embeddings() is trained.embedding
    assert dict(pipe.unet.attn_processors) == trained.processors
    ids_before = pipe.tokenizer("a photo of a brown teddy bear").input_ids

    with apply_concepts(pipe, [trained.concept], cinv=cinv[0]) as applied:
        assert any(isinstance(p, PerfusionAttnProcessor)
                   for p in pipe.unet.attn_processors.values())
        applied(["a photo of teddy*", "a cat"], seed=[0, 1], num_inference_steps=2,
                output_type="np")
    assert_bit_identical(trained.before, pipe)  # after rendering with the concept
    assert pipe.text_encoder.get_input_embeddings() is trained.embedding
    assert dict(pipe.unet.attn_processors) == trained.processors
    assert pipe.tokenizer("a photo of a brown teddy bear").input_ids == ids_before
    second = getattr(pipe, "text_encoder_2", None)  # SDXL: its own table back too
    assert second is None or type(second.get_input_embeddings()) is torch.nn.Embedding


def test_M2_nonfinite_loss_stops_within_a_step_and_publishes_nothing(
        subject: Subject, cinv: tuple[Tensor, str], tmp_path: Path) -> None:
    """lr 1e37: the first AdamW step moves o*_V by ~1e37 per value (finite in float32), the
    attention output then overflows and the next loss is NaN. The compiler caps `lr` at 10,
    so this goes through train() directly; test_e2e checks that a build publishes nothing."""
    pipe = tiny_pipeline(0)
    before = state_dicts(pipe)
    embedding = pipe.text_encoder.get_input_embeddings()
    processors = dict(pipe.unet.attn_processors)
    seen: list[Progress] = []
    with pytest.raises(NonFiniteLoss) as caught:
        train(pipe, subject, dataclasses.replace(RECIPE, steps=20, lr=1e37), cinv[0],
              cinv_fingerprint=cinv[1], base_fingerprint=base_fingerprint(pipe),
              progress=seen.append)
    # every reported loss was finite, and it stopped at the first step that was not
    assert seen and all(math.isfinite(p.loss) for p in seen)
    assert caught.value.step == len(seen) + 1 == 2
    assert f"at step {caught.value.step}" in str(caught.value)
    assert "nothing was saved" in str(caught.value)
    # the pipeline is as it was: processors, token embedding, weights
    assert dict(pipe.unet.attn_processors) == processors
    assert pipe.text_encoder.get_input_embeddings() is embedding
    assert_bit_identical(before, pipe)
    assert list(tmp_path.iterdir()) == []  # train() itself never writes files


def test_failure_while_preparing_leaves_the_pipeline_as_it_was(
        subject: Subject, cinv: tuple[Tensor, str]) -> None:
    """_prepare adds the token before it reads i_super; a supercategory that cannot be found
    in its own (truncated) caption fails there, and the embedding must still be restored."""
    pipe = tiny_pipeline(0)
    embedding = pipe.text_encoder.get_input_embeddings()
    long = dataclasses.replace(subject, adjectives=tuple(f"word{i}" for i in range(80)))
    with pytest.raises(trainer.TrainingError, match="supercategory"):
        train(pipe, long, dataclasses.replace(RECIPE, steps=1), cinv[0],
              cinv_fingerprint=cinv[1], base_fingerprint=base_fingerprint(pipe))
    assert pipe.text_encoder.get_input_embeddings() is embedding
    assert not any(isinstance(p, PerfusionAttnProcessor)
                   for p in pipe.unet.attn_processors.values())


def test_M3_basis_seeded_training_is_bit_deterministic(
        trained: Trained, subject: Subject) -> None:
    """Two trainings with the same seed give the same artifact bytes (resume exactness, M3,
    builds on this); another seed gives other bytes."""
    cinv = trained.cinv

    def bytes_for(recipe: Recipe) -> bytes:
        pipe = tiny_pipeline(0, family=trained.family)
        concept = train(pipe, subject, recipe, cinv[0], cinv_fingerprint=cinv[1],
                        base_fingerprint=base_fingerprint(pipe), options={"steps": 6})
        return artifact.encode(concept)

    first = artifact.encode(trained.concept)
    assert bytes_for(RECIPE) == first
    assert bytes_for(dataclasses.replace(RECIPE, seed=1)) != first


def test_gradient_checkpointing_trains_the_same_concept(trained: Trained,
                                                        subject: Subject) -> None:
    """Recomputing the UNet's activations in the backward pass saves memory and changes
    nothing: the same artifact bytes; the UNet's setting is put back."""
    pipe = tiny_pipeline(0, family=trained.family)
    cinv = trained.cinv
    seen: list[bool] = []  # the UNet's setting at each of its calls during training
    hook = pipe.unet.register_forward_pre_hook(
        lambda module, args: seen.append(bool(module.is_gradient_checkpointing)))
    concept = train(pipe, subject, RECIPE, cinv[0], cinv_fingerprint=cinv[1],
                    base_fingerprint=base_fingerprint(pipe), options={"steps": 6},
                    gradient_checkpointing=True)
    hook.remove()
    assert seen and all(seen)
    assert artifact.encode(concept) == artifact.encode(trained.concept)
    assert not pipe.unet.is_gradient_checkpointing


@pytest.mark.parametrize("sampler", ["DPMSolverMultistepScheduler", "EulerDiscreteScheduler"])
def test_the_pipelines_sampler_does_not_change_training(trained: Trained, subject: Subject,
                                                       sampler: str) -> None:
    """Training noises as the model was trained (DDPM on the scheduler's betas), whatever
    sampler the pipeline renders with: the same artifact bytes with DPM-Solver++ after a
    15-step render (whose own add_noise only knows those 15 timesteps) or with Euler (whose
    add_noise returns x₀ + σ·ε)."""
    import diffusers

    pipe = tiny_pipeline(0, family=trained.family)
    pipe.scheduler = getattr(diffusers, sampler).from_config(pipe.scheduler.config)
    pipe.scheduler.set_timesteps(15)
    cinv = trained.cinv
    concept = train(pipe, subject, RECIPE, cinv[0], cinv_fingerprint=cinv[1],
                    base_fingerprint=base_fingerprint(pipe), options={"steps": 6})
    assert artifact.encode(concept) == artifact.encode(trained.concept)


def test_masked_mse_normalises_per_image() -> None:
    """[B=3, C=1, 2, 2]. Image 0: squared errors [[1, 4], [9, 0]] under the mask
    [[1, 1], [0, .5]] -> (1 + 4) / 2.5 = 2. Image 1: an all-zero mask -> 0, not NaN.
    Image 2: errors all 4 under a full mask -> 4. The loss is the mean over images, 2.
    Normalising per row would give 1.25 for image 0; over the whole batch, 21 / 6.5."""
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 0.0]]], [[[5.0, 5.0], [5.0, 5.0]]],
                         [[[2.0, -2.0], [2.0, -2.0]]]], requires_grad=True)
    target = torch.zeros_like(pred)
    masks = torch.tensor([[[[1.0, 1.0], [0.0, 0.5]]], [[[0.0, 0.0], [0.0, 0.0]]],
                          [[[1.0, 1.0], [1.0, 1.0]]]])
    loss = masked_mse(pred, target, masks)
    assert loss.item() == 2.0
    loss.backward()
    assert pred.grad is not None and bool(torch.isfinite(pred.grad).all())
    assert bool((pred.grad[1] == 0).all())  # a fully masked-out image teaches nothing
    assert masked_mse(pred, target, None).item() == float((pred.detach() ** 2).mean())
    # the mask broadcasts over channels: two identical channels give the same value
    assert masked_mse(pred.repeat(1, 2, 1, 1), target.repeat(1, 2, 1, 1), masks).item() == 2.0


def test_mask_files_weigh_the_loss_per_image(subject: Subject, cinv: tuple[Tensor, str],
                                             tmp_path: Path) -> None:
    """Mask files go through load_masks into the loss: all-zero masks make every loss 0 (and
    o*_V never moves), all-white masks give the unmasked losses."""
    recipe = dataclasses.replace(RECIPE, steps=3)

    def losses(masks: tuple[Path, ...] | None) -> tuple[list[float], Concept]:
        pipe = tiny_pipeline(0)
        seen: list[Progress] = []
        concept = train(pipe, dataclasses.replace(subject, masks=masks), recipe, cinv[0],
                        cinv_fingerprint=cinv[1], base_fingerprint=base_fingerprint(pipe),
                        progress=seen.append)
        return [p.loss for p in seen], concept

    count = len(subject.images)
    plain, _ = losses(None)
    white, _ = losses(write_masks(tmp_path / "white", count, 255))
    black, concept = losses(write_masks(tmp_path / "black", count, 0))
    assert white == pytest.approx(plain, rel=1e-5)
    assert black == [0.0] * recipe.steps
    pipe = tiny_pipeline(0)
    i_super = super_encoding(pipe, subject, recipe.templates)
    for name, attn in cross_attention_layers(pipe.unet).items():
        assert torch.equal(concept.o_v[name], attn.to_v.weight.float() @ i_super), name


def test_training_restores_module_modes_and_grad_flags(tmp_path: Path) -> None:
    """The trainer freezes the base modules while it runs and puts their modes and
    requires_grad flags back afterwards, whatever they were."""
    pipe = tiny_pipeline(0)
    pipe.unet.train()
    first = next(pipe.vae.parameters())
    first.requires_grad_(True)
    subject = Subject("teddy*", ("teddy bear",), (), write_photos(tmp_path, 2))
    cinv = torch.eye(pipe.text_encoder.config.hidden_size)
    train(pipe, subject, Recipe(steps=1, batch=1, seed=0), cinv,
          cinv_fingerprint="c" * 64, base_fingerprint="b" * 64)
    assert pipe.unet.training and not pipe.vae.training and not pipe.text_encoder.training
    assert first.requires_grad
    assert sum(p.requires_grad for p in pipe.vae.parameters()) == 1
    assert not any(p.requires_grad for p in pipe.unet.parameters())


@pytest.mark.parametrize("variant", ["trained_keys", "embedding_only"])
def test_benchmark_ablations_train_what_they_name(variant: str, subject: Subject,
                                                  trained: Trained) -> None:
    """bench/ablations.py, subclasses of the trainer's Method: "trained_keys" optimises o*_K
    too (it moves off W_K i_super), "embedding_only" (textual inversion) only the embedding
    (o*_K and o*_V stay at their starts). Neither touches the base weights."""
    pipe, cinv = tiny_pipeline(0, family=trained.family), trained.cinv
    before = state_dicts(pipe)
    concept = train(pipe, subject, RECIPE, cinv[0], cinv_fingerprint=cinv[1],
                    base_fingerprint=base_fingerprint(pipe), method=ABLATIONS[variant])
    assert_bit_identical(before, pipe)
    i_super = super_encoding(pipe, subject, RECIPE.templates)
    for name, attn in cross_attention_layers(pipe.unet).items():
        locked = attn.to_k.weight.float() @ i_super
        start_v = attn.to_v.weight.float() @ i_super
        if variant == "trained_keys":
            assert not torch.allclose(concept.o_k[name], locked), name
            assert not torch.equal(concept.o_v[name], start_v), name
        else:
            assert torch.equal(concept.o_k[name], locked), name
            assert torch.equal(concept.o_v[name], start_v), name
    # the embedding learns in both, and differently from Perfusion's
    assert not torch.equal(concept.embedding, trained.concept.embedding)
    assert (concept.i_super is None) == (variant == "trained_keys")  # o*_K stored in full


def test_training_records_where_the_edit_applied(subject: Subject, trained: Trained) -> None:
    """The trainer stops the edit at each caption's end-of-text token and the concept says
    so; the benchmarks' `AllPositions` edits the padding too, which gives a different
    concept from the same start and seed, and says so too."""
    pipe, cinv = tiny_pipeline(0, family=trained.family), trained.cinv
    everywhere = train(pipe, subject, RECIPE, cinv[0], cinv_fingerprint=cinv[1],
                       base_fingerprint=base_fingerprint(pipe), options={"steps": 6},
                       method=ABLATIONS["all_positions"])
    assert (trained.concept.positions, everywhere.positions) == ("prompt", "all")
    assert not torch.equal(everywhere.embedding, trained.concept.embedding)
    assert any(not torch.equal(everywhere.o_v[n], trained.concept.o_v[n])
               for n in everywhere.o_v)


def test_checkpoint_identity_names_the_method(subject: Subject) -> None:
    """A benchmark's checkpoint never resumes a product training of the same subject, and
    the product's identity is the one it had when the recipe named the method."""
    product = trainer._identity(subject, RECIPE, trainer.PERFUSION, "c", "b")
    ablation = trainer._identity(subject, RECIPE, ABLATIONS["trained_keys"], "c", "b")
    assert product != ablation
    assert '"variant": "perfusion"' in product["recipe"]


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_denoising_target_follows_the_schedulers_prediction_type(kind: str) -> None:
    """The loss target is what the scheduler's step reads the UNet's output as: fed the target
    itself as the model output, the scheduler's own x₀ estimate is the clean latents exactly
    (ε, v and x₀ parametrisations; a v-prediction model trained on ε targets would not)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(prediction_type=kind, rescale_betas_zero_snr=kind != "epsilon",
                              clip_sample=False,
                              timestep_spacing="trailing", set_alpha_to_one=False)
    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([10, 500, 998])
    target = forward.denoising_target(scheduler, latents, noise, t)
    noisy = scheduler.add_noise(latents, noise, t)
    scheduler.set_timesteps(1000)
    for i in range(3):
        out = scheduler.step(target[i:i + 1], int(t[i]), noisy[i:i + 1])
        assert torch.allclose(out.pred_original_sample, latents[i:i + 1], atol=1e-3)
    with pytest.raises(ValueError, match="prediction_type"):
        forward.denoising_target(DDIMScheduler(prediction_type="flow"), latents, noise, t)


# ------------------------------------------------ i_super and the mask at the substitution


def _hidden(pipe: Any, caption: str) -> tuple[Tensor, list[int]]:
    hidden, ids = trainer.encode(pipe, [caption])
    return hidden[0].detach(), ids[0].tolist()


def test_i_super_reads_the_substituted_word_not_a_later_repeat() -> None:
    """"a photo of a {} in a dog bed": i_super is the first "dog" (where the token was), not
    the template's own later one, which the encoder outputs differently."""
    pipe = tiny_pipeline(0)
    subject = Subject("rex*", ("dog",), (), ())
    template = "a photo of a {} in a dog bed"
    hidden, ids = _hidden(pipe, "a photo of a dog in a dog bed")
    dog = pipe.tokenizer("dog", add_special_tokens=False).input_ids
    assert len(dog) == 1 and ids.count(dog[0]) == 2
    first, last = ids.index(dog[0]), len(ids) - 1 - ids[::-1].index(dog[0])
    i_super = super_encoding(pipe, subject, (template,))
    torch.testing.assert_close(i_super, hidden[first].float())
    apart = float((hidden[first] - hidden[last]).norm() / hidden[first].norm())
    assert apart > 0.05, apart  # the two dogs really differ: the test can tell them apart


def test_i_super_of_a_multi_token_word_is_its_last_token_at_the_substitution() -> None:
    pipe = tiny_pipeline(0)
    word = pipe.tokenizer("sunflower", add_special_tokens=False).input_ids
    assert len(word) == 2  # several tokens in this vocabulary
    hidden, ids = _hidden(pipe, "a small, yellow sunflower beside a sunflower field")
    where = next(i for i in range(len(ids)) if ids[i:i + 2] == word) + 1  # the first, last token
    subject = Subject("sunny*", ("sunflower",), ("small", "yellow"), ())
    i_super = super_encoding(pipe, subject, ("a {} beside a sunflower field",))
    torch.testing.assert_close(i_super, hidden[where].float())


@pytest.mark.parametrize("template,adjectives", [
    ("a photo of a {}", ()), ("a {} in a dog bed, at night", ("small", "red")),
    ("{} on the left", ("striped",)), ("the {}", ())])
def test_super_caption_equals_the_tokenizer_on_word_boundaries(
        template: str, adjectives: tuple[str, ...]) -> None:
    tokenizer = tiny_pipeline(0).tokenizer
    ids, span = trainer.super_caption(tokenizer, template, "teddy bear", adjectives)
    text = trainer.captions(template, "teddy bear", adjectives)
    expected = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True).input_ids
    assert ids.tolist() == expected
    assert ids[span.start:span.stop].tolist() == \
        tokenizer("teddy bear", add_special_tokens=False).input_ids


def test_attention_mask_marks_only_the_substituted_word(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    """mask: attention reads the attention to the "dog" that replaced the token, not to every
    position holding the word's ids."""
    pipe = tiny_pipeline(0)
    seen: list[Tensor] = []
    real = trainer.attention_maps

    def spy(pipe: Any, latents: Tensor, hidden: Tensor, hit: Tensor, generator: Any,
            added: Any = None) -> Tensor:
        seen.append(hit)
        result: Tensor = real(pipe, latents, hidden, hit, generator, added)
        return result

    monkeypatch.setattr(trainer, "attention_maps", spy)
    subject = Subject("rex*", ("dog",), (), ())
    recipe = Recipe(templates=("a photo of a {} in a dog bed",), mask="attention")
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    maps = trainer.attention_maps_for(pipe, subject, recipe, latents)
    _, ids = _hidden(pipe, "a photo of a dog in a dog bed")
    dog = pipe.tokenizer("dog", add_special_tokens=False).input_ids[0]
    assert maps.shape == (2, 4, 4)
    assert seen[0].nonzero().tolist() == [[0, ids.index(dog)]]
    # with its own captions, each latent's mask is read in its own caption (the word moves)
    own = ("a {} in a dog bed", "on the sofa a {}")
    trainer.attention_maps_for(pipe, subject, dataclasses.replace(recipe, captions=own), latents)
    where = [_hidden(pipe, c.replace("{}", "dog"))[1].index(dog) for c in own]
    assert seen[1].nonzero().tolist() == [[0, where[0]], [1, where[1]]]
    assert where[0] != where[1]


def test_the_token_stands_for_the_supercategorys_last_word_after_the_others(
        subject: Subject, cinv: tuple[Tensor, str]) -> None:
    """With a phrase as first supercategory ("teddy bear"), every caption puts its leading
    words before the token, the token starts from the last word's embedding, and the
    concept records the words so that rendering puts them there too; a method without
    context (the benchmarks' `NoContext`) reads the token alone, started from the mean of
    the whole phrase's embeddings, as before."""

    class NoContext(trainer.Method):
        name = "no_context"
        context = False

    pipe = tiny_pipeline(0)
    table = extended_embedding(pipe.text_encoder).base.weight

    def mean_embedding(words: str) -> Tensor:
        return table[text.word_ids(pipe.tokenizer, words)].float().mean(0)

    with_words = trainer._prepare(pipe, subject, RECIPE, cinv[0])
    assert with_words.context == "teddy"
    assert torch.equal(with_words.embedding.detach(), mean_embedding("bear"))
    _, _, prompts, _ = trainer._batch(with_words, 4)
    assert all(p.endswith(f"teddy {placeholder(subject.token)}") for p in prompts), prompts
    # a caption that already says the words before `{}` says them once, and so does
    # i_super's: the token and "bear" are still read in the same caption
    plain = dataclasses.replace(subject, adjectives=())
    own = ("a Teddy {} at the beach", "a {} in the snow", "the teddy  {} on the moon")
    said = trainer._prepare(tiny_pipeline(0), plain, dataclasses.replace(RECIPE, captions=own),
                            cinv[0])
    _, _, prompts, supers = trainer._batch(said, 12)
    for prompt, sup in zip(prompts, supers, strict=True):
        assert prompt.lower().count("teddy") == 1 and sup.count("teddy") == 1, (prompt, sup)
        assert prompt.replace(placeholder(subject.token), "bear") == sup
    assert torch.equal(said.i_super, super_encoding(tiny_pipeline(0), plain, (
        "a {} at the beach", "a {} in the snow", "the {} on the moon")))
    bare = trainer._prepare(tiny_pipeline(0), subject, RECIPE, cinv[0], NoContext())
    assert bare.context == ""
    assert torch.equal(bare.embedding.detach(), mean_embedding("teddy bear"))
    _, _, prompts, _ = trainer._batch(bare, 4)
    assert not any("teddy" in p for p in prompts), prompts


def test_a_template_that_says_the_context_words_says_them_once() -> None:
    strip = trainer.without_context
    assert strip("a purple and yellow striped {} on the left", "purple and yellow striped",
                 ()) == "a {} on the left"
    assert strip("Purple  and yellow STRIPED {}", "purple and yellow striped", ()) == "{}"
    assert strip("a striped {}", "purple and yellow striped", ()) == "a striped {}"
    assert strip("a teddy {}", "teddy", ("brown",)) == "a teddy {}"  # adjectives between
    assert strip("a teddy {}", "", ()) == "a teddy {}"
    assert strip("a {} and a teddy {}", "teddy", ()) == "a {} and a teddy {}"  # the first only


def test_each_image_is_trained_with_its_own_caption(subject: Subject,
                                                    cinv: tuple[Tensor, str]) -> None:
    """With `captions` (one per image), every batch row is captioned with its own image's
    caption (a mirrored copy with its original's), and key locking reads the supercategory
    in those captions, not in `templates`."""
    own = ("a {} at the beach", "a {} in the snow", "a {} on the moon")
    recipe = dataclasses.replace(RECIPE, captions=own, flip=True)
    pipe = tiny_pipeline(0)
    run = trainer._prepare(pipe, subject, recipe, cinv[0])
    count = len(subject.images)
    assert run.latents.shape[0] == 2 * count  # the originals, then their mirrored copies
    latents, _, prompts, supers = trainer._batch(run, 24)
    seen = set()
    for row, prompt, sup in zip(latents, prompts, supers, strict=True):
        (k,) = [k for k in range(2 * count) if torch.equal(run.latents[k], row)]
        caption = own[k % count]
        # the supercategory's leading words ("teddy" of "teddy bear") before the token
        assert prompt == rewrite(trainer.captions(caption, f"teddy {subject.token}",
                                                  subject.adjectives), [subject.token])
        assert sup == trainer.captions(caption, subject.supercategories[0], subject.adjectives)
        # so the token is read where i_super reads the supercategory's last word
        assert prompt.replace(placeholder(subject.token), "bear") == sup
        seen.add(k)
    assert len(seen) > count  # originals and mirrored copies were both drawn
    assert torch.equal(run.i_super, super_encoding(pipe, subject, own))
    assert not torch.equal(run.i_super, super_encoding(pipe, subject, RECIPE.templates))
    # the plan's options reach the recipe; a count that is not the images' is refused
    assert Recipe.from_options(LearnOptions(captions=own)).captions == own
    assert Recipe.from_options(LearnOptions()).captions == ()
    with pytest.raises(trainer.TrainingError, match="2 captions for 3 images"):
        trainer._prepare(pipe, subject, dataclasses.replace(recipe, captions=own[:2]), cinv[0])
