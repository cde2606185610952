"""Reads toy:shapes images back into scene attributes, and scores concept fidelity."""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw

from . import world

ImageLike = Image.Image | NDArray[Any]
Mask = NDArray[np.bool_]
Pixels = NDArray[np.float64]

BORDER = 3  # px: the frame whose median colour is the background
MIN_AREA = 10  # px: smaller masks are no object
HOLE = 12  # px: enclosed background regions this large are holes of the outline (a ring's)
PLAIN = 40.0  # border pixels within this colour distance of their median are plain
NEAR_BACKGROUND = 60.0  # the median's farthest distance from a BACKGROUNDS colour
FIRST_CUT = 40.0  # colour distance from the background that counts as object, first pass
ANGLES = (-10.0, -5.0, 0.0, 5.0, 10.0)  # rotations tried when fitting outlines
SLACK = 1.1  # drawn outlines' areas differ from their polygons' by less than this factor
CLIP = 60.0  # colour residuals are clipped here when fitting colours (robust mean)
OUTLIER = 35.0  # a pixel this far from a colour (or more, in noise) is not that colour
FEW_PAIRS = 10  # fewer pixel pairs than this along the stripes: the layout decides (_on_dots)
MINOR = 0.04  # the share of the object's pixels that a pattern's colour needs
NOISY = 35.0  # border noise above which the mask is found in a smoothed image
SIGMA = 30.0  # colour kernel width in fidelity
CANVAS = 64  # side of the normalised masks in fidelity
NORM_SIDE = 18.0  # sqrt(area) of a normalised mask, px
FIT_ANGLES = tuple(range(-20, 21, 5))  # relative rotations tried in fidelity
IOU_FLOOR = 0.6  # normalised IoU that different shapes reach by overlap alone (measured ~0.56)


@dataclass(frozen=True)
class Reading:
    """What the analyzer sees in one image (None: not seen)."""

    background: str | None  # nearest BACKGROUNDS entry to the frame's median; None: not plain
    colour: str | None  # the object's (fill) colour, a COLOURS name; None: no object
    position: str | None  # a POSITIONS name, from the fitted outline's centre
    size: str | None  # a SIZES name, fitted together with the shape
    shape: str | None  # the best-fitting outline's family (a world.SHAPES name)
    pattern: str | None  # "solid", "striped" or "dotted"
    second: str | None  # the pattern's second colour (None when solid)
    outline: str | None  # the best-fitting outline among read()'s `forms` (world.Form.name)
    mask: Mask = field(compare=False, repr=False)  # bool [64, 64]: the object


# ------------------------------------------------------------------ reading


def read(image: ImageLike, forms: tuple[world.Form, ...] = world.FORMS) -> Reading:
    """The scene attributes that `image` shows, for outlines among `forms`."""
    if not forms:
        raise ValueError("read needs at least one outline form")
    px = _pixels(image)
    bg, noise, plain = _border(px)
    background = _nearest(bg, world.BACKGROUNDS) if plain else None
    if background is not None and _distance(bg, world.BACKGROUNDS[background]) > NEAR_BACKGROUND:
        background = None
    mask = _object_mask(px, bg, noise) if plain else np.zeros(px.shape[:2], bool)
    if mask.sum() < MIN_AREA:
        return Reading(background, None, None, None, None, None, None, None, mask)
    colour, pattern, second = _colours(px, mask, noise)
    form, size, cx, cy = _fit(mask, tuple(forms))
    return Reading(background, colour, _position(cx, cy, size), size, form.shape, pattern,
                   second, form.name, mask)


def agreement(reading: Reading, scene: world.Scene,
              attributes: Sequence[str] = ("background", "colour", "position", "size", "shape"),
              ) -> dict[str, bool]:
    """Per attribute, whether the reading says what the scene has.

    A striped object's two colours cover equal areas, so which one is the "fill" is only
    the phase of the stripes on the pixel grid, which nothing in a caption says and a
    drawing may shift by half a period (docs/toy.md, "Reading"). When scene and reading
    are both striped, colour and second are therefore matched the way round that agrees
    on more of the two (the caption's order on a tie)."""
    read = {name: getattr(reading, name) for name in attributes}
    if scene.pattern == "striped" and reading.pattern == "striped":
        ordered = (reading.colour == scene.colour) + (reading.second == scene.second)
        swapped = (reading.colour == scene.second) + (reading.second == scene.colour)
        if swapped > ordered:
            read.update((name, {"colour": reading.second, "second": reading.colour}[name])
                        for name in ("colour", "second") if name in read)
    return {name: read[name] == getattr(scene, name) for name in attributes}


