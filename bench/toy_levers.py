"""CPU levers for training and sampling the toy:shapes model, measured side by side.

    .venv/bin/python bench/toy_levers.py [--threads 2] [--repeat 5]

For a stock `UNet2DConditionModel` of the toy's shape it times one training step (forward,
backward, AdamW) and one sampling forward (a classifier-free-guidance batch), and prints each
lever's time as a ratio of the plain fp32 run at the same size:

- bf16 autocast (this CPU has AVX512-BF16), channels_last, torch.compile;
- batch size (time per sample);
- where the UNet works: 16×16 latents (a 4× VAE), 32×32 latents (2×) or 64×64 pixels;
- the UNet's widths.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Callable, Iterator

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from diffusers import UNet2DConditionModel

TEXT = 128


def unet(channels: tuple[int, ...], side: int, latent: int) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=side, in_channels=latent, out_channels=latent, layers_per_block=1,
        block_out_channels=channels, cross_attention_dim=TEXT, attention_head_dim=8,
        norm_num_groups=16, down_block_types=("CrossAttnDownBlock2D",) * len(channels),
        up_block_types=("CrossAttnUpBlock2D",) * len(channels))


@contextlib.contextmanager
def autocast(bf16: bool) -> Iterator[None]:
    if bf16:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield
    else:
        yield


def timed(fn: Callable[[], None], repeat: int) -> float:
    fn()  # warm-up (and compilation)
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def measure(channels: tuple[int, ...], side: int, latent: int, batch: int, *, bf16: bool = False,
            channels_last: bool = False, compile_: bool = False, repeat: int = 5
            ) -> tuple[float, float]:
    """(seconds per training step, seconds per sampling forward of a batch of 16)."""
    model = unet(channels, side, latent)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    run: Callable[..., torch.Tensor] = model
    if compile_:
        run = torch.compile(model)  # type: ignore[assignment]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, latent, side, side).to(memory_format=fmt)
    text = torch.randn(batch, 77, TEXT)
    t = torch.randint(0, 1000, (batch,))

    def train() -> None:
        with autocast(bf16):
            loss = run(x, t, encoder_hidden_states=text).sample.float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    xs = torch.randn(16, latent, side, side).to(memory_format=fmt)
    ts, texts = torch.full((16,), 500), torch.randn(16, 77, TEXT)

    @torch.no_grad()
    def sample() -> None:
        with autocast(bf16):
            run(xs, ts, encoder_hidden_states=texts)

    return timed(train, repeat), timed(sample, repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    small = (32, 64, 96, 96)
    rows: list[tuple[str, tuple[int, ...], int, int, int, dict[str, bool]]] = [
        ("fp32 (reference)", small, 16, 4, 32, {}),
        ("bf16 autocast", small, 16, 4, 32, {"bf16": True}),
        ("channels_last", small, 16, 4, 32, {"channels_last": True}),
        ("bf16 + channels_last", small, 16, 4, 32, {"bf16": True, "channels_last": True}),
        ("batch 64 (per sample)", small, 16, 4, 64, {}),
        ("batch 16 (per sample)", small, 16, 4, 16, {}),
        ("8 latent channels", small, 16, 8, 32, {}),
        ("32×32 latents", small, 32, 4, 32, {}),
        ("64×64 pixels", small, 64, 3, 32, {}),
        ("widths 48-96-128-128", (48, 96, 128, 128), 16, 4, 32, {}),
        ("widths 48-96-128-128, bf16", (48, 96, 128, 128), 16, 4, 32, {"bf16": True}),
        ("widths 64-128-192-192", (64, 128, 192, 192), 16, 4, 32, {}),
        ("widths 64-128-192-192, bf16", (64, 128, 192, 192), 16, 4, 32, {"bf16": True}),
    ]
    if not args.no_compile:
        rows.insert(4, ("torch.compile", small, 16, 4, 32, {"compile_": True}))
    reference: tuple[float, float] | None = None
    print(f"torch {torch.__version__}, {args.threads} thread(s); ratio = time / fp32 reference "
          "(per sample for batch rows)")
    print("| lever | train step s | ratio | sample fwd (16) s | ratio |")
    print("|---|---|---|---|---|")
    for name, channels, side, latent, batch, flags in rows:
        try:
            train_s, sample_s = measure(channels, side, latent, batch, repeat=args.repeat,
                                        **flags)  # type: ignore[arg-type]
        except Exception as error:  # a lever this build lacks (say, no compiler)
            print(f"| {name} | failed: {type(error).__name__}: {str(error)[:80]} | | | |")
            continue
        per = train_s * 32 / batch
        if reference is None:
            reference = (train_s, sample_s)
        print(f"| {name} | {per:.3f} | {per / reference[0]:.2f} | {sample_s:.3f} | "
              f"{sample_s / reference[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
