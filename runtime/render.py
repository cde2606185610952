"""Concepts applied to a stock diffusers pipeline, and rendering with them (one call each)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .artifact import Concept, load
from .covariance import cinv_for
from .fingerprint import base_fingerprint
from .key_locking import make_basis, strength_to_beta
from .layers import cross_attention_layers
from .processor import SUPER_KWARG, ConceptState, Installed, install
from .tokens import TOKEN, add_concepts, remove_extension, rewrite

# Images per pipeline call when none is given: one on the CPU, where torch's kernels give
# different bits for different batch sizes and even for different places in one batch (M4);
# on CUDA a batch of 8, where throughput matters more (and M4 is not promised).
CPU_BATCH, CUDA_BATCH = 1, 8


def default_cache_dir() -> Path:
    base = os.environ.get("PERFUSION_CACHE")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "perfusion"


@dataclass(eq=False)
class Applied:
    """Concepts installed in a pipeline. Call it like the pipeline, with concept tokens in
    the prompt; `remove()` (or leaving a `with`) restores the pipeline."""

    pipe: Any
    concepts: dict[str, Concept]
    cinv: Tensor
    installed: Installed
    state: ConceptState = field(default_factory=ConceptState)
    batch_size: int = CPU_BATCH  # images per pipeline call, always exactly this many

    def __enter__(self) -> Applied:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        self.installed.restore()
        remove_extension(self.pipe.text_encoder)

    def tokens_in(self, prompts: Sequence[str]) -> list[str]:
        """The loaded concept tokens the prompts name, in the order they were loaded (not of
        appearance: the concept basis, and so every image, must not depend on prompt order)."""
        seen = {t for p in prompts for t in TOKEN.findall(p)}
        return [t for t in self.concepts if t in seen]

    def activate(self, tokens: Sequence[str], strength: float | Mapping[str, float]) -> str:
        """Gate the given concepts in (the others out); returns the lock mode used."""
        if not tokens:
            self.state.deactivate()
            return "local"
        chosen = [self.concepts[t] for t in tokens]
        locks = {str(c.options.get("lock", "local")) for c in chosen}
        lock = locks.pop() if len(locks) == 1 else "local"  # mixed modes: lock locally
        betas = [strength_to_beta(strength[t] if isinstance(strength, Mapping) else strength,
                                  lock) for t in tokens]
        device = self.pipe.unet.device
        basis = make_basis(torch.stack([c.i_star for c in chosen]).to(device), self.cinv.to(device))
        layers = list(chosen[0].o_k)
        self.state.activate(
            basis, {n: torch.stack([c.o_k[n] for c in chosen]).to(device) for n in layers},
            {n: torch.stack([c.o_v[n] for c in chosen]).to(device) for n in layers},
            beta=torch.tensor(betas), lock=lock)
        return lock

    def supercategory_prompt(self, prompt: str) -> str:
        """The prompt with each concept token replaced by its (first) supercategory."""
        return TOKEN.sub(lambda m: self.concepts[m.group()].supercategories[0]
                         if m.group() in self.concepts else m.group(), prompt)

    def __call__(self, prompt: str | Sequence[str], *, seed: int | Sequence[int] = 0,
                 strength: float | Mapping[str, float] = 0.5, negative_prompt: str = "",
                 **pipe_kwargs: Any) -> list[Any]:
        """Images for the prompts (one per prompt), image i seeded by its own generator.

        Every concept any prompt names is active for the whole call. Prompts go through the
        pipeline in chunks of exactly `batch_size`, the last one padded with copies (their
        images dropped), so every call has the same shape. On the CPU the default is one
        image per call: torch's CPU kernels (oneDNN convolutions, GroupNorm) give slightly
        different bits for different batch sizes and for different places in a batch, and
        image k must not depend on what else is rendered with it (RELIABILITY.md M4)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        seeds = [seed] * len(prompts) if isinstance(seed, int) else list(seed)
        if len(seeds) != len(prompts):
            raise ValueError("give one seed per prompt")
        lock = self.activate(self.tokens_in(prompts), strength)
        images: list[Any] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk, chunk_seeds = _padded(prompts[start:start + self.batch_size],
                                         seeds[start:start + self.batch_size], self.batch_size)
            kwargs = self._embeddings(chunk, negative_prompt, lock, pipe_kwargs)
            generators = [torch.Generator("cpu").manual_seed(s) for s in chunk_seeds]
            done = list(self.pipe(generator=generators, **kwargs, **pipe_kwargs).images)
            images += done[:len(prompts[start:start + self.batch_size])]
        return images

    def _embeddings(self, prompts: list[str], negative: str, lock: str,
                    pipe_kwargs: Mapping[str, Any]) -> dict[str, Any]:
        device = self.pipe.unet.device
        guided = float(pipe_kwargs.get("guidance_scale", 7.5)) > 1.0
        with torch.no_grad():
            cond, uncond = self.pipe.encode_prompt(
                [rewrite(p, self.concepts) for p in prompts], device, 1, guided,
                [negative] * len(prompts))
            out: dict[str, Any] = {"prompt_embeds": cond, "negative_prompt_embeds": uncond}
            if lock == "global" and self.state.active:
                sup, _ = self.pipe.encode_prompt(
                    [self.supercategory_prompt(p) for p in prompts], device, 1, False)
                both = torch.cat([uncond, sup]) if guided else sup
                out["cross_attention_kwargs"] = {SUPER_KWARG: both}
        return out


