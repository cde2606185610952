"""Cost of one Perfusion training step against a bare frozen-UNet forward + backward.

    .venv/bin/python bench/train_overhead.py            # tiny, width 128, SD 1.5 UNet: ~2 min
    .venv/bin/python bench/train_overhead.py --quick    # tiny model only: ~10 s
    .venv/bin/python bench/train_overhead.py --profile  # no timings: cProfile of the UNet rows

Each model gets one batch (latents, timesteps, noise, text encodings), drawn once from fixed
seeds, and four rows timed side by side, interleaved round by round in a rotating order so
that load on the machine falls on every row alike:

- `bare UNet`: diffusers' default attention processors, frozen UNet, forward and backward of
  the ε-MSE with gradients w.r.t. the text encodings only (so backward runs through the whole
  UNet, cross-attention K/V included);
- `Perfusion UNet`: the same batch and gradients with the Perfusion processors installed and
  the concept activated as the trainer does it each step (i* EMA update, `make_basis`,
  `ConceptState.activate`), edited K and V in every cross-attention layer, and an AdamW step
  on o*_V: what the edit adds to the UNet's work;
- `text + bare UNet`: the trainer's work without Perfusion (a textual-inversion step):
  text encoder forward with the trainable concept embedding, default processors, backward
  into the embedding, AdamW step;
- `Perfusion step`: a whole training step. On the tiny pipelines it is `trainer._step`
  itself (batch drawing and tokenization included; `text + bare UNet` then mirrors
  `trainer._micro_step` without the Perfusion lines). On SD 1.5 (UNet and CLIP ViT-L/14 with
  random weights; no tokenizer ships for it) both text rows run the text encoder on fixed
  token ids, with the concept token's row added through `tokens.extended_embedding`.

Models: the tiny pipeline (`tiny_pipeline`, width 32, 32 px images, 8×8 latents), the same at
width 128 (64 px, 16×16 latents), and SD 1.5's UNet at 256 px (32×32 latents, batch 1).
Torch runs on one thread by default, so the CPU time of the process is the step's own work
even when other processes share the machine; it prints wall and CPU ms per step (best and
median) and the ratios. No test runs this file or asserts a timing.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _images import make_images
from architectures import sd15_unet_and_text_encoder
from torch import Tensor, nn

from perfusion_runtime.method import trainer
from perfusion_runtime.method.covariance import CAPTIONS_PATH, estimate_cinv, load_captions
from perfusion_runtime.method.key_locking import inverse_covariance, make_basis, second_moment
from perfusion_runtime.method.layers import cross_attention_layers
from perfusion_runtime.method.processor import ConceptState, install
from perfusion_runtime.method.tiny import tiny_pipeline
from perfusion_runtime.method.tokens import extended_embedding, positions

SEED = 0
CAPTIONS = 512  # of the shipped corpus, for C⁻¹ (not timed; its exact value does not matter)
IMAGES = 4
TINY = (("tiny", 32, 32), ("width 128", 128, 64))  # (label, model width, resolution in px)
SD15_LATENT = 32  # 256 px
ROWS = ("bare UNet", "Perfusion UNet", "text + bare UNet", "Perfusion step")
RATIOS = (("Perfusion UNet", "bare UNet"), ("Perfusion step", "bare UNet"),
          ("Perfusion step", "text + bare UNet"), ("text + bare UNet", "bare UNet"))

Step = Callable[[], float]  # one step; returns the loss


@dataclass
class Batch:
    """One fixed training batch."""

    noisy: Tensor  # [B, 4, h, w]
    timesteps: Tensor  # [B]
    noise: Tensor  # [B, 4, h, w]
    hidden: Tensor  # [B, 77, D] text encodings, detached
    ids: Tensor  # [B, 77] their token ids


@dataclass
class Case:
    """One model, its two processor sets and its four rows."""

    label: str
    unet: Any
    batch: Batch
    default: dict[str, Any]  # diffusers' attention processors
    ours: dict[str, Any]  # with the Perfusion processors installed
    rows: dict[str, tuple[Step, bool]] = field(default_factory=dict)  # row -> (step, ours?)


@dataclass
class Concept:
    """The trainable state of one concept, as `trainer._Run` holds it."""

    token_id: int
    o_k: dict[str, Tensor]
    o_v: dict[str, nn.Parameter]
    cinv: Tensor
    beta: float
    tau: float
    i_star: Tensor | None = None


# ---- the rows --------------------------------------------------------------------------------


def bare_unet(unet: Any, batch: Batch) -> float:
    """Frozen UNet, default processors, grads w.r.t. the encodings only."""
    encodings = batch.hidden.detach().requires_grad_(True)
    pred = unet(batch.noisy, batch.timesteps, encoder_hidden_states=encodings).sample
    loss = F.mse_loss(pred.float(), batch.noise.float())
    loss.backward()
    return float(loss.detach())


def activate(state: ConceptState, concept: Concept, i_star: Tensor) -> None:
    """As `trainer._micro_step` activates the concept before the UNet runs."""
    names = list(concept.o_k)
    state.activate(make_basis(i_star[None], concept.cinv),
                   {n: concept.o_k[n][None] for n in names},
                   {n: concept.o_v[n][None] for n in names},
                   beta=concept.beta, lock="local", tau=concept.tau)


def update_i_star(concept: Concept, hidden: Tensor, ids: Tensor) -> Tensor:
    """`trainer._update_i_star` for a Concept."""
    current = hidden[positions(ids, concept.token_id)].detach().float().mean(0)
    concept.i_star = current if concept.i_star is None else \
        trainer.EMA_DECAY * concept.i_star + (1 - trainer.EMA_DECAY) * current
    return concept.i_star


def perfusion_unet(unet: Any, batch: Batch, state: ConceptState, concept: Concept,
                   optimiser: torch.optim.Optimizer) -> float:
    """The same batch with the concept active, edited K/V, AdamW on o*_V."""
    optimiser.zero_grad(set_to_none=True)
    activate(state, concept, update_i_star(concept, batch.hidden, batch.ids))
    encodings = batch.hidden.detach().requires_grad_(True)
    pred = unet(batch.noisy, batch.timesteps, encoder_hidden_states=encodings).sample
    loss = trainer.masked_mse(pred, batch.noise, None)
    loss.backward()
    optimiser.step()
    return float(loss.detach())


def text_unet(unet: Any, text_encoder: Any, batch: Batch, optimiser: torch.optim.Optimizer,
              state: ConceptState | None, concept: Concept) -> float:
    """Text encoder with the trainable embedding, then the UNet; Perfusion when `state`."""
    optimiser.zero_grad(set_to_none=True)
    hidden = text_encoder(batch.ids)[0]
    if state is not None:
        activate(state, concept, update_i_star(concept, hidden, batch.ids))
    pred = unet(batch.noisy, batch.timesteps, encoder_hidden_states=hidden).sample
    loss = trainer.masked_mse(pred, batch.noise, None)
    loss.backward()
    optimiser.step()
    return float(loss.detach())


def trainer_text_bare_unet(run: Any, optimiser: torch.optim.Optimizer) -> float:
    """`trainer._micro_step` without the Perfusion lines: a textual-inversion step."""
    pipe, size = run.pipe, run.recipe.batch
    optimiser.zero_grad(set_to_none=True)
    latents, _, prompts = trainer._batch(run, size)
    noise = torch.randn(latents.shape, generator=run.generator)
    t = torch.randint(0, run.noise.config.num_train_timesteps, (size,),
                      generator=run.generator)
    noisy = run.noise.add_noise(latents, noise, t)
    hidden, _ = trainer.encode(pipe, prompts)
    pred = pipe.unet(noisy, t, encoder_hidden_states=hidden).sample
    loss = trainer.masked_mse(pred, noise, None)
    loss.backward()
    optimiser.step()
    return float(loss.detach())


# ---- the models ------------------------------------------------------------------------------


def processors(unet: Any, state: ConceptState) -> tuple[dict[str, Any], dict[str, Any]]:
    """(diffusers' processors, ours); ours stay installed."""
    default = dict(unet.attn_processors)
    install(unet, state)
    return default, dict(unet.attn_processors)


def tiny_case(label: str, width: int, resolution: int, size: int, folder: Path) -> Case:
    """The tiny pipeline prepared by `trainer._prepare`, as `train()` prepares it."""
    pipe = tiny_pipeline(SEED, width)
    cinv = estimate_cinv(pipe.tokenizer, pipe.text_encoder,
                         load_captions(CAPTIONS_PATH)[:CAPTIONS])
    subject = trainer.Subject("teddy*", ("teddy bear", "toy"), ("brown",),
                              make_images(folder, IMAGES, resolution))
    recipe = trainer.Recipe(batch=size, resolution=resolution, seed=SEED)
    run = trainer._prepare(pipe, subject, recipe, cinv)
    state = ConceptState(caching=False)  # as train() makes it
    default, ours = processors(pipe.unet, state)
    latents, _, prompts = trainer._batch(run, size)
    noise = torch.randn(latents.shape, generator=run.generator)
    t = torch.randint(0, run.noise.config.num_train_timesteps, (size,),
                      generator=run.generator)
    with torch.no_grad():
        hidden, ids = trainer.encode(pipe, prompts)
    batch = Batch(run.noise.add_noise(latents, noise, t), t, noise, hidden, ids)
    concept = Concept(run.token_id, run.o_k, run.o_v, run.cinv, recipe.beta, recipe.tau)
    optimiser = trainer._optimiser(run)
    embedding_only = torch.optim.AdamW([run.embedding], lr=recipe.embedding_lr,
                                       weight_decay=0.0)
    trainer._update_i_star(run, hidden, ids)  # i* exists before the first trainer step
    case = Case(label, pipe.unet, batch, default, ours)
    case.rows = {
        "bare UNet": (lambda: bare_unet(pipe.unet, batch), False),
        "Perfusion UNet": (lambda: perfusion_unet(pipe.unet, batch, state, concept,
                                                  optimiser), True),
        "text + bare UNet": (lambda: trainer_text_bare_unet(run, embedding_only), False),
        "Perfusion step": (lambda: trainer._step(run, state, optimiser, 1), True),
    }
    return case


def sd15_case(size: int) -> Case:
    """SD 1.5's UNet and text encoder (random weights), 32×32 latents, fixed token ids."""
    unet, text_encoder = sd15_unet_and_text_encoder(device="cpu", seed=SEED)
    generator = torch.Generator().manual_seed(SEED)
    vocab = int(text_encoder.config.vocab_size)
    extended = extended_embedding(text_encoder)
    token_id = vocab  # the first id past the base vocabulary, as tokens.add_concepts gives
    extended.set_vector(token_id, extended.base.weight[1000], trainable=True)
    ids = torch.full((size, 77), int(text_encoder.config.pad_token_id))
    ids[:, 0] = int(text_encoder.config.bos_token_id)
    ids[:, 1:8] = torch.randint(3, vocab, (size, 7), generator=generator)
    ids[:, 5], ids[:, 8] = token_id, int(text_encoder.config.eos_token_id)
    with torch.no_grad():
        hidden = text_encoder(ids)[0]
    width = hidden.shape[-1]
    cinv = inverse_covariance(second_moment(torch.randn(4 * width, width, generator=generator)))
    i_super = torch.randn(width, generator=generator)
    layers = cross_attention_layers(unet)
    o_k = {n: a.to_k.weight.detach() @ i_super for n, a in layers.items()}
    o_v = {n: nn.Parameter(a.to_v.weight.detach() @ i_super) for n, a in layers.items()}
    concept = Concept(token_id, o_k, o_v, cinv, beta=0.75, tau=0.1)
    update_i_star(concept, hidden, ids)
    state = ConceptState(caching=False)
    default, ours = processors(unet, state)
    shape = (size, 4, SD15_LATENT, SD15_LATENT)
    batch = Batch(torch.randn(shape, generator=generator), torch.randint(0, 1000, (size,),
                  generator=generator), torch.randn(shape, generator=generator), hidden, ids)
    embedding = extended.vectors[str(token_id)]
    optimiser = torch.optim.AdamW([{"params": list(o_v.values()), "lr": 0.03},
                                   {"params": [embedding], "lr": 0.006}], weight_decay=0.0)
    embedding_only = torch.optim.AdamW([embedding], lr=0.006, weight_decay=0.0)
    case = Case("SD 1.5 UNet, 256 px", unet, batch, default, ours)
    case.rows = {
        "bare UNet": (lambda: bare_unet(unet, batch), False),
        "Perfusion UNet": (lambda: perfusion_unet(unet, batch, state, concept, optimiser), True),
        "text + bare UNet": (lambda: text_unet(unet, text_encoder, batch, embedding_only, None,
                                               concept), False),
        "Perfusion step": (lambda: text_unet(unet, text_encoder, batch, optimiser, state,
                                             concept), True),
    }
    return case


# ---- timing ----------------------------------------------------------------------------------


Times = dict[str, list[tuple[float, float]]]


def timed(case: Case, row: str) -> tuple[float, float]:
    """(wall s, CPU s of this process) of one step of `row`."""
    step, ours = case.rows[row]
    case.unet.set_attn_processor(dict(case.ours if ours else case.default))
    with torch.enable_grad():
        wall, cpu = time.perf_counter(), time.process_time()
        loss = step()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if not np.isfinite(loss):
        raise SystemExit(f"{case.label}, {row}: the loss is {loss}")
    return wall, cpu


def measure(case: Case, warmup: int, repeat: int) -> Times:
    """Warm-up, then `repeat` rounds; each round runs every row once, in a rotating order."""
    for _ in range(warmup):
        for row in ROWS:
            timed(case, row)
    times: Times = {row: [] for row in ROWS}
    for r in range(repeat):
        for row in ROWS[r % len(ROWS):] + ROWS[:r % len(ROWS)]:
            times[row].append(timed(case, row))
    return times


def report(case: Case, times: Times) -> None:
    params = sum(p.numel() for p in case.unet.parameters())
    layers = len(cross_attention_layers(case.unet))
    print(f"\n{case.label}: UNet {params / 1e6:.1f} M parameters, {layers} cross-attention "
          f"layers, latents {tuple(case.batch.noisy.shape)}, "
          f"text encodings {tuple(case.batch.hidden.shape)}")
    stats = {}  # row -> (best wall, median wall, best CPU, median CPU) in ms
    for row, pairs in times.items():
        wall, cpu = [w * 1e3 for w, _ in pairs], [c * 1e3 for _, c in pairs]
        stats[row] = (min(wall), statistics.median(wall), min(cpu), statistics.median(cpu))
    widths = (11, 13, 10, 12)
    print(f"  {'ms per step':<37} {'best wall':>10} {'median wall':>12} {'best CPU':>9} "
          f"{'median CPU':>11}")
    for row in ROWS:
        figures = "".join(f"{x:>{w}.1f}" for x, w in zip(stats[row], widths, strict=True))
        print(f"  {row + f' ({len(times[row])} runs)':<37}{figures}")
    for a, b in RATIOS:
        ratios = "".join(f"{x / y:>{w}.3f}" for x, y, w in zip(stats[a], stats[b], widths,
                                                               strict=True))
        print(f"  {a + ' / ' + b:<37}{ratios}")


def profile(case: Case, steps: int) -> None:
    """cProfile of `steps` steps of the two UNet rows (no timings reported from it)."""
    for row in ("bare UNet", "Perfusion UNet"):
        for _ in range(2):
            timed(case, row)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(steps):
            timed(case, row)
        profiler.disable()
        print(f"\n--- {case.label}, {row}: {steps} steps, by total time")
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(25)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="the tiny model only, 4 rounds")
    parser.add_argument("--repeat", type=int, default=12,
                        help="timed rounds on the tiny models (default 12)")
    parser.add_argument("--sd15-repeat", type=int, default=3,
                        help="timed rounds on SD 1.5 (default 3; 0 leaves it out)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4, help="tiny models' batch (default 4)")
    parser.add_argument("--sd15-batch", type=int, default=1, help="SD 1.5's batch (default 1)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: the process's CPU time is "
                             "then the step's own work, steady on a shared machine)")
    parser.add_argument("--profile", action="store_true",
                        help="no timings: cProfile of the UNet rows of the tiny model")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    repeat = min(args.repeat, 4) if args.quick else args.repeat
    print(f"train_overhead: {args.warmup} warm-up round(s), then timed rounds; "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as folder:
        for label, width, resolution in TINY[:1] if args.quick or args.profile else TINY:
            case = tiny_case(label, width, resolution, args.batch,
                             Path(folder) / label.replace(" ", "_"))
            if args.profile:
                profile(case, repeat)
                return
            report(case, measure(case, args.warmup, repeat))
    if not args.quick and args.sd15_repeat > 0:
        case = sd15_case(args.sd15_batch)
        report(case, measure(case, 1, args.sd15_repeat))
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
