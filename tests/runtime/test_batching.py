"""Applied renders in pipeline calls of one fixed size, padding the last one (M4)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from perfusion_runtime.method.render import CPU_BATCH, apply_concepts
from perfusion_runtime.method.tiny import tiny_pipeline

RENDER = {"num_inference_steps": 2, "output_type": "np"}


def test_every_call_has_the_same_size_and_padding_is_dropped(
        monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = tiny_pipeline(0)
    sizes: list[int] = []
    real = type(pipe).__call__

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        sizes.append(int(kwargs["prompt_embeds"].shape[0]))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", spy)
    prompts = ["a red cube", "a blue ball", "a green cone", "a dog"]
    with apply_concepts(pipe, [], batch_size=3) as applied:
        padded = applied(prompts, seed=[1, 2, 3, 4], **RENDER)
    assert sizes == [3, 3] and len(padded) == 4
    with apply_concepts(pipe, []) as applied:  # the CPU default: one image per call
        single = applied(prompts, seed=[1, 2, 3, 4], **RENDER)
    assert CPU_BATCH == 1 and sizes[2:] == [1, 1, 1, 1]
    # the fourth image of the padded run is alone in its call with two copies of itself
    again = applied_alone(pipe, "a dog", 4)
    assert np.array_equal(padded[3], again)
    assert all(np.isfinite(image).all() for image in single)


def applied_alone(pipe: Any, prompt: str, seed: int) -> np.ndarray:
    with apply_concepts(pipe, [], batch_size=3) as applied:
        image: np.ndarray = applied([prompt], seed=[seed], **RENDER)[0]
    return image


def test_batch_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        apply_concepts(tiny_pipeline(0), [], batch_size=0)
