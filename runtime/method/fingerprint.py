"""The base-model fingerprint a concept is bound to: its text side and its K/V projections."""

from __future__ import annotations

import hashlib
from typing import Any

from . import text
from .covariance import joint_fingerprint, text_encoder_fingerprint
from .layers import cross_attention_layers


def base_fingerprint(pipe: Any) -> str:
    """sha256 over the tokenizer and text encoder (as C⁻¹'s fingerprint; SDXL: both) and
    every cross-attention `to_k`/`to_v` weight of the UNet: everything a concept's tensors
    are defined against, without hashing the whole UNet (gigabytes for SD 1.5) on each
    load."""
    side = joint_fingerprint(pipe) if text.is_xl(pipe) else \
        text_encoder_fingerprint(pipe.tokenizer, pipe.text_encoder)
    digest = hashlib.sha256(side.encode("ascii"))
    for name, attn in cross_attention_layers(pipe.unet).items():
        for part in ("to_k", "to_v"):
            weight = getattr(attn, part).weight.detach().float().contiguous().cpu()
            digest.update(f"{name}.{part}:{tuple(weight.shape)}".encode())
            digest.update(weight.numpy().tobytes())
    return digest.hexdigest()
