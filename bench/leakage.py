"""Leakage of the gated edit over many concepts: how far a prompt that names no concept
moves when a concept's edit is forced on, and where along the text the gate opens.

    .venv/bin/python bench/leakage.py [--model toy:shapes] [--concepts 8] [--seeds 4]
        [--prompts 8] [--steps 100] [--batch 4] [--render-steps 25] [--threads 1]
        [--method perfusion|all_positions]

Concepts: `--concepts` objects of the toy world (`world.held_out_scene`: outline, colour,
pattern), each learned from 5 renders (`world.render`) at other sizes, positions,
backgrounds and rotations, with its outline word as supercategory; each trained with
`--seeds` training seeds. Prompts: `--prompts` held-out world captions naming no concept
(`world.caption(world.held_out_scene(i), random.Random(i))`), rendered with the concept's
edit forced on (every loaded concept gated in, as if the prompt named it) and by the base
model, with the same seeds. Per image: the mean absolute pixel difference, of 255. It
prints the distribution over concepts × seeds × prompts (mean, 95th percentile, max), and
per kind of text position (the prompt's words, the end-of-text token, the padding after
it) the mean projection coefficient s(e) and gate σ((s − β)/τ) at strength 0.5: where the
leak comes from. Any diffusers folder or built-in model works with `--model`; the world
only makes the pictures and the prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import torch
from ablations import METHODS

from perfusion_runtime.build.jobs import default_captions, load_pipeline
from perfusion_runtime.method.artifact import Concept
from perfusion_runtime.method.covariance import cinv_for
from perfusion_runtime.method.device import choose
from perfusion_runtime.method.fingerprint import base_fingerprint
from perfusion_runtime.method.key_locking import coefficients, gate, make_basis, strength_to_beta
from perfusion_runtime.method.render import apply_concepts
from perfusion_runtime.method.trainer import Recipe, Subject, encode, train
from perfusion_runtime.toy import world

STRENGTH = 0.5


def concept_pictures(i: int, folder: Path, count: int = 5) -> tuple[tuple[Path, ...], str]:
    """Five renders of held-out object i at other places, sizes and backgrounds; its word."""
    thing = world.held_out_scene(100 + i)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(count):
        where = world.held_out_scene(1000 + 10 * i + k)
        scene = world.with_changes(thing, size=where.size, position=where.position,
                                   background=where.background, dx=where.dx, dy=where.dy,
                                   angle=where.angle)
        paths.append(folder / f"{k}.png")
        world.render(scene).save(paths[-1])
    return tuple(paths), thing.shape


def render(pipe: Any, concepts: list[Concept], cinv: torch.Tensor, prompts: list[str],
           args: argparse.Namespace) -> list[np.ndarray]:
    with apply_concepts(pipe, concepts, cinv=cinv) as applied:
        if concepts:  # forced on: every prompt is edited by every loaded concept
            applied.tokens_in = lambda _prompts: list(applied.concepts)  # type: ignore[method-assign]
        images = applied(prompts, seed=list(range(1000, 1000 + len(prompts))),
                         strength=STRENGTH, num_inference_steps=args.render_steps,
                         guidance_scale=args.guidance, output_type="np")
    return [np.asarray(im, dtype=np.float64) * 255 for im in images]


def gate_by_position(pipe: Any, concept: Concept, cinv: torch.Tensor, prompts: list[str]
                     ) -> dict[str, tuple[float, float]]:
    """Mean s(e) and gate per kind of position, over the prompts' encodings."""
    hidden, ids = encode(pipe, prompts)
    basis = make_basis(concept.i_star[None].to(hidden.device), cinv.to(hidden.device))
    with torch.no_grad():
        s = coefficients(hidden.float(), basis)[..., 0]  # [B, T]
    g = gate(s, strength_to_beta(STRENGTH, "local"), 0.15)
    eos = int(pipe.tokenizer.eos_token_id)
    first_eos = (ids == eos).float().argmax(1)  # [B]
    where = torch.arange(ids.shape[1])[None]
    kinds = {"words": (where > 0) & (where < first_eos[:, None]),
             "end of text": where == first_eos[:, None],
             "padding": where > first_eos[:, None]}
    return {k: (float(s[m].mean()), float(g[m].mean())) for k, m in kinds.items()}