def _padded(prompts: list[str], seeds: list[int], size: int) -> tuple[list[str], list[int]]:
    """The chunk filled up to `size` with copies of its last prompt and seed."""
    pad = size - len(prompts)
    return prompts + prompts[-1:] * pad, seeds + seeds[-1:] * pad


def _load_all(items: Sequence[Path | Concept], base_fingerprint: str) -> dict[str, Concept]:
    concepts: dict[str, Concept] = {}
    for item in items:
        concept = item if isinstance(item, Concept) else \
            load(Path(item), expect_base_fingerprint=base_fingerprint)
        if concept.token in concepts:
            raise ValueError(f"two concepts use the token {concept.token!r}")
        concepts[concept.token] = concept
    return concepts


def apply_concepts(pipe: Any, concepts: Sequence[str | os.PathLike[str] | Concept], *,
                   cache_dir: Path | None = None, captions: Path | None = None,
                   cinv: Tensor | None = None, batch_size: int | None = None) -> Applied:
    """Load concept files (or Concepts) into a stock diffusers StableDiffusionPipeline.

    Validates each file against this pipeline (base model fingerprint, layers, sizes), adds
    the tokens to its tokenizer, and installs the Perfusion processors. The pipeline's base
    weights are never modified; `Applied.remove()` undoes the rest. C⁻¹ comes from the cache
    (estimated on the shipped caption corpus, or on `captions`) unless given as `cinv`."""
    if batch_size is None:
        batch_size = CPU_BATCH if pipe.unet.device.type == "cpu" else CUDA_BATCH
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    base = base_fingerprint(pipe)
    cinv_print = None
    if not concepts:  # nothing to gate: C⁻¹ (minutes to estimate on a CPU) is not needed
        cinv = torch.zeros(0, 0)
    elif cinv is None:
        cinv, cinv_print = cinv_for(pipe, cache_dir or default_cache_dir(), captions)
    loaded = _load_all([c if isinstance(c, Concept) else Path(c) for c in concepts], base)
    layers = {n: int(a.to_k.out_features) for n, a in cross_attention_layers(pipe.unet).items()}
    for concept in loaded.values():
        if concept.layers != layers:
            raise ValueError(f"concept {concept.token!r} was made for other cross-attention "
                             "layers than this pipeline's")
        if cinv_print is not None and concept.cinv_fingerprint != cinv_print:
            raise ValueError(f"concept {concept.token!r} was trained with another C⁻¹ "
                             f"({concept.cinv_fingerprint[:12]}, here {cinv_print[:12]})")
    add_concepts(pipe.tokenizer, pipe.text_encoder,
                 {t: c.embedding for t, c in loaded.items()})
    state = ConceptState()
    return Applied(pipe, loaded, cinv.float(), install(pipe.unet, state), state, batch_size)
