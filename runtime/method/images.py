"""Training images and loss masks as tensors: decoded once, square-cropped, optionally flipped."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor


def _square(image: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    """Centre crop to a square, then resize to size × size."""
    return ImageOps.fit(image, (size, size), method=resample, centering=(0.5, 0.5))


def load_images(paths: Sequence[Path], size: int, flip: bool) -> Tensor:
    """[N, 3, size, size] in [-1, 1]; with `flip`, the N mirrored images follow: [2N, ...]."""
    rows = []
    for path in paths:
        with Image.open(path) as image:
            rgb = _square(image.convert("RGB"), size, Image.Resampling.BICUBIC)
        rows.append(torch.from_numpy(np.asarray(rgb, dtype=np.float32).copy()))
    pixels = torch.stack(rows).permute(0, 3, 1, 2) / 127.5 - 1.0
    return torch.cat([pixels, pixels.flip(-1)]) if flip else pixels


def load_masks(paths: Sequence[Path], size: int, flip: bool) -> Tensor:
    """[N, 1, size, size] in [0, 1] at latent resolution, in the same order as the images
    (and mirrored the same way), so that mask i weighs the loss of image i."""
    rows = []
    for path in paths:
        with Image.open(path) as image:
            grey = _square(image.convert("L"), size, Image.Resampling.BOX)
        rows.append(torch.from_numpy(np.asarray(grey, dtype=np.float32).copy()) / 255.0)
    masks = torch.stack(rows)[:, None]
    return torch.cat([masks, masks.flip(-1)]) if flip else masks
