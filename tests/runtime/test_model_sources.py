"""Model sources (docs/models.md): model ids through a Hugging Face cache that the tests
fill themselves in the hub's real layout (blobs, snapshot links, refs), loaded with the
network off; the names that are refused; the weights stamp in cache keys."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from ldm_layout import to_single_file
from PIL import Image
from test_e2e import fresh_cache

from perfusion_dsl.compiler import compile_paths
from perfusion_runtime.build import models as models_module
from perfusion_runtime.build import status as status_module
from perfusion_runtime.build.jobs import ModelUnavailable, load_pipeline
from perfusion_runtime.build.models import describe, source_of, stamp
from perfusion_runtime.build.progress import Reporter
from perfusion_runtime.build.run import RunOptions, run
from perfusion_runtime.method.device import choose
from perfusion_runtime.method.fingerprint import base_fingerprint
from perfusion_runtime.method.tiny import tiny_pipeline

REPO = "perfusion-tests/tiny-sd"
FIRST = "1" * 40
SECOND = "2" * 40


def hub_snapshot(hub: Path, repo: str, commit: str, pipe: Any, refs: tuple[str, ...] = ("main",),
                 ) -> Path:
    """Save `pipe` as the hub's cache keeps a download: each file's bytes once under
    `blobs/`, the snapshot a tree of relative links to them, `refs/<branch>` the commit."""
    folder = hub / ("models--" + repo.replace("/", "--"))
    staging = folder / "staging"
    pipe.save_pretrained(staging, safe_serialization=True)
    snapshot = folder / "snapshots" / commit
    for file in sorted(p for p in staging.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / file.relative_to(staging)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
        file.unlink()
    for ref in refs:
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty hub cache under HF_HOME, with the network off, and no stamp remembered."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(status_module, "_STAMPS", {})
    monkeypatch.setattr(models_module, "_RESOLVED", {})
    return tmp_path / "hf" / "hub"


def test_model_names_are_classified() -> None:
    assert source_of("tiny:random").kind == "tiny"
    assert source_of("toy:shapes").kind == "builtin"
    hub = source_of("stable-diffusion-v1-5/stable-diffusion-v1-5@fp16-main")
    assert (hub.kind, hub.repo, hub.revision) == ("hub", "stable-diffusion-v1-5/"
                                                  "stable-diffusion-v1-5", "fp16-main")
    assert source_of("models/dreamshaper_8.safetensors").kind == "file"
    assert source_of("./models/sd15").kind == "folder"  # a path, even where it does not exist
    assert source_of("/opt/models/sd15").kind == "folder"
    assert source_of("sd15").kind == "folder"  # no slash: not an id


def test_an_existing_folder_wins_over_a_model_id(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert source_of("org/name").kind == "folder"


@pytest.mark.parametrize("name", ["model.ckpt", "weights/model.PT", "x.pth", "m.bin"])
def test_S8_pickle_checkpoints_are_refused_before_any_read(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not read")
    with pytest.raises(ModelUnavailable, match="pickle that can run code") as caught:
        load_pipeline(str(path), choose("cpu"))
    assert "safetensors" in str(caught.value)
    assert describe(str(path)).startswith("refused: ")


def test_M7_model_id_loads_from_the_hub_cache_offline(hub: Path) -> None:
    original = tiny_pipeline(0)
    hub_snapshot(hub, REPO, FIRST, original, refs=("main", "v1"))
    for name in (REPO, f"{REPO}@v1", f"{REPO}@{FIRST}"):
        pipe = load_pipeline(name, choose("cpu"))
        assert base_fingerprint(pipe) == base_fingerprint(original), name
    assert describe(REPO) == f"Hugging Face cache, snapshot {FIRST[:12]}"


def test_M7_model_id_missing_offline_says_what_and_how_within_a_second(hub: Path) -> None:
    for name, revision in ((REPO, None), (f"{REPO}@v9", "v9")):
        started = time.perf_counter()
        with pytest.raises(ModelUnavailable) as caught:
            load_pipeline(name, choose("cpu"))
        assert time.perf_counter() - started < 1.0
        message = str(caught.value)
        assert "not in the Hugging Face cache" in message and "HF_HUB_OFFLINE" in message
        assert f"hf download {REPO}" in message and str(hub) in message
        if revision:
            assert f"--revision {revision}" in message
    assert "HF_HUB_OFFLINE is set" in describe(REPO)


def test_M7_incomplete_snapshot_is_unavailable_not_a_crash(hub: Path) -> None:
    snapshot = hub_snapshot(hub, REPO, FIRST, tiny_pipeline(0))
    (snapshot / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelUnavailable, match=REPO):
        load_pipeline(REPO, choose("cpu"))


def test_a_builtin_models_stamp_follows_its_record_corpus_and_sampler(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A built-in model retrained (training.json), given another caption corpus, or another
    sampler (its class in model_index.json, its scheduler config: renders change with them)
    gets another stamp, so every key made with it changes; its weights are not read."""
    shipped = models_module.BUILTIN_MODELS["toy:shapes"]
    folder = tmp_path / "shapes"
    parts = ("training.json", "captions.txt", "model_index.json",
             "scheduler/scheduler_config.json")
    for part in parts:
        (folder / part).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shipped / part, folder / part)
    monkeypatch.setitem(models_module.BUILTIN_MODELS, "toy:shapes", folder)
    seen = {stamp("toy:shapes")}
    for part in parts:
        with (folder / part).open("a") as f:
            f.write("\n")
        seen.add(stamp("toy:shapes"))
    assert len(seen) == 1 + len(parts) and "missing" not in seen
    (folder / "training.json").unlink()
    assert stamp("toy:shapes") == "missing"


