"""The toy:shapes world: deterministic scenes, renders and captions that say what they show."""

from __future__ import annotations

import hashlib
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


def test_scenes_cover_the_vocabularies() -> None:
    scenes = [world.scene_for_seed(s) for s in range(2000)]
    for attribute, vocabulary in (("shape", world.SHAPES), ("colour", world.COLOURS),
                                  ("size", world.SIZES), ("position", world.POSITIONS),
                                  ("background", world.BACKGROUNDS),
                                  ("pattern", world.PATTERNS)):
        seen = Counter(getattr(s, attribute) for s in scenes)
        assert set(seen) == set(vocabulary), attribute
    assert not any(s.shape in world.UNSEEN_SHAPES for s in scenes)


@pytest.mark.parametrize("seed", range(30))
def test_captions_name_what_they_show(seed: int) -> None:
    scene = world.scene_for_seed(seed)
    text = world.caption(scene, random.Random(seed))
    assert scene.shape in text and scene.colour in text and scene.size in text
    assert scene.background in text
    if scene.pattern != "solid":
        assert f"{scene.colour} and {scene.second} {scene.pattern}" in text
    left_out = world.caption(scene, random.Random(seed), omit=("background",))
    assert scene.background not in left_out.replace(scene.colour, "")


def test_captions_vary_their_phrasing() -> None:
    scene = world.scene_for_seed(3)
    assert len({world.caption(scene, random.Random(k)) for k in range(40)}) >= 4


def test_unseen_shapes_render() -> None:
    for shape in world.UNSEEN_SHAPES:
        scene = world.Scene(shape, "red", "large", "center", "black")
        pixels = np.asarray(world.render(scene)).astype(int)
        assert (np.abs(pixels - world.BACKGROUNDS["black"]).max(2) > 60).sum() > 200
