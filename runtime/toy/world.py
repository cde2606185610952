"""The toy:shapes world (v2): seeded scenes of one object on a plain background, with captions.

Pure Python and Pillow (no torch): the model trainer, the analyzer, the example images and
the tests all draw from here. Every scene is a function of its seed; captions vary their
phrasing but always name what they say exactly.

An object's outline comes from a family of twelve (circle, polygons, stars, cross, heart,
crescent, arrow, ring) with compositional variants: the number of a star's points, round or
sharp corners, thin or fat, which way a crescent opens or an arrow points. Within a variant
the outline's proportions vary continuously (a star's inner radius, a crescent's thickness),
so that an outline no caption names exactly still sits between outlines the model has seen.
Some outlines and colour/pattern combinations never occur in training (`UNSEEN_FORMS`,
`UNSEEN_COMBINATIONS`): they are the held-out concepts of the benchmarks (docs/toy.md).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

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
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "pentagon", "hexagon",
          "heart", "crescent", "arrow", "ring")
SIZES: dict[str, float] = {"small": 9.0, "medium": 14.0, "large": 20.0}  # radius in px
POSITIONS: dict[str, tuple[int, int]] = {  # (column, row) on a 3×3 grid
    "top left": (0, 0), "top": (1, 0), "top right": (2, 0),
    "left": (0, 1), "center": (1, 1), "right": (2, 1),
    "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2),
}
PATTERNS = ("solid", "striped", "dotted")
FACINGS = ("right", "down", "left", "up")  # clockwise from +x, as y points down
COUNT_WORDS = {3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}
PERIOD = 8  # px: the patterns' period (stripes 4 px of each colour; one dot per 8×8 cell)


@dataclass(frozen=True, order=True)
class Form:
    """An outline variant, as captions name it: the family (`shape`), a star's number of
    `points`, the way a crescent opens or an arrow points (`facing`), and `build`: "thin",
    "fat", "round" (rounded corners) or "" (the family's plain form)."""

    shape: str
    points: int = 0
    facing: str = ""
    build: str = ""

    @property
    def name(self) -> str:
        """The outline's words: "round square", "six pointed star", "thin crescent opening
        left", "arrow pointing up"."""
        words = [self.build] if self.build else []
        if self.points:
            words.append(f"{COUNT_WORDS[self.points]} pointed")
        words.append(self.shape)
        if self.facing:
            words.append(f"{'opening' if self.shape == 'crescent' else 'pointing'} {self.facing}")
        return " ".join(words)


# Each form's continuous parameter (`Scene.depth`): its range in training and in held-out
# scenes. Stars: the inner radius; crosses and arrows: the arm's / shaft's half-width;
# crescents: how far the cut-out disc is moved (larger is fatter); rings: the band's width;
# round polygons: the corners' radius. Ranges of one family leave gaps between builds, so
# that "thin" and "fat" are told apart at 8 px.
_DEPTHS: dict[tuple[str, str], tuple[float, float]] = {
    ("star", ""): (0.36, 0.48), ("cross", ""): (0.26, 0.36), ("arrow", ""): (0.24, 0.34),
    ("crescent", "thin"): (0.25, 0.33), ("crescent", ""): (0.47, 0.55),
    ("crescent", "fat"): (0.7, 0.8),
    ("ring", "thin"): (0.26, 0.32), ("ring", "fat"): (0.45, 0.55),
    ("square", "round"): (0.5, 0.65), ("triangle", "round"): (0.3, 0.4),
}


def depth_range(form: Form) -> tuple[float, float] | None:
    """The range of `form`'s continuous parameter (None: the form has none)."""
    return _DEPTHS.get((form.shape, form.build))


def _forms() -> tuple[Form, ...]:
    out = [Form("circle"), Form("square"), Form("square", build="round"), Form("triangle"),
           Form("triangle", build="round"), Form("diamond"), Form("pentagon"),
           Form("hexagon"), Form("cross"), Form("heart")]
    out += [Form("star", points=n) for n in (4, 5, 6, 7, 8)]
    out += [Form("crescent", facing=f, build=b) for f in FACINGS for b in ("thin", "", "fat")]
    out += [Form("arrow", facing=f) for f in FACINGS]
    out += [Form("ring", build=b) for b in ("thin", "fat")]
    return tuple(out)


FORMS = _forms()  # every outline variant of the world
# Never in the training data (the benchmarks' unseen outlines): a seven pointed star (the
# model sees four, five, six and eight) and a crescent between thin and fat.
UNSEEN_FORMS = (Form("star", points=7), *(Form("crescent", facing=f) for f in FACINGS))
TRAINING_FORMS = tuple(f for f in FORMS if f not in UNSEEN_FORMS)
# (fill, second colour, pattern) never in the training data, on any outline
UNSEEN_COMBINATIONS = (("purple", "yellow", "striped"), ("cyan", "red", "dotted"),
                       ("green", "pink", "dotted"))


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
    points: int = 0  # a star's points (0: five)
    facing: str = ""  # a crescent's opening or an arrow's point ("": right)
    build: str = ""  # "thin", "fat", "round" or ""
    depth: float = 0.0  # the form's continuous parameter (0: the middle of its range)

    @property
    def form(self) -> Form:
        points = (self.points or 5) if self.shape == "star" else 0
        facing = (self.facing or "right") if self.shape in ("crescent", "arrow") else ""
        return Form(self.shape, points, facing, self.build)

    @property
    def outline(self) -> str:
        """The outline's words (`Form.name`): what the analyzer reads as `outline`."""
        return self.form.name


def centre(scene: Scene) -> tuple[float, float]:
    """The object's centre in px: its grid cell's centre, pulled in so it stays whole."""
    col, row = POSITIONS[scene.position]
    r = SIZES[scene.size]
    margin = r + 2
    span = SIZE - 2 * margin
    return (margin + span * col / 2 + scene.dx, margin + span * row / 2 + scene.dy)


def sample_scene(rng: random.Random, forms: tuple[Form, ...] = TRAINING_FORMS,
                 patterned: float = 0.5, combinations_ok: bool = False) -> Scene:
    """A random scene: a family uniformly, then one of its `forms` and a depth in its
    range; the object's colours always differ from each other. Unless `combinations_ok`,
    an UNSEEN_COMBINATIONS pattern is drawn again."""
    families = sorted({f.shape for f in forms})
    shape = rng.choice(families)
    form = rng.choice([f for f in forms if f.shape == shape])
    span = depth_range(form)
    depth = rng.uniform(*span) if span else 0.0
    background = rng.choice(sorted(BACKGROUNDS))
    colour = rng.choice(sorted(COLOURS))
    pattern, second = "solid", None
    if rng.random() < patterned:
        while True:
            pattern = rng.choice(PATTERNS[1:])
            second = rng.choice([c for c in sorted(COLOURS) if c != colour])
            if combinations_ok or (colour, second, pattern) not in UNSEEN_COMBINATIONS:
                break
    return Scene(shape=shape, colour=colour, size=rng.choice(list(SIZES)),
                 position=rng.choice(list(POSITIONS)), background=background,
                 pattern=pattern, second=second, dx=rng.uniform(-2, 2), dy=rng.uniform(-2, 2),
                 angle=rng.uniform(-10, 10), points=form.points, facing=form.facing,
                 build=form.build, depth=depth)


def scene_for_seed(seed: int, forms: tuple[Form, ...] = TRAINING_FORMS) -> Scene:
    return sample_scene(random.Random(seed), forms)


# ------------------------------------------------------------------ drawing

Ring = list[tuple[float, float]]


def outline(scene: Scene | Form, cx: float, cy: float, r: float, angle: float,
            depth: float = 0.0) -> list[Ring]:
    """The outline's polygons in px: the outer boundary first, then its holes (a ring's).
    A Scene brings its own depth; with a Form, `depth` (0: the middle of its range)."""
    form = scene.form if isinstance(scene, Scene) else scene
    if isinstance(scene, Scene):
        depth = scene.depth
    span = depth_range(form)
    if span and not depth:
        depth = sum(span) / 2
    turn = math.radians(angle + 90 * FACINGS.index(form.facing or "right"))
    cos, sin = math.cos(turn), math.sin(turn)
    return [[(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in ring]
            for ring in _unit(form, depth)]


def _unit(form: Form, depth: float) -> list[Ring]:
    """The form in a unit circle, y down, facing right."""
    shape = form.shape
    if shape == "circle":
        return [_circle(48)]
    if shape == "square":
        square = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
        return [_rounded(square, depth * 0.8) if form.build == "round" else square]
    if shape == "triangle":
        triangle = _regular(3)
        return [_rounded(triangle, depth) if form.build == "round" else triangle]
    if shape == "pentagon":
        return [_regular(5)]
    if shape == "hexagon":
        return [_regular(6)]
    if shape == "diamond":
        return [[(0, -1), (0.7, 0), (0, 1), (-0.7, 0)]]
    if shape == "star":
        n = form.points or 5
        return [[((1.0 if i % 2 == 0 else depth) * math.cos(t - math.pi / 2),
                  (1.0 if i % 2 == 0 else depth) * math.sin(t - math.pi / 2))
                 for i, t in enumerate(_angles(2 * n))]]
    if shape == "cross":
        w = depth
        return [[(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1),
                 (-w, w), (-1, w), (-1, -w), (-w, -w)]]
    if shape == "heart":
        pts = [(16 * math.sin(t) ** 3,
                -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)))
               for t in _angles(64)]
        return [[(x / 17, (y + 2) / 17) for x, y in pts]]
    if shape == "crescent":
        return [_crescent(depth)]
    if shape == "arrow":
        w = depth
        return [[(-1, -w), (0.2, -w), (0.2, -0.75), (1, 0), (0.2, 0.75), (0.2, w), (-1, w)]]
    if shape == "ring":
        inner = 1 - depth
        return [_circle(48), [(inner * x, inner * y) for x, y in _circle(48)]]
    raise ValueError(f"unknown shape {shape!r}")


