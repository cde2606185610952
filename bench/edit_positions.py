"""Which text positions the Perfusion edit should touch: only the prompt's own (its start
token, words and end-of-text token: the trainer's), or every one of the 77, padding
included (the ablation `ablations.AllPositions`, as concept files before format 3).

    .venv/bin/python bench/edit_positions.py [--model toy:shapes] [--set world|personalize]
        [--concepts 8] [--seeds 1] [--prompts 8] [--fidelity-prompts 4] [--steps 400]
        [--batch 4] [--render-steps 20] [--threads 1] [--json PATH]

The concepts: with `--set world`, `--concepts` objects of the toy world (the concepts of
`leakage.py`: 5 renders each, its outline word as supercategory); with `--set personalize`,
the held-out concepts of `personalize.py` (among them those of `specs/`: the crescent, the
striped badge, the dotted tile), learned from its pictures, prompted in its phrasings. Each
concept is trained with `--seeds` training seeds, twice per seed, with the edit at the
prompt's positions (the trainer's `Method`) and at every position
(`ablations.AllPositions`), and each of the two concepts is rendered both ways
(`Concept.positions` decides where `Applied` edits). Per combination: the leak
(`leakage.py`'s measure: `--prompts` held-out captions that name no concept, the edit forced
on, against the base model; mean absolute difference of 255, its mean, 95th percentile and
max over images), the fidelity of `--fidelity-prompts` prompts naming the concept
(`analyze.fidelity` against its pictures), their alignment (position, size and background
read back right) and looks (colour, pattern and second colour read back right: the fidelity
measure barely sees patterns). Then, for the concepts trained at every position, where along
the text eq. 2 changes the values: the mean norm of W_V e, of the projection term s(e)·W_V
i* and of the gate term σ((s − β)/τ)·o*_V, per kind of position, over the layers.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import personalize
import torch
from ablations import METHODS
from leakage import STRENGTH, arguments, concept_pictures, prepare, render
from PIL import Image

from perfusion_runtime.method.artifact import Concept
from perfusion_runtime.method.fingerprint import base_fingerprint
from perfusion_runtime.method.key_locking import coefficients, gate, make_basis, strength_to_beta
from perfusion_runtime.method.layers import cross_attention_layers
from perfusion_runtime.method.processor import INFERENCE_TAU
from perfusion_runtime.method.render import apply_concepts
from perfusion_runtime.method.trainer import PERFUSION, Recipe, Subject, encode, train
from perfusion_runtime.toy import analyze, world

TRAININGS = {"prompt": PERFUSION, "all": METHODS["all_positions"]}
ALIGNMENT = personalize.ALIGNMENT


def fidelity_scenes(i: int, count: int) -> list[world.Scene]:
    """The concept's object at `count` other sizes, positions and backgrounds."""
    thing = world.held_out_scene(100 + i)
    return [world.with_changes(thing, **{k: getattr(world.held_out_scene(5000 + 10 * i + n), k)
                                         for k in ALIGNMENT}) for n in range(count)]


def concepts(args: argparse.Namespace, work: Path
             ) -> list[tuple[str, str, tuple[Path, ...], list[world.Scene]]]:
    """Per concept of the chosen set: its token, supercategory word, pictures and the
    scenes its fidelity prompts ask for."""
    if args.set == "world":
        found = []
        for i in range(args.concepts):
            pictures, word = concept_pictures(i, work / f"concept{i}")
            found.append((f"c{i}*", word, pictures, fidelity_scenes(i, args.fidelity_prompts)))
        return found
    return [(spec.token, spec.supercategory,
             personalize.training_images(spec, work / spec.token.rstrip("*")),
             [scene for scene, _ in personalize.prompts_for(spec, args.fidelity_prompts)])
            for spec in personalize.SPECS[:args.concepts]]


def score(pipe: Any, concept: Concept, cinv: torch.Tensor, scenes: list[world.Scene],
          refs: list[Image.Image], args: argparse.Namespace
          ) -> tuple[list[float], list[float], list[float]]:
    """Fidelity, alignment and looks (colour, pattern, second colour read right: the
    fidelity measure barely sees patterns) of each prompt naming the concept."""
    rng = random.Random(f"fidelity {concept.token}")
    prompts = [world.caption(s, rng, subject=concept.token) for s in scenes]
    with apply_concepts(pipe, [concept], cinv=cinv) as applied:
        images = applied(prompts, seed=list(range(2000, 2000 + len(prompts))),
                         strength=STRENGTH, num_inference_steps=args.render_steps,
                         guidance_scale=args.guidance)
    fid = [analyze.fidelity(im, refs) for im in images]
    ali, looks = personalize.read_back(images, scenes)
    return fid, ali, looks


