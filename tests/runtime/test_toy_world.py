"""The toy:shapes world: deterministic scenes, renders and captions that say what they show."""

from __future__ import annotations

import hashlib
import itertools
import random
from collections import Counter

import numpy as np
import pytest

from perfusion_runtime.toy import world


def digest(seed: int) -> str:
    image, text = world.training_example(seed)
    return hashlib.sha256(image.tobytes() + text.encode()).hexdigest()


def test_training_examples_are_deterministic() -> None:
    assert [digest(s) for s in range(20)] == [digest(s) for s in range(20)]
    assert len({digest(s) for s in range(20)}) == 20


def test_render_is_64px_rgb_with_the_background_at_the_border() -> None:
    for seed in range(300):
        scene = world.scene_for_seed(seed)
        pixels = np.asarray(world.render(scene))
        assert pixels.shape == (64, 64, 3)
        border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
        off = np.abs(border.astype(int) - world.BACKGROUNDS[scene.background]).max(1)
        # the object is pulled in from the edges but may touch them (jitter, rotation, the
        # corners of squares and crosses reach past r); the border stays mostly background
        assert (off <= 24).mean() >= 0.9, seed
        assert scene.colour != scene.background


@pytest.fixture(scope="module")
def training_scenes() -> list[world.Scene]:
    return [world.scene_for_seed(s) for s in range(4000)]


def test_scenes_cover_the_vocabularies(training_scenes: list[world.Scene]) -> None:
    for attribute, vocabulary in (("shape", world.SHAPES), ("colour", world.COLOURS),
                                  ("size", world.SIZES), ("position", world.POSITIONS),
                                  ("background", world.BACKGROUNDS),
                                  ("pattern", world.PATTERNS)):
        seen = Counter(getattr(s, attribute) for s in training_scenes)
        assert set(seen) == set(vocabulary), attribute
    assert {s.form for s in training_scenes} == set(world.TRAINING_FORMS)


def test_training_never_shows_the_unseen_outlines_or_combinations(
        training_scenes: list[world.Scene]) -> None:
    assert not any(s.form in world.UNSEEN_FORMS for s in training_scenes)
    assert not any((s.colour, s.second, s.pattern) in world.UNSEEN_COMBINATIONS
                   for s in training_scenes)
    # a crescent's depth in training is thin or fat, never the held-out middle
    middle = world.depth_range(world.Form("crescent", facing="right"))
    assert middle is not None
    assert not any(middle[0] <= s.depth <= middle[1]
                   for s in training_scenes if s.shape == "crescent")


def test_every_pattern_pair_is_common(training_scenes: list[world.Scene]) -> None:
    """Half the objects are patterned, so each (fill, second, pattern) is seen often."""
    combos = Counter((s.colour, s.second, s.pattern) for s in training_scenes
                     if s.pattern != "solid")
    expected = {(a, b, p) for a in world.COLOURS for b in world.COLOURS if a != b
                for p in world.PATTERNS[1:]} - set(world.UNSEEN_COMBINATIONS)
    assert set(combos) == expected
    mean = sum(combos.values()) / len(combos)  # about 18 of 4,000 scenes each
    assert min(combos.values()) >= 0.4 * mean
    assert 0.45 <= sum(combos.values()) / len(training_scenes) <= 0.55


@pytest.mark.parametrize("seed", range(30))
def test_captions_name_what_they_show(seed: int) -> None:
    scene = world.scene_for_seed(seed)
    text = world.caption(scene, random.Random(seed))
    assert scene.shape in text and scene.colour in text and scene.size in text
    assert scene.background in text
    for word in scene.outline.split():
        # a five pointed star may be just a "star", a thin crescent just a "crescent"
        if word not in ("five", "pointed", "thin", "fat"):
            assert word in text, (word, text)
    if scene.pattern != "solid":
        assert f"{scene.colour} and {scene.second} {scene.pattern}" in text
    left_out = world.caption(scene, random.Random(seed), omit=("background",))
    assert scene.background not in left_out.replace(scene.colour, "")


