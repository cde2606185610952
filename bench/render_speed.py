"""Rendering with `apply_concepts` against a plain diffusers `StableDiffusionPipeline.__call__`.

    .venv/bin/python bench/render_speed.py            # tiny, width 128, SD 1.5 UNet: ~8 min
    .venv/bin/python bench/render_speed.py --quick    # tiny model, 3 rounds: ~1 min

Part 1, whole renders. A concept is trained for a few steps on the tiny pipeline (random
seeded weights: the bench measures speed, not likeness) and loaded with `apply_concepts` into
a copy of the same model (and, with its lock option set to global, into another); a further
copy stays stock. The same N prompts (8 by default), steps, guidance and seeds (one generator
per image) are rendered by:

- `plain, 1 call of N`: the stock pipeline, `pipe(prompts, generator=[...])`;
- `plain, N calls of 1`: the stock pipeline once per prompt. `Applied.__call__` renders one
  image per pipeline call on the CPU (render.py: torch's CPU kernels give different bits for
  different batch sizes, and image k must not depend on the rest of the batch), so this row
  isolates what our processors cost from what that policy costs;
- `plain, N calls of 1, token as text`: the same with `teddy*` in the prompts as plain text;
- `ours, no concept token`: `applied(prompts, seed=[...])`, prompts naming no loaded concept;
- `ours, concept, local lock` / `global lock`: the prompts with `teddy*` for `teddy bear`
  (global lock also encodes the supercategory prompt and takes keys from it).

Forward hooks on every cross-attention `to_k` and `to_v` count calls in one extra, untimed
render per row, and a wrapper around our processors' projection counts the K/V pairs they
compute. The images of the rows without a concept token are compared with the plain
pipeline's.

Part 2, SD 1.5 (full run only): the real SD 1.5 UNet (random weights) at 256 px (32×32
latents), classifier-free-guidance batch 2, a few consecutive denoising steps on the same
prompt encodings, with diffusers' processors (K/V projected every step), ours with no concept
and ours with a concept active (K/V computed at the first step, reused after).

Rows are interleaved round by round in a rotating order; torch runs on one thread by default
so that the CPU time of the process is the render's own work on a shared machine. No test
runs this file or asserts a timing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _images import make_images
from architectures import sd15_unet_and_text_encoder
from torch import Tensor

from perfusion_runtime.method.artifact import Concept
from perfusion_runtime.method.covariance import CAPTIONS_PATH, estimate_cinv, load_captions
from perfusion_runtime.method.fingerprint import base_fingerprint
from perfusion_runtime.method.key_locking import inverse_covariance, make_basis, second_moment
from perfusion_runtime.method.layers import cross_attention_layers
from perfusion_runtime.method.processor import ConceptState, PerfusionAttnProcessor, install
from perfusion_runtime.method.render import Applied, apply_concepts
from perfusion_runtime.method.tiny import tiny_pipeline
from perfusion_runtime.method.trainer import Recipe, Subject, train

SEED = 0
CAPTIONS = 512  # of the shipped corpus, for C⁻¹ (not timed)
MODELS = (("tiny", 32), ("width 128", 128))  # (label, model width); both render 32×32 px
SCENES = ("on the beach", "in the snow", "on a wooden table", "in a forest at night",
          "next to a red car", "in a city street", "on the moon", "under water",
          "in a kitchen", "on a mountain top", "in the rain", "at a birthday party")
TEMPLATE = "a photo of a {} {}"
SD15_LATENT = 32  # 256 px

PLAIN_BATCHED = "plain, 1 call of N"
PLAIN_EACH = "plain, N calls of 1"
PLAIN_EACH_NAMED = "plain, N calls of 1, token as text"
OURS_BARE = "ours, no concept token"
OURS_LOCAL = "ours, concept, local lock"
OURS_GLOBAL = "ours, concept, global lock"
RATIOS = ((OURS_BARE, PLAIN_EACH), (OURS_LOCAL, PLAIN_EACH_NAMED),
          (OURS_GLOBAL, PLAIN_EACH_NAMED), (OURS_BARE, PLAIN_BATCHED),
          (OURS_LOCAL, PLAIN_BATCHED), (PLAIN_EACH, PLAIN_BATCHED))
SD15_DEFAULT = "diffusers' processors"
SD15_BARE = "ours, no concept"
SD15_CONCEPT = "ours, concept (local lock)"
WIDTHS = (10, 12, 9, 11)  # best wall, median wall, best CPU, median CPU


def prompts(subject: str, count: int) -> list[str]:
    return [TEMPLATE.format(subject, SCENES[k % len(SCENES)]) for k in range(count)]


@dataclass
class Row:
    label: str
    run: Callable[[], Any]  # one timed unit; returns the images (part 1)
    pipe: Any  # whose cross-attention layers are counted
    before: Callable[[], None] = lambda: None  # untimed set-up before each run


Times = dict[str, list[tuple[float, float]]]


# ---- part 1: whole renders on the tiny pipelines --------------------------------------------


def trained_concept(width: int, folder: Path) -> tuple[Concept, Tensor]:
    """A concept trained for a few steps on a copy of the model, and the C⁻¹ it used."""
    pipe = tiny_pipeline(SEED, width)
    cinv = estimate_cinv(pipe.tokenizer, pipe.text_encoder,
                         load_captions(CAPTIONS_PATH)[:CAPTIONS])
    subject = Subject("teddy*", ("teddy bear", "toy"), ("brown",), make_images(folder, 2, 32))
    concept = train(pipe, subject, Recipe(steps=8, batch=2, resolution=32, seed=SEED), cinv,
                    cinv_fingerprint="0" * 64, base_fingerprint=base_fingerprint(pipe))
    return concept, cinv


def render_rows(width: int, count: int, steps: int, folder: Path) -> list[Row]:
    concept, cinv = trained_concept(width, folder)
    plain = tiny_pipeline(SEED, width)
    seeds = list(range(count))
    options: dict[str, Any] = {"num_inference_steps": steps, "output_type": "np"}

    def batched(texts: list[str]) -> Callable[[], np.ndarray]:
        def go() -> np.ndarray:
            generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
            return np.asarray(plain(texts, generator=generators, **options).images)
        return go

    def each(texts: list[str]) -> Callable[[], np.ndarray]:
        def go() -> np.ndarray:
            return np.concatenate([
                plain(text, generator=torch.Generator("cpu").manual_seed(s), **options).images
                for text, s in zip(texts, seeds, strict=True)])
        return go

    def ours(applied: Applied, texts: list[str]) -> Callable[[], np.ndarray]:
        return lambda: np.stack(applied(texts, seed=seeds, **options))

    bare, named = prompts("teddy bear", count), prompts("teddy*", count)
    local = apply_concepts(tiny_pipeline(SEED, width), [concept], cinv=cinv)
    as_global = concept.with_options(lock="global")
    global_ = apply_concepts(tiny_pipeline(SEED, width), [as_global], cinv=cinv)
    return [Row(PLAIN_BATCHED, batched(bare), plain),
            Row(PLAIN_EACH, each(bare), plain),
            Row(PLAIN_EACH_NAMED, each(named), plain),
            Row(OURS_BARE, ours(local, bare), local.pipe),
            Row(OURS_LOCAL, ours(local, named), local.pipe),
            Row(OURS_GLOBAL, ours(global_, named), global_.pipe)]


@contextmanager
def counting(unet: Any) -> Iterator[dict[str, int]]:
    """Calls of every cross-attention to_k/to_v, and the K/V pairs computed: our processors'
    projections, counted by wrapping the method (for diffusers' processors: the to_k calls,
    one per K/V pair)."""
    counts = {"calls": 0, "pairs": 0}
    layers = cross_attention_layers(unet)
    ours = any(isinstance(a.processor, PerfusionAttnProcessor) for a in layers.values())
    project = PerfusionAttnProcessor._project

    def counted(self: PerfusionAttnProcessor, *args: Any) -> Any:
        counts["pairs"] += 1
        return project(self, *args)

    def hook(*_: Any) -> None:
        counts["calls"] += 1

    handles = [p.register_forward_hook(hook) for a in layers.values() for p in (a.to_k, a.to_v)]
    PerfusionAttnProcessor._project = counted  # type: ignore[method-assign]
    try:
        yield counts
    finally:
        PerfusionAttnProcessor._project = project  # type: ignore[method-assign]
        for handle in handles:
            handle.remove()
        if not ours:
            counts["pairs"] = counts["calls"] // 2


# ---- part 2: denoising steps of SD 1.5's UNet ------------------------------------------------


def sd15_rows(steps: int) -> list[Row]:
    """`steps` UNet calls on one CFG batch of prompt encodings, as a pipeline makes them."""
    unet, _ = sd15_unet_and_text_encoder(device="cpu", seed=SEED)
    generator = torch.Generator().manual_seed(SEED)
    width = int(unet.config.cross_attention_dim)
    encodings = torch.randn(2, 77, width, generator=generator)  # [uncond, cond]
    latents = torch.randn(2, 4, SD15_LATENT, SD15_LATENT, generator=generator)
    cinv = inverse_covariance(second_moment(torch.randn(4 * width, width, generator=generator)))
    i_super = torch.randn(width, generator=generator)
    layers = cross_attention_layers(unet)
    o_k = {n: (a.to_k.weight @ i_super)[None] for n, a in layers.items()}
    o_v = {n: (a.to_v.weight @ i_super)[None] for n, a in layers.items()}
    basis = make_basis(encodings[1, 5][None], cinv)  # the concept sits at position 5
    default = dict(unet.attn_processors)
    state = ConceptState()
    install(unet, state)
    ours = dict(unet.attn_processors)

    def denoise() -> None:
        with torch.no_grad():
            for t in torch.linspace(900, 100, steps).long():
                unet(latents, t, encoder_hidden_states=encodings)

    def use(processors: dict[str, Any], concept: bool) -> Callable[[], None]:
        def go() -> None:
            unet.set_attn_processor(dict(processors))
            if concept:  # a new activation, as each Applied call makes: the K/V cache misses
                state.activate(basis, o_k, o_v, beta=0.7, lock="local")
            else:
                state.deactivate()
        return go

    return [Row(SD15_DEFAULT, denoise, _Unet(unet), use(default, False)),
            Row(SD15_BARE, denoise, _Unet(unet), use(ours, False)),
            Row(SD15_CONCEPT, denoise, _Unet(unet), use(ours, True))]


@dataclass
class _Unet:
    """Stands in for a pipeline in `Row.pipe` (only `.unet` is read)."""

    unet: Any


# ---- timing and the tables -------------------------------------------------------------------


def timed(row: Row) -> tuple[float, float, Any]:
    row.before()
    wall, cpu = time.perf_counter(), time.process_time()
    out = row.run()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def measure(table: list[Row], warmup: int, repeat: int) -> Times:
    """Warm-up, then `repeat` rounds; each round runs every row once, in a rotating order."""
    for _ in range(warmup):
        for row in table:
            timed(row)
    times: Times = {row.label: [] for row in table}
    for r in range(repeat):
        for row in table[r % len(table):] + table[:r % len(table)]:
            wall, cpu, _ = timed(row)
            times[row.label].append((wall, cpu))
    return times


def stats(times: Times) -> dict[str, tuple[float, ...]]:
    """row -> (best wall, median wall, best CPU, median CPU) in seconds."""
    out = {}
    for label, pairs in times.items():
        wall, cpu = [w for w, _ in pairs], [c for _, c in pairs]
        out[label] = (min(wall), statistics.median(wall), min(cpu), statistics.median(cpu))
    return out


def table_rows(table: list[Row], times: Times, unit: str) -> dict[str, Any]:
    """Prints one line per row (with counts from an untimed run); returns each row's output."""
    figures = stats(times)
    print(f"  {unit:<58}{'best wall':>10}{'median wall':>12}{'best CPU':>9}{'median CPU':>11}"
          f"{'to_k+to_v calls':>17}{'K/V pairs':>11}")
    outputs = {}
    for row in table:
        row.before()
        with counting(row.pipe.unet) as counts:
            outputs[row.label] = row.run()
        cells = "".join(f"{x:>{w}.3f}" for x, w in zip(figures[row.label], WIDTHS, strict=True))
        print(f"  {row.label + f' ({len(times[row.label])} runs)':<58}{cells}"
              f"{counts['calls']:>17}{counts['pairs']:>11}")
    return outputs


