"""A small line plot in Pillow (no plotting library is a dependency): series of (x, y)
points, each point optionally labelled, axes with ticks, a legend."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (127, 127, 127),
           (255, 127, 14), (23, 190, 207), (140, 86, 75)]
Series = tuple[str, Sequence[tuple[float, float]], Sequence[str]]


def _ticks(low: float, high: float) -> list[float]:
    span = max(high - low, 1e-9)
    step = min((s for s in (0.01, 0.02, 0.05, 0.1, 0.2, 0.25, 0.5, 1.0) if span / s <= 8),
               default=1.0)
    first = step * round(low / step + 0.4999)
    return [round(first + k * step, 6) for k in range(int((high - first) / step + 1e-9) + 1)]


def line_plot(series: Sequence[Series], path: Path, *, x_label: str, y_label: str,
              title: str, size: tuple[int, int] = (820, 560)) -> None:
    """Write a PNG: each series a coloured line through its points, labels beside them."""
    width, height = size
    left, right, top, bottom = 70, 250, 40, 60
    xs = [x for _, pts, _ in series for x, _ in pts]
    ys = [y for _, pts, _ in series for _, y in pts]
    pad_x, pad_y = max((max(xs) - min(xs)) * 0.08, 0.02), max((max(ys) - min(ys)) * 0.08, 0.02)
    x0, x1 = min(xs) - pad_x, max(xs) + pad_x
    y0, y1 = min(ys) - pad_y, max(ys) + pad_y
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (width - left - right),
                top + (y1 - y) / (y1 - y0) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline=(0, 0, 0))
    for tx in _ticks(x0, x1):
        px, _ = at(tx, y0)
        draw.line([px, height - bottom, px, height - bottom + 5], fill=(0, 0, 0))
        draw.text((px - 12, height - bottom + 8), f"{tx:g}", fill=(0, 0, 0), font=font)
    for ty in _ticks(y0, y1):
        _, py = at(x0, ty)
        draw.line([left - 5, py, left, py], fill=(0, 0, 0))
        draw.text((left - 40, py - 6), f"{ty:g}", fill=(0, 0, 0), font=font)
    draw.text((left, 12), title, fill=(0, 0, 0), font=font)
    draw.text(((width - right + left) / 2 - 120, height - 25), x_label, fill=(0, 0, 0), font=font)
    draw.text((8, top - 22), y_label, fill=(0, 0, 0), font=font)
    for k, (name, points, labels) in enumerate(series):
        colour = COLOURS[k % len(COLOURS)]
        pixels = [at(x, y) for x, y in points]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        for i, (px, py) in enumerate(pixels):
            draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=colour)
            if i < len(labels):
                draw.text((px + 6, py - 12), labels[i], fill=colour, font=font)
        ly = top + 10 + 22 * k
        draw.line([width - right + 15, ly + 6, width - right + 40, ly + 6], fill=colour, width=3)
        draw.text((width - right + 46, ly), name, fill=(0, 0, 0), font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
