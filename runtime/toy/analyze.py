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
PLAIN = 40.0  # border pixels within this colour distance of their median are plain
NEAR_BACKGROUND = 60.0  # the median's farthest distance from a BACKGROUNDS colour
FIRST_CUT = 40.0  # colour distance from the background that counts as object, first pass
ANGLES = (-10.0, -5.0, 0.0, 5.0, 10.0)  # rotations tried when fitting outlines
SLACK = 1.1  # drawn outlines' areas differ from their polygons' by less than this factor
CLIP = 60.0  # colour residuals are clipped here when fitting colours (robust mean)
OUTLIER = 35.0  # a pixel this far from a colour (or more, in noise) is not that colour
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
    shape: str | None  # the best-fitting outline among read()'s `shapes`
    pattern: str | None  # "solid", "striped" or "dotted"
    second: str | None  # the pattern's second colour (None when solid)
    mask: Mask = field(compare=False, repr=False)  # bool [64, 64]: the object


# ------------------------------------------------------------------ reading


def read(image: ImageLike, shapes: tuple[str, ...] = world.SHAPES) -> Reading:
    """The scene attributes that `image` shows, for outlines among `shapes`."""
    if not shapes:
        raise ValueError("read needs at least one shape")
    px = _pixels(image)
    bg, noise, plain = _border(px)
    background = _nearest(bg, world.BACKGROUNDS) if plain else None
    if background is not None and _distance(bg, world.BACKGROUNDS[background]) > NEAR_BACKGROUND:
        background = None
    mask = _object_mask(px, bg, noise) if plain else np.zeros(px.shape[:2], bool)
    if mask.sum() < MIN_AREA:
        return Reading(background, None, None, None, None, None, None, mask)
    colour, pattern, second = _colours(px, mask, noise)
    shape, size, cx, cy = _fit(mask, tuple(shapes))
    return Reading(background, colour, _position(cx, cy, size), size, shape, pattern, second,
                   mask)


def agreement(reading: Reading, scene: world.Scene,
              attributes: Sequence[str] = ("background", "colour", "position", "size", "shape"),
              ) -> dict[str, bool]:
    """Per attribute, whether the reading says what the scene has."""
    return {name: getattr(reading, name) == getattr(scene, name) for name in attributes}


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
    """`mask` with every region of the complement that does not touch the frame added."""
    labels = _labels(~mask)
    edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    outside: Mask = np.isin(labels, edge[edge >= 0])
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
    striped = _along_stripes(minority, ys, xs) >= 0.5
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
                   xs: NDArray[np.int64]) -> float:
    """Of the chosen pixels whose neighbour two steps along the stripes' diagonal
    (x+2, y-2) is in the object, the share whose neighbour is chosen too: ~1 for stripes,
    ~0 for dots (2×2 px on a 6 px grid)."""
    grid = np.full((world.SIZE + 4, world.SIZE + 4), -1, np.int8)
    grid[ys + 2, xs + 2] = chosen
    there = grid[ys[chosen], xs[chosen] + 4]  # (y-2, x+2) in padded coordinates
    there = there[there >= 0]
    return float(there.mean()) if there.size else 0.0


def _primary(a: NDArray[np.bool_], b: NDArray[np.bool_], ys: NDArray[np.int64],
             xs: NDArray[np.int64]) -> bool:
    """Whether end `a` is the fill of a striped object. world draws the second colour where
    (x + y) mod 6 is 2 or 3 and leaves the fill where it is 5 or 0; without that phase (a
    drawn image) the larger end is the fill."""
    phase = (xs + ys) % 6
    fill, stripe = np.isin(phase, (5, 0)), np.isin(phase, (2, 3))
    vote = (a & fill).sum() + (b & stripe).sum() - (b & fill).sum() - (a & stripe).sum()
    if abs(vote) > 0.2 * (fill.sum() + stripe.sum()):
        return bool(vote > 0)
    return bool(a.sum() >= b.sum())


# ------------------------------------------------------------------ outline and position


def _fit(mask: Mask, shapes: tuple[str, ...]) -> tuple[str, str, float, float]:
    """(shape, size, cx, cy): the outline with the best IoU against the mask, centred on the
    mask's centroid, over the sizes and a few rotations; (cx, cy) is its world centre.
    Candidates go by area, closest first, and the search stops once none left can win
    (IoU <= smaller area / larger area, with SLACK for rasterization)."""
    ys, xs = np.nonzero(mask)
    my, mx = ys.mean() + 0.5, xs.mean() + 0.5  # pixel centres
    area = float(mask.sum())
    candidates = sorted((abs(math.log(c.area / area)), c) for c in _candidates(shapes))
    best = (-1.0, candidates[0][1], 0.0, 0.0)
    for gap, c in candidates:
        if math.exp(-gap) * SLACK <= best[0]:
            break
        cx, cy = mx - c.gx, my - c.gy
        drawn = _rasterize([(x + cx, y + cy) for x, y in c.polygon])
        inter = float((drawn & mask).sum())
        iou = inter / (float(drawn.sum()) + area - inter)
        if iou > best[0]:
            best = (iou, c, cx, cy)
    return best[1].shape, best[1].size, best[2], best[3]


@dataclass(frozen=True, order=True)
class _Outline:
    """One candidate: an outline centred on (0, 0), its area and area centroid."""

    shape: str
    size: str
    angle: float
    area: float
    gx: float
    gy: float
    polygon: tuple[tuple[float, float], ...] = field(compare=False)


@functools.cache
def _candidates(shapes: tuple[str, ...]) -> tuple[_Outline, ...]:
    out = []
    for shape, size, angle in itertools.product(shapes, world.SIZES, ANGLES):
        polygon = tuple(world.outline(shape, 0.0, 0.0, world.SIZES[size], angle))
        area, gx, gy = _centroid(polygon)
        out.append(_Outline(shape, size, angle, area, gx, gy, polygon))
    return tuple(out)


def _centroid(polygon: Sequence[tuple[float, float]]) -> tuple[float, float, float]:
    """The area and area centroid of a simple polygon (shoelace)."""
    x = np.asarray([p[0] for p in polygon])
    y = np.asarray([p[1] for p in polygon])
    cross = x * np.roll(y, -1) - np.roll(x, -1) * y
    area = cross.sum() / 2
    return (abs(float(area)), float(((x + np.roll(x, -1)) * cross).sum() / (6 * area)),
            float(((y + np.roll(y, -1)) * cross).sum() / (6 * area)))


def _rasterize(polygon: Sequence[tuple[float, float]]) -> Mask:
    """The pixels whose centres lie inside `polygon` (px coordinates, as world draws)."""
    image = Image.new("L", (world.SIZE, world.SIZE), 0)
    ImageDraw.Draw(image).polygon([(x - 0.5, y - 0.5) for x, y in polygon], fill=1)
    return np.asarray(image, dtype=bool)


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
