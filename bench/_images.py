"""Seeded noise PNGs for the runtime benches (their content does not change the cost)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_images(folder: Path, count: int, side: int, seed: int = 0) -> tuple[Path, ...]:
    """`count` seeded noise PNGs of side × side pixels in `folder`."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(count):
        path = folder / f"{k}.png"
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return tuple(paths)