def _circle(n: int) -> Ring:
    return [(math.cos(t), math.sin(t)) for t in _angles(n)]


def _regular(n: int) -> Ring:
    """A regular n-gon inscribed in the unit circle, a corner up."""
    return [(math.cos(t - math.pi / 2), math.sin(t - math.pi / 2)) for t in _angles(n)]


def _rounded(polygon: Ring, radius: float) -> Ring:
    """A convex polygon with each corner replaced by an arc of `radius` tangent to both of
    its edges (so the rounded outline stays inside the sharp one)."""
    out: Ring = []
    n = len(polygon)
    for i in range(n):
        (x, y) = polygon[i]
        ends = []
        for px, py in (polygon[i - 1], polygon[(i + 1) % n]):
            length = math.hypot(px - x, py - y)
            ends.append(((px - x) / length, (py - y) / length))  # unit vectors along edges
        (ax, ay), (bx, by) = ends
        half = math.acos(max(-1.0, min(1.0, ax * bx + ay * by))) / 2  # half the corner
        back = radius / math.tan(half)  # the tangent points' distance from the corner
        sx, sy = ax + bx, ay + by
        norm = math.hypot(sx, sy)
        d = radius / math.sin(half)  # the arc's centre, on the bisector
        ccx, ccy = x + d * sx / norm, y + d * sy / norm
        start = math.atan2(y + back * ay - ccy, x + back * ax - ccx)
        stop = math.atan2(y + back * by - ccy, x + back * bx - ccx)
        sweep = (stop - start + math.pi) % (2 * math.pi) - math.pi  # the short way round
        out += [(ccx + radius * math.cos(start + sweep * k / 6),
                 ccy + radius * math.sin(start + sweep * k / 6)) for k in range(7)]
    return out