def arguments(steps: int, render_steps: int) -> argparse.ArgumentParser:
    """The options this bench shares with `edit_positions.py`."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="toy:shapes")
    parser.add_argument("--concepts", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--render-steps", type=int, default=render_steps)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write every figure here")
    return parser


def prepare(args: argparse.Namespace, name: str
            ) -> tuple[Any, Path, torch.Tensor, str, list[str], list[np.ndarray]]:
    """The pipeline, a work folder, C⁻¹ and its fingerprint, the prompts that name no
    concept and their base-model renders."""
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model, choose("cpu"))
    pipe.set_progress_bar_config(disable=True)
    work = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    cinv, cinv_print = cinv_for(pipe, work / "cache", default_captions(args.model))
    prompts = [world.caption(world.held_out_scene(i), random.Random(i))
               for i in range(args.prompts)]
    return pipe, work, cinv, cinv_print, prompts, render(pipe, [], cinv, prompts, args)


def main() -> None:
    parser = arguments(steps=100, render_steps=25)
    parser.description = __doc__.split("\n")[0]
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--method", default="perfusion", choices=sorted(METHODS),
                        help="the training (ablations.py): all_positions edits the padding "
                             "after the prompt's end too, as files before format 3 did")
    args = parser.parse_args()
    started = time.perf_counter()
    pipe, work, cinv, cinv_print, prompts, base = prepare(args, "leakage")
    leaks: list[dict[str, Any]] = []
    positions: list[dict[str, tuple[float, float]]] = []
    for i in range(args.concepts):
        pictures, word = concept_pictures(i, work / f"concept{i}")
        for seed in range(args.seeds):
            recipe = Recipe(steps=args.steps, batch=args.batch, seed=seed, flip=False,
                            templates=("a {}",))
            concept = train(pipe, Subject(f"c{i}*", (word,), (), pictures, base_model=args.model),
                            recipe, cinv, cinv_fingerprint=cinv_print,
                            base_fingerprint=base_fingerprint(pipe),
                            method=METHODS[args.method])
            forced = render(pipe, [concept], cinv, prompts, args)
            for k, (a, b) in enumerate(zip(forced, base, strict=True)):
                leaks.append({"concept": i, "seed": seed, "prompt": k,
                              "mean": float(np.abs(a - b).mean()),
                              "max": float(np.abs(a - b).max())})
            positions.append(gate_by_position(pipe, concept, cinv, prompts))
            print(f"concept {i} ({word}) seed {seed}: mean leak "
                  f"{np.mean([x['mean'] for x in leaks[-len(prompts):]]):.3f}/255", flush=True)
    report(leaks, positions, args, time.perf_counter() - started)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "leaks": leaks, "positions": positions}, indent=1))


def report(leaks: list[dict[str, Any]], positions: list[dict[str, tuple[float, float]]],
           args: argparse.Namespace, seconds: float) -> None:
    means = np.array([x["mean"] for x in leaks])
    maxes = np.array([x["max"] for x in leaks])
    print(f"\n{args.model}: {args.concepts} concepts × {args.seeds} seeds × {args.prompts} "
          f"prompts = {len(leaks)} images; {args.steps} steps of {args.batch}; "
          f"{args.render_steps} render steps, guidance {args.guidance}; {seconds:.0f} s\n")
    print("| leak per image (of 255) | mean | 95th percentile | max |\n|---|---:|---:|---:|")
    print(f"| mean absolute difference | {means.mean():.3f} | {np.percentile(means, 95):.3f} | "
          f"{means.max():.3f} |")
    print(f"| largest pixel difference | {maxes.mean():.1f} | {np.percentile(maxes, 95):.1f} | "
          f"{maxes.max():.1f} |")
    print("\n| positions | mean s(e) | mean gate |\n|---|---:|---:|")
    for kind in positions[0]:
        s = np.mean([p[kind][0] for p in positions])
        g = np.mean([p[kind][1] for p in positions])
        print(f"| {kind} | {s:.3f} | {g:.3f} |")


if __name__ == "__main__":
    main()
