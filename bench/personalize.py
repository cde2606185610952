"""Personalization benchmark on `toy:shapes`: Perfusion (local and global key locking),
Perfusion with trained keys, and textual inversion, on held-out concepts, measured with the
world's analyzer.

    .venv/bin/python bench/personalize.py [--model toy:shapes] [--prompts 8] [--steps 400]
        [--batch 8] [--strengths 0 0.25 0.5 0.75 1] [--out docs/benchmarks] [--concepts moon* ...]

Each concept is learned from 5 world renders of one object (random size, position,
background and rotation) with its supercategory from the world's vocabulary, by each of
three trainings with the same recipe (steps, batch, seed): Perfusion (locked keys),
"trained keys" (o*_K optimised too) and "embedding only" (textual inversion). Perfusion's
concept is rendered with local and with global key locking. Every method renders the same
prompts with the same seeds; the prompts put the concept at new positions, sizes and
backgrounds. The analyzer scores

- fidelity: `analyze.fidelity(image, training images)`;
- alignment: the share of position, size and background that the analyzer reads as the
  prompt asked;
- leakage: prompts without any concept token, rendered with the concept's edit forced on
  (as if a token were present), against the base model at the same seeds: mean absolute
  pixel difference, of 255. (`perfusion run` turns the edit off for prompts that name no
  concept, so there it is exactly 0.)

It prints the tables (Markdown), writes `<out>/results.json`, the strength sweep plot
`<out>/strength_sweep.png` and a sheet of sample renders `<out>/samples.png`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import torch
from _plot import line_plot
from PIL import Image

from perfusion_dsl.options import GENERATE, LEARN, defaults_for
from perfusion_runtime.covariance import cinv_for
from perfusion_runtime.device import choose
from perfusion_runtime.fingerprint import base_fingerprint
from perfusion_runtime.jobs import default_captions, load_pipeline
from perfusion_runtime.render import Applied, apply_concepts
from perfusion_runtime.toy import analyze, world
from perfusion_runtime.trainer import Recipe, Subject, train

REPO = Path(__file__).resolve().parent.parent
ALIGNMENT = ("position", "size", "background")
ALL_SHAPES = world.SHAPES + world.UNSEEN_SHAPES


@dataclass(frozen=True)
class Spec:
    """A held-out concept: one object of the world, and how a user would declare it."""

    token: str
    shape: str
    colour: str
    supercategory: str
    pattern: str = "solid"
    second: str | None = None
    note: str = ""

    def scene(self, rng: random.Random) -> world.Scene:
        """The object at a random size, position, background and rotation."""
        base = world.sample_scene(rng)
        return world.with_changes(base, shape=self.shape, colour=self.colour,
                                  pattern=self.pattern, second=self.second)


SPECS = (
    Spec("duo*", "diamond", "purple", "diamond", "striped", "yellow",
         "in the span: a purple and yellow striped diamond, never named as such"),
    Spec("spot*", "square", "cyan", "square", "dotted", "red",
         "in the span: a cyan square with red dots"),
    Spec("moon*", "crescent", "orange", "circle", note="unseen shape: an orange crescent"),
    Spec("kite*", "arrow", "green", "triangle", note="unseen shape: a green arrow"),
    Spec("love*", "heart", "pink", "circle", note="unseen shape: a pink heart"),
)
TRAININGS = ("perfusion", "trained_keys", "embedding_only")
# method -> (training variant, how it renders)
METHODS = {
    "Perfusion, local lock": ("perfusion", "local"),
    "Perfusion, global lock": ("perfusion", "global"),
    "Perfusion, trained keys": ("trained_keys", "local"),
    "textual inversion": ("embedding_only", "embedding"),
}
BASELINE = "base model, supercategory word"
# the compiler's defaults for toy:shapes: training (400 steps of 8, templates ["a {}"]) and
# sampling (25 steps, guidance 5)
_LEARN = defaults_for(LEARN, "toy:shapes")
_GENERATE = defaults_for(GENERATE, "toy:shapes")
RENDER = {"num_inference_steps": _GENERATE["steps"], "guidance_scale": _GENERATE["guidance"]}


def training_images(spec: Spec, folder: Path, count: int = 5) -> tuple[Path, ...]:
    rng = random.Random(f"train {spec.token}")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(count):
        path = folder / f"{k}.png"
        world.render(spec.scene(rng)).save(path)
        paths.append(path)
    return tuple(paths)


def prompts_for(spec: Spec, n: int) -> list[tuple[world.Scene, str]]:
    """n scenes of the concept with their prompts (the token as the subject)."""
    rng = random.Random(f"prompts {spec.token}")
    out = []
    for _ in range(n):
        scene = spec.scene(rng)
        out.append((scene, world.caption(scene, rng, subject=spec.token)))
    return out


def leak_prompts(n: int) -> list[str]:
    """n full held-out world captions (no concept token)."""
    return [world.caption(world.held_out_scene(50_000 + i), random.Random(i)) for i in range(n)]


def alignment(image: Image.Image, scene: world.Scene) -> float:
    got = analyze.agreement(analyze.read(image, ALL_SHAPES), scene, ALIGNMENT)
    return float(sum(got.values())) / len(ALIGNMENT)


def _render(applied: Applied, prompts: Sequence[str], seeds: Sequence[int], strength: float,
            mode: str) -> list[Image.Image]:
    """Render with the concepts applied as `mode`: "local"/"global" (Perfusion; the concept's
    lock is set at load), "embedding" (the token's embedding only: the edit stays off)."""
    if mode == "embedding":
        applied.tokens_in = lambda _prompts: []
    return list(applied(list(prompts), seed=list(seeds), strength=strength, **RENDER))


def _forced(applied: Applied) -> Applied:
    """Every loaded concept's edit on, whatever the prompt names (the leakage measurement)."""
    applied.tokens_in = lambda _prompts: list(applied.concepts)
    return applied


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="toy:shapes")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per concept")
    parser.add_argument("--leak", type=int, default=8, help="prompts without a concept")
    parser.add_argument("--steps", type=int, default=_LEARN["steps"],
                        help="training steps (all methods)")
    parser.add_argument("--batch", type=int, default=_LEARN["batch"])
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--concepts", nargs="+", default=[s.token for s in SPECS[:4]],
                        help="tokens of SPECS (default: the first four; love* is spare)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks")
    parser.add_argument("--work", type=Path, default=Path("/tmp/perfusion-bench"))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    specs = [s for s in SPECS if s.token in args.concepts]
    pipe = load_pipeline(args.model, choose("cpu"))
    captions = default_captions(args.model)
    cinv, cinv_print = cinv_for(pipe, args.work / "cache", captions)
    base_print = base_fingerprint(pipe)
    # no mirrored copies: a crescent or an arrow points one way
    recipe = Recipe(steps=args.steps, batch=args.batch, templates=tuple(_LEARN["templates"]),
                    flip=False)
    log = print
    results: dict[str, Any] = {"settings": {
        "model": args.model, "prompts": args.prompts, "leak_prompts": args.leak,
        "steps": args.steps, "batch": args.batch, "strengths": args.strengths,
        "render": RENDER, "templates": list(recipe.templates), "threads": args.threads,
        "headline_strength": _headline(args.strengths), "torch": torch.__version__},
        "concepts": {}}
    samples: list[list[Image.Image]] = []
    leak = leak_prompts(args.leak)
    leak_seeds = list(range(1000, 1000 + args.leak))
    with apply_concepts(pipe, [], cinv=cinv) as plain:
        base_leak = _render(plain, leak, leak_seeds, 0.5, "local")
    for spec in specs:
        images = training_images(spec, args.work / "images" / spec.token.rstrip("*"))
        refs = [Image.open(p).convert("RGB") for p in images]
        subject = Subject(token=spec.token, supercategories=(spec.supercategory,),
                          adjectives=(), images=images, base_model=args.model)
        row: dict[str, Any] = {"note": spec.note, "supercategory": spec.supercategory,
                               "train_seconds": {}, "methods": {}}
        concepts = {}
        for variant in TRAININGS:
            started = time.perf_counter()
            concepts[variant] = train(
                pipe, subject, dataclasses.replace(recipe, variant=variant), cinv,
                cinv_fingerprint=cinv_print, base_fingerprint=base_print,
                options={"lock": "local"})
            row["train_seconds"][variant] = time.perf_counter() - started
            log(f"{spec.token}: trained {variant} in {row['train_seconds'][variant]:.0f} s")
        scenes = prompts_for(spec, args.prompts)
        prompts = [p for _, p in scenes]
        seeds = list(range(len(prompts)))
        plain_prompts = [p.replace(spec.token, spec.supercategory) for p in prompts]
        with apply_concepts(pipe, [], cinv=cinv) as plain:
            shown = _render(plain, plain_prompts, seeds, 0.5, "local")
        row["methods"][BASELINE] = {"none": _score(shown, scenes, refs)}
        sample_row = [refs[0], shown[0]]
        for method, (variant, mode) in METHODS.items():
            lock = "global" if mode == "global" else "local"
            concept = dataclasses.replace(concepts[variant], options={"lock": lock})
            sweep: dict[str, Any] = {}
            strengths = args.strengths if mode != "embedding" else [_headline(args.strengths)]
            for strength in strengths:
                with apply_concepts(pipe, [concept], cinv=cinv) as applied:
                    shown = _render(applied, prompts, seeds, strength, mode)
                key = "none" if mode == "embedding" else f"{strength:g}"
                sweep[key] = _score(shown, scenes, refs)
                if strength == _headline(args.strengths):
                    sample_row.append(shown[0])
            with apply_concepts(pipe, [concept], cinv=cinv) as applied:
                leaked = _render(_forced(applied) if mode != "embedding" else applied, leak,
                                 leak_seeds, _headline(args.strengths), mode)
            sweep["leakage_of_255"] = _leakage(leaked, base_leak)
            row["methods"][method] = sweep
            log(f"{spec.token}: {method}: " + ", ".join(
                f"{k}: fid {v['fidelity']:.3f} align {v['alignment']:.3f}"
                for k, v in sweep.items() if isinstance(v, dict))
                + f"; leakage {sweep['leakage_of_255']:.3f}/255")
        samples.append(sample_row)
        results["concepts"][spec.token] = row
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    _sheet(samples, args.out / "samples.png")
    _plot(results, args.out / "strength_sweep.png")
    print(tables(results))