def test_stamp_is_the_resolved_snapshot_so_a_new_revision_rebuilds(hub: Path) -> None:
    assert stamp(REPO) == "missing"
    assert status_module.model_stamp(REPO) == "missing"  # not remembered: a run may fetch it
    hub_snapshot(hub, REPO, FIRST, tiny_pipeline(0))
    assert status_module.model_stamp(REPO) == f"hub:{FIRST}"
    assert stamp(f"{REPO}@{FIRST}") == f"hub:{FIRST}"
    hub_snapshot(hub, REPO, SECOND, tiny_pipeline(1))  # main moves on
    assert stamp(REPO) == f"hub:{SECOND}"
    assert stamp(f"{REPO}@{FIRST}") == f"hub:{FIRST}"  # a pinned revision does not


def test_e2e_model_id_train_render_noop_and_a_new_revision(
        hub: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    hub_snapshot(hub, REPO, FIRST, tiny_pipeline(0))
    root = tmp_path / "project"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (32, 32), (200, 120, 40)).save(root / "images" / "1.png")
    (root / "a.concept").write_text(
        f'model "{REPO}"\nlearn images/*.png as teddy* <teddy bear> {{ steps: 2, batch: 1 }}\n'
        'generate "a photo of teddy*" { steps: 2 }\n', encoding="utf-8")
    cache = fresh_cache(tmp_path_factory, "hub-e2e")
    compilation = compile_paths([root], root)
    assert compilation.ok, compilation.diagnostics
    plan = compilation.plan()

    def build() -> Any:
        return run(plan, root, RunOptions(store=cache, device="cpu"), Reporter(quiet=True))

    first = build()
    assert (first.trained, len(first.rendered), first.failures) == (["teddy*"], 1, [])
    again = build()
    assert (again.trained, again.rendered, again.reused, again.failures) == ([], [], ["teddy*"],
                                                                             [])
    # the weights gone from the cache, its ref kept: a run with nothing to do needs none
    shutil.rmtree(hub / ("models--" + REPO.replace("/", "--")) / "snapshots" / FIRST)
    quiet = build()
    assert (quiet.trained, quiet.rendered, quiet.failures) == ([], [], [])
    hub_snapshot(hub, REPO, SECOND, tiny_pipeline(0))  # main moves to a new commit
    newer = build()
    assert (newer.trained, len(newer.rendered), newer.failures) == (["teddy*"], 1, [])
    image = next((root / "renders" / "a").glob("a-photo-of-teddy_*.png"))
    text = Image.open(image).text  # type: ignore[attr-defined]
    assert (text["base_model"], text["base_model_weights"]) == (REPO, f"hub:{SECOND}")


def test_e2e_model_id_missing_offline_fails_its_steps_with_their_spec_lines(
        hub: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path / "project"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (32, 32), (200, 120, 40)).save(root / "images" / "1.png")
    (root / "a.concept").write_text(
        f'model "{REPO}"\n\nlearn images/*.png as teddy* <teddy bear> {{ steps: 2 }}\n',
        encoding="utf-8")
    compilation = compile_paths([root], root)
    summary = run(compilation.plan(), root,
                  RunOptions(store=fresh_cache(tmp_path_factory, "hub-missing"), device="cpu"),
                  Reporter(quiet=True))
    (failure,) = summary.failures
    assert "a.concept:3" in failure and "not in the Hugging Face cache" in failure
    assert f"hf download {REPO}" in failure


# ---------------------------------------------------------------- single checkpoint files