def ratios(times: Times, pairs: tuple[tuple[str, str], ...]) -> None:
    figures = stats(times)
    for a, b in pairs:
        cells = "".join(f"{x / y:>{w}.3f}" for x, y, w in zip(figures[a], figures[b], WIDTHS,
                                                              strict=True))
        print(f"  {a + ' / ' + b.removeprefix('plain, '):<58}{cells}")


def report_renders(label: str, table: list[Row], times: Times, count: int, steps: int) -> None:
    pipe = table[0].pipe
    side = pipe.unet.config.sample_size * (1 << (len(pipe.vae.config.block_out_channels) - 1))
    print(f"\n{label}: {count} prompts, 1 image each, {steps} steps, guidance 7.5, "
          f"{side}×{side} px, {len(cross_attention_layers(pipe.unet))} cross-attention layers")
    images = table_rows(table, times, f"seconds for {count} images")
    ratios(times, RATIOS)

    def gap(a: str, b: str) -> float:
        return float(np.abs(images[a] - images[b]).max())

    print(f"  max |Δ| per pixel (0–1): ours without a concept token vs plain N calls of 1 "
          f"{gap(OURS_BARE, PLAIN_EACH):.1e}, vs plain 1 call of N "
          f"{gap(OURS_BARE, PLAIN_BATCHED):.1e}; plain N calls of 1 vs 1 call of N "
          f"{gap(PLAIN_EACH, PLAIN_BATCHED):.1e}; ours with the concept vs plain "
          f"{gap(OURS_LOCAL, PLAIN_EACH_NAMED):.1e}")


