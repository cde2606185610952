"""`mask: attention`: per-image masks from the base model's cross-attention."""

from __future__ import annotations

import torch

from perfusion_runtime.method.attention_mask import THRESHOLD, _to_grid, attention_maps, binarise
from perfusion_runtime.method.layers import cross_attention_layers
from perfusion_runtime.method.tiny import tiny_pipeline
from perfusion_runtime.method.tokens import positions
from perfusion_runtime.method.trainer import captions, encode


def test_binarise_is_per_image_not_per_row() -> None:
    grid = torch.zeros(2, 4, 4)
    grid[0, 0, 0] = 10.0  # image 0: one hot spot
    grid[0, 3, :] = 2.0  # a whole row at 20 % of the way to image 0's peak: below it
    grid[1] = 1.0  # image 1: flat
    mask = binarise(grid)
    assert mask.shape == (2, 1, 4, 4)
    assert mask[0, 0].sum() == 1 and mask[0, 0, 0, 0] == 1  # row 3 is not its own max
    assert mask[1].sum() == 16
    assert THRESHOLD > 0.2  # the row above really is below the threshold


def test_binarise_reads_attention_above_its_floor() -> None:
    # attention to a word never falls to 0: a background at 60 % of the peak (as on
    # toy:shapes) must stay out of the mask, which a share of the peak alone would keep
    grid = torch.full((1, 4, 4), 0.6)
    grid[0, 1:3, 1:3] = 1.0  # the object
    grid[0, 0, 0] = 0.75  # a little above the floor, well below the object
    mask = binarise(grid)
    assert mask[0, 0, 1:3, 1:3].all() and mask.sum() == 4


def test_binarise_falls_back_to_whole_image_without_signal() -> None:
    assert torch.equal(binarise(torch.zeros(1, 3, 3)), torch.ones(1, 1, 3, 3))


def test_to_grid_averages_layers_at_latent_size() -> None:
    fine = torch.zeros(1, 16)
    fine[0, 0] = 1.0  # a 4×4 layer, top-left
    coarse = torch.zeros(1, 4)
    coarse[0, 0] = 1.0  # a 2×2 layer, top-left
    grid = _to_grid([fine, coarse], 4)
    assert grid.shape == (1, 4, 4)
    assert grid[0, 0, 0] == grid.max() and grid[0, 3, 3] == grid.min()


def test_attention_masks_on_a_real_pipeline_leave_it_as_found() -> None:
    pipe = tiny_pipeline(0)
    before = {n: a.processor for n, a in cross_attention_layers(pipe.unet).items()}
    hidden, ids = encode(pipe, [captions("a photo of a {}", "teddy bear", ())])
    word = pipe.tokenizer("teddy bear", add_special_tokens=False).input_ids
    hit = positions(ids, torch.tensor(word))
    assert hit.sum() == len(word)
    latents = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    masks = binarise(attention_maps(pipe, latents, hidden, hit, torch.Generator().manual_seed(1)))
    assert masks.shape == (3, 1, 4, 4)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert all(masks[i].sum() > 0 for i in range(3))
    after = {n: a.processor for n, a in cross_attention_layers(pipe.unet).items()}
    assert after == before