def test_outline_names_are_compositional() -> None:
    names = {form.name for form in world.FORMS}
    assert {"circle", "square", "round square", "six pointed star", "seven pointed star",
            "thin crescent opening left", "fat crescent opening up", "crescent opening right",
            "arrow pointing down", "thin ring", "fat ring"} <= names
    assert len(names) == len(world.FORMS)
    # the v1 world's words still describe a scene: a plain "star" has five points
    star = world.Scene("star", "red", "large", "center", "black")
    assert star.outline == "five pointed star"
    said = {world.describe_object(star, rng=random.Random(k)) for k in range(20)}
    assert said == {"large red star", "large red five pointed star"}


def test_captions_vary_their_phrasing() -> None:
    scene = world.scene_for_seed(3)
    assert len({world.caption(scene, random.Random(k)) for k in range(40)}) >= 4


def test_unseen_forms_render() -> None:
    for form in world.UNSEEN_FORMS:
        scene = world.Scene(form.shape, "red", "large", "center", "black", points=form.points,
                            facing=form.facing, build=form.build)
        pixels = np.asarray(world.render(scene)).astype(int)
        assert (np.abs(pixels - world.BACKGROUNDS["black"]).max(2) > 60).sum() > 200


def coverage(scene: world.Scene) -> np.ndarray:
    return np.asarray(world.object_mask(scene), dtype=np.float64) / 255


@pytest.mark.parametrize("facing", world.FACINGS)
def test_crescents_open_and_arrows_point_where_they_say(facing: str) -> None:
    ux, uy = {"right": (1, 0), "down": (0, 1), "left": (-1, 0), "up": (0, -1)}[facing]
    r = world.SIZES["large"]

    def at(alpha: np.ndarray, cx: float, cy: float, ahead: float, aside: float) -> float:
        """Coverage at `ahead` r along the facing and `aside` r across it."""
        x, y = cx + r * (ahead * ux - aside * uy), cy + r * (ahead * uy + aside * ux)
        return float(alpha[int(y), int(x)])

    for shape in ("crescent", "arrow"):
        scene = world.Scene(shape, "red", "large", "center", "black", facing=facing,
                            build="fat" if shape == "crescent" else "")
        alpha, (cx, cy) = coverage(scene), world.centre(scene)
        if shape == "crescent":  # open ahead, solid behind
            assert at(alpha, cx, cy, 0.6, 0) < 0.1 and at(alpha, cx, cy, -0.9, 0) > 0.9
        else:  # the head is wide ahead, the shaft narrow behind
            assert at(alpha, cx, cy, 0.3, 0.45) > 0.9 and at(alpha, cx, cy, -0.4, 0.45) < 0.1
            assert at(alpha, cx, cy, 0.85, 0) > 0.5 and at(alpha, cx, cy, -0.9, 0) > 0.9


def test_rings_have_holes_and_builds_differ() -> None:
    thin, fat = (world.Scene("ring", "blue", "large", "center", "white", build=b)
                 for b in ("thin", "fat"))
    assert coverage(thin)[32, 32] == 0 and coverage(fat)[32, 32] == 0
    assert coverage(fat).sum() > 1.3 * coverage(thin).sum()
    stars = [world.Scene("star", "red", "large", "center", "black", points=n)
             for n in (4, 5, 6, 7, 8)]
    assert len({coverage(s).tobytes() for s in stars}) == 5
    rounded = world.Scene("square", "red", "large", "center", "black", build="round")
    sharp = world.with_changes(rounded, build="")
    assert coverage(rounded).sum() < 0.97 * coverage(sharp).sum()
    assert coverage(rounded)[32, 32] == 1


def test_depth_ranges_leave_gaps_between_builds() -> None:
    for shape in ("crescent", "ring"):
        spans = sorted(world.depth_range(f) or (0.0, 0.0) for f in world.FORMS
                       if f.shape == shape and f.facing in ("", "right"))
        assert all(a[1] + 0.08 <= b[0] for a, b in itertools.pairwise(spans)), spans