def _pixels(image: ImageLike) -> Pixels:
    """The image as float RGB [64, 64, 3] in 0..255."""
    if isinstance(image, np.ndarray):
        array = np.asarray(image, dtype=np.float64)
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=2)
        if image.dtype.kind == "f" and array.max() <= 1.0:
            array = array * 255.0
        image = Image.fromarray(np.clip(array[..., :3], 0, 255).round().astype(np.uint8))
    image = image.convert("RGB")
    if image.size != (world.SIZE, world.SIZE):
        image = image.resize((world.SIZE, world.SIZE), Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.float64)


def _border(px: Pixels) -> tuple[Pixels, float, bool]:
    """The outer frame's median colour, its noise (about the 90th percentile of the pixels'
    distance from the median, as 1.6 × the median distance: an object may cover part of
    the frame) and whether it is plain (mostly within PLAIN of the median)."""
    frame = np.ones(px.shape[:2], bool)
    frame[BORDER:-BORDER, BORDER:-BORDER] = False
    border = px[frame]
    median = np.median(border, axis=0)
    spread = np.linalg.norm(border - median, axis=1)
    return median, 1.6 * float(np.median(spread)), bool((spread <= PLAIN).mean() >= 0.5)


def _nearest(colour: Pixels, table: dict[str, tuple[int, int, int]]) -> str:
    return min(table, key=lambda name: _distance(colour, table[name]))


def _distance(a: Pixels, b: tuple[int, int, int]) -> float:
    return float(np.linalg.norm(a - np.asarray(b, dtype=np.float64)))


# ------------------------------------------------------------------ the object mask


def _object_mask(px: Pixels, bg: Pixels, noise: float) -> Mask:
    """The object: pixels far from the background, bridged, largest component, holes
    filled. The cut is half the object's weaker contrast (edges sit where coverage is one
    half), and above the noise; a noisy image is smoothed (3×3 box) first."""
    if noise > NOISY:
        px = _box(px)
        noise = _border(px)[1]
    contrast = np.linalg.norm(px - bg, axis=2)
    floor = max(FIRST_CUT, 1.5 * noise)
    first = _whole(contrast > floor)
    inner = _erode(first) & (contrast > floor)
    if inner.sum() < MIN_AREA:
        return first
    cut = max(0.5 * float(np.percentile(contrast[inner], 10)), 20.0, 1.5 * noise)
    return _whole(contrast > cut)


