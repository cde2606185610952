"""Base-model quality of `toy:shapes`: renders held-out captions and reads them back.

    .venv/bin/python bench/toy_quality.py [--n 256] [--steps 15] [--guidance 5] [--model DIR]
                                          [--rescale 0] [--save sheet.png]
                                          [--scheduler model|ddim|dpm] [--channels-last]

Scenes come from `world.held_out_scene(i)` (seeds never used for training); each is
captioned in full (outline, colours, size, position, background; pattern when it has one),
rendered with seed i, and read by the analyzer. It prints, per attribute, how often the
reading agrees with the caption, next to the analyzer's own agreement on the ground-truth
renders of the same scenes (the analyzer's error bar), the seconds per image, and the
commonest misreadings of each attribute (asked → read), which say where a model goes wrong.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

from perfusion_runtime.build.jobs import load_pipeline
from perfusion_runtime.method.device import choose
from perfusion_runtime.toy import analyze, world

ATTRIBUTES = ("background", "colour", "position", "size", "shape", "outline", "pattern",
              "second")
# toy:shapes v2's targets (docs/toy.md#quality): "outline" is the variant (a Form name, one
# of 28 in training), "shape" its family; "second" is the pattern's second colour (None when
# solid, so a solid object drawn solid agrees)
TARGETS = {"background": 0.95, "colour": 0.95, "position": 0.95, "size": 0.95,
           "outline": 0.85, "pattern": 0.90, "second": 0.90}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--model", default="toy:shapes", help="toy:shapes or a diffusers folder")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rescale", type=float, default=0.0,
                        help="guidance_rescale (Lin et al. 2024), for zero-terminal-SNR models")
    parser.add_argument("--save", type=Path, default=None, help="write a sheet of the first 32")
    parser.add_argument("--scheduler", choices=("model", "ddim", "dpm"), default="model",
                        help="the model folder's sampler, or DDIM or DPM-Solver++ (2M) on "
                             "its schedule")
    parser.add_argument("--channels-last", action="store_true",
                        help="UNet and VAE in channels_last memory format")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model, choose("cpu"))
    if args.scheduler == "ddim":  # as the model shipped before DPM-Solver++ (docs/toy.md)
        from diffusers import DDIMScheduler

        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False,
                                                   set_alpha_to_one=False)
    elif args.scheduler == "dpm":
        from diffusers import DPMSolverMultistepScheduler

        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    if args.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    model_hits = dict.fromkeys(ATTRIBUTES, 0)
    truth_hits = dict.fromkeys(ATTRIBUTES, 0)
    misses: dict[str, collections.Counter[str]] = {a: collections.Counter() for a in ATTRIBUTES}
    images = []
    started = time.perf_counter()
    for i in range(args.n):
        scene = world.held_out_scene(i)
        prompt = world.caption(scene, random.Random(i))
        image = pipe(prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
                     guidance_rescale=args.rescale,
                     generator=torch.Generator().manual_seed(i)).images[0]
        images.append(image)
        reading = analyze.read(image)
        for name, ok in analyze.agreement(reading, scene, ATTRIBUTES).items():
            model_hits[name] += ok
            if not ok:
                misses[name][f"{getattr(scene, name)} → {getattr(reading, name)}"] += 1
        truth = analyze.read(world.render(scene))
        for name, ok in analyze.agreement(truth, scene, ATTRIBUTES).items():
            truth_hits[name] += ok
    seconds = (time.perf_counter() - started) / args.n
    print(f"{args.model}: {args.n} held-out captions, {args.steps} steps of "
          f"{type(pipe.scheduler).__name__}, guidance {args.guidance}"
          f"{', channels_last' if args.channels_last else ''}; {seconds:.3f} s per image\n")
    print(f"{'attribute':<12}{'model':>8}{'analyzer on truth':>20}{'target':>9}")
    for name in ATTRIBUTES:
        target = TARGETS.get(name)
        mark = "" if target is None else ("  met" if model_hits[name] / args.n >= target
                                          else "  MISSED")
        print(f"{name:<12}{model_hits[name] / args.n:>8.1%}{truth_hits[name] / args.n:>20.1%}"
              f"{'' if target is None else f'{target:.0%}':>9}{mark}")
    print("\ncommonest misreadings (asked → read, count):")
    for name in ATTRIBUTES:
        top = ", ".join(f"{k} {n}" for k, n in misses[name].most_common(6))
        print(f"  {name:<11}{top or '-'}")
    if args.save is not None:
        _sheet(images[:32], args.save)


def _sheet(images: list, path: Path) -> None:
    from PIL import Image

    sheet = Image.new("RGB", (8 * 64, 4 * 64))
    for k, image in enumerate(images):
        sheet.paste(image, ((k % 8) * 64, (k // 8) * 64))
    sheet.resize((sheet.width * 2, sheet.height * 2), Image.Resampling.NEAREST).save(path)
    print(f"sheet: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
