"""Size of one concept file for SD 1.5's dimensions against the budget (invariant 8), for
SD 2.1's and SDXL's, and what the fp16 option costs in pixels.

    .venv/bin/python bench/artifact_size.py [--models sd15 sd21 sdxl] [--pixels] [--threads 1]

Builds each model's UNet and text encoder(s) on the meta device (shapes only, no weights),
reads the cross-attention layers and their to_k/to_v widths, saves a concept with random
tensors of exactly those shapes and realistic metadata (locked keys: the file holds i_super,
not o*_K), in fp32 and in fp16, and prints the sizes, beside the trained-keys form (o*_K in
full) and the previous format 1. `--pixels` also trains concepts on the tiny pipeline and
on `toy:shapes` and renders prompts with each concept's fp32 file and its fp16 file: the
mean and largest pixel difference, of 255.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from architectures import ARCHITECTURES, unet_and_text_encoders

from perfusion_runtime.method.artifact import (
    Concept,
    encode,
    load,
    locked_key_targets,
    save,
    size_for,
)
from perfusion_runtime.method.layers import cross_attention_layers

BUDGET_KIB, HALF_BUDGET_KIB = 104, 52
EXPECTED_PER_PROJECTION = 12_480  # docs/runtime.md, "The concept file"
EXPECTED_TOTAL = 26_496
# What a plan's ConceptStep carries with default learn options (the built-in 10 templates),
# and what the trainer adds: where the edit applies.
OPTIONS = {
    "positions": "prompt",
    "steps": 400, "seed": 0, "batch": 16, "lr": 0.03, "embedding_lr": 0.006, "lock": "local",
    "mask": "none", "resolution": None, "flip": True, "beta": 0.75, "tau": 0.1,
    "templates": ["a photo of a {}", "a rendering of a {}", "a cropped photo of the {}",
                  "the photo of a {}", "a photo of a clean {}", "a close-up photo of a {}",
                  "a bright photo of the {}", "a good photo of a {}", "a photo of one {}",
                  "a rendition of the {}"],
}


def shapes(name: str) -> tuple[dict[str, int], int, int]:
    """({attn2 path: O}, D_tok, D) read from the architecture itself. SDXL's D is both
    encoders' widths side by side, and so is its D_tok: the new token has an embedding
    row in each encoder."""
    unet, encoders = unet_and_text_encoders(name, device="meta")
    attn = cross_attention_layers(unet)
    layers = {}
    for layer, module in attn.items():
        assert module.to_k.out_features == module.to_v.out_features, layer
        layers[layer] = int(module.to_k.out_features)
    d_text = {int(module.to_k.in_features) for module in attn.values()}
    assert d_text == {sum(e.config.hidden_size for e in encoders)}, d_text
    d_token = sum(int(e.get_input_embeddings().embedding_dim) for e in encoders)
    return layers, d_token, d_text.pop()


def random_concept(layers: dict[str, int], d_token: int, d_text: int) -> tuple[
        Concept, dict[str, torch.Tensor]]:
    """A concept of the real shapes with locked keys, and the W_K it was made against."""
    gen = torch.Generator().manual_seed(0)

    def vec(n: int) -> torch.Tensor:
        return torch.randn(n, generator=gen)

    weights = {name: torch.randn(o, d_text, generator=gen) for name, o in layers.items()}
    i_super = vec(d_text)
    return Concept(
        token="teddy*", supercategories=("teddy bear", "toy"), adjectives=("brown", "worn"),
        base_model="runwayml/stable-diffusion-v1-5", base_fingerprint="a" * 64,
        cinv_fingerprint="b" * 64, options=OPTIONS, key="c" * 64,
        embedding=vec(d_token), i_star=vec(d_text),
        o_k=locked_key_targets(weights, i_super),
        o_v={name: vec(o) for name, o in layers.items()}, i_super=i_super,
    ), weights


def header_parts(data: bytes) -> tuple[int, int, int]:
    """(header bytes, of which tensor entries, of which metadata) as JSON text."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    metadata = len(json.dumps({"__metadata__": header.pop("__metadata__")},
                              separators=(",", ":")))
    return length, len(json.dumps(header, separators=(",", ":"))), metadata


def format_1_size(concept: Concept) -> int:
    """The same concept in format 1: o*_K in full and every option in the metadata."""
    tensors = {"embedding": concept.embedding, "i_star": concept.i_star,
               "o_k": torch.cat(list(concept.o_k.values())),
               "o_v": torch.cat(list(concept.o_v.values()))}
    metadata = {"format": "perfusion-concept", "format_version": "1", "token": concept.token,
                "supercategories": json.dumps(list(concept.supercategories)),
                "adjectives": json.dumps(list(concept.adjectives)),
                "base_model": concept.base_model, "base_fingerprint": concept.base_fingerprint,
                "cinv_fingerprint": concept.cinv_fingerprint,
                "options": json.dumps(concept.options, separators=(",", ":")),
                "key": concept.key, "layers": json.dumps(concept.layers, separators=(",", ":"))}
    return len(safetensors.torch.save(tensors, metadata=metadata))


