"""Can the toy model's UNet place things, and bind position words to places? (docs/toy.md)

    .venv/bin/python bench/position_binding.py [--steps 300] [--threads 1]

Two tiny trainings of the architecture `tools/train_toy_model.py` builds (from scratch, at
t = 999 with the zero-terminal-SNR schedule, so the input is pure noise and the target is
what the model must draw from the caption alone):

- *place*: one fixed target, a blob in the top-left cell of a 3×3 grid, no caption. It
  shows whether a stock `UNet2DConditionModel`, which has no positional embedding, can put
  something off-centre at all (zero padding is its only positional signal).
- *bind*: nine captions, "a red star in the top left corner, black background" and so on,
  each with its blob in the named cell; the text encoder trains too. It shows how long
  binding nine position phrases to nine places takes, alone.

Every 25 steps it prints the loss and, for a fresh noise draw, how many of the targets have
their brightest grid cell where they should (1 of 1 for place, of 9 for bind).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from transformers import CLIPTokenizer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import train_toy_model  # noqa: E402

from perfusion_runtime.toy import world  # noqa: E402

# each grid cell (col, row) under the world's first phrasing of it ("in the top left corner")
PLACES = {world._POSITION_WORDS[name][0]: cell for name, cell in world.POSITIONS.items()}


def blob(col: int, row: int) -> torch.Tensor:
    """A [4, 16, 16] latent target: 2.0 on the 4×4 block of grid cell (col, row), else 0."""
    target = torch.zeros(4, 16, 16)
    target[:, 1 + 5 * row:5 + 5 * row, 1 + 5 * col:5 + 5 * col] = 2.0
    return target


def brightest_cell(latent: torch.Tensor) -> tuple[int, int]:
    means = {(c, r): float(latent[:, 1 + 5 * r:5 + 5 * r, 1 + 5 * c:5 + 5 * c].mean())
             for c in range(3) for r in range(3)}
    return max(means, key=lambda cell: means[cell])


def run(name: str, captions: list[str], targets: torch.Tensor, train_text: bool,
        steps: int) -> None:
    tokenizer = CLIPTokenizer.from_pretrained(str(train_toy_model.TOKENIZER))
    settings = argparse.Namespace(seed=0, text_layers=2, unet_channels=[32, 64, 96, 96],
                                  latent_channels=4)
    text, unet = train_toy_model.make_denoiser(tokenizer, settings)
    unet = unet.to(memory_format=torch.channels_last)  # faster on a CPU
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True,
                    return_tensors="pt").input_ids
    params = list(unet.parameters()) + (list(text.parameters()) if train_text else [])
    optimiser = torch.optim.AdamW(params, lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    n = len(captions)
    t = torch.full((n,), 999)
    for step in range(1, steps + 1):
        out = unet(torch.randn(n, 4, 16, 16, generator=gen), t,
                   encoder_hidden_states=text(ids)[0]).sample
        loss = (out - targets).pow(2).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if step % 25 == 0:
            with torch.no_grad():
                drawn = unet(torch.randn(n, 4, 16, 16, generator=gen), t,
                             encoder_hidden_states=text(ids)[0]).sample
            right = sum(brightest_cell(drawn[k]) == brightest_cell(targets[k]) for k in range(n))
            print(f"{name} step {step:4d}: loss {float(loss.detach()):.4f}, right {right}/{n}",
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    run("place", [""] * 8, torch.stack([blob(0, 0)] * 8), False, args.steps)
    names = list(PLACES)
    run("bind", [f"a red star {where}, black background" for where in names],
        torch.stack([blob(*PLACES[where]) for where in names]), True, args.steps)


if __name__ == "__main__":
    main()
