"""Rendering with trained concepts on the real tiny diffusers pipeline: invariants 7 and 8 of
docs/runtime.md, M4, global key locking and several concepts in one prompt."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from test_trainer import shared_cinv_cache
from torch import Tensor

from perfusion_runtime.method import artifact
from perfusion_runtime.method.artifact import Concept
from perfusion_runtime.method.covariance import cinv_for
from perfusion_runtime.method.fingerprint import base_fingerprint
from perfusion_runtime.method.processor import SUPER_KWARG
from perfusion_runtime.method.render import Applied, apply_concepts
from perfusion_runtime.method.tiny import tiny_pipeline
from perfusion_runtime.method.tokens import placeholder, rewrite
from perfusion_runtime.method.trainer import Recipe, Subject, train

RECIPE = Recipe(steps=8, batch=2, seed=0, templates=("a photo of a {}", "a close-up of a {}"))
RENDER = {"num_inference_steps": 3, "output_type": "np"}  # float images in [0, 1]
PLAIN = "a red car on a beach"  # names no concept
LEAK_LIMIT = 2 / 255  # invariant 7: mean |Δ| of a concept-free image next to a concept one


def write_photos(folder: Path, count: int, colour: tuple[int, int, int]) -> tuple[Path, ...]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        image = Image.new("RGB", (40, 40), (20 + 50 * i, 120, 60))
        ImageDraw.Draw(image).rectangle((6 + 2 * i, 6, 30, 34 - 3 * i), fill=colour)
        paths.append(folder / f"{i}.png")
        image.save(paths[-1])
    return tuple(paths)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("render")


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def family(request: pytest.FixtureRequest) -> str:
    """Every test here runs on the SD 1.x tiny pipeline, the SD 2.x one (GELU text encoder,
    per-block heads, linear projections, upcast attention, v-prediction) and the SDXL one
    (two text encoders side by side, pooled text and size numbers in the time embedding)."""
    return str(request.param)


@pytest.fixture(scope="module")
def pipe(family: str) -> Any:
    return tiny_pipeline(0, family=family)


@pytest.fixture(scope="module")
def base(family: str) -> Any:
    """The plain pipeline, never touched by a concept."""
    return tiny_pipeline(0, family=family)


@pytest.fixture(scope="module")
def cinv(tmp_path_factory: pytest.TempPathFactory, base: Any, family: str) -> Tensor:
    """C⁻¹ of the tiny text encoder on the shipped caption corpus, estimated once per session
    (a cache folder shared by the runtime test files); the leak of invariant 7 depends on it."""
    return cinv_for(base, shared_cinv_cache(tmp_path_factory, family))[0]


def _train(pipe: Any, cinv: Tensor, folder: Path, token: str, supers: tuple[str, ...],
           colour: tuple[int, int, int]) -> Concept:
    subject = Subject(token, supers, ("small",), write_photos(folder, 2, colour),
                      base_model="tiny:random")
    return train(pipe, subject, RECIPE, cinv, cinv_fingerprint="c" * 64,
                 base_fingerprint=base_fingerprint(pipe), options={"lock": "local"})


@pytest.fixture(scope="module")
def teddy(pipe: Any, cinv: Tensor, workdir: Path) -> Concept:
    return _train(pipe, cinv, workdir / "teddy", "teddy*", ("teddy bear",), (150, 90, 30))


@pytest.fixture(scope="module")
def mug(pipe: Any, cinv: Tensor, workdir: Path) -> Concept:
    return _train(pipe, cinv, workdir / "mug", "mug*", ("coffee mug", "cup"), (30, 60, 220))


def plain_render(pipe: Any, prompt: str, seed: int) -> np.ndarray:
    """The stock pipeline, no Perfusion anywhere."""
    image: np.ndarray = pipe(prompt, generator=torch.Generator().manual_seed(seed),
                             **RENDER).images[0]
    return image


def test_invariant_7_prompt_without_concept_renders_like_base(
        pipe: Any, base: Any, teddy: Concept, cinv: Tensor, family: str) -> None:
    expected = plain_render(base, PLAIN, seed=3)
    with apply_concepts(pipe, [teddy], cinv=cinv) as applied:
        alone = applied(PLAIN, seed=3, **RENDER)[0]
        concept, beside = applied(["a photo of teddy* on a beach", PLAIN], seed=[3, 3],
                                  **RENDER)
    # no concept token: no row is edited and the processors are diffusers' own maths, also
    # beside a concept prompt in the same call (the gate is per prompt)
    assert np.array_equal(alone, expected)
    assert np.array_equal(beside, expected)
    assert np.isfinite(concept).all()
    # while the concept itself does change its own image (less in the tiny SDXL, whose
    # pooled text, a part of the time embedding, carries the supercategory by design)
    changed = float(np.abs(concept - plain_render(base, "a photo of teddy bear on a beach",
                                                  3)).mean())
    assert changed > (LEAK_LIMIT / 2 if family == "sdxl" else LEAK_LIMIT)


def _gap(a: np.ndarray, b: np.ndarray) -> str:
    return f"mean {float(np.abs(a - b).mean()) * 255:.3f}/255, max " \
           f"{float(np.abs(a - b).max()) * 255:.3f}/255"


@pytest.mark.parametrize("size", [2, 4])
def test_gate_is_per_image_in_a_batched_call(pipe: Any, base: Any, teddy: Concept,
                                             mug: Concept, cinv: Tensor, size: int) -> None:
    """Batched calls (CUDA's default): a plain prompt beside a concept prompt is not edited,
    and a teddy*-only prompt does not move when mug* is active beside it. The reference is
    the same call with a plain prompt in the other place, so batch size and place (which
    change bits on their own) are the same on both sides."""
    other, plain_other = "mug* on a table", "a green bus in a city"
    with apply_concepts(pipe, [teddy, mug], cinv=cinv, batch_size=size) as applied:
        plain_mixed = applied(["a photo of teddy* on a beach", PLAIN], seed=[3, 4], **RENDER)
        plain_ref = applied([plain_other, PLAIN], seed=[3, 4], **RENDER)
        a_mixed = applied([other, "teddy* in the snow"], seed=[3, 4], **RENDER)
        a_ref = applied([plain_other, "teddy* in the snow"], seed=[3, 4], **RENDER)
    base_mixed = base([plain_other, PLAIN], generator=[torch.Generator().manual_seed(s)
                                                        for s in (3, 4)], **RENDER).images
    print(f"batch {size}: plain {_gap(plain_mixed[1], plain_ref[1])}; teddy* beside mug* "
          f"{_gap(a_mixed[1], a_ref[1])}")
    assert np.array_equal(plain_mixed[1], plain_ref[1])
    assert np.array_equal(a_mixed[1], a_ref[1])
    if size == 2:  # the call the stock pipeline makes with the same two prompts
        assert np.array_equal(plain_ref[1], base_mixed[1])
    assert not np.array_equal(a_mixed[0], plain_ref[0])  # mug* did render as itself


def test_no_concept_is_active_after_a_call(pipe: Any, base: Any, teddy: Concept,
                                          cinv: Tensor) -> None:
    """Between calls of `applied`, the pipeline itself renders like the base model."""
    with apply_concepts(pipe, [teddy], cinv=cinv) as applied:
        applied("a photo of teddy* on a beach", seed=0, **RENDER)
        assert not applied.state.active
        direct = plain_render(pipe, PLAIN, seed=3)
    assert np.array_equal(direct, plain_render(base, PLAIN, seed=3))


def test_invariant_8_reload_reproduces_outputs_exactly(
        pipe: Any, teddy: Concept, cinv: Tensor, tmp_path: Path, family: str) -> None:
    prompts = ["a photo of teddy*", "teddy* in the snow", PLAIN]
    with apply_concepts(pipe, [teddy], cinv=cinv) as applied:
        in_memory = applied(prompts, seed=[0, 1, 2], **RENDER)
    path = tmp_path / "teddy.safetensors"
    artifact.save(teddy, path)
    fresh = tiny_pipeline(0, family=family)
    with apply_concepts(fresh, [path], cinv=cinv) as applied:
        loaded = applied.concepts["teddy*"]
        reloaded = applied(prompts, seed=[0, 1, 2], **RENDER)
    assert artifact.encode(loaded) == artifact.encode(teddy)
    for name in ("embedding", "i_star"):
        assert torch.equal(getattr(loaded, name), getattr(teddy, name))
    for a, b in zip(in_memory, reloaded, strict=True):
        assert np.array_equal(a, b)


def test_M4_image_k_same_alone_in_batch_and_any_order(
        pipe: Any, teddy: Concept, mug: Concept, cinv: Tensor) -> None:
    """The same concept set in every call (the state is per call): image k depends only on
    its prompt and seed, not on its batch or its place in it."""
    prompts = ["mug* and teddy* on a table", "mug* on a table", "teddy* in the snow", PLAIN]
    seeds = [5, 6, 7, 5]
    with apply_concepts(pipe, [teddy, mug], cinv=cinv) as applied:
        batch = applied(prompts, seed=seeds, **RENDER)
        reverse = applied(prompts[::-1], seed=seeds[::-1], **RENDER)[::-1]
        alone = [applied([prompts[0], p], seed=[seeds[0], s], **RENDER)[1]
                 for p, s in zip(prompts, seeds, strict=True)]
    for k in range(len(prompts)):
        assert np.isfinite(batch[k]).all()
        assert np.array_equal(batch[k], reverse[k]), k
        assert np.array_equal(batch[k], alone[k]), k
    assert not np.array_equal(batch[0], batch[3])  # the seeds and prompts do matter


@pytest.mark.parametrize("context", ["teddy", ""], ids=["as-trained", "without-context"])
def test_global_locking_renders_through_the_supercategory_prompt(
        pipe: Any, teddy: Concept, cinv: Tensor, monkeypatch: pytest.MonkeyPatch,
        context: str) -> None:
    """As trained, "teddy" stands before the token and the token for "bear" alone; without
    context words (files before format 4) the token stands for "teddy bear", two tokens, and
    the supercategory prompt's encodings are moved into line with the prompt's."""
    assert teddy.context == "teddy"  # the trainer's: the supercategory's leading words
    teddy = teddy.with_options(context=context)
    prompts = ["a photo of teddy*", "teddy* on a beach"]
    with apply_concepts(pipe, [teddy], cinv=cinv) as applied:
        local = applied(prompts, seed=[0, 1], **RENDER)
    global_teddy = teddy.with_options(lock="global")
    built: list[dict[str, Any]] = []
    seen: list[Tensor | None] = []
    with apply_concepts(pipe, [global_teddy], cinv=cinv) as applied:
        spy_embeddings(applied, built, monkeypatch)
        for processor in applied.installed.processors.values():
            spy_key_value(processor, seen, monkeypatch)
        glob = applied(prompts, seed=[0, 1], **RENDER)
        supers = [in_line(applied, p) for p in prompts]
    assert applied.supercategory_prompt(prompts[1]) == "teddy bear on a beach"
    assert len(built) == len(prompts)  # one pipeline call per image on the CPU (M4)
    for kwargs, expected in zip(built, supers, strict=True):
        both = kwargs["cross_attention_kwargs"][SUPER_KWARG]
        # guided: [unconditional, supercategory prompt], like prompt_embeds' [uncond, cond]
        assert both.shape == (2, *kwargs["prompt_embeds"].shape[1:])
        assert torch.equal(both[1:], expected)
        assert torch.equal(both[:1], kwargs["negative_prompt_embeds"])
    assert seen and all(s is not None for s in seen)  # every attn2 got the super encodings
    for a, b in zip(local, glob, strict=True):
        assert np.isfinite(b).all()
        assert not np.array_equal(a, b)


def in_line(applied: Applied, prompt: str) -> Tensor:
    """The supercategory prompt's encodings (the pipeline's own encoding of its text) moved
    into line with `prompt`'s positions (after its context words): the concept's position
    holds the last token of what it stands for, every later word and the end of text the
    token that many places on, and the padding its own position (the end of text where the
    longer text still has words)."""
    tokenizer = applied.pipe.tokenizer
    stands_for = applied.concepts["teddy*"].stands_for
    sup_tokens = len(tokenizer(stands_for, add_special_tokens=False).input_ids)
    # without context words, "teddy bear" is two tokens: the words after it do move
    assert sup_tokens >= 2 or applied.concepts["teddy*"].context
    ids = tokenizer(rewrite(applied.with_context(prompt), ["teddy*"])).input_ids
    at = ids.index(tokenizer.convert_tokens_to_ids(placeholder("teddy*")))
    end = ids.index(tokenizer.eos_token_id)
    length = tokenizer.model_max_length
    moved = end + sup_tokens - 1  # where the supercategory prompt's end of text is
    index = [k if k < at else k + sup_tokens - 1 if k <= end else max(k, moved)
             for k in range(length)]
    encoded: Tensor = applied.pipe.encode_prompt(  # by keyword: SDXL's takes a second prompt
        prompt=[applied.supercategory_prompt(prompt)], device="cpu", num_images_per_prompt=1,
        do_classifier_free_guidance=False)[0]
    return encoded[:, index]


def spy_embeddings(applied: Applied, built: list[dict[str, Any]],
                   monkeypatch: pytest.MonkeyPatch) -> None:
    real = applied._embeddings

    def spy(*args: Any) -> dict[str, Any]:
        built.append(real(*args))
        return built[-1]

    monkeypatch.setattr(applied, "_embeddings", spy)


def spy_key_value(processor: Any, seen: list[Tensor | None],
                  monkeypatch: pytest.MonkeyPatch) -> None:
    real = processor.key_value

    def spy(attn: Any, context: Tensor, super_context: Tensor | None) -> tuple[Tensor, Tensor]:
        seen.append(super_context)
        result: tuple[Tensor, Tensor] = real(attn, context, super_context)
        return result

    monkeypatch.setattr(processor, "key_value", spy)


def test_two_concepts_in_one_prompt(pipe: Any, teddy: Concept, mug: Concept, cinv: Tensor
                                    ) -> None:
    with apply_concepts(pipe, [teddy, mug], cinv=cinv) as applied:
        both = applied("teddy* next to mug*", seed=0, **RENDER)[0]
        chosen = applied.concept_set(applied.tokens_in(["teddy* next to mug*"]), 0.5)
        assert chosen is not None and chosen.basis.size == 2
        only_teddy = applied("teddy* next to a cup", seed=0, **RENDER)[0]
    assert np.isfinite(both).all()
    assert not np.array_equal(both, only_teddy)


def test_two_identical_concepts_are_a_clear_error(pipe: Any, teddy: Concept, cinv: Tensor
                                                  ) -> None:
    twin = dataclasses.replace(teddy, token="twin*")
    embedding = pipe.text_encoder.get_input_embeddings()
    with apply_concepts(pipe, [teddy, twin], cinv=cinv) as applied:
        assert applied("a photo of teddy*", seed=0, **RENDER)[0] is not None  # one is fine
        with pytest.raises(ValueError, match=r"linearly dependent.*same concept twice"):
            applied("teddy* and twin*", seed=0, **RENDER)
    assert pipe.text_encoder.get_input_embeddings() is embedding


# ----------------------------------------------------------- the Python API, as users call it


def test_wrong_base_model_is_refused_before_anything_costly(
        pipe: Any, teddy: Concept, tmp_path: Path) -> None:
    """Every file is checked before C⁻¹ is estimated (minutes on SD 1.5) and cached."""
    path = tmp_path / "other.safetensors"
    artifact.save(dataclasses.replace(teddy, base_fingerprint="0" * 64), path)
    cache = tmp_path / "cache"
    vocabulary = len(pipe.tokenizer)
    with pytest.raises(artifact.ArtifactError, match="trained on base model"):
        apply_concepts(pipe, [path], cache_dir=cache)
    assert not cache.exists()  # no C⁻¹ estimated, no entry for the wrong model
    assert len(pipe.tokenizer) == vocabulary


def test_strength_mapping_may_leave_tokens_at_the_default(
        pipe: Any, teddy: Concept, mug: Concept, cinv: Tensor) -> None:
    prompt = "teddy* next to mug*"
    with apply_concepts(pipe, [teddy, mug], cinv=cinv) as applied:
        partial = applied(prompt, seed=1, strength={"teddy*": 0.9}, **RENDER)[0]
        full = applied(prompt, seed=1, strength={"teddy*": 0.9, "mug*": 0.5}, **RENDER)[0]
    assert np.array_equal(partial, full)


def test_the_edit_stops_at_each_prompts_end_of_text(
        pipe: Any, teddy: Concept, cinv: Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    """A concept trained with the edit at the prompt's positions (`positions` "prompt", as
    the trainer trains) is edited at each row's start token, words and end-of-text token
    (the negative prompt's under guidance too); one trained with the edit everywhere (files
    before format 3, the benchmarks' `AllPositions`) is edited everywhere."""
    assert teddy.positions == "prompt"
    stopping = teddy
    everywhere = teddy.with_options(positions="all")
    prompt, negative = "teddy* on a beach", "blurry"
    # the prompt the encoder reads: the context word "teddy", the token (one added token)
    # and the words after it
    assert teddy.context == "teddy"
    words = 1 + len(pipe.tokenizer("teddy on a beach", add_special_tokens=False).input_ids)
    seen: list[Tensor | None] = []
    for concept in (stopping, everywhere):
        with apply_concepts(pipe, [concept], cinv=cinv) as applied:
            state = applied.state
            real = type(state).activate_rows

            def spy(rows: Any, tau: Any = None, lengths: Tensor | None = None,
                    state: Any = state, real: Any = real) -> None:
                seen.append(lengths)
                real(state, rows, lengths=lengths)

            monkeypatch.setattr(state, "activate_rows", spy)
            applied(prompt, negative_prompt=negative, guidance_scale=3.0, **RENDER)
            applied(prompt, guidance_scale=1.0, **RENDER)
    negative_length = len(pipe.tokenizer(negative).input_ids)
    assert [None if t is None else t.tolist() for t in seen] == [
        [negative_length, words + 2], [words + 2], None, None]


def test_numpy_integer_seeds_are_accepted(pipe: Any, teddy: Concept, cinv: Tensor) -> None:
    with apply_concepts(pipe, [teddy], cinv=cinv) as applied:
        one = applied("teddy* on a beach", seed=np.int64(3), **RENDER)[0]
        many = applied(["teddy* on a beach", PLAIN], seed=np.array([3, 4]), **RENDER)
        expected = applied(["teddy* on a beach", PLAIN], seed=[3, 4], **RENDER)
        with pytest.raises(TypeError, match="seed must be an integer"):
            applied("teddy* on a beach", seed=3.5, **RENDER)  # type: ignore[arg-type]
    assert np.array_equal(one, expected[0])
    assert all(np.array_equal(a, b) for a, b in zip(many, expected, strict=True))


def test_own_cross_attention_kwargs_are_merged(pipe: Any, teddy: Concept, cinv: Tensor
                                               ) -> None:
    """Global locking passes its own cross_attention_kwargs; the caller's go along (here a
    key that diffusers' attention drops, with a logged notice, as no processor takes it)."""
    global_teddy = teddy.with_options(lock="global")
    with apply_concepts(pipe, [global_teddy], cinv=cinv) as applied:
        theirs = applied("teddy* on a beach", seed=0, cross_attention_kwargs={"unused": 1},
                         **RENDER)[0]
        ours = applied("teddy* on a beach", seed=0, **RENDER)[0]
    assert np.array_equal(theirs, ours)


def test_unknown_concept_token_warns_naming_the_applied_ones(
        pipe: Any, teddy: Concept, cinv: Tensor) -> None:
    with apply_concepts(pipe, [teddy], cinv=cinv) as applied, \
            pytest.warns(UserWarning, match=r"abc\* is not an applied concept .*applied: teddy\*"):
        applied("a photo of abc* and teddy*", seed=0, **RENDER)


def test_applying_twice_is_refused_before_anything_changes(
        pipe: Any, teddy: Concept, mug: Concept, cinv: Tensor) -> None:
    with apply_concepts(pipe, [teddy], cinv=cinv) as applied:
        before = applied("teddy* on a beach", seed=0, **RENDER)[0]
        vocabulary = len(pipe.tokenizer)
        rows = dict(pipe.text_encoder.get_input_embeddings().vectors)
        with pytest.raises(ValueError, match=r"already applied.*Applied\.remove\(\)"):
            apply_concepts(pipe, [mug], cinv=cinv)
        assert len(pipe.tokenizer) == vocabulary
        assert dict(pipe.text_encoder.get_input_embeddings().vectors) == rows
        assert np.array_equal(applied("teddy* on a beach", seed=0, **RENDER)[0], before)
    with apply_concepts(pipe, [mug], cinv=cinv):  # after remove(), applying again works
        pass


def test_remove_one_concept_keeps_the_others(pipe: Any, base: Any, teddy: Concept,
                                             mug: Concept, cinv: Tensor) -> None:
    with apply_concepts(base, [teddy], cinv=cinv) as alone:
        expected = alone("teddy* in the snow", seed=2, **RENDER)[0]
    with apply_concepts(pipe, [teddy, mug], cinv=cinv) as applied:
        applied.remove("mug*")
        assert list(applied.concepts) == ["teddy*"]
        kept = applied("teddy* in the snow", seed=2, **RENDER)[0]
        with pytest.warns(UserWarning, match=r"mug\* is not an applied concept"):
            applied("mug* on a table", seed=2, **RENDER)
        with pytest.raises(ValueError, match="not applied"):
            applied.remove("mug*")
    assert np.array_equal(kept, expected)
