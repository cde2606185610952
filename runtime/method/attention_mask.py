"""`mask: attention`: loss masks from the base model's cross-attention to the supercategory."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .layers import cross_attention_layers
from .noise import schedule

NOISE_LEVEL = 0.5  # the timestep, as a fraction of the schedule, at which attention is read
# a latent pixel is in the mask where its attention is at least half-way from the image's
# least to its most: attention to a word never falls to 0 (softmax over every token), and
# on toy:shapes its floor was 37-69 % of the peak, so a share of the peak kept whole images
# (docs/runtime.md, "Training")
THRESHOLD = 0.5


class _Capture:
    """A cross-attention processor that computes attention as diffusers' AttnProcessor does
    and keeps, per layer, the probability mass on the given text positions."""

    def __init__(self, hit: Tensor) -> None:
        self.hit = hit  # [B, T] bool: the supercategory's positions
        self.maps: list[Tensor] = []  # per layer: [B, Q]

    def __call__(self, attn: Any, hidden_states: Tensor,
                 encoder_hidden_states: Tensor | None = None, attention_mask: Tensor | None = None,
                 temb: Tensor | None = None, **kwargs: Any) -> Tensor:
        assert encoder_hidden_states is not None
        batch = hidden_states.shape[0]
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, None)  # [B·heads, Q, T]
        per_head = probs.view(batch, attn.heads, *probs.shape[1:]).mean(1)  # [B, Q, T]
        self.maps.append((per_head * self.hit[:, None, :]).sum(-1).float())
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        result: Tensor = attn.to_out[1](attn.to_out[0](out))
        return result


def _to_grid(maps: Sequence[Tensor], size: int) -> Tensor:
    """Mean over layers of each layer's square map, resized to size × size: [B, size, size]."""
    grids = []
    for m in maps:
        side = round(m.shape[1] ** 0.5)
        grid = m.view(m.shape[0], 1, side, side)
        grids.append(F.interpolate(grid, size=(size, size), mode="bilinear",
                                   align_corners=False)[:, 0])
    return torch.stack(grids).mean(0)


def binarise(grid: Tensor) -> Tensor:
    """Per image (never per row: a known bug), keep where attention is ≥ THRESHOLD of the way
    from the image's least to its most."""
    flat = grid.flatten(1)
    low, peak = flat.amin(1)[:, None, None], flat.amax(1)[:, None, None]
    span = peak - low
    mask = ((grid - low) >= THRESHOLD * span).float()
    flat_image = span.flatten() <= 1e-12 * peak.abs().flatten().clamp_min(1.0)
    mask[flat_image] = 1.0  # no signal at all: fall back to the whole image
    return mask[:, None]  # [B, 1, size, size]


@torch.no_grad()
def attention_maps(pipe: Any, latents: Tensor, hidden: Tensor, hit: Tensor,
                   generator: torch.Generator,
                   added: dict[str, Tensor] | None = None) -> Tensor:
    """[N, h, w] attention to the supercategory over the training latents [N, C, h, w], the
    mean over cross-attention layers at latent size. `hidden` [1, T, D] encodes a
    caption with the supercategory in place of the token ([N, T, D]: each latent's own);
    `hit` [1, T] (or [N, T]) marks its positions. `added`: SDXL's added conditions for that
    caption ([1, …] each, or [N, …]), None for SD 1.x/2.x."""
    unet = pipe.unet
    forward = schedule(pipe.scheduler)  # the training noise, whatever the sampler
    steps = forward.config.num_train_timesteps
    t = torch.full((latents.shape[0],), int(steps * NOISE_LEVEL), dtype=torch.long)
    noise = torch.randn(latents.shape, generator=generator)
    noisy = forward.add_noise(latents, noise, t)
    capture = _Capture(hit.expand(latents.shape[0], -1).to(unet.device))
    layers = cross_attention_layers(unet)
    originals = {name: attn.processor for name, attn in layers.items()}
    try:
        for attn in layers.values():
            attn.set_processor(capture)
        rows = latents.shape[0]
        unet(noisy.to(unet.device), t.to(unet.device),
             encoder_hidden_states=hidden.expand(rows, -1, -1).to(unet.device),
             added_cond_kwargs=None if added is None else
             {k: v.expand(rows, -1).to(unet.device) for k, v in added.items()})
    finally:
        for name, attn in layers.items():
            attn.set_processor(originals[name])
    return _to_grid(capture.maps, latents.shape[-1]).cpu()
