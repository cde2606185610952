"""Invariant 8 (size): a concept for SD 1.5's dimensions is at most 106 KiB in fp32."""

from __future__ import annotations

import torch

from perfusion_dsl.options import LEARN, defaults_for
from perfusion_runtime.artifact import Concept, encode, size_for
from perfusion_runtime.layers import cross_attention_layers
from perfusion_runtime.tiny import sd15_unet_and_text_encoder

BUDGET = 106 * 1024


def test_invariant_8_sd15_concept_file_fits_106_kib() -> None:
    unet, text_encoder = sd15_unet_and_text_encoder("meta")  # shapes only, no memory
    layers = {name: int(attn.to_k.out_features)
              for name, attn in cross_attention_layers(unet).items()}
    assert len(layers) == 16 and sum(layers.values()) == 12_480  # PERFUSION.md's numbers
    width = int(text_encoder.config.hidden_size)
    generator = torch.Generator().manual_seed(0)
    options = {k: list(v) if isinstance(v, tuple) else v
               for k, v in defaults_for(LEARN).items()}  # what the compiler plans by default
    concept = Concept(
        token="teddy*", supercategories=("teddy bear",), adjectives=("fluffy", "brown"),
        base_model="runwayml/stable-diffusion-v1-5", base_fingerprint="b" * 64,
        cinv_fingerprint="c" * 64, options=options, key="a" * 64,
        embedding=torch.randn(width, generator=generator),
        i_star=torch.randn(width, generator=generator),
        o_k={n: torch.randn(o, generator=generator) for n, o in layers.items()},
        o_v={n: torch.randn(o, generator=generator) for n, o in layers.items()})
    assert concept.num_floats == size_for(layers, width, width) == 26_496
    data = encode(concept)
    assert len(data) <= BUDGET, f"{len(data):,} bytes > {BUDGET:,}"
    assert len(data) >= 26_496 * 4  # every float is really stored, in fp32