def sizes(name: str) -> None:
    print(f"{name}:")
    layers, d_token, d_text = shapes(name)
    concept, weights = random_concept(layers, d_token, d_text)
    trained_keys = Concept(**{**concept.__dict__, "i_super": None})
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "teddy.safetensors"
        save(concept, path)
        data = path.read_bytes()
        again = load(path, expect_base_fingerprint="a" * 64, expect_layers=layers,
                     expect_dims=(d_token, d_text), key_weights=weights)
    assert all(torch.equal(again.o_k[name], concept.o_k[name]) for name in layers)
    half = encode(concept, half=True)
    header, entries, metadata = header_parts(data)
    stored = d_token + 2 * d_text + sum(layers.values())
    widths = ", ".join(f"{o}×{list(layers.values()).count(o)}"
                       for o in sorted(set(layers.values())))
    budget, half_budget = BUDGET_KIB * 1024, HALF_BUDGET_KIB * 1024
    rows = [
        ("cross-attention layers", f"{len(layers)} (O: {widths})"),
        ("floats in the concept", f"{concept.num_floats:,} (size_for: "
                                  f"{size_for(layers, d_token, d_text):,})"),
        ("floats in the file", f"{stored:,} (embedding, i*, i_super, o*_V)"),
        ("header", f"{8 + header:,} B (tensor entries {entries:,}, metadata {metadata:,})"),
        ("file, fp32", f"{len(data):,} B = {len(data) / 1024:.2f} KiB "
                       f"({len(data) / budget:.3f} of {BUDGET_KIB} KiB)"),
        ("file, fp16", f"{len(half):,} B = {len(half) / 1024:.2f} KiB "
                       f"({len(half) / half_budget:.3f} of {HALF_BUDGET_KIB} KiB)"),
        ("trained keys (o*_K in full)", f"{len(encode(trained_keys)):,} B = "
                                        f"{len(encode(trained_keys)) / 1024:.2f} KiB"),
        ("format 1, same concept", f"{format_1_size(concept):,} B = "
                                   f"{format_1_size(concept) / 1024:.2f} KiB"),
    ]
    for label, value in rows:
        print(f"{label:>28}  {value}")


def pixel_cost(model: str, concepts: int, prompts: list[str], steps: int) -> None:
    """Render each concept from its fp32 file and from its fp16 file; print |Δ| of 255."""
    import numpy as np

    from perfusion_runtime.build.jobs import default_captions, load_pipeline
    from perfusion_runtime.method.covariance import cinv_for
    from perfusion_runtime.method.device import choose
    from perfusion_runtime.method.fingerprint import base_fingerprint
    from perfusion_runtime.method.render import apply_concepts
    from perfusion_runtime.method.trainer import Recipe, Subject, train
    from perfusion_runtime.toy import world

    pipe = load_pipeline(model, choose("cpu"))
    pipe.set_progress_bar_config(disable=True)
    folder = Path(tempfile.mkdtemp(prefix="fp16-"))
    cinv, cinv_print = cinv_for(pipe, folder / "cache", default_captions(model))
    diffs: list[Any] = []
    for i in range(concepts):
        pictures = []
        for k in range(5):
            pictures.append(folder / f"{i}-{k}.png")
            world.render(world.held_out_scene(100 * i + k)).save(pictures[-1])
        recipe = Recipe(steps=steps, batch=4, seed=i, flip=False, templates=("a {}",))
        concept = train(pipe, Subject(f"c{i}*", ("circle",), (), tuple(pictures)), recipe,
                        cinv, cinv_fingerprint=cinv_print, base_fingerprint=base_fingerprint(pipe))
        images = []
        for half in (False, True):
            path = folder / f"{i}-{half}.safetensors"
            save(concept, path, half=half)
            with apply_concepts(pipe, [path], cinv=cinv) as applied:
                images.append(applied([p.replace("{}", concept.token) for p in prompts],
                                      seed=list(range(len(prompts))), num_inference_steps=25,
                                      guidance_scale=5.0, output_type="np"))
        diffs += [np.abs(np.asarray(a) - np.asarray(b)) * 255
                  for a, b in zip(*images, strict=True)]
    means = [float(d.mean()) for d in diffs]
    print(f"{model}: fp16 against fp32 files, {concepts} concepts × {len(prompts)} prompts "
          f"({steps} training steps): mean |Δ| {np.mean(means):.3f}/255 (largest image mean "
          f"{max(means):.3f}), largest pixel {max(float(d.max()) for d in diffs):.1f}/255")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(ARCHITECTURES),
                        choices=list(ARCHITECTURES))
    parser.add_argument("--pixels", action="store_true", help="also measure fp16 in pixels")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models:
        sizes(name)
    if args.pixels:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        prompts = ["a {} on the left, black background", "a large {} at the top, white "
                   "background", "on gray, a small {} at the bottom", "a {} in the center"]
        for model in ("tiny:random", "toy:shapes"):
            pixel_cost(model, 4, prompts, 100)


if __name__ == "__main__":
    main()
