"""Tiny in-process Stable Diffusion (`tiny:random`, tests, CPU benches), from configs only."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "tokenizer"  # tools/make_tiny_tokenizer.py
TEXT_POSITIONS = 77  # T of SD 1.x
TINY_SAMPLE_SIZE = 8  # latents 8×8 -> 32×32 px images (the tiny VAE downsamples by 4)

# SD 1.x's scheduler/scheduler_config.json (DDIM with the training betas).
SD_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False,
    "steps_offset": 1, "prediction_type": "epsilon",
}


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Module initialisers draw from torch's global generator: seed a forked copy of it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def tiny_tokenizer() -> Any:
    """CLIPTokenizer over the committed tiny byte-level BPE vocabulary (never the network)."""
    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), local_files_only=True)


def _tiny_text_encoder(tokenizer: Any, width: int, sd2: bool = False) -> Any:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=TEXT_POSITIONS,
        # OpenCLIP's text tower (SD 2.x) uses exact GELU; OpenAI's CLIP (SD 1.x) quick GELU
        hidden_act="gelu" if sd2 else "quick_gelu", projection_dim=width,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def _tiny_unet(width: int, sd2: bool = False) -> Any:
    return UNet2DConditionModel(
        sample_size=TINY_SAMPLE_SIZE, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(width, 2 * width), norm_num_groups=8, cross_attention_dim=width,
        # diffusers' name for the number of heads: one for all blocks (SD 1.x), or per block
        # with linear projections in and out of the transformers and fp32 attention (SD 2.x)
        attention_head_dim=(2, 4) if sd2 else 4, use_linear_projection=sd2,
        upcast_attention=sd2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )


def _tiny_vae() -> Any:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        block_out_channels=(8, 16, 16), norm_num_groups=8, sample_size=4 * TINY_SAMPLE_SIZE,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    )


def tiny_pipeline(seed: int = 0, width: int = 32, *, sd2: bool = False) -> Any:
    """A StableDiffusionPipeline with random seeded weights; 32×32 px images by default.

    `width` is the model width: text hidden size = cross_attention_dim = `width`, UNet
    block_out_channels (width, 2·width); a multiple of 8. The same seed and width give
    bit-identical weights; torch's global generator is left as it was. `sd2`: SD 2.x's
    differences in small (GELU text encoder, per-block heads, linear projections, upcast
    attention, v-prediction)."""
    if width <= 0 or width % 8:
        raise ValueError(f"width must be a positive multiple of 8, got {width}")
    tokenizer = tiny_tokenizer()
    with _seeded(seed):
        text_encoder = _tiny_text_encoder(tokenizer, width, sd2)
        unet = _tiny_unet(width, sd2)
        vae = _tiny_vae()
    for model in (text_encoder, unet, vae):
        model.eval().requires_grad_(False)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(**{**SD_SCHEDULER, "prediction_type": "v_prediction"} if sd2
                                else SD_SCHEDULER), safety_checker=None, feature_extractor=None,
        image_encoder=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