def checkpoint(tmp_path: Path, pipe: Any, name: str = "model") -> tuple[Path, Path]:
    """`pipe` as one original-layout `.safetensors` file, and its diffusers configuration
    (the folder without the weights, as a configuration repository holds it)."""
    config = tmp_path / f"{name}-config"
    pipe.save_pretrained(config, safe_serialization=True)
    for weights in config.rglob("*.safetensors"):
        weights.unlink()
    return to_single_file(pipe, tmp_path / f"{name}.safetensors"), config


def same_weights(a: Any, b: Any) -> None:
    components = ["unet", "vae", "text_encoder"]
    if getattr(a, "text_encoder_2", None) is not None:
        components.append("text_encoder_2")
    for component in components:
        ours, theirs = getattr(a, component).state_dict(), getattr(b, component).state_dict()
        assert ours.keys() == theirs.keys(), component
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), (component, key)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_single_file_checkpoint_loads_with_its_config_offline(tmp_path: Path,
                                                               family: str) -> None:
    original = tiny_pipeline(0, family=family)
    file, config = checkpoint(tmp_path, original)
    pipe = load_pipeline(str(file), choose("cpu"), str(config))
    assert type(pipe) is type(original)
    same_weights(pipe, original)
    assert base_fingerprint(pipe) == base_fingerprint(original)
    assert pipe.scheduler.config.prediction_type == ("v_prediction" if family == "sd2"
                                                     else "epsilon")
    assert describe(str(file)) == "single checkpoint file"


def test_single_file_config_from_a_model_id_in_the_hub_cache(hub: Path, tmp_path: Path) -> None:
    original = tiny_pipeline(0)
    file, _ = checkpoint(tmp_path, original)
    snapshot = hub_snapshot(hub, REPO, FIRST, original)
    for weights in snapshot.rglob("*.safetensors"):  # a configuration needs no weights
        weights.unlink()
    same_weights(load_pipeline(str(file), choose("cpu"), REPO), original)


def test_single_file_without_a_config_says_how_to_give_one(tmp_path: Path) -> None:
    file, _ = checkpoint(tmp_path, tiny_pipeline(0))
    with pytest.raises(ModelUnavailable, match=r"\[checkpoints\]") as caught:
        load_pipeline(str(file), choose("cpu"))
    assert "Stable Diffusion 1.x" in str(caught.value)
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in str(caught.value)


@pytest.mark.parametrize("file_layers, config_layers", [(1, 2), (2, 1)],
                         ids=["config-bigger", "file-bigger"])
def test_single_file_with_the_wrong_config_is_refused_not_half_random(
        tmp_path: Path, file_layers: int, config_layers: int) -> None:
    def pipe(layers: int) -> Any:
        made = tiny_pipeline(0)
        made.unet = made.unet.__class__(**{**made.unet.config, "layers_per_block": layers})
        return made

    file, _ = checkpoint(tmp_path, pipe(file_layers), "file")
    _, wrong = checkpoint(tmp_path, pipe(config_layers), "wrong")
    with pytest.raises(ModelUnavailable, match="another model family or size") as caught:
        load_pipeline(str(file), choose("cpu"), str(wrong))
    assert len(str(caught.value)) < 1000  # not every mismatched tensor


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "first_stage_model."])
def test_single_file_missing_a_tensor_is_refused_not_left_random(tmp_path: Path,
                                                                 prefix: str) -> None:
    """diffusers' loader keeps a weight the file lacks at its random start, silently."""
    from safetensors.torch import load_file, save_file

    file, config = checkpoint(tmp_path, tiny_pipeline(0))
    tensors = load_file(str(file))
    dropped = next(k for k in sorted(tensors) if k.startswith(prefix) and k.endswith(".weight"))
    del tensors[dropped]
    save_file(tensors, str(file))
    with pytest.raises(ModelUnavailable, match="does not match its configuration"):
        load_pipeline(str(file), choose("cpu"), str(config))


@pytest.mark.parametrize("content, why", [
    (b"", "too small to be a safetensors file"),
    (b"PK\x03\x04" + bytes(60), "not a safetensors file"),
], ids=["empty", "zip"])
def test_single_file_that_is_not_safetensors_is_unavailable(tmp_path: Path, content: bytes,
                                                            why: str) -> None:
    file = tmp_path / "model.safetensors"
    file.write_bytes(content)
    with pytest.raises(ModelUnavailable, match=why):
        load_pipeline(str(file), choose("cpu"), str(tmp_path))


