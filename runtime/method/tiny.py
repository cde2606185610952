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
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

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


FAMILIES = ("sd1", "sd2", "sdxl")


def _tiny_text_encoder(tokenizer: Any, width: int, gelu: bool = False,
                       projection: int | None = None) -> Any:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=TEXT_POSITIONS,
        # OpenCLIP's text towers (SD 2.x, SDXL's second encoder) use exact GELU; OpenAI's
        # CLIP (SD 1.x, SDXL's first) quick GELU
        hidden_act="gelu" if gelu else "quick_gelu", projection_dim=projection or width,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    # SDXL's second encoder: its pooled output is projected (`text_embeds`)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _tiny_unet(width: int, family: str, text_width: int) -> Any:
    sd2, xl = family == "sd2", family == "sdxl"
    extra: dict[str, Any] = {}
    if xl:  # the pooled text (projection width 16) and six size numbers join the time embedding
        extra = {"addition_embed_type": "text_time", "addition_time_embed_dim": 8,
                 "projection_class_embeddings_input_dim": 16 + 6 * 8,
                 "transformer_layers_per_block": (1, 2)}
    return UNet2DConditionModel(
        sample_size=TINY_SAMPLE_SIZE, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(width, 2 * width), norm_num_groups=8, cross_attention_dim=text_width,
        # diffusers' name for the number of heads: one for all blocks (SD 1.x), or per block
        # with linear projections in and out of the transformers (SD 2.x, SDXL) and fp32
        # attention (SD 2.x)
        attention_head_dim=(2, 4) if sd2 or xl else 4, use_linear_projection=sd2 or xl,
        upcast_attention=sd2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), **extra,
    )


def _tiny_vae() -> Any:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        block_out_channels=(8, 16, 16), norm_num_groups=8, sample_size=4 * TINY_SAMPLE_SIZE,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    )


def tiny_pipeline(seed: int = 0, width: int = 32, *, family: str = "sd1") -> Any:
    """A Stable Diffusion pipeline with random seeded weights; 32×32 px images by default.

    `width` is the model width: text hidden size = cross_attention_dim = `width`, UNet
    block_out_channels (width, 2·width); a multiple of 8. The same seed and width give
    bit-identical weights; torch's global generator is left as it was. `family`:
    - "sd1": SD 1.x in small;
    - "sd2": SD 2.x's differences (GELU text encoder, per-block heads, linear
      projections, upcast attention, v-prediction);
    - "sdxl": an SDXL pipeline: a second, wider (width + 16) GELU text encoder with a
      projection, cross-attention over both encoders side by side, the pooled text and
      size numbers added to the time embedding, 1 and 2 transformer layers per level."""
    if width <= 0 or width % 8:
        raise ValueError(f"width must be a positive multiple of 8, got {width}")
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    tokenizer = tiny_tokenizer()
    xl = family == "sdxl"
    with _seeded(seed):
        text_encoder = _tiny_text_encoder(tokenizer, width, gelu=family == "sd2")
        second = _tiny_text_encoder(tokenizer, width + 16, gelu=True, projection=16) \
            if xl else None
        unet = _tiny_unet(width, family, width + (width + 16 if xl else 0))
        vae = _tiny_vae()
    for model in (text_encoder, unet, vae, *([second] if second is not None else [])):
        model.eval().requires_grad_(False)
    schedule = {**SD_SCHEDULER, "prediction_type": "v_prediction"} if family == "sd2" \
        else SD_SCHEDULER
    if xl:
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=second, tokenizer=tokenizer,
            tokenizer_2=tiny_tokenizer(), unet=unet, scheduler=DDIMScheduler(**schedule),
            force_zeros_for_empty_prompt=False)
    else:
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
            scheduler=DDIMScheduler(**schedule), safety_checker=None, feature_extractor=None,
            image_encoder=None, requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe
