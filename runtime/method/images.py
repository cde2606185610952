"""Training images and loss masks as tensors: decoded once, square-cropped, optionally flipped."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor


def _square(image: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    """Centre crop to a square, then resize to size × size."""
    return ImageOps.fit(image, (size, size), method=resample, centering=(0.5, 0.5))


class InputChanged(RuntimeError):
    """A training input's bytes are not those the run was planned (and keyed) with."""


def _opened(path: Path, digest: str | None) -> Image.Image:
    """The image at `path`, decoded from bytes read once and, given `digest`, checked to be
    the bytes the cache key was computed from: a file edited during the run would otherwise
    publish a concept under a key it does not match."""
    with open(path, "rb") as handle:
        data = handle.read()
    if digest is not None and (actual := hashlib.sha256(data).hexdigest()) != digest:
        raise InputChanged(f"{path} changed during the run (sha256 {digest[:12]}… when the "
                           f"run was planned, {actual[:12]}… now); nothing was trained from "
                           "it: run again to plan with the file as it is")
    return Image.open(io.BytesIO(data))


def load_images(paths: Sequence[Path], size: int, flip: bool,
                digests: Sequence[str] | None = None) -> Tensor:
    """[N, 3, size, size] in [-1, 1]; with `flip`, the N mirrored images follow: [2N, ...].
    `digests`: the sha256 each file's bytes must have (InputChanged otherwise)."""
    rows = []
    for i, path in enumerate(paths):
        with _opened(path, None if digests is None else digests[i]) as image:
            rgb = _square(image.convert("RGB"), size, Image.Resampling.BICUBIC)
        rows.append(torch.from_numpy(np.asarray(rgb, dtype=np.float32).copy()))
    pixels = torch.stack(rows).permute(0, 3, 1, 2) / 127.5 - 1.0
    return torch.cat([pixels, pixels.flip(-1)]) if flip else pixels


def load_masks(paths: Sequence[Path], size: int, flip: bool,
               digests: Sequence[str] | None = None) -> Tensor:
    """[N, 1, size, size] in [0, 1] at latent resolution, in the same order as the images
    (and mirrored the same way), so that mask i weighs the loss of image i."""
    rows = []
    for i, path in enumerate(paths):
        with _opened(path, None if digests is None else digests[i]) as image:
            grey = _square(image.convert("L"), size, Image.Resampling.BOX)
        rows.append(torch.from_numpy(np.asarray(grey, dtype=np.float32).copy()) / 255.0)
    masks = torch.stack(rows)[:, None]
    return torch.cat([masks, masks.flip(-1)]) if flip else masks
