"""The pieces of `tools/train_toy_model.py` that a GPU run relies on: each step's batch is a
function of the seed and the step (so worker processes can make it ahead, and a resumed run
draws the same), the loss balance and the EMA as tensor operations, and `--minutes`; and
`tools/gpu_train_toy.sh`, the GPU call itself, end to end on the CPU (slow)."""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

TOOL = Path(__file__).resolve().parents[2] / "tools" / "train_toy_model.py"


@pytest.fixture(scope="module")
def toy() -> Any:
    spec = importlib.util.spec_from_file_location("train_toy_model", TOOL)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_toy_model"] = module  # the spawned workers import it by this name
    sys.path.insert(0, str(TOOL.parent))
    spec.loader.exec_module(module)
    return module


def test_step_batch_is_a_function_of_seed_and_step(toy: Any) -> None:
    idx, ids = toy.step_batch(0, 5, 1000, 16)
    again_idx, again_ids = toy.step_batch(0, 5, 1000, 16)
    assert torch.equal(idx, again_idx) and torch.equal(ids, again_ids)
    assert idx.shape == (16,) and ids.shape == (16, 77)
    assert int(idx.min()) >= 0 and int(idx.max()) < 1000
    other_step, _ = toy.step_batch(0, 6, 1000, 16)
    other_seed, _ = toy.step_batch(1, 5, 1000, 16)
    assert not torch.equal(idx, other_step) and not torch.equal(idx, other_seed)
    # each caption describes its own image's scene (a tenth are empty, for guidance)
    tokenizer = toy._feed_tokenizer()
    said = [tokenizer.decode(row, skip_special_tokens=True) for row in ids]
    scenes = [toy.scene_for_seed(int(i)) for i in idx]  # seed 0: scene seeds are the indices
    assert sum(bool(text) for text in said) >= 12
    for text, scene in zip(said, scenes, strict=True):
        assert text == "" or scene.colour in text.split(), (text, scene)


def test_spawned_workers_make_what_the_loop_would_make_itself(toy: Any) -> None:
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        feed = toy.Feed(pool, 3, 500, 8, first=4)
        made = [feed.get(step) for step in (4, 5, 6)]
        feed.close()
        pixels, seeds = toy.dataset(5, 0, pool)
    for step, (idx, ids) in zip((4, 5, 6), made, strict=True):
        own_idx, own_ids = toy.step_batch(3, step, 500, 8)
        assert torch.equal(idx, own_idx) and torch.equal(ids, own_ids)
    here, here_seeds = toy.dataset(5, 0)
    assert torch.equal(pixels, here) and seeds == here_seeds == list(range(5))
    assert pixels.dtype == torch.uint8 and pixels.shape == (5, 3, 64, 64)
    first = torch.from_numpy(np.array(toy.training_example(0)[0])).permute(2, 0, 1)
    assert torch.equal(here[0], first)


def balance_by_loop(table: torch.Tensor, per_sample: torch.Tensor, t: torch.Tensor,
                    decay: float) -> torch.Tensor:
    """The loss balance written the plain way: level by level, in Python."""
    table = table.clone()
    level = t * 20 // 1000
    for k in sorted(set(level.tolist())):
        mean = float(per_sample[level == k].mean())
        old = float(table[k])
        table[k] = mean if old == 0 else old + (1 - decay) * (mean - old)
    return table


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 999), st.floats(0.01, 10.0)), min_size=1,
                max_size=40),
       st.lists(st.floats(0.0, 5.0), min_size=20, max_size=20))
def test_loss_balance_matches_the_level_by_level_loop(
        toy: Any, samples: list[tuple[int, float]], start: list[float]) -> None:
    t = torch.tensor([s[0] for s in samples])
    per_sample = torch.tensor([s[1] for s in samples])
    balance = toy.LossBalance()
    # some levels seen before, some never (0 means unseen)
    initial = torch.tensor([v if i % 3 else 0.0 for i, v in enumerate(start)])
    balance.level_loss.copy_(initial)
    loss = balance(per_sample, t)
    expected = balance_by_loop(initial, per_sample, t, balance.decay)
    torch.testing.assert_close(balance.level_loss, expected, rtol=1e-5, atol=1e-6)
    level = t * 20 // 1000
    torch.testing.assert_close(loss, (per_sample / expected[level]).mean(), rtol=1e-5,
                               atol=1e-6)


def test_ema_update_moves_every_weight_by_the_decay(toy: Any) -> None:
    torch.manual_seed(0)
    model, ema = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    before = [p.detach().clone() for p in ema.parameters()]
    toy.ema_update(ema, model, 0.9)
    for e, b, p in zip(ema.parameters(), before, model.parameters(), strict=True):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * p.detach())


def test_minutes_sets_steps_from_the_measured_speed(toy: Any) -> None:
    args = argparse.Namespace(minutes=10.0, started=time.time() - 120)
    steps, decay = toy.steps_for_minutes(args, 0, 120, 0.05)
    # 600 s less the 120 spent and 20 for the last save, at 90 %: 8,280 more steps
    assert abs(steps - (120 + 0.9 * 460 / 0.05)) <= 2
    assert decay == round(steps * 0.75)
    args.started = time.time() - 700  # already over: no more steps than those done
    assert toy.steps_for_minutes(args, 0, 120, 0.05)[0] == 120


@pytest.mark.slow
def test_the_gpu_call_script_trains_and_its_pieces_unpack_into_a_loadable_model(
        tmp_path: Path) -> None:
    """`tools/gpu_train_toy.sh` as the next lent GPU will run it, with SMOKE=1 (`--quick` on
    the CPU): the model comes out in pieces of at most 15 MB beside its log and record, and
    `--unpack` puts them back as a folder that stock diffusers loads."""
    import json
    import os
    import shutil
    import subprocess

    from diffusers import StableDiffusionPipeline

    script = TOOL.parent / "gpu_train_toy.sh"
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OUT": str(out), "SMOKE": "1", "PYTHON": sys.executable,
           "WORK": str(tmp_path / "work"), "OMP_NUM_THREADS": "2"}
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    pieces = sorted(out.glob("model.tar.part-*"))
    assert pieces and all(p.stat().st_size <= 15 * 2**20 for p in pieces)
    assert "unet step 30/30" in (out / "train.log").read_text()
    # --unpack works on the checkout the script sits in: a copy with a stand-in model
    repo = tmp_path / "repo"
    (repo / "tools").mkdir(parents=True)
    shutil.copy(script, repo / "tools")
    (repo / "runtime" / "toy" / "shapes").mkdir(parents=True)
    (repo / "runtime" / "toy" / "shapes" / "old-weights").write_text("replaced")
    unpack = subprocess.run(["bash", str(repo / "tools" / "gpu_train_toy.sh"), "--unpack",
                             str(out)], capture_output=True, text=True, timeout=120)
    assert unpack.returncode == 0, unpack.stderr
    model = repo / "runtime" / "toy" / "shapes"
    assert not (model / "old-weights").exists()
    assert json.loads((model / "training.json").read_text()) == \
        json.loads((out / "training.json").read_text())
    pipe = StableDiffusionPipeline.from_pretrained(str(model), local_files_only=True,
                                                   safety_checker=None)
    assert list(pipe.unet.config.block_out_channels) == [32, 32, 32, 32]  # --quick's widths
