"""Runtime test fixtures: the tiny pipeline, prompt encodings, UNet inputs, concept states."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# Some tests run benchmark-side code (the ablation methods, SD 1.5's shapes), which stays
# out of the product package.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

# The runtime needs the `runtime` extra (torch, diffusers, transformers); without it the
# compiler's tests still run and these are left out.
if not all(importlib.util.find_spec(m) for m in ("torch", "diffusers", "transformers")):
    collect_ignore_glob = ["test_*.py"]
else:
    import torch
    from torch import Tensor

    from perfusion_runtime.method.key_locking import inverse_covariance, make_basis, second_moment
    from perfusion_runtime.method.layers import cross_attention_layers
    from perfusion_runtime.method.processor import ConceptState
    from perfusion_runtime.method.tiny import tiny_pipeline

    Encode = Callable[[list[str]], Tensor]

    @pytest.fixture(scope="module", autouse=True)
    def one_thread() -> Iterator[None]:
        """Two cores often shared with other jobs: one torch thread is several times faster
        here than two contending ones."""
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(before)

    @pytest.fixture
    def pipe() -> Any:
        """A fresh tiny StableDiffusionPipeline (seed 0); building one takes ~0.1 s."""
        return tiny_pipeline(seed=0)

    @pytest.fixture
    def encode(pipe: Any) -> Encode:
        """encode(prompts): the text encoder's last hidden state [B, 77, D], as SD uses it."""

        def run(prompts: list[str]) -> Tensor:
            ids = pipe.tokenizer(prompts, padding="max_length", truncation=True,
                                 max_length=pipe.tokenizer.model_max_length,
                                 return_tensors="pt").input_ids
            with torch.no_grad():
                out: Tensor = pipe.text_encoder(ids)[0]
            return out

        return run

    @pytest.fixture
    def unet_inputs(pipe: Any, encode: Encode) -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
        """unet_inputs(prompts, seed=0): (latents [B, 4, 8, 8], timestep, encodings [B, 77, D])."""

        def make(prompts: list[str], seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
            generator = torch.Generator().manual_seed(seed)
            size = pipe.unet.config.sample_size
            latents = torch.randn(len(prompts), 4, size, size, generator=generator)
            return latents, torch.tensor(500), encode(prompts)

        return make

    def targets(pipe: Any, k: int, seed: int) -> dict[str, Tensor]:
        """One random target [K, O] per cross-attention layer."""
        generator = torch.Generator().manual_seed(seed)
        return {name: torch.randn(k, attn.to_k.out_features, generator=generator)
                for name, attn in cross_attention_layers(pipe.unet).items()}

    @pytest.fixture
    def concept_state(pipe: Any) -> Callable[..., ConceptState]:
        """concept_state(i_stars [K, D], encodings, beta, lock="local"): K concepts with random
        o*_K and o*_V per layer, C⁻¹ from the second moment of `encodings` [..., D]."""

        def make(i_stars: Tensor, encodings: Tensor, beta: float,
                 lock: str = "local") -> ConceptState:
            state = ConceptState()
            basis = make_basis(i_stars, inverse_covariance(second_moment(encodings)))
            k = i_stars.shape[0]
            state.activate(basis, targets(pipe, k, seed=1), targets(pipe, k, seed=2),
                           beta=beta, lock=lock)
            return state

        return make
