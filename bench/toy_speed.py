"""Speed of `toy:shapes` on this machine: train one concept with the default recipe, render 8
images with the default sampling settings.

    .venv/bin/python bench/toy_speed.py [--threads N] [--renders 8]

The recipe and the sampling settings are the compiler's defaults for `toy:shapes`
(`perfusion_dsl.options.defaults_for`): 300 steps of 8 images, templates ["a {}"]; 15
DPM-Solver++ steps (the model folder's sampler) at guidance 5, one image per pipeline call
on the CPU (as `perfusion run`). The concept is `moon*` from specs/images/moon/. It prints
the seconds of each phase: loading the pipeline, C⁻¹ on the model's caption corpus (once
per model: cached afterwards), training, and rendering.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

from perfusion_dsl.options import GENERATE, LEARN, defaults_for
from perfusion_dsl.plan import LearnOptions
from perfusion_runtime.build.jobs import default_captions, load_pipeline
from perfusion_runtime.method.covariance import cinv_for
from perfusion_runtime.method.device import choose
from perfusion_runtime.method.fingerprint import base_fingerprint
from perfusion_runtime.method.render import apply_concepts
from perfusion_runtime.method.trainer import Recipe, Subject, train

REPO = Path(__file__).resolve().parent.parent
MODEL = "toy:shapes"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--renders", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    learn, generate = defaults_for(LEARN, MODEL), defaults_for(GENERATE, MODEL)
    clock = time.perf_counter()
    pipe = load_pipeline(MODEL, choose("cpu"))
    loaded = time.perf_counter() - clock
    with tempfile.TemporaryDirectory() as cache:
        clock = time.perf_counter()
        cinv, cinv_print = cinv_for(pipe, Path(cache), default_captions(MODEL))
        cinv_seconds = time.perf_counter() - clock
    images = tuple(sorted((REPO / "specs" / "images" / "moon").glob("*.png")))
    subject = Subject("moon*", ("circle",), (), images, base_model=MODEL)
    recipe = Recipe.from_options(LearnOptions(**learn))
    clock = time.perf_counter()
    concept = train(pipe, subject, recipe, cinv, cinv_fingerprint=cinv_print,
                    base_fingerprint=base_fingerprint(pipe))
    trained = time.perf_counter() - clock
    prompts = [f"a large moon* {w}, black background" for w in
               ("on the left", "on the right", "at the top", "at the bottom")] * 4
    prompts = prompts[:args.renders]
    with apply_concepts(pipe, [concept], cinv=cinv) as applied:
        clock = time.perf_counter()
        applied(prompts, seed=list(range(len(prompts))), strength=0.5,
                num_inference_steps=generate["steps"], guidance_scale=generate["guidance"])
        rendered = time.perf_counter() - clock
    print(f"toy:shapes on {args.threads} thread(s), torch {torch.__version__}")
    print(f"  load the pipeline          {loaded:7.2f} s")
    print(f"  C⁻¹ ({'world corpus' if default_captions(MODEL) else 'general corpus'}, once per "
          f"model) {cinv_seconds:7.2f} s")
    print(f"  train one concept          {trained:7.2f} s  ({recipe.steps} steps of "
          f"{recipe.batch}: {trained / recipe.steps * 1000:.0f} ms a step)")
    print(f"  render {len(prompts)} images            {rendered:7.2f} s  ({generate['steps']} "
          f"steps, guidance {generate['guidance']:g}: {rendered / len(prompts):.2f} s an image)")


if __name__ == "__main__":
    main()
