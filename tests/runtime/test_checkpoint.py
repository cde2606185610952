"""Training checkpoints on the real tiny pipeline: exact resume (M3), foreign or corrupt
checkpoints ignored, a cooperative stop that leaves the pipeline as found (R10), and kill -9 at
seeded random moments in a subprocess that publishes through the store (R1)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from test_trainer import assert_bit_identical, state_dicts, write_photos

from perfusion_runtime.files.store import Store
from perfusion_runtime.method import artifact, checkpoint
from perfusion_runtime.method.layers import cross_attention_layers
from perfusion_runtime.method.processor import PerfusionAttnProcessor
from perfusion_runtime.method.tiny import tiny_pipeline
from perfusion_runtime.method.trainer import Progress, Recipe, Subject, TrainingInterrupted, train

RECIPE = Recipe(steps=6, batch=2, seed=0, templates=("a photo of a {}", "a close-up of a {}"))
KEY = "ab" * 32
CINV_FP, BASE_FP = "c" * 64, "b" * 64
WARNING = "ignoring the training checkpoint"


@pytest.fixture(scope="module")
def subject(tmp_path_factory: pytest.TempPathFactory) -> Subject:
    photos = write_photos(tmp_path_factory.mktemp("checkpoint") / "photos", 2)
    return Subject("teddy*", ("teddy bear",), ("brown",), photos, key=KEY,
                   base_model="tiny:random")


def run(subject: Subject, recipe: Recipe = RECIPE, *, seen: list[int] | None = None,
        pipe: Any = None, cinv_fp: str = CINV_FP, **kwargs: Any) -> bytes:
    """train() on a fresh tiny pipeline (C⁻¹ = I) -> the artifact's bytes; `seen` collects the
    steps run."""
    pipe = pipe if pipe is not None else tiny_pipeline(0)
    cinv = torch.eye(pipe.text_encoder.config.hidden_size)

    def report(p: Progress) -> None:
        if seen is not None:
            seen.append(p.step)

    concept = train(pipe, subject, recipe, cinv, cinv_fingerprint=cinv_fp,
                    base_fingerprint=BASE_FP, options={"steps": recipe.steps},
                    progress=report, **kwargs)
    data: bytes = artifact.encode(concept)
    return data


def stop_after(step: int) -> Callable[[], bool]:
    """A stop() that says True the `step`-th time it is polled (polled once per step)."""
    polls = iter(range(1, 1_000_000))
    return lambda: next(polls) >= step


def interrupt(subject: Subject, path: Path, step: int, recipe: Recipe = RECIPE,
              **kwargs: Any) -> TrainingInterrupted:
    with pytest.raises(TrainingInterrupted) as caught:
        run(subject, recipe, checkpoint=path, checkpoint_every=2, stop=stop_after(step),
            **kwargs)
    return caught.value


@pytest.fixture(scope="module")
def uninterrupted(subject: Subject) -> bytes:
    return run(subject)


def test_M3_resume_is_exact(subject: Subject, uninterrupted: bytes, tmp_path: Path) -> None:
    path = tmp_path / "ck.safetensors"
    stopped = interrupt(subject, path, 3)
    assert (stopped.step, stopped.checkpoint) == (3, path)
    assert "step 3" in str(stopped) and str(path) in str(stopped)
    seen: list[int] = []
    assert run(subject, checkpoint=path, checkpoint_every=2, seen=seen) == uninterrupted
    assert seen == [4, 5, 6]  # it resumed, it did not retrain
    # left in place after success (the caller deletes it); at step 6 it resumes to the end
    seen.clear()
    assert run(subject, checkpoint=path, seen=seen) == uninterrupted
    assert seen == []
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp files left


def test_M3_resume_from_the_last_checkpoint_before_a_crash(
        subject: Subject, uninterrupted: bytes, tmp_path: Path) -> None:
    """A crash (not a cooperative stop) after step 3 with checkpoints every 2 steps: the rerun
    starts from step 2 and is still exact; the pipeline is left as found."""
    path, pipe = tmp_path / "ck.safetensors", tiny_pipeline(0)
    before, processors = state_dicts(pipe), dict(pipe.unet.attn_processors)

    def crash(p: Progress) -> None:
        if p.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(pipe, subject, RECIPE, torch.eye(pipe.text_encoder.config.hidden_size),
              cinv_fingerprint=CINV_FP, base_fingerprint=BASE_FP, options={"steps": 6},
              progress=crash, checkpoint=path, checkpoint_every=2)
    assert dict(pipe.unet.attn_processors) == processors
    assert_bit_identical(before, pipe)
    seen: list[int] = []
    assert run(subject, checkpoint=path, checkpoint_every=2, seen=seen) == uninterrupted
    assert seen == [3, 4, 5, 6]


def test_R10_stop_without_a_checkpoint(subject: Subject) -> None:
    with pytest.raises(TrainingInterrupted) as caught:
        run(subject, stop=stop_after(2))
    assert (caught.value.step, caught.value.checkpoint) == (2, None)
    assert "starts over" in str(caught.value)
    assert not isinstance(caught.value, RuntimeError)  # not a TrainingError
    # stop() is polled after every step but the last: a finished training is returned
    polls: list[int] = []

    def never() -> bool:
        polls.append(1)
        return False

    assert run(subject, dataclasses.replace(RECIPE, steps=2), stop=never)
    assert len(polls) == 1
    assert run(subject, dataclasses.replace(RECIPE, steps=1), stop=lambda: True)


def test_R10_stop_leaves_pipeline_as_found(subject: Subject, tmp_path: Path) -> None:
    pipe = tiny_pipeline(0)
    pipe.unet.train()
    first = next(pipe.vae.parameters())
    first.requires_grad_(True)
    before, processors = state_dicts(pipe), dict(pipe.unet.attn_processors)
    embedding = pipe.text_encoder.get_input_embeddings()
    ids = pipe.tokenizer("a photo of a brown teddy bear").input_ids
    interrupt(subject, tmp_path / "ck.safetensors", 1, pipe=pipe)
    assert dict(pipe.unet.attn_processors) == processors
    assert not any(isinstance(p, PerfusionAttnProcessor)
                   for p in pipe.unet.attn_processors.values())
    assert pipe.text_encoder.get_input_embeddings() is embedding
    assert pipe.tokenizer("a photo of a brown teddy bear").input_ids == ids
    assert_bit_identical(before, pipe)
    assert pipe.unet.training and not pipe.vae.training and not pipe.text_encoder.training
    assert first.requires_grad
    assert sum(p.requires_grad for p in pipe.vae.parameters()) == 1
    assert not any(p.requires_grad for p in pipe.unet.parameters())


MISMATCHES: dict[str, dict[str, Any]] = {
    "key": {"subject": {"key": "cd" * 32}},
    "token": {"subject": {"token": "bear*"}},
    "recipe": {"recipe": {"seed": 1}},
    "steps": {"recipe": {"steps": 8}},
    "cinv": {"cinv_fp": "d" * 64},
}


@pytest.mark.parametrize("change", MISMATCHES)
def test_M3_mismatched_checkpoint_is_ignored(
        change: str, subject: Subject, uninterrupted: bytes, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    path, changes = tmp_path / "ck.safetensors", MISMATCHES[change]
    other = dataclasses.replace(subject, **changes.get("subject", {}))
    interrupt(other, path, 3, dataclasses.replace(RECIPE, **changes.get("recipe", {})),
              cinv_fp=changes.get("cinv_fp", CINV_FP))
    seen: list[int] = []
    with caplog.at_level(logging.WARNING):
        assert run(subject, checkpoint=path, checkpoint_every=2, seen=seen) == uninterrupted
    assert seen == [1, 2, 3, 4, 5, 6]
    assert any(WARNING in r.message and "another training" in r.message
               for r in caplog.records)


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def replace_with(path: Path, make: Callable[[Path], None]) -> None:
    path.unlink()
    make(path)


CORRUPTIONS: dict[str, Callable[[Path], object]] = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "garbage": lambda p: p.write_bytes(random.Random(0).randbytes(4096)),
    "empty": lambda p: p.write_bytes(b""),
    "flipped byte": flip_last_byte,
    "torch.save zip": lambda p: torch.save({"step": 3}, p),
    "directory": lambda p: replace_with(p, Path.mkdir),
    "fifo": lambda p: replace_with(p, os.mkfifo),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_M3_corrupt_checkpoint_is_ignored(
        corruption: str, subject: Subject, uninterrupted: bytes, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "ck.safetensors"
    interrupt(subject, path, 3)
    CORRUPTIONS[corruption](path)
    seen: list[int] = []
    with caplog.at_level(logging.WARNING):
        assert run(subject, checkpoint=path, checkpoint_every=2, seen=seen) == uninterrupted
    assert seen == [1, 2, 3, 4, 5, 6]
    assert any(WARNING in r.message for r in caplog.records)


def test_checkpoint_holds_the_whole_state_without_pickle(subject: Subject,
                                                         tmp_path: Path) -> None:
    """Tensors by stable names (no pickle: safetensors), scalars in JSON metadata."""
    path = tmp_path / "ck.safetensors"
    interrupt(subject, path, 3)
    header = read_header(path)
    meta = header.pop("__metadata__")
    assert meta["format"] == checkpoint.FORMAT and meta["step"] == "3"
    assert len(json.loads(meta["losses"])) == 3 and meta["key"] == KEY
    layers = list(cross_attention_layers(tiny_pipeline(0).unet))
    trainable = ["embedding", *(f"o_v.{layer}" for layer in layers)]
    assert set(header) == {"generator", "i_star"} | {
        f"{kind}.{name}" for name in trainable
        for kind in ("param", "adamw.step", "adamw.exp_avg", "adamw.exp_avg_sq")}
    assert header["generator"]["dtype"] == "U8"
    assert header["adamw.step.embedding"]["shape"] == []


def read_header(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    header: dict[str, Any] = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    return header


# ---------------------------------------------------------------------------------------------
# R1: kill -9 in a subprocess that trains with checkpoints and publishes through the store

SCRIPT = """
import json, sys
import torch
torch.set_num_threads(1)
from pathlib import Path
from perfusion_runtime.method import artifact
from perfusion_runtime.files.store import Store
from perfusion_runtime.method.tiny import tiny_pipeline
from perfusion_runtime.method.trainer import Recipe, Subject, train