def _crescent(offset: float) -> Ring:
    """The unit disc minus a disc of radius 0.85 whose centre is `offset` to the right:
    the crescent opens right, and a larger offset leaves it fatter."""
    inner = 0.85
    # where the two circles cross: x = (1 + offset² − inner²) / (2 offset)
    x = (1 + offset**2 - inner**2) / (2 * offset)
    a = math.acos(max(-1.0, min(1.0, x)))  # on the unit circle
    b = math.atan2(math.sqrt(max(0.0, 1 - x * x)), x - offset)  # on the inner circle
    outer = [(math.cos(t), math.sin(t)) for t in _angles(40, a, 2 * math.pi - a)]
    cut = [(offset + inner * math.cos(t), inner * math.sin(t))
           for t in _angles(40, 2 * math.pi - b, b)]
    return outer + cut


def _angles(n: int, start: float = 0.0, stop: float = 2 * math.pi) -> list[float]:
    closed = math.isclose(abs(stop - start), 2 * math.pi)
    steps = n if closed else n - 1
    return [start + (stop - start) * i / steps for i in range(n)]


def _big_mask(scene: Scene) -> Image.Image:
    """The object's coverage at 4×: 255 inside its outline (less its holes), 0 outside."""
    big = SIZE * _SUPER
    cx, cy = centre(scene)
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    for k, ring in enumerate(outline(scene, cx, cy, SIZES[scene.size], scene.angle)):
        draw.polygon([(x * _SUPER, y * _SUPER) for x, y in ring], fill=0 if k else 255)
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
    """Stripes along (1, −1), PERIOD px apart, half of each colour: pixel (x, y) is the
    second colour where (x + y) mod PERIOD is in 1…3, the fill in 5…7 (0 and 4 mix them).
    Dots: discs of radius 1.8 px at (4 + 8i, 4 + 8j)."""
    assert scene.second is not None
    draw = ImageDraw.Draw(fill)
    colour = COLOURS[scene.second]
    step = PERIOD * _SUPER
    big = fill.width
    if scene.pattern == "striped":
        half = step // 2
        for x in range(-big, 2 * big, step):  # diagonal stripes
            x0 = x + 2  # the second colour's band starts at x + y ≡ 0.5 (mod PERIOD) px
            draw.polygon([(x0, 0), (x0 + half, 0), (x0 + half - big, big), (x0 - big, big)],
                         fill=colour)
    else:
        radius = 1.8 * _SUPER
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


