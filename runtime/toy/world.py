"""The toy:shapes world: seeded scenes of one object on a plain background, with captions.

Pure Python and Pillow (no torch): the model trainer, the analyzer, the example images and
the tests all draw from here. Every scene is a function of its seed; captions vary their
phrasing but always name what they say exactly.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Literal

from PIL import Image, ImageDraw

SIZE = 64  # image side in pixels
_SUPER = 4  # drawn at 4× and downsampled: anti-aliased edges, deterministic pixels

# The vocabularies (docs/toy.md). RGB values are far apart so that every pair is told apart.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 90, 230),
    "yellow": (240, 210, 40), "purple": (150, 60, 190), "orange": (245, 140, 30),
    "pink": (245, 130, 190), "cyan": (40, 205, 215),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15), "white": (240, 240, 240), "gray": (125, 125, 125),
    "beige": (215, 195, 150),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
UNSEEN_SHAPES = ("heart", "crescent", "arrow")  # never in the training data (benchmarks)
SIZES: dict[str, float] = {"small": 8.0, "medium": 13.0, "large": 19.0}  # radius in px
POSITIONS: dict[str, tuple[int, int]] = {  # (column, row) on a 3×3 grid
    "top left": (0, 0), "top": (1, 0), "top right": (2, 0),
    "left": (0, 1), "center": (1, 1), "right": (2, 1),
    "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2),
}
PATTERNS = ("solid", "striped", "dotted")
Pattern = Literal["solid", "striped", "dotted"]


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    position: str
    background: str
    pattern: str = "solid"
    second: str | None = None  # the pattern's second colour
    dx: float = 0.0  # jitter of the centre, in px
    dy: float = 0.0
    angle: float = 0.0  # rotation in degrees (small: the shape stays recognisable)


def centre(scene: Scene) -> tuple[float, float]:
    """The object's centre in px: its grid cell's centre, pulled in so it stays whole."""
    col, row = POSITIONS[scene.position]
    r = SIZES[scene.size]
    margin = r + 2
    span = SIZE - 2 * margin
    return (margin + span * col / 2 + scene.dx, margin + span * row / 2 + scene.dy)


def sample_scene(rng: random.Random, shapes: tuple[str, ...] = SHAPES,
                 patterned: float = 0.25) -> Scene:
    """A random scene; the object's colours always differ from the background."""
    background = rng.choice(sorted(BACKGROUNDS))
    colour = rng.choice(sorted(COLOURS))
    pattern, second = "solid", None
    if rng.random() < patterned:
        pattern = rng.choice(PATTERNS[1:])
        second = rng.choice([c for c in sorted(COLOURS) if c != colour])
    return Scene(shape=rng.choice(shapes), colour=colour, size=rng.choice(list(SIZES)),
                 position=rng.choice(list(POSITIONS)), background=background,
                 pattern=pattern, second=second, dx=rng.uniform(-2, 2), dy=rng.uniform(-2, 2),
                 angle=rng.uniform(-10, 10))


def scene_for_seed(seed: int, shapes: tuple[str, ...] = SHAPES) -> Scene:
    return sample_scene(random.Random(seed), shapes)


# ------------------------------------------------------------------ drawing


def outline(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """The shape's polygon (circles and crescents as many-sided polygons), in px."""
    points = _unit(shape)
    a = math.radians(angle)
    cos, sin = math.cos(a), math.sin(a)
    return [(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in points]


def _unit(shape: str) -> list[tuple[float, float]]:
    """The shape in a unit circle, y down."""
    if shape == "circle":
        return [(math.cos(t), math.sin(t)) for t in _angles(48)]
    if shape == "square":
        s = 0.8
        return [(-s, -s), (s, -s), (s, s), (-s, s)]
    if shape == "triangle":
        return [(math.cos(t - math.pi / 2), math.sin(t - math.pi / 2)) for t in _angles(3)]
    if shape == "star":
        return [((1.0 if i % 2 == 0 else 0.42) * math.cos(t - math.pi / 2),
                 (1.0 if i % 2 == 0 else 0.42) * math.sin(t - math.pi / 2))
                for i, t in enumerate(_angles(10))]
    if shape == "cross":
        w = 0.32
        return [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1),
                (-w, w), (-1, w), (-1, -w), (-w, -w)]
    if shape == "diamond":
        return [(0, -1), (0.7, 0), (0, 1), (-0.7, 0)]
    return _unseen(shape)


def _unseen(shape: str) -> list[tuple[float, float]]:
    if shape == "heart":
        pts = [(16 * math.sin(t) ** 3,
                -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)))
               for t in _angles(64)]
        return [(x / 17, (y + 2) / 17) for x, y in pts]
    if shape == "crescent":  # the unit disc minus a disc of radius 0.8 centred at (0.45, 0)
        a, b = math.radians(51.3), math.radians(77.4)  # where the two circles cross
        outer = [(math.cos(t), math.sin(t)) for t in _angles(40, a, 2 * math.pi - a)]
        inner = [(0.45 + 0.8 * math.cos(t), 0.8 * math.sin(t))
                 for t in _angles(40, 2 * math.pi - b, b)]
        return outer + inner
    if shape == "arrow":
        return [(-1, -0.3), (0.2, -0.3), (0.2, -0.75), (1, 0), (0.2, 0.75), (0.2, 0.3),
                (-1, 0.3)]
    raise ValueError(f"unknown shape {shape!r}")