config = json.loads(Path(sys.argv[1]).read_text())
recipe = Recipe(**{**config["recipe"], "templates": tuple(config["recipe"]["templates"])})
subject = Subject(**{**config["subject"], "images": tuple(map(Path, config["images"]))})
store = Store(config["root"])
if store.get(subject.key) is None:
    pipe = tiny_pipeline(0)
    cinv = torch.eye(pipe.text_encoder.config.hidden_size)
    concept = train(pipe, subject, recipe, cinv, cinv_fingerprint=config["cinv"],
                    base_fingerprint=config["base"], options={"steps": recipe.steps},
                    progress=lambda p: print("step", p.step, flush=True),
                    checkpoint=store.checkpoint(subject.key),
                    checkpoint_every=config["every"])
    print("publishing", flush=True)
    store.put(subject.key, artifact.encode(concept), token=subject.token, tool_version="test")
# as jobs.train_job: a kill between publishing and this leaves the checkpoint for the rerun
store.checkpoint(subject.key).unlink(missing_ok=True)
print("done", flush=True)
"""


def start(tmp_path: Path, subject: Subject, every: int) -> subprocess.Popen[str]:
    config = {"recipe": dataclasses.asdict(RECIPE), "root": str(tmp_path / "store"),
              "images": [str(p) for p in subject.images], "every": every,
              "cinv": CINV_FP, "base": BASE_FP,
              "subject": {"token": subject.token, "supercategories": subject.supercategories,
                          "adjectives": subject.adjectives, "key": subject.key,
                          "base_model": subject.base_model}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "script.py").write_text(SCRIPT)
    with (tmp_path / "stderr.txt").open("a") as stderr:
        return subprocess.Popen([sys.executable, str(tmp_path / "script.py"),
                                 str(tmp_path / "config.json")], cwd=tmp_path, text=True,
                                stdout=subprocess.PIPE, stderr=stderr)


def kill_at_random(proc: subprocess.Popen[str], rng: random.Random) -> list[str]:
    """SIGKILL after a random number of progress lines plus a random delay; the lines read."""
    assert proc.stdout is not None
    lines: list[str] = []
    wanted = rng.randint(1, RECIPE.steps + 1)
    guard = threading.Timer(120, proc.kill)
    guard.start()
    try:
        while len(lines) < wanted and (line := proc.stdout.readline()):
            lines.append(line.strip())
        threading.Event().wait(rng.uniform(0, 0.08))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        guard.cancel()
        proc.stdout.close()
    return lines


def saved_step(path: Path) -> int:
    """The step of the checkpoint at `path` (0: none); it must be complete if it exists."""
    if not path.exists():
        return 0
    return int(read_header(path)["__metadata__"]["step"])


def kill_and_rerun(tmp_path: Path, subject: Subject, uninterrupted: bytes, seed: int) -> None:
    rng = random.Random(seed)
    every = rng.randint(1, 3)
    store = Store(tmp_path / "store")
    kill_at_random(start(tmp_path, subject, every), rng)
    assert store.verify() == []  # no final-named entry is ever incomplete
    published = store.peek(KEY)
    assert published is None or published.read_bytes() == uninterrupted
    step = saved_step(store.checkpoint(KEY))  # never a partial file at its final name
    rerun = start(tmp_path, subject, every)
    out, _ = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    steps_run = [int(line.split()[1]) for line in out.splitlines() if line.startswith("step")]
    assert steps_run == ([] if published else list(range(step + 1, RECIPE.steps + 1)))
    found = store.get(KEY)
    assert found is not None and found.read_bytes() == uninterrupted
    assert not store.checkpoint(KEY).exists() and store.verify() == []


@pytest.mark.parametrize("seed", range(2))
def test_R1_kill_9_during_training(seed: int, subject: Subject, uninterrupted: bytes,
                                   tmp_path: Path) -> None:
    kill_and_rerun(tmp_path, subject, uninterrupted, seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(2, 12))
def test_R1_kill_9_during_training_10_trials(seed: int, subject: Subject, uninterrupted: bytes,
                                             tmp_path: Path) -> None:
    kill_and_rerun(tmp_path, subject, uninterrupted, seed)