def value_terms(pipe: Any, concept: Concept, cinv: torch.Tensor, prompts: list[str]
                ) -> dict[str, dict[str, float]]:
    """Mean norms of W_V e, s(e)·W_V i* and σ((s − β)/τ)·o*_V per kind of position."""
    hidden, ids = encode(pipe, [*prompts, ""])  # the unconditional row too
    hidden = hidden.float()
    basis = make_basis(concept.i_star[None], cinv)
    s = coefficients(hidden, basis)[..., 0]  # [B, T]
    g = gate(s, strength_to_beta(STRENGTH, "local"), INFERENCE_TAU)
    first = (ids == int(pipe.tokenizer.eos_token_id)).int().argmax(1)[:, None]
    where = torch.arange(ids.shape[1])[None]
    kinds = {"start": (where == 0).expand_as(s), "words": (where > 0) & (where < first),
             "end of text": where == first, "padding": where > first}
    sums: dict[str, dict[str, list[float]]] = {k: {"W e": [], "s·W i*": [], "gate·o*": []}
                                               for k in kinds}
    with torch.no_grad():
        for name, attn in cross_attention_layers(pipe.unet).items():
            w = attn.to_v.weight.float()
            plain = hidden @ w.T  # [B, T, O]
            projection = s[..., None] * (w @ concept.i_star)  # [B, T, O]
            gated = g[..., None] * concept.o_v[name]
            for kind, mask in kinds.items():
                for term, t in (("W e", plain), ("s·W i*", projection), ("gate·o*", gated)):
                    sums[kind][term].append(float(t[mask].norm(dim=-1).mean()))
    return {k: {t: float(np.mean(v)) for t, v in terms.items()} for k, terms in sums.items()}


def main() -> None:
    parser = arguments(steps=400, render_steps=20)
    parser.description = __doc__.split("\n")[0]
    parser.add_argument("--fidelity-prompts", type=int, default=4)
    parser.add_argument("--set", choices=("world", "personalize"), default="world",
                        help="the concepts: the toy world's held-out objects (leakage.py's) "
                             "or personalize.py's, those of specs/ among them")
    parser.add_argument("--seeds", type=int, default=1, help="training seeds per concept")
    args = parser.parse_args()
    started = time.perf_counter()
    pipe, work, cinv, cinv_print, prompts, base = prepare(args, "edit-positions")
    rows: dict[str, dict[str, list[float]]] = {}
    terms: list[dict[str, dict[str, float]]] = []
    chosen = concepts(args, work)
    for token, word, pictures, scenes in chosen:
        refs = [Image.open(p).convert("RGB") for p in pictures]
        for seed, (trained, method) in itertools.product(range(args.seeds), TRAININGS.items()):
            recipe = Recipe(steps=args.steps, batch=args.batch, seed=seed, flip=False,
                            templates=("a {}",))
            concept = train(pipe, Subject(token, (word,), (), pictures, base_model=args.model),
                            recipe, cinv, cinv_fingerprint=cinv_print,
                            base_fingerprint=base_fingerprint(pipe), method=method)
            if trained == "all":
                terms.append(value_terms(pipe, concept, cinv, prompts))
            for rendered in TRAININGS:
                shown = concept.with_options(positions=rendered)
                forced = render(pipe, [shown], cinv, prompts, args)
                fid, ali, looks = score(pipe, shown, cinv, scenes, refs, args)
                row = rows.setdefault(f"trained: {trained}, rendered: {rendered}",
                                      {"leak": [], "fidelity": [], "alignment": [], "looks": []})
                row["leak"] += [float(np.abs(a - b).mean()) for a, b in zip(forced, base,
                                                                            strict=True)]
                row["fidelity"] += fid
                row["alignment"] += ali
                row["looks"] += looks
        n = args.seeds * len(scenes)  # this concept's last images per row
        print(f"{token} ({word}) done, {time.perf_counter() - started:.0f} s: " + "; ".join(
            f"{name}: fidelity {np.mean(row['fidelity'][-n:]):.2f} looks "
            f"{np.mean(row['looks'][-n:]):.2f}" for name, row in rows.items()), flush=True)
    report(rows, terms, args, [token for token, *_ in chosen], time.perf_counter() - started)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "rows": rows, "terms": terms}, indent=1))


def report(rows: dict[str, dict[str, list[float]]], terms: list[dict[str, dict[str, float]]],
           args: argparse.Namespace, tokens: list[str], seconds: float) -> None:
    print(f"\n{args.model}: {len(tokens)} concepts ({args.set}) x {args.seeds} training seeds, "
          f"{args.prompts} leak prompts and {args.fidelity_prompts} concept prompts each; "
          f"{args.steps} steps of {args.batch}; "
          f"{args.render_steps} render steps, guidance {args.guidance}; {seconds:.0f} s\n")
    print("| edit positions | leak mean | leak p95 | leak max | fidelity | alignment | looks |\n"
          "|---|---:|---:|---:|---:|---:|---:|")
    for name, row in rows.items():
        leak = np.array(row["leak"])
        print(f"| {name} | {leak.mean():.3f} | {np.percentile(leak, 95):.3f} | {leak.max():.3f} "
              f"| {np.mean(row['fidelity']):.3f} | {np.mean(row['alignment']):.3f} "
              f"| {np.mean(row['looks']):.3f} |")
    print("\nFidelity / looks per concept (" + " ".join(tokens) + "):\n")
    for name, row in rows.items():
        n = len(row["fidelity"]) // len(tokens)
        cells = [f"{np.mean(row['fidelity'][k * n:(k + 1) * n]):.2f}/"
                 f"{np.mean(row['looks'][k * n:(k + 1) * n]):.2f}" for k in range(len(tokens))]
        print(f"{name:<36} " + " ".join(cells))
    print("\nValues under eq. 2, concepts trained at every position (mean norm over layers):\n\n"
          "| positions | W_V e | s(e)·W_V i* | gate·o*_V |\n|---|---:|---:|---:|")
    for kind in terms[0]:
        cells = [np.mean([t[kind][term] for t in terms]) for term in ("W e", "s·W i*", "gate·o*")]
        print(f"| {kind} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
