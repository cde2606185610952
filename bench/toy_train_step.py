"""The toy:shapes UNet phase's time per step, as `tools/train_toy_model.py` runs it, per lever.

    .venv/bin/python bench/toy_train_step.py --device cuda --workers 14   # on a GPU
    .venv/bin/python bench/toy_train_step.py --batch 32 --steps 3 13      # on this CPU

Each variant runs the training script's own `train_unet` (captions made by `--workers`
processes, AdamW, EMA, loss balance, the text encoder too) on random latents, twice: for
the first and for the second of `--steps` steps, each from scratch in a temporary state
folder. The difference of the two wall times over the difference of the step counts is the
time of one step without the fixed costs (start, text probe, saving the state). Variants:
channels-last weights on or off, bf16 autocast on or off, batch size. Also the time one
process takes to make one step's captions (`step_batch`), which the workers must beat.
The first GPU run (2026-12-04, docs/toy.md#the-gpu-run) took 158 ms a step at batch 256.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import train_toy_model as toy  # noqa: E402


def run(args: argparse.Namespace, pool: object, steps: int, batch: int, channels_last: bool,
        bf16: bool) -> float:
    """Seconds for `steps` steps of `train_unet` from scratch, fixed costs included."""
    device = torch.device(args.device)
    toy.DEVICE = device
    settings = argparse.Namespace(
        seed=0, steps=steps, decay_steps=steps, prediction="v_prediction", min_snr=5.0,
        high_noise=0.25, balance=True, batch=batch, lr=1e-3, ema=0.999,
        unet_channels=[64, 128, 160, 160], text_layers=4, latent_channels=8,
        probe_every=10**9, save_every=0,
        minutes=0.0, bf16=bf16, started=time.time())
    tokenizer = toy._feed_tokenizer()
    text, unet = toy.make_denoiser(tokenizer, settings)
    text, unet = text.to(device), unet.to(device)
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(args.images, 8, 16, 16, generator=gen).to(device)
    seeds = list(range(args.images))
    with tempfile.TemporaryDirectory() as state:
        settings.state = Path(state)
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        toy.train_unet(text, unet, tokenizer, latents, seeds, settings, gen, pool)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--batch", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--steps", type=int, nargs=2, default=[10, 60])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pool = None
    if args.workers:
        import multiprocessing

        pool = multiprocessing.get_context("spawn").Pool(args.workers)
    toy.log = lambda msg: None  # the training loop's progress lines
    started = time.perf_counter()
    for step in range(1, 6):
        toy.step_batch(0, step, args.images, args.batch[0])
    captions = (time.perf_counter() - started) / 5
    print(f"one step's captions in one process (batch {args.batch[0]}): "
          f"{captions * 1000:.1f} ms")
    first, second = args.steps
    on_gpu = args.device.startswith("cuda")
    variants = [(b, cl, bf) for b in args.batch for cl in (False, True) for bf in (False, True)
                if b == args.batch[0] or (not cl and bf == on_gpu)]
    print(f"{'batch':>5}  {'channels-last':>13}  {'bf16':>5}  {'ms/step':>8}  "
          f"{'samples/s':>9}  {'vs first':>8}")
    base = None
    run(args, pool, first, *variants[0])  # warm-up: first use of the kernels, the workers
    for batch, channels_last, bf16 in variants:
        a = run(args, pool, first, batch, channels_last, bf16)
        b = run(args, pool, second, batch, channels_last, bf16)
        per_step = (b - a) / (second - first)
        base = base or per_step / batch
        print(f"{batch:>5}  {channels_last!s:>13}  {bf16!s:>5}  {per_step * 1000:>8.1f}  "
              f"{batch / per_step:>9.0f}  {base / (per_step / batch):>8.2f}", flush=True)
    if pool is not None:
        pool.terminate()


if __name__ == "__main__":
    main()