def _angles(n: int, start: float = 0.0, stop: float = 2 * math.pi) -> list[float]:
    closed = math.isclose(abs(stop - start), 2 * math.pi)
    steps = n if closed else n - 1
    return [start + (stop - start) * i / steps for i in range(n)]


def _big_mask(scene: Scene) -> Image.Image:
    """The object's coverage at 4×: 255 inside its outline, 0 outside."""
    big = SIZE * _SUPER
    cx, cy = centre(scene)
    polygon = [(x * _SUPER, y * _SUPER) for x, y in
               outline(scene.shape, cx, cy, SIZES[scene.size], scene.angle)]
    mask = Image.new("L", (big, big), 0)
    ImageDraw.Draw(mask).polygon(polygon, fill=255)
    return mask


def object_mask(scene: Scene) -> Image.Image:
    """The object's coverage as a 64×64 gray image (white object, black background): a loss
    mask for the scene's render."""
    return _big_mask(scene).resize((SIZE, SIZE), Image.Resampling.BOX)


def render(scene: Scene) -> Image.Image:
    """The scene as a 64×64 RGB image (deterministic)."""
    big = SIZE * _SUPER
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    mask = _big_mask(scene)
    fill = Image.new("RGB", (big, big), COLOURS[scene.colour])
    if scene.pattern != "solid" and scene.second is not None:
        _pattern(fill, scene)
    image.paste(fill, (0, 0), mask)
    return image.resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def _pattern(fill: Image.Image, scene: Scene) -> None:
    assert scene.second is not None
    draw = ImageDraw.Draw(fill)
    colour = COLOURS[scene.second]
    step = 6 * _SUPER
    big = fill.width
    if scene.pattern == "striped":
        for x in range(-big, 2 * big, step):  # diagonal stripes
            draw.polygon([(x, 0), (x + step // 2, 0), (x + step // 2 - big, big), (x - big, big)],
                         fill=colour)
    else:
        radius = 1.3 * _SUPER
        for y in range(step // 2, big, step):
            for x in range(step // 2, big, step):
                draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)


# ------------------------------------------------------------------ captions

_POSITION_WORDS: dict[str, tuple[str, ...]] = {
    "top left": ("in the top left corner", "at the top left"),
    "top": ("at the top", "near the top"),
    "top right": ("in the top right corner", "at the top right"),
    "left": ("on the left", "at the left"),
    "center": ("in the center", "in the middle"),
    "right": ("on the right", "at the right"),
    "bottom left": ("in the bottom left corner", "at the bottom left"),
    "bottom": ("at the bottom", "near the bottom"),
    "bottom right": ("in the bottom right corner", "at the bottom right"),
}


def describe_object(scene: Scene, subject: str | None = None, size: bool = True) -> str:
    """'large red and white striped star' (or the subject word in place of colour+shape)."""
    words = [scene.size] if size else []
    if subject is not None:
        words.append(subject)
        return " ".join(words)
    if scene.pattern != "solid" and scene.second is not None:
        words += [f"{scene.colour} and {scene.second}", scene.pattern]
    else:
        words.append(scene.colour)
    words.append(scene.shape)
    return " ".join(words)


def caption(scene: Scene, rng: random.Random, subject: str | None = None,
            omit: tuple[str, ...] = ()) -> str:
    """One of several phrasings naming the object, its position and the background (each
    left out when named in `omit`: "size", "position", "background")."""
    thing = describe_object(scene, subject, size="size" not in omit)
    where = rng.choice(_POSITION_WORDS[scene.position])
    bg = scene.background
    has_where, has_bg = "position" not in omit, "background" not in omit
    forms = [f"a {thing}" + (f" {where}" if has_where else "") + (f", {bg} background"
                                                                    if has_bg else "")]
    if has_bg:
        forms.append(f"on {bg}, a {thing}" + (f" {where}" if has_where else ""))
        forms.append(f"a {thing} on a {bg} background" + (f", {where}" if has_where else ""))
    if has_where:
        forms.append(f"{where}, a {thing}" + (f" on {bg}" if has_bg else ""))
    return rng.choice(forms)


def training_example(seed: int, caption_rng: random.Random | None = None) -> tuple[Image.Image,
                                                                                    str]:
    """Training pair `seed`: an image and a caption; one in five captions leaves out one of
    size, position or background, so that the model also learns prompts that say less."""
    scene = scene_for_seed(seed)
    return render(scene), training_caption(scene, caption_rng or random.Random(seed * 7919 + 1))


def training_caption(scene: Scene, rng: random.Random) -> str:
    """A caption as training draws them: one in five leaves out one of size, position or
    background."""
    omit: tuple[str, ...] = ()
    if rng.random() < 0.2:
        omit = (rng.choice(("size", "position", "background")),)
    return caption(scene, rng, omit=omit)


def caption_corpus(count: int = 5000) -> list[str]:
    """The captions of training scenes 0 … count − 1, without rendering them: the prompts a
    user of this world writes, for C⁻¹ (shipped as the model's `captions.txt`)."""
    return [training_caption(scene_for_seed(seed), random.Random(seed * 7919 + 1))
            for seed in range(count)]


HELD_OUT_OFFSET = 10_000_000  # seeds at or above this are never used for training


def held_out_scene(i: int) -> Scene:
    return scene_for_seed(HELD_OUT_OFFSET + i)


def with_changes(scene: Scene, **changes: object) -> Scene:
    return replace(scene, **changes)  # type: ignore[arg-type]
