"""Stable Diffusion's UNets and text encoders with random weights: the real shapes of SD 1.5,
SD 2.1 and SDXL for size and speed benchmarks (and the artifact-size test), from the
published configs, without weights."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

# SD 1.5 (runwayml/stable-diffusion-v1-5) as published: unet/config.json, text_encoder/config.json.
SD15_UNET: dict[str, Any] = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 768,
    "attention_head_dim": 8, "norm_num_groups": 32, "act_fn": "silu", "norm_eps": 1e-5,
    "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1,
    "mid_block_scale_factor": 1.0, "center_input_sample": False,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
}
SD15_TEXT: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072,
    "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
    "hidden_act": "quick_gelu", "projection_dim": 768, "layer_norm_eps": 1e-5,
    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}


def sd15_unet_and_text_encoder(device: str | torch.device = "meta", seed: int = 0
                               ) -> tuple[Any, Any]:
    """SD 1.5's UNet and CLIP ViT-L/14 text encoder with random weights (shapes only on "meta")."""
    unet, (text_encoder,) = unet_and_text_encoders("sd15", device, seed)
    return unet, text_encoder


# SD 2.1 (stabilityai/stable-diffusion-2-1, 768 px, v-prediction) as published: per-block
# heads, linear projections, fp32 attention, the 1,024-wide OpenCLIP ViT-H text tower with
# its last layer already dropped (23 of 24: penultimate-layer conditioning)
SD21_UNET: dict[str, Any] = {
    **SD15_UNET, "sample_size": 96, "cross_attention_dim": 1024,
    "attention_head_dim": (5, 10, 20, 20), "use_linear_projection": True,
    "upcast_attention": True,
}
SD21_TEXT: dict[str, Any] = {
    **SD15_TEXT, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
    "num_attention_heads": 16, "hidden_act": "gelu", "projection_dim": 512,
}
# SDXL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0): three levels, 1 / 2 / 10
# transformer layers, cross-attention over both encoders' hidden states side by side
# (768 + 1,280 = 2,048), the second encoder's pooled projection and the size/crop ids added
# to the time embedding
SDXL_UNET: dict[str, Any] = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280), "cross_attention_dim": 2048,
    "attention_head_dim": (5, 10, 20), "transformer_layers_per_block": (1, 2, 10),
    "use_linear_projection": True, "norm_num_groups": 32, "act_fn": "silu",
    "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
SDXL_TEXT_2: dict[str, Any] = {
    **SD15_TEXT, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
    "num_attention_heads": 20, "hidden_act": "gelu", "projection_dim": 1280,
}
ARCHITECTURES: dict[str, tuple[dict[str, Any], tuple[dict[str, Any], ...]]] = {
    "sd15": (SD15_UNET, (SD15_TEXT,)),
    "sd21": (SD21_UNET, (SD21_TEXT,)),
    "sdxl": (SDXL_UNET, (SD15_TEXT, SDXL_TEXT_2)),
}


# The VAEs (vae/config.json as published): SDXL's has SD's shapes, another latent scale,
# and decodes in fp32
SD15_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "block_out_channels": (128, 256, 512, 512), "norm_num_groups": 32, "sample_size": 512,
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "scaling_factor": 0.18215,
}
VAES: dict[str, dict[str, Any]] = {
    "sd15": SD15_VAE, "sd21": {**SD15_VAE, "sample_size": 768},
    "sdxl": {**SD15_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
}


def unet_and_text_encoders(name: str, device: str | torch.device = "meta", seed: int = 0,
                           text: Mapping[str, Any] | None = None
                           ) -> tuple[Any, tuple[Any, ...]]:
    """The UNet and the text encoder(s) of ARCHITECTURES[name] with random weights (shapes
    only on "meta"); SDXL's second encoder carries its projection. `text` overrides keys
    of every text encoder's config (a tokenizer's vocabulary size and special ids)."""
    unet_config, text_configs = ARCHITECTURES[name]
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)  # module initialisers draw from the global generator
        unet = UNet2DConditionModel(**unet_config)
        encoders = tuple((CLIPTextModelWithProjection if k == 1 else CLIPTextModel)(
            CLIPTextConfig(**{**config, **(text or {})})) for k, config in enumerate(text_configs))
    for model in (unet, *encoders):
        model.eval().requires_grad_(False)
    return unet, encoders
