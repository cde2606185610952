"""Draws the small training images of the example specs (`specs/images/`), deterministically.

The example specs use the built-in `toy:shapes` model, whose world is coloured circles,
squares and stars on plain backgrounds, so each "photo" here is a few flat shapes: a teddy is
a brown head with two ears, a cat has triangle ears, a mug is a square with a handle and a
star logo. Every image is 64×64 and a few hundred bytes; the only dependency is Pillow.

    python tools/make_example_images.py           # (re)write specs/images/
    python tools/make_example_images.py --check   # exit 1 if the committed files differ

Each picture is drawn from its own seeded random generator, so rerunning the script writes
the same pixels; PNG bytes are the same for the same Pillow and zlib.
"""

from __future__ import annotations

import argparse
import io
import math
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 64
MAX_BYTES = 2048
ROOT = Path(__file__).resolve().parent.parent / "specs" / "images"

RGB = tuple[int, int, int]
# draw(draw, rng, fill) paints one object; `fill` is None for colour, 255 for a mask.
Painter = Callable[[ImageDraw.ImageDraw, random.Random, int | None], None]

BACKGROUNDS: tuple[RGB, ...] = (
    (236, 228, 210), (206, 226, 240), (220, 238, 214), (244, 214, 214), (232, 232, 232),
)


def _colour(fill: int | None, rgb: RGB) -> RGB | int:
    return rgb if fill is None else fill


def _star(cx: float, cy: float, outer: float, inner: float,
          turn: float) -> list[tuple[float, float]]:
    points = []
    for i in range(10):
        radius = outer if i % 2 == 0 else inner
        angle = turn + i * math.pi / 5 - math.pi / 2
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def _circle(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, fill: RGB | int) -> None:
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)


def teddy(draw: ImageDraw.ImageDraw, rng: random.Random, fill: int | None) -> None:
    """A brown head with two round ears and a lighter muzzle."""
    cx, cy, r = 32 + rng.randint(-6, 6), 35 + rng.randint(-4, 4), 15 + rng.randint(-2, 3)
    brown = _colour(fill, (128 + rng.randint(-10, 10), 82, 44))
    for side in (-1, 1):
        _circle(draw, cx + side * r * 0.8, cy - r * 0.8, r * 0.42, brown)
    _circle(draw, cx, cy, r, brown)
    _circle(draw, cx, cy + r * 0.35, r * 0.4, _colour(fill, (214, 176, 130)))


def whiskers(draw: ImageDraw.ImageDraw, rng: random.Random, fill: int | None) -> None:
    """A ginger head with two triangle ears and green eyes."""
    cx, cy, r = 32 + rng.randint(-6, 6), 36 + rng.randint(-4, 4), 14 + rng.randint(-2, 3)
    ginger = _colour(fill, (232, 140 + rng.randint(-12, 12), 48))
    for side in (-1, 1):
        tip = (cx + side * r * 0.75, cy - r * 1.55)
        draw.polygon([(cx + side * r * 0.15, cy - r * 0.7), tip, (cx + side * r, cy - r * 0.2)],
                     fill=ginger)
    _circle(draw, cx, cy, r, ginger)
    for side in (-1, 1):
        _circle(draw, cx + side * r * 0.4, cy - r * 0.15, 2, _colour(fill, (40, 150, 70)))


def pip(draw: ImageDraw.ImageDraw, rng: random.Random, fill: int | None) -> None:
    """A golden head with long floppy ears and a dark nose."""
    cx, cy, r = 32 + rng.randint(-6, 6), 33 + rng.randint(-4, 4), 13 + rng.randint(-1, 3)
    gold = _colour(fill, (218, 170 + rng.randint(-10, 10), 80))
    ear = _colour(fill, (176, 124, 52))
    for side in (-1, 1):
        x = cx + side * r * 0.95
        draw.ellipse((x - r * 0.35, cy - r * 0.6, x + r * 0.35, cy + r * 0.9), fill=ear)
    _circle(draw, cx, cy, r, gold)
    _circle(draw, cx, cy + r * 0.45, 2.5, _colour(fill, (40, 30, 30)))


def mug(draw: ImageDraw.ImageDraw, rng: random.Random, fill: int | None) -> None:
    """A blue square body, a ring handle on the right and a yellow star logo."""
    x, y, w = 18 + rng.randint(-5, 5), 18 + rng.randint(-5, 5), 24 + rng.randint(-2, 4)
    blue = _colour(fill, (40, 90, 200 + rng.randint(-20, 20)))
    draw.ellipse((x + w - 6, y + 5, x + w + 10, y + w - 5), outline=blue, width=4)
    draw.rectangle((x, y, x + w, y + w), fill=blue)
    star = _star(x + w / 2, y + w / 2, w * 0.3, w * 0.13, rng.uniform(-0.3, 0.3))
    draw.polygon(star, fill=_colour(fill, (250, 210, 40)))


def ada(draw: ImageDraw.ImageDraw, rng: random.Random, fill: int | None) -> None:
    """A face with red hair, two eyes and a green square jumper."""
    cx, cy, r = 32 + rng.randint(-5, 5), 26 + rng.randint(-3, 3), 11 + rng.randint(-1, 2)
    jumper = _colour(fill, (60, 150, 90))
    draw.rectangle((cx - r * 1.4, cy + r * 1.1, cx + r * 1.4, SIZE), fill=jumper)
    _circle(draw, cx, cy - r * 0.25, r * 1.2, _colour(fill, (196, 72, 36)))
    _circle(draw, cx, cy + r * 0.1, r, _colour(fill, (242, 204, 170)))
    for side in (-1, 1):
        _circle(draw, cx + side * r * 0.4, cy, 1.5, _colour(fill, (50, 50, 60)))


@dataclass(frozen=True)
class Concept:
    """One example concept: where its pictures go and how to draw them."""

    folder: str
    paint: Painter
    files: tuple[str, ...]
    seed: int
    masks: str | None = None  # sibling folder for loss masks, matched by file stem


CONCEPTS = (
    Concept("teddy", teddy, ("1", "2", "3", "4", "5"), seed=1),
    Concept("whiskers", whiskers, ("1", "2", "3", "4"), seed=2),
    Concept("pip", pip, ("park/1", "park/2", "home/3", "home/4"), seed=3),
    Concept("mug/photos", mug, ("front", "left", "right", "top"), seed=4, masks="mug/masks"),
    Concept("ada", ada, ("1", "2", "3", "4", "5", "6"), seed=5),
)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def draw_pair(concept: Concept, index: int) -> tuple[bytes, bytes]:
    """(photo PNG, mask PNG) of picture `index`; both come from one seeded generator state."""
    seed = concept.seed * 1000 + index
    background = random.Random(seed).choice(BACKGROUNDS)
    photo = Image.new("RGB", (SIZE, SIZE), background)
    concept.paint(ImageDraw.Draw(photo), random.Random(seed), None)
    mask = Image.new("L", (SIZE, SIZE), 0)
    concept.paint(ImageDraw.Draw(mask), random.Random(seed), 255)
    # Flat colours only, so a small palette is lossless and keeps each file tiny.
    return _png(photo.quantize(colors=16, dither=Image.Dither.NONE)), _png(mask.convert("1"))


def images() -> dict[Path, bytes]:
    """Every file the examples need, by path."""
    out: dict[Path, bytes] = {}
    for concept in CONCEPTS:
        for index, name in enumerate(concept.files):
            photo, mask = draw_pair(concept, index)
            out[ROOT / concept.folder / f"{name}.png"] = photo
            if concept.masks:
                out[ROOT / concept.masks / f"{Path(name).name}.png"] = mask
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="compare with the files on disk instead of writing")
    args = parser.parse_args(argv)
    stale = []
    for path, data in sorted(images().items()):
        if len(data) > MAX_BYTES:
            print(f"{path}: {len(data)} bytes, over the {MAX_BYTES}-byte budget", file=sys.stderr)
            return 1
        if args.check:
            if not path.is_file() or path.read_bytes() != data:
                stale.append(path)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        print(f"wrote {path.relative_to(ROOT.parent.parent)} ({len(data)} bytes)")
    for path in stale:
        print(f"differs: {path.relative_to(ROOT.parent.parent)}", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
