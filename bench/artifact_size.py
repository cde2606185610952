"""Size of one concept file for SD 1.5's dimensions, against the 106 KiB budget (invariant 8).

    .venv/bin/python bench/artifact_size.py

Builds SD 1.5's UNet and text encoder on the meta device (shapes only, no weights), reads
the 16 cross-attention layers and their to_k/to_v widths, saves a concept with random fp32
tensors of exactly those shapes and realistic metadata, loads it back, and prints the sizes.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import safetensors.torch
import torch

from perfusion_runtime.artifact import Concept, load, save, size_for
from perfusion_runtime.layers import cross_attention_layers
from perfusion_runtime.tiny import sd15_unet_and_text_encoder

BUDGET_KIB = 106
EXPECTED_PER_PROJECTION = 12_480  # PERFUSION.md, "The concept artifact"
EXPECTED_TOTAL = 26_496
# What a plan's ConceptStep carries with default learn options (the built-in 10 templates).
OPTIONS = {
    "steps": 400, "seed": 0, "batch": 16, "lr": 0.03, "embedding_lr": 0.006, "lock": "local",
    "mask": "none", "resolution": None, "flip": True, "beta": 0.75, "tau": 0.1,
    "templates": ["a photo of a {}", "a rendering of a {}", "a cropped photo of the {}",
                  "the photo of a {}", "a photo of a clean {}", "a close-up photo of a {}",
                  "a bright photo of the {}", "a good photo of a {}", "a photo of one {}",
                  "a rendition of the {}"],
}


def sd15_shapes() -> tuple[dict[str, int], int, int]:
    """({attn2 path: O}, D_tok, D) read from the architecture itself."""
    unet, text_encoder = sd15_unet_and_text_encoder(device="meta")
    attn = cross_attention_layers(unet)
    layers = {}
    for name, module in attn.items():
        assert module.to_k.out_features == module.to_v.out_features, name
        layers[name] = int(module.to_k.out_features)
    d_text = {int(module.to_k.in_features) for module in attn.values()}
    assert d_text == {text_encoder.config.hidden_size}, d_text
    d_token = int(text_encoder.get_input_embeddings().embedding_dim)
    return layers, d_token, d_text.pop()


def random_concept(layers: dict[str, int], d_token: int, d_text: int) -> Concept:
    gen = torch.Generator().manual_seed(0)

    def vec(n: int) -> torch.Tensor:
        return torch.randn(n, generator=gen)

    return Concept(
        token="teddy*", supercategories=("teddy bear", "toy"), adjectives=("brown", "worn"),
        base_model="runwayml/stable-diffusion-v1-5", base_fingerprint="a" * 64,
        cinv_fingerprint="b" * 64, options=OPTIONS, key="c" * 64,
        embedding=vec(d_token), i_star=vec(d_text),
        o_k={name: vec(o) for name, o in layers.items()},
        o_v={name: vec(o) for name, o in layers.items()},
    )


def header_parts(data: bytes) -> tuple[int, int, int]:
    """(header bytes, of which tensor entries, of which metadata) as JSON text."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    metadata = len(json.dumps({"__metadata__": header.pop("__metadata__")},
                              separators=(",", ":")))
    return length, len(json.dumps(header, separators=(",", ":"))), metadata


def per_layer_size(data: bytes, concept: Concept) -> int:
    """Size of the same concept with one tensor per layer and projection (runtime/DESIGN.md's
    first sketch: `o_k.<layer>`, `o_v.<layer>`), for comparison with the packed layout."""
    length = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8:8 + length])["__metadata__"]
    del metadata["layers"]
    tensors = {"embedding": concept.embedding, "i_star": concept.i_star}
    for prefix, targets in (("o_k", concept.o_k), ("o_v", concept.o_v)):
        tensors |= {f"{prefix}.{layer}": t for layer, t in targets.items()}
    return len(safetensors.torch.save(tensors, metadata=metadata))


def main() -> None:
    layers, d_token, d_text = sd15_shapes()
    per_projection = sum(layers.values())
    concept = random_concept(layers, d_token, d_text)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "teddy.safetensors"
        save(concept, path)
        data = path.read_bytes()
        again = load(path, expect_base_fingerprint="a" * 64, expect_layers=layers,
                     expect_dims=(d_token, d_text))
    assert all(torch.equal(again.o_v[name], concept.o_v[name]) for name in layers)
    header, entries, metadata = header_parts(data)
    per_layer = per_layer_size(data, concept)
    tensor_bytes = 4 * concept.num_floats
    budget = BUDGET_KIB * 1024
    widths = ", ".join(f"{o}×{list(layers.values()).count(o)}"
                       for o in sorted(set(layers.values())))
    rows = [
        ("cross-attention layers", f"{len(layers)} (O: {widths})"),
        ("D_tok, D", f"{d_token}, {d_text}"),
        ("floats per projection", f"{per_projection:,} (expected {EXPECTED_PER_PROJECTION:,})"),
        ("total floats", f"{concept.num_floats:,} (expected {EXPECTED_TOTAL:,}; "
                         f"size_for: {size_for(layers, d_token, d_text):,})"),
        ("tensor data", f"{tensor_bytes:,} B = {tensor_bytes / 1024:.2f} KiB"),
        ("header", f"{8 + header:,} B (tensor entries {entries:,}, metadata {metadata:,})"),
        ("file", f"{len(data):,} B = {len(data) / 1024:.2f} KiB"),
        ("budget", f"{budget:,} B = {BUDGET_KIB} KiB"),
        ("file / budget", f"{len(data) / budget:.4f} "
                          f"({'within' if len(data) <= budget else 'OVER'}, "
                          f"{budget - len(data):,} B to spare)"),
        ("per-layer layout", f"{per_layer:,} B = {per_layer / 1024:.2f} KiB, "
                             f"{per_layer / budget:.4f} of the budget (not used)"),
    ]
    for label, value in rows:
        print(f"{label:>24}  {value}")


if __name__ == "__main__":
    main()
