"""A full fine-tune of the UNet with a concept token (DreamBooth-style), for
`personalize.py`: the ceiling that Perfusion's rank-1 edit is measured against.

The concept token is added to the text encoder with its embedding started from the
supercategory, as every other method starts it, and trained at the recipe's `embedding_lr`;
every UNet parameter is trained at `lr`, AdamW. Everything else is the runtime trainer's own:
the pictures' latents, the batches, captions, noise and timesteps drawn from the recipe's
seed, the denoising target and the loss (`runtime/method/trainer.py`'s `_prepare` and `_step`, with
`ablations.EmbeddingOnly`: its step runs the UNet as it is, without Perfusion's edit, and
here the UNet's own weights are what moves). So the fine-tune differs from the other methods
only in what is optimised. There is no prior-preservation loss (DreamBooth's class images):
the benchmark measures what the fine-tune does to other prompts as leakage instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from ablations import EmbeddingOnly
from torch import Tensor

from perfusion_runtime.method.processor import ConceptState
from perfusion_runtime.method.tokens import remove_extension
from perfusion_runtime.method.trainer import Recipe, Subject, _frozen, _prepare, _step


@dataclass(frozen=True)
class Tuned:
    """What a fine-tune leaves besides the UNet's weights: the token's trained embedding
    [D] (float32, CPU) and the loss of every step."""

    embedding: Tensor
    losses: tuple[float, ...]


@contextlib.contextmanager
def finetuned(pipe: Any, subject: Subject, recipe: Recipe, cinv: Tensor,
              lr: float) -> Iterator[Tuned]:
    """Fine-tune `pipe`'s UNet and the token's embedding on `subject`; for the duration of
    the `with`, the UNet holds the fine-tuned weights. On leaving, however it is left, the
    UNet gets back its own weights (a copy of its state_dict is kept) and the text encoder
    its own embedding, so that what runs next sees the base model."""
    saved = {name: tensor.detach().clone() for name, tensor in pipe.unet.state_dict().items()}
    try:
        yield _train(pipe, subject, recipe, cinv, lr)
    finally:
        pipe.unet.load_state_dict(saved)


def _train(pipe: Any, subject: Subject, recipe: Recipe, cinv: Tensor, lr: float) -> Tuned:
    """The fine-tune itself; it leaves the UNet's weights changed (and its gradients freed)."""
    unet = pipe.unet
    try:
        # _frozen: every base parameter frozen and in eval mode, and put back as found on
        # exit; the UNet's are then unfrozen for this run only
        with _frozen(pipe):
            run = _prepare(pipe, subject, recipe, cinv, EmbeddingOnly())
            unet.requires_grad_(True)
            # weight decay 0, as the trainer's own AdamW (trainer._optimiser)
            optimiser = torch.optim.AdamW(
                [{"params": [run.embedding], "lr": recipe.embedding_lr},
                 {"params": list(unet.parameters()), "lr": lr}], weight_decay=0.0)
            state = ConceptState(caching=False)  # never activated: no processors installed
            with torch.enable_grad():
                for step in range(1, recipe.steps + 1):
                    run.losses.append(_step(run, state, optimiser, step))
            return Tuned(run.embedding.detach().float().cpu().clone(), tuple(run.losses))
    finally:
        remove_extension(pipe.text_encoder)
        unet.zero_grad(set_to_none=True)  # the last step's gradients: as large as the UNet
