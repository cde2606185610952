"""Where a UNet's cross-attention lives: the layers Perfusion edits and a concept is keyed by."""

from __future__ import annotations

from diffusers.models.attention_processor import Attention
from torch import nn


def cross_attention_layers(unet: nn.Module) -> dict[str, Attention]:
    """Every cross-attention `attn2` module by module path, in model order (SD 1.5: 16)."""
    return {
        name: module for name, module in unet.named_modules()
        if name.rsplit(".", 1)[-1] == "attn2" and isinstance(module, Attention)
        and module.is_cross_attention
    }
