"""Training recipes side by side on `toy:shapes`: how many steps and images a concept needs.

    .venv/bin/python bench/recipe_sweep.py [--recipes 400x8 400x4 200x8 300x8c 300x8cm 150x16cn]
        [--seeds 1] [--prompts 6] [--render-steps 15] [--threads 2] [--json PATH]

Each held-out concept of `personalize.py` (those of `specs/` among them) is trained with each
recipe (STEPS x BATCH, then letters: `c` each picture with its own caption, as
`personalize.training_captions` writes them; `m` loss masks from the base model's attention,
`mask: attention`; `n` without the supercategory's leading words before the token, the
ablation `NoContext`; the rest the compiler's defaults for toy:shapes, no mirrored copies)
and each training seed, then rendered at strength 0.5 for `--prompts` prompts naming it
(`personalize.prompts_for`). Per recipe: the training seconds, fidelity, alignment and looks
(colour, pattern and second colour read back right), as `edit_positions.py` scores them.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import personalize
import torch
from ablations import METHODS as ABLATIONS
from edit_positions import score
from PIL import Image

from perfusion_runtime.build.jobs import default_captions, load_pipeline
from perfusion_runtime.method.covariance import cinv_for
from perfusion_runtime.method.device import choose
from perfusion_runtime.method.fingerprint import base_fingerprint
from perfusion_runtime.method.trainer import PERFUSION, Recipe, Subject, train

LETTERS = "cmn"  # a recipe's letters after STEPSxBATCH


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", nargs="+", default=["400x8", "400x4", "200x8"],
                        help="STEPSxBATCH")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--render-steps", type=int,
                        default=personalize.RENDER["num_inference_steps"])
    parser.add_argument("--guidance", type=float, default=personalize.RENDER["guidance_scale"])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--work", type=Path, default=Path("/tmp/perfusion-recipe-sweep"))
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline("toy:shapes", choose("cpu"))
    pipe.set_progress_bar_config(disable=True)
    cinv, cinv_print = cinv_for(pipe, args.work / "cache", default_captions("toy:shapes"))
    base_print = base_fingerprint(pipe)  # training leaves the base weights as they were
    recipes = {name: tuple(int(x) for x in name.rstrip(LETTERS).split("x"))
               for name in args.recipes}
    rows: dict[str, dict[str, list[float]]] = {
        name: {"seconds": [], "fidelity": [], "alignment": [], "looks": []} for name in recipes}
    for spec in personalize.SPECS:
        pictures = personalize.training_images(spec, args.work / spec.token.rstrip("*"))
        refs = [Image.open(p).convert("RGB") for p in pictures]
        scenes = [scene for scene, _ in personalize.prompts_for(spec, args.prompts)]
        subject = Subject(spec.token, (spec.supercategory,), (), pictures,
                          base_model="toy:shapes")
        for seed in range(args.seeds):
            for name, (steps, batch) in recipes.items():
                letters = name[len(name.rstrip(LETTERS)):]
                captions = personalize.training_captions(spec, len(pictures)) \
                    if "c" in letters else ()
                recipe = Recipe(steps=steps, batch=batch, seed=seed, flip=False,
                                templates=tuple(personalize.LEARN_DEFAULTS["templates"]),
                                captions=captions, mask="attention" if "m" in letters else "none")
                started = time.perf_counter()
                concept = train(pipe, subject, recipe, cinv, cinv_fingerprint=cinv_print,
                                base_fingerprint=base_print,
                                method=ABLATIONS["no_context"] if "n" in letters else PERFUSION)
                row = rows[name]
                row["seconds"].append(time.perf_counter() - started)
                fid, ali, looks = score(pipe, concept, cinv, scenes, refs, args)
                row["fidelity"] += fid
                row["alignment"] += ali
                row["looks"] += looks
                print(f"{spec.token} seed {seed} {name}: {row['seconds'][-1]:.0f} s, fidelity "
                      f"{np.mean(fid):.2f}, alignment {np.mean(ali):.2f}, looks "
                      f"{np.mean(looks):.2f}", flush=True)
    print("\n| recipe (steps x batch) | training s | fidelity | alignment | looks |\n"
          "|---|---:|---:|---:|---:|")
    for name, row in rows.items():
        print(f"| {name} | {np.mean(row['seconds']):.0f} | {np.mean(row['fidelity']):.3f} "
              f"| {np.mean(row['alignment']):.3f} | {np.mean(row['looks']):.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json),
                                                                "work": str(args.work)},
                                         "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