def _box(px: Pixels) -> Pixels:
    """The 3×3 mean of each pixel (edges repeated)."""
    p = np.pad(px, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = px.shape[:2]
    return np.asarray(sum(p[i:i + h, j:j + w] for i in range(3) for j in range(3))) / 9.0


def _whole(mask: Mask) -> Mask:
    return _fill_holes(_largest(mask | _gaps(mask)))


def _gaps(mask: Mask) -> Mask:
    """Pixels outside `mask` between two of its pixels (opposite neighbours): the lines where
    two pattern colours mix into the background's colour (red and cyan on gray)."""
    p = np.pad(mask, 1)
    across = ((p[:-2, 1:-1] & p[2:, 1:-1]) | (p[1:-1, :-2] & p[1:-1, 2:])
              | (p[:-2, :-2] & p[2:, 2:]) | (p[:-2, 2:] & p[2:, :-2]))
    return ~mask & across


def _labels(mask: Mask) -> NDArray[np.int64]:
    """Connected components (4-neighbour): each pixel of `mask` gets its component's
    smallest flat index; the rest get -1. Min-propagation with pointer jumping."""
    n = mask.size
    labels = np.where(mask.ravel(), np.arange(n), n).reshape(mask.shape)
    while True:
        padded = np.pad(labels, 1, constant_values=n)
        low = np.minimum.reduce([labels, padded[:-2, 1:-1], padded[2:, 1:-1],
                                 padded[1:-1, :-2], padded[1:-1, 2:]])
        low = np.where(mask, low, n)
        flat = np.append(low.ravel(), n)
        low = np.where(mask, flat[flat[low]], n)  # jump twice along the label chain
        if np.array_equal(low, labels):
            return np.where(mask, labels, -1)
        labels = low


def _largest(mask: Mask) -> Mask:
    """The largest 4-connected component of `mask` (ties: the first in raster order)."""
    if not mask.any():
        return mask
    labels = _labels(mask)
    counts = np.bincount(labels[mask])
    largest: Mask = labels == int(np.argmax(counts))
    return largest


def _fill_holes(mask: Mask) -> Mask:
    """`mask` with every region of the complement that does not touch the frame and is
    smaller than HOLE px added: specks inside a pattern, not the hole of a ring."""
    labels = _labels(~mask)
    edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    counts = np.bincount(labels[labels >= 0], minlength=mask.size)
    outside: Mask = np.isin(labels, edge[edge >= 0]) | ((labels >= 0) & (counts[labels] >= HOLE))
    return ~outside


def _dilate(mask: Mask) -> Mask:
    """`mask` grown by one pixel (4-neighbour)."""
    padded = np.pad(mask, 1)
    grown: Mask = (mask | padded[:-2, 1:-1] | padded[2:, 1:-1]
                   | padded[1:-1, :-2] | padded[1:-1, 2:])
    return grown


def _erode(mask: Mask) -> Mask:
    padded = np.pad(mask, 1)
    eroded: Mask = (mask & padded[:-2, 1:-1] & padded[2:, 1:-1]
                    & padded[1:-1, :-2] & padded[1:-1, 2:])
    return eroded


# ------------------------------------------------------------------ colours and pattern


def _interior(px: Pixels, mask: Mask) -> tuple[Pixels, NDArray[np.int64], NDArray[np.int64]]:
    """The object's pixels away from its edge (all of them when it is too thin): colours
    and their (y, x) coordinates."""
    inner = _erode(mask)
    chosen = inner if inner.sum() >= MIN_AREA else mask
    ys, xs = np.nonzero(chosen)
    return px[ys, xs], ys, xs


def _colours(px: Pixels, mask: Mask, noise: float) -> tuple[str, str, str | None]:
    """(colour, pattern, second): the COLOURS entry nearest to most pixels, or, when some
    pixels are far from it, the pair whose segment explains the pixels best (a pattern,
    with edges that mix the two) if each end holds at least MINOR of the pixels."""
    pixels, ys, xs = _interior(px, mask)
    names = sorted(world.COLOURS)
    table = np.asarray([world.COLOURS[n] for n in names], dtype=np.float64)
    distances = np.linalg.norm(pixels[:, None] - table[None], axis=2)
    best = int(np.argmin(np.minimum(distances, CLIP).mean(0)))
    reach = max(OUTLIER, 1.2 * noise)
    pair = _best_pair(pixels, table)
    if pair is None or (distances[:, best] > reach).mean() < MINOR:
        return names[best], "solid", None
    i, j, t, residual = pair
    fits = residual <= reach
    a, b = (t < 0.3) & fits, (t > 0.7) & fits
    if min(a.mean(), b.mean()) < MINOR:
        return names[best], "solid", None
    minority = a if a.sum() < b.sum() else b
    share, pairs = _along_stripes(minority, ys, xs)
    striped = share >= 0.5
    if pairs < FEW_PAIRS:  # a thin object (a small ring's band): too few pixels to tell
        striped = _on_dots(minority, ys, xs) < 0.7
    first = _primary(a, b, ys, xs) if striped else a.sum() >= b.sum()
    colour, second = (names[i], names[j]) if first else (names[j], names[i])
    return colour, "striped" if striped else "dotted", second


def _best_pair(pixels: Pixels, table: Pixels) -> tuple[int, int, Pixels, Pixels] | None:
    """The pair of colours whose segment fits the pixels best (robust mean distance):
    (i, j, each pixel's position t along i→j, its distance from the segment)."""
    best: tuple[float, int, int, Pixels, Pixels] | None = None
    for i, j in itertools.combinations(range(len(table)), 2):
        step = table[j] - table[i]
        t = np.clip((pixels - table[i]) @ step / float(step @ step), 0.0, 1.0)
        residual = np.linalg.norm(pixels - (table[i] + t[:, None] * step), axis=1)
        cost = float(np.minimum(residual, CLIP).mean())
        if best is None or cost < best[0]:
            best = (cost, i, j, t, residual)
    return None if best is None else best[1:]


def _along_stripes(chosen: NDArray[np.bool_], ys: NDArray[np.int64],
                   xs: NDArray[np.int64]) -> tuple[float, int]:
    """Of the chosen pixels whose neighbour three steps along the stripes' diagonal
    (x+3, y-3) is in the object, the share whose neighbour is chosen too: ~1 for stripes,
    ~0 for dots (discs 3.6 px across on an 8 px grid); and how many pixels that share is
    of."""
    grid = np.full((world.SIZE + 6, world.SIZE + 6), -1, np.int8)
    grid[ys + 3, xs + 3] = chosen
    there = grid[ys[chosen], xs[chosen] + 6]  # (y-3, x+3) in padded coordinates
    there = there[there >= 0]
    return (float(there.mean()) if there.size else 0.0), int(there.size)


def _on_dots(chosen: NDArray[np.bool_], ys: NDArray[np.int64], xs: NDArray[np.int64]) -> float:
    """The share of the chosen pixels in the cells where world draws dots (x and y mod 8 in
    2…5): about 1 for a dotted object's dots, about a quarter for a stripe."""
    near = np.isin(xs % world.PERIOD, (2, 3, 4, 5)) & np.isin(ys % world.PERIOD, (2, 3, 4, 5))
    return float(near[chosen].mean()) if chosen.any() else 0.0


def _primary(a: NDArray[np.bool_], b: NDArray[np.bool_], ys: NDArray[np.int64],
             xs: NDArray[np.int64]) -> bool:
    """Whether end `a` is the fill of a striped object. world draws the second colour where
    (x + y) mod 8 is 1…3 and leaves the fill where it is 5…7; without that phase (a drawn
    image) the larger end is the fill."""
    phase = (xs + ys) % world.PERIOD
    fill, stripe = np.isin(phase, (5, 6, 7)), np.isin(phase, (1, 2, 3))
    vote = (a & fill).sum() + (b & stripe).sum() - (b & fill).sum() - (a & stripe).sum()
    if abs(vote) > 0.2 * (fill.sum() + stripe.sum()):
        return bool(vote > 0)
    return bool(a.sum() >= b.sum())


# ------------------------------------------------------------------ outline and position


def _fit(mask: Mask, forms: tuple[world.Form, ...]) -> tuple[world.Form, str, float, float]:
    """(form, size, cx, cy): the outline with the best IoU against the mask, centred on the
    mask's centroid, over the sizes, a few rotations and depths; (cx, cy) is its world
    centre. Candidates go by area, closest first, and the search stops once none left can
    win (IoU <= smaller area / larger area, with SLACK for rasterization)."""
    ys, xs = np.nonzero(mask)
    my, mx = ys.mean() + 0.5, xs.mean() + 0.5  # pixel centres
    area = float(mask.sum())
    candidates = sorted((abs(math.log(c.area / area)), c) for c in _candidates(forms))

    def iou(c: _Outline, cx: float, cy: float) -> float:
        drawn = _rasterize([[(x + cx, y + cy) for x, y in ring] for ring in c.rings])
        inter = float((drawn & mask).sum())
        return inter / (float(drawn.sum()) + area - inter)

    scored: list[tuple[float, _Outline]] = []
    for gap, c in candidates:
        if scored and math.exp(-gap) * SLACK <= max(scored)[0]:
            break
        scored.append((iou(c, mx - c.gx, my - c.gy), c))
    # The centroids agree only to a fraction of a pixel, which costs thin outlines (a ring's
    # band, a star's points) much of their IoU: the best few are tried at half-pixel shifts.
    # Likewise sharp corners between the tried rotations: those are tried ±2.5° turned.
    best = (-1.0, scored[0][1], 0.0, 0.0)
    for _, first in sorted(scored, reverse=True)[:REFINE]:
        for c in (first, _turned(first, -2.5), _turned(first, 2.5)):
            for sx, sy in itertools.product((-0.5, 0.0, 0.5), repeat=2):
                cx, cy = mx - c.gx + sx, my - c.gy + sy
                score = iou(c, cx, cy)
                if score > best[0]:
                    best = (score, c, cx, cy)
    return best[1].form, best[1].size, best[2], best[3]


def _turned(c: _Outline, by: float) -> _Outline:
    return _outline(c.form, c.size, c.angle + by, c.depth)


@dataclass(frozen=True, order=True)
class _Outline:
    """One candidate: an outline centred on (0, 0), its area and area centroid."""

    form: world.Form
    size: str
    angle: float
    depth: float
    area: float
    gx: float
    gy: float
    rings: tuple[tuple[tuple[float, float], ...], ...] = field(compare=False)


RASTER = 2  # supersampling of candidate outlines in _rasterize
REFINE = 6  # candidates refined at sub-pixel shifts in _fit
DEPTH_STEPS = 3  # depths tried per form with a range: its ends and middle


@functools.cache
def _candidates(forms: tuple[world.Form, ...]) -> tuple[_Outline, ...]:
    out = []
    for form, size, angle in itertools.product(forms, world.SIZES, ANGLES):
        span = world.depth_range(form)
        depths = ([span[0] + (span[1] - span[0]) * k / (DEPTH_STEPS - 1)
                   for k in range(DEPTH_STEPS)] if span else [0.0])
        out += [_outline(form, size, angle, depth) for depth in depths]
    return tuple(out)


def _outline(form: world.Form, size: str, angle: float, depth: float) -> _Outline:
    rings = world.outline(form, 0.0, 0.0, world.SIZES[size], angle, depth)
    area, gx, gy = _area_centroid(rings)
    return _Outline(form, size, angle, depth, area, gx, gy, tuple(tuple(r) for r in rings))


def _area_centroid(rings: Sequence[Sequence[tuple[float, float]]]
                   ) -> tuple[float, float, float]:
    """The area and area centroid of an outline with holes (the first ring less the rest)."""
    parts = [_centroid(ring) for ring in rings]
    signs = [1.0] + [-1.0] * (len(parts) - 1)
    area = sum(s * a for s, (a, _, _) in zip(signs, parts, strict=True))
    gx = sum(s * a * x for s, (a, x, _) in zip(signs, parts, strict=True)) / area
    gy = sum(s * a * y for s, (a, _, y) in zip(signs, parts, strict=True)) / area
    return area, gx, gy


def _centroid(polygon: Sequence[tuple[float, float]]) -> tuple[float, float, float]:
    """The area and area centroid of a simple polygon (shoelace)."""
    x = np.asarray([p[0] for p in polygon])
    y = np.asarray([p[1] for p in polygon])
    cross = x * np.roll(y, -1) - np.roll(x, -1) * y
    area = cross.sum() / 2
    return (abs(float(area)), float(((x + np.roll(x, -1)) * cross).sum() / (6 * area)),
            float(((y + np.roll(y, -1)) * cross).sum() / (6 * area)))


def _rasterize(rings: Sequence[Sequence[tuple[float, float]]]) -> Mask:
    """The pixels at least half covered by the outline (the first ring less the others; px
    coordinates, as world draws): drawn at RASTER× and box-filtered, as the object mask is
    cut where coverage is one half. (Pillow's polygon fill at 1× also fills every pixel its
    edges touch, which made every outline about a pixel too wide and favoured rounded and
    smaller forms.)"""
    side = world.SIZE * RASTER
    image = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(image)
    for k, ring in enumerate(rings):
        draw.polygon([(x * RASTER - 0.5, y * RASTER - 0.5) for x, y in ring],
                     fill=0 if k else 255)
    small = image.resize((world.SIZE, world.SIZE), Image.Resampling.BOX)
    return np.asarray(small) >= 128


def _position(cx: float, cy: float, size: str) -> str:
    """The grid cell whose world.centre (for the read size, without jitter) is nearest to
    the fitted outline's centre. Medium cells' boundaries (23.5, 40.5 px) would leave a
    large object 0.5 px from the wrong cell at full jitter; these leave it 3.5 px."""
    col, row = _cell(cx, size), _cell(cy, size)
    return next(name for name, cell in world.POSITIONS.items() if cell == (col, row))


def _cell(v: float, size: str) -> int:
    margin = world.SIZES[size] + 2
    span = world.SIZE - 2 * margin
    return min(range(3), key=lambda k: abs(v - (margin + span * k / 2)))


# ------------------------------------------------------------------ fidelity


def fidelity(image: ImageLike, references: Sequence[ImageLike]) -> float:
    """Concept fidelity in [0, 1]: how much the object in `image` looks like the object in
    the references, wherever it is, however big, on whatever background.

    fidelity = mean over references of (shape + colour) / 2, where
      shape  = clip((IoU - 0.6) / 0.4, 0, 1), IoU the best soft IoU (sum of minima / sum of
               maxima), over relative rotations of -20..20° in 5° steps, of the two objects'
               coverage maps, each centred on its centroid and scaled to a sqrt(area) of
               18 px (0.6: about what two different shapes overlap once so aligned);
      colour = K(A, B) / sqrt(K(A, A) K(B, B)), A and B the objects' interior pixel colours
               (up to ~300 each) and K(A, B) the mean of exp(-|a - b|² / (2 · 30²)) over all
               pairs: the cosine similarity of kernel mean embeddings, 1 for equal mixes.
    An image without an object scores 0 against every reference.
    """
    if not references:
        raise ValueError("fidelity needs at least one reference image")
    mine = _concept(image)
    return float(np.mean([_similarity(mine, _concept(ref)) for ref in references]))


@dataclass(frozen=True)
class _Concept:
    """An object as fidelity compares it: its normalised alpha at each of FIT_ANGLES, and a
    sample of its interior colours."""

    turned: tuple[NDArray[np.float64], ...]
    colours: Pixels


def _concept(image: ImageLike) -> _Concept | None:
    px = _pixels(image)
    bg, noise, plain = _border(px)
    mask = _object_mask(px, bg, noise) if plain else np.zeros(px.shape[:2], bool)
    if mask.sum() < MIN_AREA:
        return None
    alpha = _alpha(px, bg, mask)
    pixels = _interior(px, mask)[0]
    stride = max(1, len(pixels) // 300)
    return _Concept(tuple(_normalised(alpha, float(a)) for a in FIT_ANGLES), pixels[::stride])


def _alpha(px: Pixels, bg: Pixels, mask: Mask) -> NDArray[np.float64]:
    """The object's coverage of each pixel: 1 inside, contrast / the object's median
    contrast on the edge band (the mask's edge and the ring around it), 0 elsewhere."""
    contrast = np.linalg.norm(px - bg, axis=2)
    inner = _erode(mask)
    full = float(np.median(contrast[inner if inner.any() else mask]))
    ring = _dilate(mask)
    edge = np.clip(contrast / max(full, 1.0), 0.0, 1.0)
    return np.where(inner, 1.0, np.where(ring, edge, 0.0))


def _similarity(a: _Concept | None, b: _Concept | None) -> float:
    if a is None or b is None:
        return 0.0
    fixed = a.turned[FIT_ANGLES.index(0)]
    iou = max(float(np.minimum(fixed, t).sum() / np.maximum(fixed, t).sum()) for t in b.turned)
    shape = float(np.clip((iou - IOU_FLOOR) / (1 - IOU_FLOOR), 0, 1))
    colour = _kernel(a.colours, b.colours) / math.sqrt(
        _kernel(a.colours, a.colours) * _kernel(b.colours, b.colours))
    return (shape + colour) / 2


def _kernel(a: Pixels, b: Pixels) -> float:
    squared = ((a[:, None] - b[None]) ** 2).sum(axis=2)
    return float(np.exp(-squared / (2 * SIGMA**2)).mean())


def _normalised(alpha: NDArray[np.float64], angle: float) -> NDArray[np.float64]:
    """`alpha` resampled (bilinear) onto a CANVAS² grid: its centroid in the middle, its
    sqrt(area) NORM_SIDE px, turned by `angle` degrees."""
    ys, xs = np.mgrid[0:alpha.shape[0], 0:alpha.shape[1]]
    total = float(alpha.sum())
    cx, cy = float((alpha * xs).sum()) / total, float((alpha * ys).sum()) / total
    scale = math.sqrt(total) / NORM_SIDE  # source px per canvas px
    v, u = np.mgrid[0:CANVAS, 0:CANVAS] + 0.5 - CANVAS / 2
    a = math.radians(angle)
    sx = cx + scale * (u * math.cos(a) - v * math.sin(a))
    sy = cy + scale * (u * math.sin(a) + v * math.cos(a))
    return _bilinear(alpha, sx, sy)


def _bilinear(image: NDArray[np.float64], x: NDArray[np.float64],
              y: NDArray[np.float64]) -> NDArray[np.float64]:
    """`image` sampled at (x, y) (pixel indices, zero outside)."""
    padded = np.pad(image, 1)
    x = np.clip(x + 1, 0, padded.shape[1] - 1.001)
    y = np.clip(y + 1, 0, padded.shape[0] - 1.001)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = x - x0, y - y0
    top = padded[y0, x0] * (1 - fx) + padded[y0, x0 + 1] * fx
    bottom = padded[y0 + 1, x0] * (1 - fx) + padded[y0 + 1, x0 + 1] * fx
    return np.asarray(top * (1 - fy) + bottom * fy)