def report_sd15(table: list[Row], times: Times, steps: int) -> None:
    print(f"\nSD 1.5 UNet (random weights): {steps} denoising steps, CFG batch 2, latents "
          f"{SD15_LATENT}×{SD15_LATENT} (256 px), 16 cross-attention layers")
    table_rows(table, times, f"seconds for {steps} UNet calls")
    ratios(times, ((SD15_BARE, SD15_DEFAULT), (SD15_CONCEPT, SD15_DEFAULT)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="the tiny model only, 3 rounds, no SD 1.5")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per call (default 8)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    parser.add_argument("--repeat", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--sd15-steps", type=int, default=3,
                        help="UNet calls per SD 1.5 row (default 3)")
    parser.add_argument("--sd15-repeat", type=int, default=3,
                        help="timed rounds of SD 1.5 (default 3; 0 leaves it out)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1, see the module docstring)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeat = min(args.repeat, 3) if args.quick else args.repeat
    print(f"render_speed: {args.warmup} warm-up round(s), then timed rounds; torch "
          f"{torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as folder:
        for label, width in MODELS[:1] if args.quick else MODELS:
            table = render_rows(width, args.prompts, args.steps, Path(folder) / str(width))
            report_renders(label, table, measure(table, args.warmup, repeat), args.prompts,
                           args.steps)
    if not args.quick and args.sd15_repeat > 0:
        table = sd15_rows(args.sd15_steps)
        report_sd15(table, measure(table, 1, args.sd15_repeat), args.sd15_steps)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
