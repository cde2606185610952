"""`mask: attention` against the truth on `toy:shapes`: how well the base model's attention
to a concept's supercategory finds the object in its training pictures.

    OMP_NUM_THREADS=2 .venv/bin/python bench/attention_masks.py [--threads 2]

For each concept of `bench/personalize.py` (its 5 training pictures, their own captions and
its supercategory), the attention maps that `mask: attention` reads (`trainer.
attention_maps_for`) are cut two ways side by side: the rule before 2026-12-04 (a latent
pixel is in the mask where its attention is ≥ 30 % of the image's peak) and today's
(`attention_mask.binarise`: ≥ half-way from the image's least to its most). Each mask is
compared with the world's own object mask (`world.object_mask`, at latent size, a latent
pixel counted in where the object covers half of it): intersection over union, the share of
the object inside the mask (recall) and the mask's share of the image. Prints one row per
concept and rule, and the means.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import personalize
import torch

from perfusion_runtime.build.jobs import load_pipeline
from perfusion_runtime.method import trainer
from perfusion_runtime.method.attention_mask import binarise
from perfusion_runtime.method.device import choose
from perfusion_runtime.method.images import load_images
from perfusion_runtime.toy import world


def peak_share(grid: torch.Tensor, share: float = 0.3) -> torch.Tensor:
    """The rule before 2026-12-04: ≥ `share` of each image's peak."""
    peak = grid.flatten(1).amax(1)[:, None, None]
    return grid >= share * peak


def truth(scenes: list[world.Scene], size: int) -> np.ndarray:
    """[N, size, size] bool: latent pixels at least half covered by the object."""
    out = []
    for scene in scenes:
        m = np.asarray(world.object_mask(scene), dtype=float) / 255.0
        step = m.shape[0] // size
        out.append(m.reshape(size, step, size, step).mean((1, 3)) >= 0.5)
    return np.stack(out)


def scores(mask: np.ndarray, true: np.ndarray) -> tuple[float, float, float]:
    inter = (mask & true).sum((1, 2))
    iou = inter / np.maximum((mask | true).sum((1, 2)), 1)
    recall = inter / np.maximum(true.sum((1, 2)), 1)
    return float(iou.mean()), float(recall.mean()), float(mask.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="toy:shapes")
    parser.add_argument("--work", type=Path, default=Path("/tmp/perfusion-bench"))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model, choose("cpu"))
    rules = {"≥ 30 % of the peak (before)": lambda g: peak_share(g).numpy(),
             "≥ half-way from least to most (now)": lambda g: binarise(g)[:, 0].bool().numpy()}
    totals: dict[str, list[tuple[float, float, float]]] = {name: [] for name in rules}
    print("| concept | rule | IoU | recall | mask area | object area |")
    print("|---|---|---|---|---|---|")
    for spec in personalize.SPECS:
        scenes = personalize.training_scenes(spec)
        images = personalize.training_images(spec, args.work / "images" / spec.token.rstrip("*"))
        subject = trainer.Subject(token=spec.token, supercategories=(spec.supercategory,),
                                  adjectives=(), images=images, base_model=args.model)
        recipe = trainer.Recipe(mask="attention", flip=False,
                                captions=personalize.training_captions(spec, len(images)))
        pixels = load_images(images, trainer.native_resolution(pipe), False, None)
        latents = trainer.encode_latents(pipe, pixels)
        grid = trainer.attention_maps_for(pipe, subject, recipe, latents)
        true = truth(scenes, grid.shape[-1])
        for name, rule in rules.items():
            row = scores(rule(grid), true)
            totals[name].append(row)
            print(f"| `{spec.token}` | {name} | {row[0]:.2f} | {row[1]:.2f} | {row[2]:.2f} | "
                  f"{true.mean():.2f} |", flush=True)
    for name, rows in totals.items():
        iou, recall, area = np.mean(rows, axis=0)
        print(f"mean, {name}: IoU {iou:.2f}, recall {recall:.2f}, mask area {area:.2f}")


if __name__ == "__main__":
    main()
