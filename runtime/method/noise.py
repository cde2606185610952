"""The forward process the base model was trained with: noised latents, and what the UNet
predicts from them, whatever sampler the pipeline renders with.

A pipeline's scheduler is a sampler (DDIM, DPM-Solver++, Euler, ...), and samplers noise
differently: Euler's `add_noise` returns x₀ + σ·ε, which the UNet never saw in training, and
DPM-Solver++'s looks its timestep up in the last inference schedule it was given (so it
fails after a 15-step render). Training takes the schedule's betas from the scheduler's
config and noises with DDPM's √ᾱ·x₀ + √(1−ᾱ)·ε, as the model was trained."""

from __future__ import annotations

from typing import Any

from diffusers import DDPMScheduler
from torch import Tensor


def schedule(scheduler: Any) -> DDPMScheduler:
    """DDPM on `scheduler`'s training schedule: its betas (zero-SNR rescaling included),
    number of timesteps and prediction type."""
    return DDPMScheduler.from_config(scheduler.config)


def denoising_target(scheduler: Any, latents: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """What the UNet predicts, by the scheduler's `prediction_type`: the noise (ε: SD 1.x), the
    velocity √ᾱ·ε − √(1−ᾱ)·x₀ (v: SD 2.x and toy:shapes), or the clean latents. `scheduler`
    is one `schedule` made."""
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        velocity: Tensor = scheduler.get_velocity(latents, noise, t)
        return velocity
    if kind == "sample":
        return latents
    raise ValueError(f"the scheduler's prediction_type {kind!r} is not one the trainer knows")
