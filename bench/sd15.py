"""SD 1.5's UNet and text encoder with random weights: the real shapes for size and speed
benchmarks (and the artifact-size test), from the published configs, without weights."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

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
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)  # module initialisers draw from the global generator
        unet = UNet2DConditionModel(**SD15_UNET)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
    for model in (unet, text_encoder):
        model.eval().requires_grad_(False)
    return unet, text_encoder
