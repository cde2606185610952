"""Trains the built-in `toy:shapes` Stable Diffusion from scratch on the toy world.

    .venv/bin/python tools/train_toy_model.py                 # toy:shapes (docs/toy.md#model)
    .venv/bin/python tools/train_toy_model.py --quick --out /tmp/toy --state /tmp/toy.state
    python tools/train_toy_model.py --device cuda --workers 14 --minutes 9 ...  # on a GPU
                                                 # (docs/toy.md#training-on-a-gpu)

The run can be stopped at any time and the same command resumes it: the VAE phase (every
--save-every / 4 steps), the latents and, every --save-every steps, the UNet phase
(weights, EMA, AdamW, generators) are kept in --state (git-ignored), with the sittings
(where and how long each ran), and each saved UNet step also refreshes --out with the EMA
weights. --threads may differ between sittings (the last bits of the sums may then differ).

Phases, all seeded: (1) render the training scenes (runtime/toy/world.py), (2) train the
VAE (AutoencoderKL, 64 px → 16×16×4 latents; the object's pixels weigh more), (3) encode
every image once, (4) train the CLIP text encoder and the UNet together (v-prediction on a
zero-terminal-SNR schedule, or ε with --prediction epsilon; a quarter of each batch at the
noisiest steps; min-SNR weights, each noise level's loss divided by its running mean;
10 % empty captions for classifier-free guidance; an exponential moving average of the
weights; docs/toy.md#training says why),
(5) save a diffusers folder that `StableDiffusionPipeline.from_pretrained` loads, with
training.json (command, seed, time, losses) beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from runtime.toy.world import (  # noqa: E402
    HELD_OUT_OFFSET,
    POSITIONS,
    SIZE,
    caption,
    scene_for_seed,
    training_caption,
    training_example,
    with_changes,
)

TOKENIZER = REPO / "runtime" / "tokenizer"
OUT = REPO / "runtime" / "toy" / "shapes"
STATE = REPO / "runtime" / "toy" / "shapes.train"  # git-ignored: what a rerun resumes from
# The scheduler per prediction type (--prediction). "epsilon" is SD 1.x's. "v_prediction",
# the committed model's, is rescaled to zero terminal SNR (Lin et al. 2024) and sampled with
# trailing timesteps: with SD's own schedule (SNR 0.005 at t = 999) the noisiest training
# latents still show where the object is, so an ε model learns to find it in the noise and
# never to read its position from the caption (docs/toy.md#position).
_SD = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
       "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False,
       "steps_offset": 1}
SCHEDULERS: dict[str, dict[str, Any]] = {
    "epsilon": {**_SD, "prediction_type": "epsilon"},
    "v_prediction": {**_SD, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                     "timestep_spacing": "trailing"},
}


def sampler(prediction: str) -> DPMSolverMultistepScheduler:
    """What the saved pipeline samples with: DPM-Solver++ (2M) on the training schedule,
    which draws at 15 steps what DDIM draws at 25 (docs/toy.md#speed)."""
    return DPMSolverMultistepScheduler.from_config(
        {k: v for k, v in SCHEDULERS[prediction].items()
         if k not in ("clip_sample", "set_alpha_to_one")})


def train_scheduler(prediction: str) -> DDPMScheduler:
    return DDPMScheduler(**{k: v for k, v in SCHEDULERS[prediction].items()
                            if k not in ("set_alpha_to_one", "steps_offset", "timestep_spacing")})


TEXT_WIDTH = 128


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_vae(args: argparse.Namespace) -> AutoencoderKL:
    torch.manual_seed(args.seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=args.latent_channels, sample_size=SIZE,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=tuple(args.vae_channels), layers_per_block=1, norm_num_groups=16)


def make_denoiser(tokenizer: Any, args: argparse.Namespace
                  ) -> tuple[CLIPTextModel, UNet2DConditionModel]:
    """The text encoder and the UNet, seeded apart from the VAE (--seed + 1)."""
    torch.manual_seed(args.seed + 1)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=args.text_layers, num_attention_heads=4, max_position_embeddings=77,
        hidden_act="quick_gelu", projection_dim=TEXT_WIDTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    channels = tuple(args.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=SIZE // 4, in_channels=args.latent_channels,
        out_channels=args.latent_channels, layers_per_block=1,
        block_out_channels=channels, cross_attention_dim=TEXT_WIDTH, attention_head_dim=8,
        norm_num_groups=16, down_block_types=("CrossAttnDownBlock2D",) * len(channels),
        up_block_types=("CrossAttnUpBlock2D",) * len(channels))
    return text, unet


def _render(seed: int) -> np.ndarray:
    return np.asarray(training_example(seed)[0])


def dataset(n: int, seed: int, pool: Any = None) -> tuple[torch.Tensor, list[int]]:
    """n images [n, 3, 64, 64] as bytes (`as_pixels` maps them to [-1, 1]) and their scene
    seeds (captions are re-drawn); rendered by `pool`'s workers when there is one."""
    seeds = [seed * 1_000_003 + i for i in range(n)]
    if seeds[-1] >= HELD_OUT_OFFSET:
        raise SystemExit(f"--seed {seed} with --images {n} reaches the held-out scenes")
    arrays = np.stack(pool.map(_render, seeds, chunksize=256) if pool
                      else [_render(s) for s in seeds])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous(), seeds


def as_pixels(images: torch.Tensor) -> torch.Tensor:
    """Bytes [n, 3, 64, 64] → floats in [-1, 1], channels-last (faster on CPU)."""
    return (images.float() / 127.5 - 1.0).contiguous(memory_format=torch.channels_last)


def train_vae(vae: AutoencoderKL, pixels: torch.Tensor, args: argparse.Namespace,
              gen: torch.Generator) -> tuple[float, list[dict[str, Any]]]:
    """Reconstruction (L1 + L2) with a small KL term. With `object_weight` k, pixels that
    differ from the image's background (the median of its corners) weigh 1 + k: the object
    covers a small part of the picture, so an unweighted loss is mostly background, and a
    VAE trained on it loses the object's colour (docs/toy.md#vae). Saved in --state every
    --save-every / 4 steps, so a stopped run goes on from there; returns the last loss and
    the sittings."""
    steps, batch, object_weight = args.vae_steps, args.vae_batch, args.vae_object_weight
    vae.to(memory_format=torch.channels_last)  # faster on CPU (bench/toy_levers.py)
    params = list(vae.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    settings = settings_of(args, VAE_SETTINGS)
    done, losses, sittings = load_state(args.state, {"vae": vae}, opt, params, gen,
                                        settings, phase="vae")
    sittings.append({"from_step": done, "to_step": done, "seconds": 0.0, **where()})
    sitting_start = time.time()
    save_every = max(1, args.save_every // 4)
    vae.train()
    loss_value = losses[-1] if losses else float("nan")
    for step in range(done + 1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = vae_lr(step, args)
        idx = torch.randint(0, len(pixels), (batch,), generator=gen)
        x = as_pixels(pixels[idx.to(pixels.device)])
        posterior = vae.encode(x).latent_dist
        # decoded from the mean: sampling with the initial unit variance drowns the colours,
        # and the UNet is trained on the means anyway; the KL term only keeps them bounded
        recon = vae.decode(posterior.mean).sample
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        error = recon - x
        if object_weight > 0:
            corners = x[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]
            background = corners.median(dim=2).values[:, :, None, None]
            on_object = (x - background).abs().amax(dim=1, keepdim=True) > 0.05
            w = 1 + object_weight * on_object.float()
            loss = (w * (error.abs() + error.pow(2))).mean() / w.mean() + 1e-5 * kl
        else:
            loss = error.abs().mean() + error.pow(2).mean() + 1e-5 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_value = float(loss.detach())
        if step % 100 == 0 or step == steps:
            losses.append(loss_value)
            log(f"vae step {step}/{steps} loss {loss_value:.4f}")
        if step % save_every == 0 or step == steps:
            sittings[-1].update(to_step=step, seconds=round(time.time() - sitting_start, 1))
            save_state(args.state, step, {"vae": vae}, opt, params, gen, losses,
                       settings, sittings, phase="vae")
        if step % 1000 == 0 and step < steps:  # the read-back's progress (docs/toy.md#vae)
            vae.eval()
            log(f"vae step {step}: analyzer on held-out round trips: "
                + ", ".join(f"{k} {v:.0%}" for k, v in vae_readback(vae).items()))
            vae.train()
    vae.eval()
    return loss_value, sittings


def vae_lr(step: int, args: argparse.Namespace) -> float:
    """1e-3 until --vae-decay-from, then a cosine decay to 5 % at --vae-steps. At a constant
    rate the VAE's weights kept moving: its read-back of the objects' colours went from 91 %
    at 2,000 steps to 74 % at 3,000 (docs/toy.md#vae)."""
    if step <= args.vae_decay_from or args.vae_steps <= args.vae_decay_from:
        return 1e-3
    done = (step - args.vae_decay_from) / (args.vae_steps - args.vae_decay_from)
    return 1e-3 * (0.05 + 0.95 * 0.5 * (1 + float(np.cos(np.pi * min(done, 1.0)))))


@torch.no_grad()
def vae_check(vae: AutoencoderKL) -> float:
    """Mean absolute reconstruction error (of 255) on 64 held-out scenes."""
    from runtime.toy.world import held_out_scene, render

    x = torch.from_numpy(np.stack([np.asarray(render(held_out_scene(i))) for i in range(64)]))
    x = as_pixels(x.permute(0, 3, 1, 2)).to(vae.device)
    recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    return float((recon - x).abs().mean() * 127.5)


@torch.no_grad()
def vae_readback(vae: AutoencoderKL, n: int = 120) -> dict[str, float]:
    """The share of n held-out scenes whose round trip through the VAE (posterior mean) the
    analyzer still reads right, per attribute: the ceiling of any UNet on its latents."""
    from PIL import Image

    from runtime.toy import analyze
    from runtime.toy.world import held_out_scene, render

    scenes = [held_out_scene(i) for i in range(n)]
    x = torch.from_numpy(np.stack([np.asarray(render(s)) for s in scenes]))
    x = as_pixels(x.permute(0, 3, 1, 2)).to(vae.device)
    recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    images = ((recon + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    names = ("background", "colour", "size", "shape", "outline", "pattern", "second")
    hits = dict.fromkeys(names, 0)
    for image, scene in zip(images, scenes, strict=True):
        for name, ok in analyze.agreement(analyze.read(Image.fromarray(image)), scene,
                                          names).items():
            hits[name] += ok
    return {name: hits[name] / n for name in names}


@torch.no_grad()
def encode_all(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    return torch.cat([vae.encode(as_pixels(pixels[i:i + 256])).latent_dist.mean
                      for i in range(0, len(pixels), 256)])


def captions_for(seeds: list[int], epoch_rng: random.Random) -> list[str]:
    out = []
    for s in seeds:
        if epoch_rng.random() < 0.1:
            out.append("")  # classifier-free guidance learns the unconditional prediction
        else:
            rng = random.Random(epoch_rng.getrandbits(32))
            out.append(training_caption(scene_for_seed(s), rng))
    return out


_FEED_TOKENIZER: Any = None


def _feed_tokenizer() -> Any:
    global _FEED_TOKENIZER
    if _FEED_TOKENIZER is None:
        _FEED_TOKENIZER = CLIPTokenizer.from_pretrained(str(TOKENIZER), local_files_only=True)
    return _FEED_TOKENIZER


def step_batch(seed: int, step: int, images: int, batch: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """UNet step `step`'s images (indices into the training set) and their captions' token
    ids: a function of (seed, step) alone, so that workers can make them ahead of the
    training loop (one process needs about 50 ms for 256 captions, twice a GPU step) and a
    resumed run needs no generator state for them."""
    rng = random.Random(seed * 1_000_000_007 + step)
    idx = [rng.randrange(images) for _ in range(batch)]
    base = seed * 1_000_003
    ids = _feed_tokenizer()(captions_for([base + i for i in idx], rng), padding="max_length",
                            max_length=77, truncation=True, return_tensors="pt").input_ids
    return torch.tensor(idx), ids


class Feed:
    """`step_batch` for consecutive steps, made by `pool`'s workers a few steps ahead (or
    here, without a pool)."""

    AHEAD = 32

    def __init__(self, pool: Any, seed: int, images: int, batch: int, first: int) -> None:
        self.pool, self.args, self.next = pool, (seed, images, batch), first
        self.pending: list[Any] = []

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        seed, images, batch = self.args
        if self.pool is None:
            return step_batch(seed, step, images, batch)
        while len(self.pending) < self.AHEAD:
            self.pending.append((self.next, self.pool.apply_async(
                step_batch, (seed, self.next, images, batch))))
            self.next += 1
        made, result = self.pending.pop(0)
        assert made == step, (made, step)
        return result.get()

    def close(self) -> None:
        """Waits for the batches made ahead: a pool terminated with results still due can
        fail in its own clean-up ("Cannot have cache with result_hander not alive")."""
        for _, result in self.pending:
            result.wait()
        self.pending.clear()


def _tensors(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().cpu().contiguous()
            for k, v in module.state_dict().items()}


def _load(module: nn.Module, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
    module.load_state_dict({k[len(prefix) + 1:]: v for k, v in tensors.items()
                            if k.startswith(prefix + ".")})


# The settings each saved phase was made with: resuming under other ones would silently
# mix two recipes (say, a VAE state of another --vae-object-weight), so it stops instead.
# (not the step counts: a larger --vae-steps or --steps goes on from where a run ended)
VAE_SETTINGS = ("seed", "images", "vae_batch", "vae_object_weight", "vae_decay_from",
                "latent_channels", "vae_channels")
UNET_SETTINGS = ("seed", "prediction", "min_snr", "high_noise", "balance", "decay_steps",
                 "batch", "lr", "ema", "unet_channels", "text_layers")


def settings_of(args: argparse.Namespace, keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: getattr(args, k) for k in keys}


def check_resume(path: Path, saved: dict[str, Any] | None, wanted: dict[str, Any]) -> None:
    """Stops when the state at `path` was made with other settings than this run's (a state
    from before they were recorded, `saved` None, is trusted)."""
    if saved is None:
        return
    diff = [f"{k} {saved.get(k)!r} here, {v!r} asked" for k, v in wanted.items()
            if saved.get(k) != v]
    if diff:
        raise SystemExit(f"{path} was made with other settings ({'; '.join(diff)}); delete "
                         "it, or pass another --state, to start afresh")


def save_state(state: Path, step: int, models: dict[str, nn.Module],
               opt: torch.optim.Optimizer, params: list[nn.Parameter], gen: torch.Generator,
               losses: list[float], settings: dict[str, Any],
               sittings: list[dict[str, Any]], phase: str = "unet") -> None:
    """Everything a phase ("vae" or "unet") needs to go on exactly: weights, EMA, AdamW,
    the generator (the UNet phase's captions need none: `step_batch`); and the sittings so
    far (where and how long each ran). One file, written atomically, holds all of it (the
    record in its metadata too), so a crash never pairs the weights of one step with the
    record of another; the .json beside it is a copy to read."""
    from safetensors.torch import save

    from perfusion_runtime.files.atomic import write_atomically

    tensors: dict[str, torch.Tensor] = {}
    for name, module in models.items():
        tensors.update(_tensors(name, module))
    for i, p in enumerate(params):
        for slot, value in opt.state[p].items():
            tensors[f"opt.{i}.{slot}"] = value.detach().cpu().contiguous()
    tensors["gen"] = gen.get_state()
    record = json.dumps({"step": step, "losses": losses, "settings": settings,
                         "sittings": sittings})
    write_atomically(state / f"{phase}_state.safetensors",
                     save(tensors, metadata={"record": record}))
    write_atomically(state / f"{phase}_state.json", record.encode("utf-8"))


def load_state(state: Path, models: dict[str, nn.Module], opt: torch.optim.Optimizer,
               params: list[nn.Parameter], gen: torch.Generator, settings: dict[str, Any],
               phase: str = "unet") -> tuple[int, list[float], list[dict[str, Any]]]:
    """(steps done, losses, sittings) from `save_state`, or (0, [], []) when there is none
    (a state from before 2026-12-04 also holds a caption generator's state, unused now)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = state / f"{phase}_state.safetensors"
    if not path.is_file():
        return 0, [], []
    with safe_open(str(path), "pt") as handle:
        record = (handle.metadata() or {}).get("record")
    # a state from before the record was kept inside the file has only the .json
    meta = json.loads(record if record else (state / f"{phase}_state.json").read_text())
    check_resume(path, meta.get("settings"), settings)
    tensors = load_file(str(path))
    for name, module in models.items():
        _load(module, name, tensors)
    for i, p in enumerate(params):
        slots = ("step", "exp_avg", "exp_avg_sq")
        # in the parameter's own memory format (channels_last for the UNet's convolutions)
        opt.state[p] = {s: (tensors[k] if s == "step" else torch.empty_like(p).copy_(tensors[k]))
                        for s in slots if (k := f"opt.{i}.{s}") in tensors}
    gen.set_state(tensors["gen"])
    log(f"resumed the {phase.upper()} phase at step {meta['step']} from {state}")
    return int(meta["step"]), list(meta["losses"]), list(meta.get("sittings", []))


def text_probe(tokenizer: Any, latents: torch.Tensor, seeds: list[int],
               scheduler: DDPMScheduler) -> Any:
    """How much the denoiser reads the caption where the layout is decided: on 64 fixed noisy
    latents at t ∈ [700, 1000), the error of its clean-latent estimate with wrong captions
    minus the error with the right ones (higher is better; 0: that part is ignored). Two
    kinds of wrong caption: another image's ("caption gap") and the same caption with
    another position ("position gap")."""
    gen = torch.Generator().manual_seed(12345)
    idx = torch.randint(0, len(latents), (64,), generator=gen)
    scenes = [scene_for_seed(seeds[i]) for i in idx.tolist()]
    caps = [caption(s, random.Random(k)) for k, s in enumerate(scenes)]
    order = torch.randperm(64, generator=gen).tolist()
    names = list(POSITIONS)
    moved = [caption(with_changes(s, position=names[(names.index(s.position) + 1 + k % 8) % 9]),
                     random.Random(k)) for k, s in enumerate(scenes)]
    tok = dict(padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ids = {"right": tokenizer(caps, **tok).input_ids,
           "caption": tokenizer([caps[j] for j in order], **tok).input_ids,
           "position": tokenizer(moved, **tok).input_ids}
    z = latents[idx.to(latents.device)]
    noise = torch.randn(z.shape, generator=gen)
    t = torch.randint(700, 1000, (64,), generator=gen)
    noisy = scheduler.add_noise(z.cpu(), noise, t).to(latents.device)
    alpha = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1).to(latents.device)
    ids = {name: tokens.to(latents.device) for name, tokens in ids.items()}
    t = t.to(latents.device)

    @torch.no_grad()
    def measure(text: CLIPTextModel, unet: UNet2DConditionModel) -> dict[str, float]:
        was = text.training, unet.training
        text.eval()
        unet.eval()
        error = {}
        for name, tokens in ids.items():
            out = unet(noisy, t, encoder_hidden_states=text(tokens)[0]).sample.float()
            if scheduler.config.prediction_type == "v_prediction":
                x0 = alpha.sqrt() * noisy - (1 - alpha).sqrt() * out
            else:
                x0 = (noisy - (1 - alpha).sqrt() * out) / alpha.sqrt()
            error[name] = float((x0 - z).pow(2).mean())
        text.train(was[0])
        unet.train(was[1])
        return {name: error[name] - error["right"] for name in ("caption", "position")}

    return measure


class LossBalance(nn.Module):
    """Divides each sample's loss by a running mean of the loss at its noise level, so that
    every level pulls on the weights by its share of the samples, not by its loss (the idea
    of EDM2's per-level uncertainty weights, Karras et al. 2024, with a running mean instead
    of a learned one). Without it, in a v run with --high-noise 0.25, the noisiest tenth,
    whose loss is mostly what no caption can say (the exact outline under nearly pure noise),
    made two thirds of the loss and the steps where shapes form a tenth
    (docs/toy.md#position)."""

    LEVELS = 20  # of 50 timesteps each

    def __init__(self, decay: float = 0.99) -> None:
        super().__init__()
        self.decay = decay
        self.register_buffer("level_loss", torch.zeros(self.LEVELS))

    def forward(self, per_sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        level = t * self.LEVELS // 1000
        table = self.get_buffer("level_loss")
        with torch.no_grad():  # per level: mean of this batch's losses, where it has any
            # (tensor operations throughout: a loop over the levels waited on the GPU at
            # each one)
            count = torch.zeros_like(table).index_add_(0, level, torch.ones_like(per_sample))
            total = torch.zeros_like(table).index_add_(0, level, per_sample.detach())
            mean = total / count.clamp(min=1)
            moved = torch.where(table == 0, mean, table + (1 - self.decay) * (mean - table))
            table.copy_(torch.where(count > 0, moved, table))
        return (per_sample / table[level]).mean()


DEVICE = torch.device("cpu")  # --device


def where() -> dict[str, Any]:
    """The machine a phase runs on, for training.json."""
    import platform

    device = "cpu"
    if DEVICE.type == "cuda":
        device = f"cuda: {torch.cuda.get_device_name(DEVICE)}"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = [line.split(":", 1)[1].strip() for line in
                 Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"device": device, "cpu": cpu,
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema ← decay · ema + (1 − decay) · model, in one fused call over all the weights (a
    loop over the tensors launched two GPU kernels per tensor, over a thousand a step)."""
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()],
                             1 - decay)


def train_unet(text: CLIPTextModel, unet: UNet2DConditionModel, tokenizer: Any,
               latents: torch.Tensor, seeds: list[int], args: argparse.Namespace,
               gen: torch.Generator, pool: Any = None
               ) -> tuple[CLIPTextModel, UNet2DConditionModel, float]:
    """Noise, timesteps and the high-noise share are drawn from `gen` (on the CPU, so that
    a run draws the same on any device); each step's images and captions from `step_batch`."""
    scheduler = train_scheduler(args.prediction)
    device = latents.device
    params = list(text.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    ema_text, ema_unet = copy.deepcopy(text).eval(), copy.deepcopy(unet).eval()
    models: dict[str, nn.Module] = {"text": text, "unet": unet, "ema_text": ema_text,
                                    "ema_unet": ema_unet}
    balance = LossBalance().to(device)
    if args.balance:
        models["balance"] = balance
    settings = settings_of(args, UNET_SETTINGS)
    done, losses, sittings = load_state(args.state, models, opt, params, gen, settings)
    sittings.append({"from_step": done, "to_step": done, "seconds": 0.0, **where()})
    sitting_start = time.time()
    feed = Feed(pool, args.seed, len(latents), args.batch, done + 1)
    # bfloat16 matrix products (the weights, the loss and AdamW stay float32)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16
                else contextlib.nullcontext())
    # In clean-latent terms the ε loss weighs the error by SNR and the v loss by 1 + SNR.
    # min-SNR-γ (Hang et al. 2023) caps that weight at γ so that the nearly clean steps, which
    # only refine texture, do not take the loss from the middle ones, where shapes form:
    # ε: min(SNR, γ) / SNR. v: min(1 + SNR, γ) / (1 + SNR), which keeps the weight 1 at the
    # noisiest steps, where the caption alone places the object (the ε loss gives them 0)
    snr = scheduler.alphas_cumprod / (1 - scheduler.alphas_cumprod)
    base = snr if args.prediction == "epsilon" else 1 + snr
    weight = (base.clamp(max=args.min_snr) / base) if args.min_snr > 0 else torch.ones_like(snr)
    weight = weight.to(device)
    probe = text_probe(tokenizer, latents, seeds, scheduler)
    text.train()
    unet.train()
    running = 0.0
    timer = (done + 20, done + 120, 0.0)  # --minutes: the steps whose time sets --steps
    if args.minutes:
        args.steps = max(args.steps, timer[1])
    step = done + 1
    while step <= args.steps:
        if args.minutes and step == timer[0]:
            timer = (timer[0], timer[1], time.time())
        if args.minutes and step == timer[1]:
            args.steps, args.decay_steps = steps_for_minutes(
                args, done, step, (time.time() - timer[2]) / (timer[1] - timer[0]))
        for group in opt.param_groups:  # linear warm-up, cosine to 10 %, then flat at 10 %
            warm = min(1.0, step / 200)
            cos = 0.55 + 0.45 * np.cos(np.pi * min(step, args.decay_steps) / args.decay_steps)
            group["lr"] = args.lr * warm * cos
        idx, ids = feed.get(step)
        z = latents[idx.to(device)]
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, 1000, (args.batch,), generator=gen)
        if args.high_noise > 0:
            # a share of the batch at the noisiest tenth, where nothing but the caption says
            # where the object goes: position words are bound to places there or nowhere
            high = torch.rand(args.batch, generator=gen) < args.high_noise
            t = torch.where(high, torch.randint(900, 1000, (args.batch,), generator=gen), t)
        noise, t, ids = noise.to(device), t.to(device), ids.to(device)
        with autocast:
            pred = unet(scheduler.add_noise(z, noise, t), t,
                        encoder_hidden_states=text(ids)[0]).sample.float()
        target = noise if args.prediction == "epsilon" else scheduler.get_velocity(z, noise, t)
        per_sample = (pred - target).pow(2).mean(dim=(1, 2, 3)) * weight[t]
        loss = balance(per_sample, t) if args.balance else per_sample.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        ema_update(ema_text, text, decay)
        ema_update(ema_unet, unet, decay)
        running += float(per_sample.mean().detach())  # the weighted loss, before balancing
        if step % 100 == 0 or step == args.steps:
            losses.append(running / (100 if step % 100 == 0 else step % 100))
            log(f"unet step {step}/{args.steps} loss {losses[-1]:.4f}")
            running = 0.0
        if step % args.probe_every == 0 or step == args.steps:
            gaps, ema_gaps = probe(text, unet), probe(ema_text, ema_unet)
            log(f"unet step {step}: caption gap {gaps['caption']:.4f}, position gap "
                f"{gaps['position']:.4f} (EMA {ema_gaps['caption']:.4f}, "
                f"{ema_gaps['position']:.4f})")
        if (args.save_every and step % args.save_every == 0) or step == args.steps:
            # the last step's state too, so that a longer --steps can go on from it
            sittings[-1].update(to_step=step, seconds=round(time.time() - sitting_start, 1))
            save_state(args.state, step, models, opt, params, gen, losses, settings,
                       sittings)
            args.sittings = sittings
        if args.save_every and step % args.save_every == 0 and step < args.steps:
            args.snapshot(ema_text, ema_unet, step, losses[-1] if losses else float("nan"))
        step += 1
    feed.close()
    return ema_text, ema_unet, losses[-1] if losses else float("nan")


def steps_for_minutes(args: argparse.Namespace, done: int, step: int, per_step: float
                      ) -> tuple[int, int]:
    """(--steps, --decay-steps) that end this sitting (the process) after about --minutes,
    from the measured seconds per step (probes and saves add about 5 %; the margin leaves
    10 %, and 20 s for the last save), with the decay ending at the same share of the run
    as the defaults' 12,000 of 16,000."""
    left = args.minutes * 60 - (time.time() - args.started) - 20
    steps = step + max(0, int(0.9 * left / per_step))
    decay = max(step, round(steps * 0.75))
    log(f"--minutes {args.minutes}: {per_step * 1000:.1f} ms a step, so --steps {steps} "
        f"--decay-steps {decay} (from step {done})")
    return steps, decay


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=40_000)
    parser.add_argument("--vae-steps", type=int, default=5000)
    parser.add_argument("--vae-decay-from", type=int, default=3000,
                        help="the VAE's learning rate decays from this step to --vae-steps")
    parser.add_argument("--latent-channels", type=int, default=8,
                        help="the VAE's latent channels (16×16 each; docs/toy.md#vae)")
    parser.add_argument("--vae-channels", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--vae-object-weight", type=float, default=9.0,
                        help="extra loss weight of the object's pixels in the VAE phase")
    parser.add_argument("--save-every", type=int, default=1000,
                        help="also save the pipeline (EMA weights) every N UNet steps")
    parser.add_argument("--steps", type=int, default=16_000)
    parser.add_argument("--prediction", choices=sorted(SCHEDULERS), default="v_prediction",
                        help="what the UNet predicts, with its noise schedule (docs/toy.md)")
    parser.add_argument("--min-snr", type=float, default=5.0,
                        help="min-SNR-γ loss weights (default 5; docs/toy.md); 0 weighs "
                             "every step alike")
    parser.add_argument("--high-noise", type=float, default=0.25,
                        help="share of samples drawn from t ∈ [900, 1000) instead of uniform t")
    parser.add_argument("--balance", action=argparse.BooleanOptionalAction, default=True,
                        help="divide each noise level's loss by its running mean (docs/toy.md)")
    parser.add_argument("--decay-steps", type=int, default=12_000,
                        help="the learning rate's cosine decay to 10 %% ends here and stays "
                             "flat after; 0: at --steps")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--unet-channels", type=int, nargs="+", default=[64, 128, 160, 160])
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--probe-every", type=int, default=500,
                        help="log the caption and position gaps (how much the caption, and its "
                             "position words, help) every N steps")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--state", type=Path, default=STATE,
                        help="where the run keeps what a rerun resumes from (the VAE, the "
                             "latents, the UNet phase every --save-every steps)")
    parser.add_argument("--device", default="cpu",
                        help="where the weights train (cpu, cuda); the scenes, captions and "
                             "random draws are made on the CPU either way")
    parser.add_argument("--workers", type=int, default=0,
                        help="processes that render the scenes and make each step's captions "
                             "ahead of the training loop (0: the loop does it; on a GPU the "
                             "captions alone would take longer than a step)")
    parser.add_argument("--minutes", type=float, default=0.0,
                        help="set --steps (and --decay-steps) so that this sitting (the whole "
                             "command) takes about this long, from the speed of the UNet "
                             "phase's first steps; training.json records the steps chosen")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                        default=None, help="the UNet's weights channels-last (default: on a "
                        "CPU, where it is faster, bench/toy_levers.py)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bfloat16 autocast in the UNet phase (default: on a GPU)")
    parser.add_argument("--quick", action="store_true", help="tiny settings: a smoke test")
    args = parser.parse_args()
    on_gpu = torch.device(args.device).type == "cuda"
    args.channels_last = not on_gpu if args.channels_last is None else args.channels_last
    args.bf16 = on_gpu if args.bf16 is None else args.bf16
    if args.quick:
        args.images, args.vae_steps, args.steps, args.save_every = 256, 20, 30, 20
        args.vae_decay_from = 10
        args.unet_channels, args.text_layers = [32, 32, 32, 32], 1
        args.probe_every, args.decay_steps = 10, 0
    args.decay_steps = args.decay_steps or args.steps
    torch.set_num_threads(args.threads)
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    pool = None
    if args.workers:
        import multiprocessing

        # spawned, not forked: a forked child of a process that holds CUDA cannot use it,
        # and one forked from a process with torch threads can hang
        pool = multiprocessing.get_context("spawn").Pool(args.workers)
    gen = torch.Generator().manual_seed(args.seed)
    started = args.started = time.time()
    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER), local_files_only=True)
    vae = make_vae(args).to(DEVICE)
    text, unet = make_denoiser(tokenizer, args)
    text, unet = text.to(DEVICE), unet.to(DEVICE)
    if args.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    log(f"params: text {sum(p.numel() for p in text.parameters()):,}, vae "
        f"{sum(p.numel() for p in vae.parameters()):,}, unet "
        f"{sum(p.numel() for p in unet.parameters()):,}")
    seeds = [args.seed * 1_000_003 + i for i in range(args.images)]
    args.state.mkdir(parents=True, exist_ok=True)
    if (args.state / "vae_phase.json").is_file():  # resume: the VAE and latents are done
        from safetensors.torch import load_file

        phase = json.loads((args.state / "vae_phase.json").read_text())
        check_resume(args.state / "vae_phase.json", phase.get("settings"),
                     settings_of(args, VAE_SETTINGS))
        vae = AutoencoderKL.from_pretrained(args.state / "vae").to(DEVICE)
        latents = load_file(str(args.state / "latents.safetensors"))["latents"].to(DEVICE)
        vae_loss, vae_error, scale = phase["vae_loss"], phase["vae_error"], phase["scale"]
        vae_seconds = phase.get("seconds")  # None (null) for a state from before it was kept
        log(f"resumed after the VAE phase from {args.state}")
    else:
        vae_loss, vae_error, scale, latents = vae_phase(args, vae, gen, pool)
        vae_seconds = time.time() - started

    vae_record = json.loads((args.state / "vae_phase.json").read_text())
    readback = vae_record.get("vae_readback")
    args.sittings = []

    def snapshot(t: CLIPTextModel, u: UNet2DConditionModel, step: int, loss: float) -> None:
        save(args, tokenizer, t, vae, u, {
            "vae_loss": vae_loss, "vae_error_of_255": vae_error, "vae_readback": readback,
            "unet_loss": loss,
            "unet_steps_done": step, "vae_phase_seconds": vae_seconds,
            "vae_sittings": vae_record.get("sittings"), "unet_sittings": args.sittings,
            "seconds": time.time() - started, "scaling_factor": scale})

    args.snapshot = snapshot
    # the UNet phase draws from its own generator, so it does not depend on the VAE phase's
    unet_gen = torch.Generator().manual_seed(args.seed + 1)
    text, unet, unet_loss = train_unet(text, unet, tokenizer, latents, seeds, args, unet_gen,
                                       pool)
    snapshot(text, unet, args.steps, unet_loss)
    if pool is not None:
        pool.terminate()


def vae_phase(args: argparse.Namespace, vae: AutoencoderKL, gen: torch.Generator,
              pool: Any = None) -> tuple[float, float, float, torch.Tensor]:
    """Phases 1–3: render, train the VAE, encode; saved in the state folder for reruns."""
    from safetensors.torch import save_file

    started = time.time()
    pixels, _ = dataset(args.images, args.seed, pool)
    pixels = pixels.to(DEVICE)
    log(f"rendered {len(pixels)} training images")
    vae_loss, sittings = train_vae(vae, pixels, args, gen)
    vae_error = vae_check(vae)
    log(f"vae: held-out reconstruction error {vae_error:.2f}/255")
    readback = vae_readback(vae)
    log("vae: analyzer on held-out round trips: "
        + ", ".join(f"{k} {v:.0%}" for k, v in readback.items()))
    latents = encode_all(vae, pixels)
    scale = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scale)
    latents = (latents * scale).contiguous()
    log(f"latents encoded; scaling factor {scale:.4f}")
    vae.save_pretrained(args.state / "vae", safe_serialization=True)
    save_file({"latents": latents.cpu()}, str(args.state / "latents.safetensors"))
    (args.state / "vae_phase.json").write_text(json.dumps(
        {"vae_loss": vae_loss, "vae_error": vae_error, "vae_readback": readback, "scale": scale,
         "sittings": sittings,
         # every sitting's training, plus this sitting's rendering and encoding
         "seconds": sum(s["seconds"] for s in sittings) + time.time() - started
         - sittings[-1]["seconds"], "settings": settings_of(args, VAE_SETTINGS)}))
    return vae_loss, vae_error, scale, latents


def save(args: argparse.Namespace, tokenizer: Any, text: CLIPTextModel, vae: AutoencoderKL,
         unet: UNet2DConditionModel, result: dict[str, Any]) -> None:
    def stored(module: nn.Module) -> Any:
        # float16 on disk keeps the folder under 40 MB; the runtime loads it in its own
        # precision (float32 on a CPU), so only the weights' last bits differ
        # (nn.Module.to: diffusers' own `to` warns about casting)
        return nn.Module.to(copy.deepcopy(module), device="cpu", dtype=torch.float16,
                            memory_format=torch.contiguous_format)

    pipe = StableDiffusionPipeline(
        vae=stored(vae), text_encoder=stored(text), tokenizer=tokenizer, unet=stored(unet),
        scheduler=sampler(args.prediction), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    temp = args.out.with_name(args.out.name + ".saving")
    shutil.rmtree(temp, ignore_errors=True)
    pipe.save_pretrained(temp, safe_serialization=True)
    write_corpus(temp / "captions.txt")
    settings = {k: v for k, v in vars(args).items()
                if k not in ("out", "snapshot", "state", "sittings", "workers", "started")}
    (temp / "training.json").write_text(json.dumps(
        {"command": "python tools/train_toy_model.py " + " ".join(sys.argv[1:]),
         "settings": settings, **result, "torch": torch.__version__}, indent=2) + "\n")
    if args.out.exists():
        shutil.rmtree(args.out)
    temp.rename(args.out)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file()) / 1e6
    log(f"saved {args.out} ({size:.1f} MB) after {result['seconds'] / 60:.1f} min")


def write_corpus(path: Path) -> None:
    """The model's caption corpus for C⁻¹ (perfusion_runtime.build.jobs.default_captions)."""
    from runtime.toy.world import caption_corpus

    lines = caption_corpus(5000)
    path.write_text("# Captions of the toy:shapes world for C⁻¹: runtime.toy.world.caption_corpus"
                    "(5000), written by tools/train_toy_model.py; do not edit by hand.\n"
                    + "\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