def _headline(strengths: Sequence[float]) -> float:
    """The strength the tables and the sample sheet show: 0.5 (the default) when swept."""
    return 0.5 if 0.5 in strengths else strengths[len(strengths) // 2]


def _score(images: Sequence[Image.Image], scenes: Sequence[tuple[world.Scene, str]],
           refs: Sequence[Image.Image]) -> dict[str, float]:
    fid = [analyze.fidelity(im, refs) for im in images]
    ali = [alignment(im, scene) for im, (scene, _) in zip(images, scenes, strict=True)]
    return {"fidelity": float(np.mean(fid)), "alignment": float(np.mean(ali))}


def _leakage(images: Sequence[Image.Image], base: Sequence[Image.Image]) -> float:
    diffs = [np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean()
             for a, b in zip(images, base, strict=True)]
    return float(np.mean(diffs))


def _mean_over(results: dict[str, Any], method: str, key: str,
               pick: Callable[[Any], float]) -> float:
    return float(np.mean([pick(row["methods"][method][key])
                          for row in results["concepts"].values()]))


def tables(results: dict[str, Any]) -> str:
    """The Markdown tables of docs/benchmarks.md from results.json."""
    lines = ["| method | fidelity | alignment | leakage (of 255) |", "|---|---|---|---|"]
    methods = [BASELINE, *METHODS]
    headline = f"{results['settings']['headline_strength']:g}"
    for method in methods:
        key = "none" if method in (BASELINE, "textual inversion") else headline
        fid = _mean_over(results, method, key, lambda v: v["fidelity"])
        ali = _mean_over(results, method, key, lambda v: v["alignment"])
        leak = ("—" if method == BASELINE else
                f"{_mean_over(results, method, 'leakage_of_255', float):.3f}")
        lines.append(f"| {method} | {fid:.3f} | {ali:.3f} | {leak} |")
    lines += ["", "| concept | " + " | ".join(methods) + " |",
              "|---|" + "---|" * len(methods)]
    for token, row in results["concepts"].items():
        cells = []
        for method in methods:
            key = "none" if method in (BASELINE, "textual inversion") else headline
            v = row["methods"][method][key]
            cells.append(f"{v['fidelity']:.2f} / {v['alignment']:.2f}")
        lines.append(f"| `{token}` | " + " | ".join(cells) + " |")
    lines += ["", "| strength | " + " | ".join(m for m in METHODS if m != "textual inversion")
              + " |", "|---|" + "---|" * (len(METHODS) - 1)]
    for s in results["settings"]["strengths"]:
        cells = []
        for method in METHODS:
            if method == "textual inversion":
                continue
            fid = _mean_over(results, method, f"{s:g}", lambda v: v["fidelity"])
            ali = _mean_over(results, method, f"{s:g}", lambda v: v["alignment"])
            cells.append(f"{fid:.3f} / {ali:.3f}")
        lines.append(f"| {s:g} | " + " | ".join(cells) + " |")
    seconds = [t for row in results["concepts"].values() for t in row["train_seconds"].values()]
    lines += ["", f"Training: {np.mean(seconds):.0f} s per concept and method on average "
                  f"({min(seconds):.0f}–{max(seconds):.0f} s)."]
    return "\n".join(lines)


def _plot(results: dict[str, Any], path: Path) -> None:
    series = []
    for method in METHODS:
        keys = (["none"] if method == "textual inversion"
                else [f"{s:g}" for s in results["settings"]["strengths"]])
        points = [(_mean_over(results, method, k, lambda v: v["alignment"]),
                   _mean_over(results, method, k, lambda v: v["fidelity"])) for k in keys]
        series.append((method, points, keys if len(keys) > 1 else []))
    base = [(_mean_over(results, BASELINE, "none", lambda v: v["alignment"]),
             _mean_over(results, BASELINE, "none", lambda v: v["fidelity"]))]
    series.append((BASELINE, base, []))
    line_plot(series, path, x_label="text alignment (position, size, background)",
              y_label="concept fidelity",
              title="strength sweep: mean over concepts (labels: strength)")


def _sheet(rows: list[list[Image.Image]], path: Path) -> None:
    """One row per concept: a training image, the base model with the supercategory word,
    then each method at strength 0.5 on the first prompt."""
    cols = max(len(r) for r in rows)
    sheet = Image.new("RGB", (cols * 64, len(rows) * 64), (255, 255, 255))
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            sheet.paste(image.convert("RGB").resize((64, 64)), (x * 64, y * 64))
    sheet.resize((sheet.width * 2, sheet.height * 2), Image.Resampling.NEAREST).save(path)


if __name__ == "__main__":
    main()