def test_single_file_that_is_no_base_model_is_named_so(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    file = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0.alpha": torch.ones(1)}, str(file))
    with pytest.raises(ModelUnavailable, match="no Stable Diffusion UNet"):
        load_pipeline(str(file), choose("cpu"), str(tmp_path))


def test_e2e_single_file_with_its_config_from_perfusion_toml(
        tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path / "project"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (32, 32), (200, 120, 40)).save(root / "images" / "1.png")
    file, config = checkpoint(root, tiny_pipeline(0, family="sd2"), "tiny-v")
    name = str(file)
    (root / "perfusion.toml").write_text(
        f'[checkpoints]\n"{name}" = {{ config = "{config.name}" }}\n', encoding="utf-8")
    (root / "a.concept").write_text(
        f'model "{name}"\nlearn images/*.png as teddy* <teddy bear> {{ steps: 2, batch: 1 }}\n'
        'generate "a photo of teddy*" { steps: 2 }\n', encoding="utf-8")
    cache = fresh_cache(tmp_path_factory, "single-file-e2e")

    def build() -> Any:
        compilation = compile_paths([root], root)
        assert compilation.ok, compilation.diagnostics
        plan = compilation.plan()
        assert plan.checkpoint_configs == {name: config.name}
        return run(plan, root, RunOptions(store=cache, device="cpu"), Reporter(quiet=True))

    first = build()
    assert (first.trained, len(first.rendered), first.failures) == (["teddy*"], 1, [])
    again = build()
    assert (again.trained, again.rendered, again.failures) == ([], [], [])
    # another configuration reads the same weights differently: the concept is trained again
    shutil.copytree(config, root / "other-config")
    (root / "perfusion.toml").write_text(
        f'[checkpoints]\n"{name}" = {{ config = "other-config" }}\n', encoding="utf-8")
    compilation = compile_paths([root], root)
    summary = run(compilation.plan(), root, RunOptions(store=cache, device="cpu"),
                  Reporter(quiet=True))
    assert (summary.trained, summary.failures) == (["teddy*"], [])


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_diffusers_folder_loads_the_pipeline_class_it_declares(tmp_path: Path,
                                                               family: str) -> None:
    original = tiny_pipeline(0, family=family)
    original.save_pretrained(tmp_path / "model", safe_serialization=True)
    pipe = load_pipeline(str(tmp_path / "model"), choose("cpu"))
    assert type(pipe) is type(original)
    same_weights(pipe, original)
    assert base_fingerprint(pipe) == base_fingerprint(original)


def test_a_folder_of_another_kind_of_pipeline_is_refused(tmp_path: Path) -> None:
    (tmp_path / "flux").mkdir()
    (tmp_path / "flux" / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    with pytest.raises(ModelUnavailable, match="is a FluxPipeline; perfusion trains"):
        load_pipeline(str(tmp_path / "flux"), choose("cpu"))


def test_single_file_read_with_another_familys_config_is_refused(tmp_path: Path) -> None:
    file, _ = checkpoint(tmp_path, tiny_pipeline(0, family="sdxl"), "xl")
    _, sd1 = checkpoint(tmp_path, tiny_pipeline(0), "sd1")
    with pytest.raises(ModelUnavailable, match="is SDXL but its configuration"):
        load_pipeline(str(file), choose("cpu"), str(sd1))


def test_e2e_sdxl_folder_train_render_and_noop(tmp_path: Path,
                                               tmp_path_factory: pytest.TempPathFactory
                                               ) -> None:
    """`perfusion run` on an SDXL model: trained in both text encoders, rendered, and a
    rerun does nothing."""
    root = tmp_path / "project"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (32, 32), (200, 120, 40)).save(root / "images" / "1.png")
    tiny_pipeline(0, family="sdxl").save_pretrained(root / "xl", safe_serialization=True)
    model = str(root / "xl")
    (root / "a.concept").write_text(
        f'model "{model}"\nlearn images/*.png as teddy* <teddy bear> {{ steps: 2, batch: 1 }}\n'
        'generate "a photo of teddy* {on a beach|in the snow}" { steps: 2 }\n'
        'generate "a plain red cube" { steps: 2 }\n', encoding="utf-8")
    cache = tmp_path_factory.mktemp("xl-cache")
    compilation = compile_paths([root], root)
    assert compilation.ok, compilation.diagnostics
    plan = compilation.plan()
    first = run(plan, root, RunOptions(store=cache, device="cpu"), Reporter(quiet=True))
    assert (first.trained, len(first.rendered), first.failures) == (["teddy*"], 3, [])
    again = run(plan, root, RunOptions(store=cache, device="cpu"), Reporter(quiet=True))
    assert (again.trained, again.rendered, again.failures) == ([], [], [])
    with Image.open(next((root / "renders" / "a").glob("a-photo-of-teddy-on-a-beach_*.png"))
                    ) as image:
        assert image.size == (32, 32)

