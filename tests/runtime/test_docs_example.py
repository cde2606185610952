"""The Python example of docs/runtime.md, run as written: the tiny pipeline saved as a
diffusers folder stands in for SD 1.5, and two concepts trained for it for the files."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from perfusion_runtime.method import artifact
from perfusion_runtime.method.covariance import cinv_for
from perfusion_runtime.method.fingerprint import base_fingerprint
from perfusion_runtime.method.tiny import tiny_pipeline
from perfusion_runtime.method.trainer import Recipe, Subject, train

DOC = Path(__file__).resolve().parents[2] / "docs" / "runtime.md"


def example() -> str:
    text = DOC.read_text(encoding="utf-8")
    match = re.search(r"<!-- example: python-api -->\n```python\n(.*?)```", text, re.S)
    assert match, "docs/runtime.md lost its tested example"
    return match.group(1)


def test_python_api_example_runs_as_documented(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "model"
    pipe = tiny_pipeline(0)
    pipe.save_pretrained(model, safe_serialization=True)
    monkeypatch.setenv("PERFUSION_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    cinv, cinv_print = cinv_for(pipe, tmp_path / "cache")
    for token, colour in (("teddy*", (150, 90, 30)), ("mug*", (30, 60, 220))):
        pictures = []
        for i in range(2):
            pictures.append(tmp_path / f"{token[:-1]}{i}.png")
            Image.new("RGB", (32, 32), (colour[0], colour[1] + 40 * i, colour[2])).save(
                pictures[-1])
        concept = train(pipe, Subject(token, (token[:-1],), (), tuple(pictures)),
                        Recipe(steps=2, batch=2), cinv, cinv_fingerprint=cinv_print,
                        base_fingerprint=base_fingerprint(pipe))
        artifact.save(concept, tmp_path / f"{token[:-1]}.safetensors")
    code = example()
    code = re.sub(r'^model = ".*?"', f"model = {str(model)!r}", code, count=1, flags=re.M)
    assert str(model) in code  # the substitution found its line
    namespace: dict[str, object] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. an unknown concept token
        exec(compile(code, str(DOC), "exec"), namespace)
    images = namespace["images"]
    assert isinstance(images, list) and len(images) == 3
    assert (tmp_path / "teddy-beach.png").is_file()
    loaded = namespace["pipe"]
    assert not any("Perfusion" in type(p).__name__
                   for p in loaded.unet.attn_processors.values())  # type: ignore[attr-defined]
    assert np.asarray(namespace["snow"]).shape == (32, 32, 3)
    assert torch.equal(loaded.unet.conv_in.weight, pipe.unet.conv_in.weight)  # type: ignore[attr-defined]