def outline_words(scene: Scene, rng: random.Random | None = None) -> str:
    """The outline as a caption names it (`Form.name`). With `rng`, a five pointed star
    is half the time just a "star", as the v1 world called it, and a thin or fat crescent
    or ring is one time in five just a "crescent" or "ring": so the plain words mean any
    of them, and a crescent between thin and fat has words too."""
    form = scene.form
    if rng is not None and form.points == 5 and rng.random() < 0.5:
        form = replace(form, points=0)
    elif rng is not None and form.build in ("thin", "fat") and rng.random() < 0.2:
        form = replace(form, build="")
    return form.name


def describe_object(scene: Scene, subject: str | None = None, size: bool = True,
                    rng: random.Random | None = None) -> str:
    """'large red and white striped six pointed star' (or the subject word in place of
    colours and outline)."""
    words = [scene.size] if size else []
    if subject is not None:
        words.append(subject)
        return " ".join(words)
    if scene.pattern != "solid" and scene.second is not None:
        words += [f"{scene.colour} and {scene.second}", scene.pattern]
    else:
        words.append(scene.colour)
    words.append(outline_words(scene, rng))
    return " ".join(words)


def caption(scene: Scene, rng: random.Random, subject: str | None = None,
            omit: tuple[str, ...] = ()) -> str:
    """One of several phrasings naming the object, its position and the background (each
    left out when named in `omit`: "size", "position", "background")."""
    thing = describe_object(scene, subject, size="size" not in omit, rng=rng)
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
