"""The Ray executor on a real local Ray instance (CPU): the same store and outputs as the local
executor, a no-op rerun, and keep-going when one concept's task fails."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from perfusion_dsl.compiler import compile_paths
from perfusion_dsl.plan import Plan
from perfusion_runtime.build.progress import Reporter
from perfusion_runtime.build.run import RunOptions, Summary, run
from perfusion_runtime.method.covariance import cinv_for
from perfusion_runtime.method.tiny import tiny_pipeline

ray = pytest.importorskip("ray")

SPEC = """\
model "tiny:random"

learn images/teddy/*.png as teddy* <teddy bear> adjectives: [brown] {
  steps: 3
  batch: 2
}

learn images/whiskers/*.png as whiskers* <cat> {
  steps: 3
  batch: 2
}

generate "a photo of teddy* {on a beach|in the snow}" x 2 {
  steps: 2
}

generate "whiskers* and teddy* at night" {
  steps: 2
}

generate "a plain red cube" {
  steps: 2
}
"""
WHISKERS_LINE = 8  # the line of its `learn` statement


@pytest.fixture(scope="module", autouse=True)
def ray_instance() -> Iterator[None]:
    """One local Ray instance for the module (the executor joins it, and leaves it up)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def write_project(root: Path) -> Path:
    """The spec and two 40×48 photos of each concept."""
    for n, name in enumerate(("teddy", "whiskers")):
        (root / "images" / name).mkdir(parents=True)
        for i in range(2):
            photo = Image.new("RGB", (40, 48), (40 + 60 * i, 110 - 50 * n, 170))
            ImageDraw.Draw(photo).ellipse((6, 10 + 2 * i, 32, 40), fill=(200, 140 - 90 * n, 40))
            photo.save(root / "images" / name / f"photo{i}.png")
    (root / "project.concept").write_text(SPEC, encoding="utf-8")
    return root


def compile_plan(root: Path) -> Plan:
    compilation = compile_paths([root], root)
    assert compilation.ok, compilation.diagnostics
    return compilation.plan()


def fresh_cache(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """An empty store holding only the tiny model's C⁻¹, estimated once per session."""
    shared = tmp_path_factory.getbasetemp() / "cinv-cache"
    cinv_for(tiny_pipeline(0), shared)
    store = tmp_path_factory.mktemp(name)
    shutil.copytree(shared / "cinv", store / "cinv")
    return store


def build(plan: Plan, root: Path, store: Path, executor: str) -> Summary:
    options = RunOptions(store=store, device="cpu", executor=executor)
    return run(plan, root, options, Reporter(quiet=True))


@dataclasses.dataclass
class Built:
    root: Path
    store: Path
    plan: Plan
    summary: Summary


def built(tmp_path_factory: pytest.TempPathFactory, name: str, executor: str) -> Built:
    root = write_project(tmp_path_factory.mktemp(f"{name}-project"))
    store = fresh_cache(tmp_path_factory, f"{name}-store")
    plan = compile_plan(root)
    return Built(root, store, plan, build(plan, root, store, executor))


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return built(tmp_path_factory, "local", "local")


@pytest.fixture(scope="module")
def distributed(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return built(tmp_path_factory, "ray", "ray")


def files(folder: Path, pattern: str) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob(pattern)}


def test_ray_executor_matches_local_executor(local: Built, distributed: Built) -> None:
    for b in (local, distributed):
        assert b.summary.failures == [] and not b.summary.stopped
        assert sorted(b.summary.trained) == ["teddy*", "whiskers*"]
        assert len(b.summary.rendered) == len(b.plan.renders) == 6
    keys = {p.name for p in (local.store / "concepts").iterdir()}
    assert keys == {p.name for p in (distributed.store / "concepts").iterdir()}
    assert keys == {c.key for c in local.plan.concepts}
    assert files(local.store / "concepts", "*.safetensors") == \
        files(distributed.store / "concepts", "*.safetensors")
    pngs = files(local.root, "*.png")
    assert len(pngs) > 6 and pngs == files(distributed.root, "*.png")  # and contact sheets
    manifests = files(local.root, "manifest.json")
    assert manifests and manifests == files(distributed.root, "manifest.json")


def test_ray_executor_noop_rerun(distributed: Built) -> None:
    again = build(distributed.plan, distributed.root, distributed.store, "ray")
    assert again.trained == [] and again.rendered == [] and again.failures == []
    assert sorted(again.reused) == ["teddy*", "whiskers*"]
    assert again.up_to_date == len(distributed.plan.renders)


def test_ray_executor_keep_going(tmp_path_factory: pytest.TempPathFactory) -> None:
    """whiskers*' photos vanish after compiling: its task fails, the image that uses it is
    skipped, and everything else is trained and rendered."""
    root = write_project(tmp_path_factory.mktemp("failing-project"))
    store = fresh_cache(tmp_path_factory, "failing-store")
    plan = compile_plan(root)
    shutil.rmtree(root / "images" / "whiskers")
    summary = build(plan, root, store, "ray")
    (failure,) = summary.failures
    assert "`whiskers*`" in failure and f"project.concept:{WHISKERS_LINE}" in failure
    assert summary.trained == ["teddy*"] and summary.skipped == 1
    uses = [r.out for r in plan.renders if "whiskers*" not in r.concepts]
    assert sorted(summary.rendered) == sorted(uses) and len(uses) == 5
    assert all((root / out).is_file() for out in uses)
    teddy = next(c.key for c in plan.concepts if c.token == "teddy*")
    assert [p.name for p in (store / "concepts").iterdir()] == [teddy]
