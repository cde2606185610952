"""`perfusion run` as a user meets it: the CLI on a real project with the tiny model, and the
reliability scenarios of the build in docs/build.md (R3–R8, R10, M6, S2), with subprocesses
for locks, kills and signals."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image, ImageDraw

from perfusion_dsl.cli import main
from perfusion_dsl.plan import PLAN_VERSION
from perfusion_runtime.build import jobs
from perfusion_runtime.files.outputs import read_png_text
from perfusion_runtime.files.store import Store
from perfusion_runtime.method.covariance import cinv_for
from perfusion_runtime.method.tiny import tiny_pipeline

SPEC = """\
model "tiny:random"

learn images/*.png as teddy* <teddy bear> adjectives: [brown] {
  steps: 3
  batch: 2
}

generate "a photo of teddy* {on a beach|in the snow}" {
  steps: 2
  seed: 5
}

generate "a plain red cube" x 2 {
  steps: 2
}
"""
TEDDY_LINE = 3


def write_project(root: Path, spec: str = SPEC) -> Path:
    (root / "images").mkdir(parents=True)
    for i in range(2):
        photo = Image.new("RGB", (40, 48), (40 + 60 * i, 110, 170))
        ImageDraw.Draw(photo).ellipse((6, 10 + 2 * i, 32, 40), fill=(200, 140, 40))
        photo.save(root / "images" / f"photo{i}.png")
    (root / "project.concept").write_text(spec, encoding="utf-8")
    return root


@pytest.fixture
def project(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project whose store (.perfusion/) already holds the tiny model's C⁻¹."""
    root = write_project(tmp_path / "project")
    shared = tmp_path_factory.getbasetemp() / "cinv-cache"
    cinv_for(tiny_pipeline(0), shared)
    shutil.copytree(shared / "cinv", root / ".perfusion" / "cinv")
    return root


def cli(root: Path, *args: str) -> tuple[int, str, str]:
    """`perfusion ARGS` in-process, in `root`; (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    cwd = Path.cwd()
    os.chdir(root)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        os.chdir(cwd)
    return code, out.getvalue(), err.getvalue()


def outputs(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted((root / "renders").rglob("*")) if p.is_file()}


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_run_builds_everything_with_provenance_and_contact_sheets(project: Path) -> None:
    code, out, err = cli(project, "run", ".", "--quiet")
    assert code == 0, err
    assert "trained 1 concept(s), 0 up to date; rendered 4 image(s), 0 up to date" in out
    assert "contact sheet: renders/project/contact-sheet_project_line8.png" in out
    assert err == ""  # --quiet: no progress
    folder = project / "renders" / "project"
    manifest = json.loads((folder / "manifest.json").read_text("utf-8"))
    beach = "a-photo-of-teddy-on-a-beach_seed5_s0.5.png"
    record = manifest["images"][beach]
    assert record["spec"] == "project.concept:8" and record["steps"] == 2
    assert record["sha256"] == __import__("hashlib").sha256((folder / beach).read_bytes()) \
        .hexdigest()
    text = read_png_text(folder / beach)
    (key,) = [p.name for p in (project / ".perfusion" / "concepts").iterdir()]
    assert text["prompt"] == "a photo of teddy* on a beach" and text["seed"] == "5"
    assert text["strength"] == "0.5" and text["steps"] == "2" and text["size"] == "32x32"
    assert json.loads(text["concepts"]) == {"teddy*": key}
    assert text["base_model"] == "tiny:random" and text["spec"] == "project.concept:8"
    assert text["tool"].startswith("perfusion ") and text["render_key"] == record["render_key"]
    # the encoder read the token after its supercategory's leading word, as it was trained
    assert text["prompt_as_read"] == "a photo of teddy teddy* on a beach"
    cubes = [read_png_text(folder / name) for name, entry in manifest["images"].items()
             if entry["spec"] == "project.concept:13"]
    assert len(cubes) == 2 and all("prompt_as_read" not in cube for cube in cubes)
    assert set(manifest["sheets"]) == {"contact-sheet_project_line8.png",
                                       "contact-sheet_project_line13.png"}
    with Image.open(folder / "contact-sheet_project_line8.png") as sheet:
        assert sheet.width >= 2 * 128  # two tiles, upscaled to be seen


def test_R4_noop_rerun_trains_0_renders_0_and_imports_no_torch(project: Path) -> None:
    assert cli(project, "run", ".", "--quiet")[0] == 0
    before = outputs(project)
    code = textwrap.dedent("""
        import sys, time
        started = time.perf_counter()
        from perfusion_dsl.cli import main
        code = main(["run", "."])
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in
                       {"torch", "diffusers", "transformers", "numpy", "ray", "tqdm"})
        print("RESULT", code, heavy, f"{time.perf_counter() - started:.2f}")
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True,
                          text=True, env=subprocess_env(), timeout=60)
    assert done.returncode == 0, done.stderr
    assert "trained 0 concept(s), 1 up to date; rendered 0 image(s), 4 up to date" in done.stdout
    assert "RESULT 0 [] " in done.stdout  # no model library was imported
    assert outputs(project) == before


def test_R3_plan_says_what_changed_and_why(project: Path) -> None:
    assert cli(project, "run", ".", "--quiet")[0] == 0
    code, out, _ = cli(project, "plan", ".")
    assert code == 0 and "teddy*           up to date" in out and "(0 to render)" in out
    spec = project / "project.concept"
    spec.write_text(SPEC.replace("steps: 3", "steps: 4"), encoding="utf-8")
    image = project / "images" / "photo1.png"
    Image.new("RGB", (40, 48), (1, 2, 3)).save(image)
    code, out, _ = cli(project, "plan", ".")
    assert code == 0
    assert "teddy*           changed: image images/photo1.png changed; `steps` 3 → 4" in out
    assert "concept teddy* changed" in out and "(2 changed)" in out and "(2 up to date)" in out
    code, out, _ = cli(project, "plan", "--json", ".")
    assert json.loads(out)["concepts"][0]["up_to_date"] is False


def test_R3_whitespace_comments_and_option_order_do_not_rebuild(project: Path) -> None:
    assert cli(project, "run", ".", "--quiet")[0] == 0
    (project / "project.concept").write_text(
        "# a comment\n" + SPEC.replace("  steps: 3\n  batch: 2", "  batch: 2   # two\n"
                                       "  steps: 3\n  lr: 3e-2")  # 0.03, the default
        .replace("steps: 2\n", "steps:  2\n"),
        encoding="utf-8")
    code, out, err = cli(project, "run", ".", "--quiet")
    assert code == 0, err
    assert "trained 0 concept(s), 1 up to date; rendered 0 image(s), 4 up to date" in out


def test_R5_edit_then_revert_is_a_pure_cache_hit(project: Path) -> None:
    assert cli(project, "run", ".", "--quiet")[0] == 0
    first = outputs(project)
    spec = project / "project.concept"
    spec.write_text(SPEC.replace("steps: 3", "steps: 4"), encoding="utf-8")
    code, out, _ = cli(project, "run", ".", "--quiet")
    assert code == 0 and "trained 1 concept(s)" in out and "rendered 2 image(s)" in out
    spec.write_text(SPEC, encoding="utf-8")
    code, out, _ = cli(project, "plan", ".")
    assert "its image is in the cache (no model needed)" in out
    code, out, _ = cli(project, "run", ".", "--quiet")
    assert code == 0
    assert "trained 0 concept(s), 1 up to date; rendered 0 image(s), 2 from the cache, 2 up to " \
           "date" in out
    assert outputs(project) == first


def test_R6_corrupt_artifact_is_reported_then_rebuilt(project: Path) -> None:
    assert cli(project, "run", ".", "--quiet")[0] == 0
    (entry,) = (project / ".perfusion" / "concepts").iterdir()
    artifact = entry / "artifact.safetensors"
    data = bytearray(artifact.read_bytes())
    data[-5] ^= 0x40
    artifact.write_bytes(bytes(data))
    code, out, err = cli(project, "cache", "verify")
    assert code == 1 and str(artifact) in err and "sha256 expected" in err
    code, out, err = cli(project, "run", ".", "--quiet")
    assert code == 0 and "trained 1 concept(s)" in out
    assert "corrupt cache entry, rebuilding it" in err and str(artifact) in err
    assert cli(project, "cache", "verify")[0] == 0


HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from perfusion_runtime.files.lock import build_lock
    with build_lock(Path(sys.argv[1])):
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
""")


@contextlib.contextmanager
def lock_holder(store: Path, seconds: float) -> Iterator[subprocess.Popen[str]]:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(store), str(seconds)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        yield holder
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()


def test_R7_second_run_names_the_holder_and_exits_1(project: Path) -> None:
    with lock_holder(project / ".perfusion", 60) as holder:
        code, _out, err = cli(project, "run", ".")
        assert code == 1 and f"process {holder.pid} is already running a build" in err
        assert "--wait" in err
    assert not (project / ".perfusion" / "concepts").exists()  # nothing was trained


def test_R7_wait_waits_for_the_holder_then_builds(project: Path) -> None:
    with lock_holder(project / ".perfusion", 2) as holder:
        started = time.monotonic()
        code, _out, err = cli(project, "run", ".", "--wait")
        assert code == 0, err
        assert f"waiting for process {holder.pid}" in err
        assert time.monotonic() - started > 1.0 and holder.poll() is not None


def test_R8_a_killed_lock_holder_leaves_no_lock(project: Path) -> None:
    with lock_holder(project / ".perfusion", 60) as holder:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        code, out, err = cli(project, "run", ".", "--quiet")
    assert code == 0, err and "trained 1 concept(s)" in out


def _run_until(project: Path, ready: Callable[[], bool], seconds: float
               ) -> subprocess.Popen[str]:
    """`perfusion run .` in a real subprocess, returned once `ready()` holds (it must, within
    `seconds`, while the run is still going)."""
    run = subprocess.Popen([sys.executable, "-m", "perfusion_dsl", "run", "."], cwd=project,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=subprocess_env())
    deadline = time.monotonic() + seconds
    while not ready():
        assert time.monotonic() < deadline and run.poll() is None, run.communicate()
        time.sleep(0.02)
    return run


def test_R10_sigterm_during_training_stops_cleanly_and_the_rerun_resumes(project: Path) -> None:
    spec = SPEC.replace("steps: 3\n  batch: 2", "steps: 400\n  batch: 1")
    (project / "project.concept").write_text(spec, encoding="utf-8")
    checkpoints = project / ".perfusion" / "checkpoints"
    run = _run_until(project, lambda: any(checkpoints.glob("*.safetensors")), 120)  # step 50
    signal_at = time.monotonic()
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=60)
    assert time.monotonic() - signal_at < 10  # promptly: after the current step
    assert run.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM: stopping after the current training or denoising step" in err
    assert "run the same command again to resume" in err
    store = Store(project / ".perfusion")
    assert store.verify() == [] and not store.concepts.exists()  # nothing half-published
    assert not list(project.rglob("*.tmp")) and not (project / "renders").exists()
    code, out, err = cli(project, "run", ".")
    assert code == 0 and "trained 1 concept(s)" in out
    assert "trained teddy* in" in err and ", resumed at step " in err
    assert re.search(r"resuming teddy\* at step (\d+) of 400, from the checkpoint of an "
                     r"earlier run\n", err), err
    assert not any(checkpoints.iterdir())  # removed once the artifact was published


def test_R10_sigterm_during_rendering_stops_within_a_denoising_step(project: Path) -> None:
    """A stop used to wait for the whole group of images in the pipeline call (up to 16:
    over a minute on a loaded CPU); it now ends the call at the next denoising step, and
    the images already written are kept."""
    spec = SPEC.replace('generate "a plain red cube" x 2 {\n  steps: 2',
                        'generate "a plain red cube" x 16 {\n  steps: 400')
    (project / "project.concept").write_text(spec, encoding="utf-8")
    folder = project / "renders" / "project"
    # the first job's images are out
    run = _run_until(project, lambda: any(folder.glob("a-photo-of-teddy*.png")), 300)
    time.sleep(1.0)  # well inside the 16 cubes of 400 steps each
    signal_at = time.monotonic()
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 128 + signal.SIGTERM, err
    assert time.monotonic() - signal_at < 15, err  # not the rest of the 16-image call
    assert "run the same command again to resume" in err
    assert len(list(folder.glob("a-photo-of-teddy*.png"))) == 2  # kept
    assert not list(project.rglob("*.tmp"))


def test_R10_a_second_sigterm_stops_at_once_with_exit_143(tmp_path: Path) -> None:
    """The first signal asks for a clean stop; a second of the same kind stops at once and
    the exit code still names it (143 for SIGTERM, as 130 names Ctrl-C). Real signals to a
    real process; the command is one that would otherwise wait 30 s."""
    script = textwrap.dedent("""
        import os, signal, sys, time
        from perfusion_dsl import cli
        from perfusion_runtime.build.command import StopFlag, stop_on_signals
        from perfusion_runtime.build.progress import Reporter

        def waits(args):
            with stop_on_signals(StopFlag(), Reporter()):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(30)
            return 0

        cli.COMMANDS["check"] = waits
        sys.exit(cli.main(["check", "."]))
    """)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env=subprocess_env(), check=False)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert time.monotonic() - started < 20
    assert "SIGTERM: stopping after" in done.stderr and "perfusion: interrupted" in done.stderr


def test_R1_a_checkpoint_left_beside_a_published_concept_is_removed(project: Path) -> None:
    """A run killed after publishing a concept and before removing its checkpoint leaves the
    checkpoint behind; the next run finds the concept built and removes it."""
    from perfusion_dsl.compiler import compile_paths
    from perfusion_runtime.build.status import store_key

    code, _, err = cli(project, "run", ".", "--quiet")
    assert code == 0, err
    (step,) = compile_paths([project], project).plan().concepts
    job = jobs.TrainJob(step, store_key(step), str(project), str(project / ".perfusion"))
    store = Store(project / ".perfusion")
    published = store.get(job.key)
    assert published is not None
    before = published.read_bytes()
    stale = store.checkpoint(job.key)
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"a checkpoint from before the kill")
    jobs.train_job(job, jobs.Pipelines("cpu"))
    assert not stale.exists() and store.verify() == []
    assert published.read_bytes() == before  # not retrained


def oom_above(limit: int, seen: list[tuple[int, bool]] | None = None) -> Any:
    """A pre-hook raising a real torch OutOfMemoryError when the UNet batch exceeds `limit`;
    each refused call's (batch, gradient checkpointing on) goes to `seen`."""

    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if args[0].shape[0] > limit:
            if seen is not None:
                seen.append((int(args[0].shape[0]), bool(module.is_gradient_checkpointing)))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    return hook


def test_M6_out_of_memory_retries_with_gradient_checkpointing_then_a_smaller_batch(
        project: Path) -> None:
    spec = SPEC.replace("batch: 2", "batch: 4")
    (project / "project.concept").write_text(spec, encoding="utf-8")
    pipes = jobs.Pipelines("cpu")
    pipe, _ = pipes.get("tiny:random")
    refused: list[tuple[int, bool]] = []
    handle = pipe.unet.register_forward_pre_hook(oom_above(1, refused), with_kwargs=True)
    try:
        jobs_module_pipelines = pipes
        from perfusion_dsl.compiler import compile_paths
        from perfusion_runtime.build.status import store_key

        plan = compile_paths([project], project).plan()
        (step,) = plan.concepts
        job = jobs.TrainJob(step, store_key(step), str(project), str(project / ".perfusion"))
        trained = jobs.train_job(job, jobs_module_pipelines)  # micro-batch 4 → 2 → 1
        assert trained.token == "teddy*"
        # first the same batch with gradient checkpointing, then smaller batches with it
        assert refused == [(4, False), (4, True), (2, True)]
        assert not pipe.unet.is_gradient_checkpointing  # put back as it was
        assert Store(project / ".perfusion").get(step.key) is not None
        handle.remove()
        handle = pipe.unet.register_forward_pre_hook(oom_above(0), with_kwargs=True)
        other = jobs.TrainJob(step, "f" * 64, str(project), str(project / ".perfusion"))
        with pytest.raises(jobs.OutOfMemory, match="even with micro-batches of 1 image"):
            jobs.train_job(other, pipes)
        assert Store(project / ".perfusion").get("f" * 64) is None  # cache untouched
    finally:
        handle.remove()


def test_precision_and_gradient_checkpointing_flags_on_the_cpu(
        project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--precision names CUDA's dtype; on the CPU the run says it computes in fp32 and
    builds; --gradient-checkpointing reaches the trainer and trains the concept the plain
    run trains."""
    asked: list[bool] = []
    real = jobs.train

    def spy(*args: Any, **kwargs: Any) -> Any:
        asked.append(kwargs.get("gradient_checkpointing", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(jobs, "train", spy)
    code, out, err = cli(project, "run", ".", "--precision", "bf16",
                         "--gradient-checkpointing")
    assert asked == [True]
    assert code == 0, err
    assert "--precision bf16 applies on CUDA; on the CPU perfusion computes in fp32" in out + err
    store = Store(project / ".perfusion")
    (key,) = [p.name for p in (store.root / "concepts").iterdir()]
    with_flags = (store.root / "concepts" / key / "artifact.safetensors").read_bytes()
    shutil.rmtree(store.root)
    assert cli(project, "run", ".", "--quiet")[0] == 0
    assert asked == [True, False]
    assert (store.root / "concepts" / key / "artifact.safetensors").read_bytes() == with_flags


def test_S2_symlink_at_an_output_path_is_refused_and_the_rest_is_built(
        project: Path, tmp_path: Path) -> None:
    target = tmp_path / "precious.txt"
    target.write_text("keep me", encoding="utf-8")
    folder = project / "renders" / "project"
    folder.mkdir(parents=True)
    (folder / "a-plain-red-cube_seed0_s0.5.png").symlink_to(target)
    code, _out, err = cli(project, "run", ".", "--quiet")
    assert code == 1 and "refusing to replace the symbolic link" in err
    assert "a-plain-red-cube_seed0_s0.5.png" in err and "project.concept:13" in err
    assert target.read_text(encoding="utf-8") == "keep me"
    assert (folder / "a-photo-of-teddy-on-a-beach_seed5_s0.5.png").is_file()


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_S2_store_parts_that_are_links_are_refused_and_nothing_outside_changes(
        project: Path, tmp_path: Path) -> None:
    """A link at the lock would get the run's pid written through it; links at history/ and
    renders/ would send build records and cached images out of the store."""
    assert cli(project, "run", ".", "--quiet")[0] == 0
    store, outside = project / ".perfusion", tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.txt"
    victim.write_text("keep me", encoding="utf-8")
    (store / "lock").unlink()
    (store / "lock").symlink_to(victim)
    code, _out, err = cli(project, "run", ".", "--quiet")
    assert code == 2, err
    assert f"{store / 'lock'}: is a symbolic link (to {str(victim)!r})" in err
    assert victim.read_text(encoding="utf-8") == "keep me"
    (store / "lock").unlink()
    for part in ("history", "renders"):
        shutil.move(store / part, outside / part)
        (store / part).symlink_to(outside / part)
    before = _tree(outside)
    (project / "project.concept").write_text(SPEC.replace("steps: 3", "steps: 4"), "utf-8")
    code, _out, err = cli(project, "run", ".", "--quiet")
    assert code == 2, err
    assert f"{store}: its parts renders, history are symbolic links" in err
    assert _tree(outside) == before and not (store / "lock").exists()


@pytest.mark.parametrize("case", ["lock-is-a-folder", "store-is-a-file", "cache-is-a-file",
                                  "cache-under-a-file", "cache-under-proc"])
def test_store_problems_are_usage_errors_naming_the_path(project: Path, tmp_path: Path,
                                                         case: str) -> None:
    """Exit 2 with the path before anything loads, as for any usage error."""
    store, a_file = project / ".perfusion", tmp_path / "a-file"
    a_file.write_text("not a folder", encoding="utf-8")
    args: list[str] = []
    if case == "lock-is-a-folder":
        (store / "lock").mkdir()
        named, why = store / "lock", "is a directory, not the lock file; remove it"
    elif case == "store-is-a-file":
        shutil.rmtree(store)
        store.write_text("not a folder", encoding="utf-8")
        named, why = store, "cannot be the cache folder: it is a file, not a folder"
    elif case == "cache-is-a-file":
        args, named = ["--cache", str(a_file)], a_file
        why = "cannot be the cache folder: it is a file, not a folder"
    elif case == "cache-under-a-file":
        args, named = ["--cache", str(a_file / "store")], a_file / "store"
        why = f"cannot be the cache folder: {a_file} is a file, not a folder"
    else:
        args, named = ["--cache", "/proc/nope"], Path("/proc/nope")
        why = "cannot create the cache folder: "
    code, out, err = cli(project, "run", ".", "--quiet", *args)
    assert code == 2, (out, err)
    assert f"{named}: {why}" in err
    assert "Traceback" not in err and "trained" not in out


def _tamper_with_the_artifact(project: Path, change: str) -> Path:
    """Rewrite the stored artifact and re-seal its manifest's digest, as a bad actor or a
    buggy tool would: the store's hash check passes, only the load check can tell."""
    import safetensors
    import safetensors.torch

    (entry,) = (project / ".perfusion" / "concepts").iterdir()
    path = entry / "artifact.safetensors"
    with safetensors.safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    if change == "token":
        metadata["token"] = "other*"
    else:
        tensors["embedding"] = tensors["embedding"][:5].clone()
    data = safetensors.torch.save(tensors, metadata)
    path.write_bytes(data)
    manifest = json.loads((entry / "manifest.json").read_text("utf-8"))
    manifest.update(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    (entry / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    assert Store(project / ".perfusion").verify() == []  # its digest matches
    shutil.rmtree(project / "renders")
    shutil.rmtree(project / ".perfusion" / "renders")
    return entry


@pytest.mark.parametrize(("change", "words"), [
    ("token", "it names token 'other*', not the plan's 'teddy*'"),
    ("embedding", "embedding"),
])
def test_M1_a_stored_artifact_that_fails_its_load_check_is_moved_aside_and_rebuilt(
        project: Path, change: str, words: str) -> None:
    """What only the pipeline can check (the embedding's width) or only the plan (the token
    it names) fails when the render job loads it: the entry is moved aside, and the same run
    trains the concept again and renders its images, as for a digest mismatch. Two
    statements use the concept: the second job finds the entry gone and is rendered again
    too."""
    spec = project / "project.concept"
    spec.write_text(spec.read_text("utf-8") + 'generate "teddy* on a table" { steps: 2 }\n',
                    encoding="utf-8")
    assert cli(project, "run", ".", "--quiet")[0] == 0
    entry = _tamper_with_the_artifact(project, change)
    tampered = (entry / "artifact.safetensors").read_bytes()
    code, out, err = cli(project, "run", ".", "--quiet")
    assert code == 0, err
    assert f"corrupt cache entry, rebuilding it: {entry}" in err and words in err
    assert "internal error" not in out + err and "error" not in err
    assert "trained 1 concept(s)" in out and "rendered 5 image(s)" in out
    assert len(outputs(project)) == 9  # 5 PNGs, 3 contact sheets, 1 manifest
    assert (entry / "artifact.safetensors").read_bytes() != tampered  # rebuilt, not reused
    _tamper_with_the_artifact(project, change)
    code, out, err = cli(project, "run", ".")  # what a user sees without --quiet
    assert code == 0, err
    assert "training teddy* (project.concept:3) again: its stored artifact failed its load " \
        "check" in err, err
    code, out, err = cli(project, "run", ".", "--quiet")
    assert code == 0 and "trained 0 concept(s), 1 up to date" in out, (out, err)


def test_R_an_image_edited_during_the_run_is_not_trained_from(project: Path) -> None:
    """The key is computed from the images' bytes when the run is planned; training reads
    them again later. An edit in between used to publish a concept under a key it does not
    match, which `plan` then called up to date once the original was restored."""
    from perfusion_dsl.compiler import compile_paths
    from perfusion_runtime.build.command import run_command
    from perfusion_runtime.build.run import RunOptions

    plan = compile_paths([project], root=project).plan()
    photo = project / "images" / "photo0.png"
    original = photo.read_bytes()
    Image.new("RGB", (40, 48), (0, 0, 0)).save(photo)  # edited after planning
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = run_command(plan, project, RunOptions(project / ".perfusion"), quiet=True)
    assert code == 1
    assert f"{photo} changed during the run" in err.getvalue(), err.getvalue()
    assert not (project / ".perfusion" / "concepts").exists()  # nothing published
    photo.write_bytes(original)
    code, out, err_text = cli(project, "plan", ".")
    assert "teddy*           new" in out
    code, out, err_text = cli(project, "run", ".", "--quiet")
    assert code == 0 and "trained 1 concept(s)" in out, err_text


def test_S2_an_output_path_that_cannot_be_written_fails_alone_on_render_and_restore(
        project: Path) -> None:
    """A folder where one image of a group goes: that path fails, naming it; the other
    image of the same call, the manifest and the contact sheet are written. The rerun, which
    restores images from the cache, reports the same instead of crashing (exit 70)."""
    folder = project / "renders" / "project"
    blocked = folder / "a-plain-red-cube_seed0_s0.5.png"
    blocked.mkdir(parents=True)
    for attempt in range(2):
        code, out, err = cli(project, "run", ".", "--quiet")
        assert code == 1, (attempt, err)
        assert f"{blocked}" in err and "internal error" not in err, err
        assert (folder / "a-plain-red-cube_seed1_s0.5.png").is_file()
        manifest = json.loads((folder / "manifest.json").read_text("utf-8"))
        assert "a-plain-red-cube_seed1_s0.5.png" in manifest["images"]
        assert blocked.name not in manifest["images"]
        assert any(folder.glob("contact-sheet_project_line*.png"))
        assert "1 job(s) failed" in out
    blocked.rmdir()
    code, out, err = cli(project, "run", ".", "--quiet")
    assert code == 0 and blocked.is_file() and "1 from the cache" in out, err


def test_two_builds_sharing_an_output_folder_keep_each_others_records(project: Path) -> None:
    """Two specs whose images go to one `out:` folder, built at once by two processes with
    different stores (so no store lock orders them): each merges its records into the
    folder's manifest under a lock, where the last writer used to drop the other's."""
    spec = ('model "tiny:random"\n'
            'generate "a plain {c} cube" x 3 {{\n  steps: 2\n  out: "../shared"\n}}\n')
    for name, colour in (("a", "red"), ("b", "blue")):
        (project / name).mkdir()
        (project / name / f"{name}.concept").write_text(spec.format(c=colour), "utf-8")
    runs = [subprocess.Popen([sys.executable, "-m", "perfusion_dsl", "run", f"{name}/",
                              "--root", ".", "--cache", f"store-{name}", "--quiet"],
                             cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=subprocess_env()) for name in ("a", "b")]
    for run in runs:
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
    shared = project / "shared"
    pngs = {p.name for p in shared.glob("a-plain-*.png")}
    assert len(pngs) == 6
    manifest = json.loads((shared / "manifest.json").read_text("utf-8"))
    assert set(manifest["images"]) == pngs
    assert len(manifest["sheets"]) == 2


def test_fail_fast_stops_at_the_first_failure(project: Path) -> None:
    (project / "project.concept").write_text(SPEC.replace("model \"tiny:random\"",
                                                          "model \"toy:missing\""),
                                             encoding="utf-8")
    code, out, err = cli(project, "run", ".", "--fail-fast", "--quiet")
    assert code == 1
    assert f"while training `teddy*` (project.concept:{TEDDY_LINE}): 'toy:missing' is not a " \
           "built-in model" in err
    assert "rendering" not in err and "1 job(s) failed" in out


def test_cache_gc_keeps_what_the_specs_reference(project: Path) -> None:
    assert cli(project, "run", ".", "--quiet")[0] == 0
    (kept,) = [p.name for p in (project / ".perfusion" / "concepts").iterdir()]
    spec = project / "project.concept"
    spec.write_text(SPEC.replace("steps: 3", "steps: 4"), encoding="utf-8")
    assert cli(project, "run", ".", "--quiet")[0] == 0
    assert len(list((project / ".perfusion" / "concepts").iterdir())) == 2
    spec.write_text(SPEC, encoding="utf-8")
    code, out, _ = cli(project, "cache", "gc", ".")
    assert code == 0 and "removed 1" in out
    assert [p.name for p in (project / ".perfusion" / "concepts").iterdir()] == [kept]
    code, out, _ = cli(project, "run", ".", "--quiet")
    assert "trained 0 concept(s)" in out


def test_plan_survives_a_hand_edited_history_and_manifest(project: Path) -> None:
    """Records read back from disk are the user's files too: wrong shapes give general
    reasons, never a crash."""
    assert cli(project, "run", ".", "--quiet")[0] == 0
    (history,) = (project / ".perfusion" / "history").iterdir()
    record = json.loads(history.read_text("utf-8"))
    record["inputs"]["images"] = [1, 2, 3]
    history.write_text(json.dumps(record), encoding="utf-8")
    manifest = project / "renders" / "project" / "manifest.json"
    data = json.loads(manifest.read_text("utf-8"))
    for image in data["images"].values():
        image["inputs"] = "not a record"
        image["render_key"] = "0" * 64
    manifest.write_text(json.dumps(data), encoding="utf-8")
    (project / "project.concept").write_text(SPEC.replace("steps: 3", "steps: 4"), "utf-8")
    code, out, err = cli(project, "plan", ".")
    assert code == 0, err
    assert "teddy*           changed: the record of its last build is unreadable" in out
    assert "its manifest record is unreadable" in out


def _as_plan_format_1(project: Path, key: str | None = None) -> None:
    """Rewrites the build records as plan format 1 wrote them: without a `plan` field (and,
    given `key`, as if that format had made other keys)."""
    (history,) = (project / ".perfusion" / "history").iterdir()
    record = json.loads(history.read_text("utf-8"))
    assert record.pop("plan") == PLAN_VERSION
    record["key"] = key or record["key"]
    history.write_text(json.dumps(record), encoding="utf-8")
    manifest = project / "renders" / "project" / "manifest.json"
    data = json.loads(manifest.read_text("utf-8"))
    for image in data["images"].values():
        assert image.pop("plan") == PLAN_VERSION
        image["render_key"] = key or image["render_key"]
    manifest.write_text(json.dumps(data), encoding="utf-8")


def test_records_of_plan_format_1_are_still_up_to_date(project: Path) -> None:
    """Format 2 typed the plan's options without changing a key: nothing is rebuilt."""
    assert cli(project, "run", ".", "--quiet")[0] == 0
    _as_plan_format_1(project)
    code, out, err = cli(project, "plan", ".")
    assert code == 0, err
    assert "(1 to train)" not in out and "teddy*           up to date" in out
    assert "changed" not in out and "new" not in out


def test_records_of_another_plan_format_say_so(project: Path) -> None:
    """Where a key changed and the record's inputs show no difference, an older record says
    the plan format changed, rather than the general reason."""
    assert cli(project, "run", ".", "--quiet")[0] == 0
    _as_plan_format_1(project, key="0" * 64)
    shutil.rmtree(project / ".perfusion" / "concepts")
    shutil.rmtree(project / ".perfusion" / "renders")
    code, out, err = cli(project, "plan", ".")
    assert code == 0, err
    assert "teddy*           changed: the plan format changed" in out
    assert out.count("(2 changed)\n      the plan format changed\n") == 2, out  # both generates
    assert "render format changed" not in out and "unreadable" not in out


def test_a_corrupt_history_record_is_reported_not_called_new(project: Path) -> None:
    assert cli(project, "run", ".", "--quiet")[0] == 0
    (history,) = (project / ".perfusion" / "history").iterdir()
    history.write_bytes(b"\x00 not json")
    shutil.rmtree(project / ".perfusion" / "concepts")
    code, out, err = cli(project, "plan", ".")
    assert code == 0, err
    assert "teddy*           changed: the record of its last build is unreadable" in out


def test_a_deleted_working_folder_is_a_clear_usage_error(tmp_path: Path) -> None:
    gone = tmp_path / "gone"
    gone.mkdir()
    script = ("import os, sys; os.chdir(sys.argv[1]); os.rmdir(sys.argv[1])\n"
              "from perfusion_dsl.cli import main; sys.exit(main(['check', '.']))")
    done = subprocess.run([sys.executable, "-c", script, str(gone)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert "perfusion: error: the current folder no longer exists" in done.stderr
    assert "Traceback" not in done.stderr


def test_R3_base_model_weights_replaced_in_place_rebuild(project: Path) -> None:
    """A local diffusers folder keeps its path but gets other weights: every key made with it
    changes (the folder's files are stamped by name, size and time), and plan says why."""
    folder = project / "model"
    tiny_pipeline(0).save_pretrained(folder, safe_serialization=True)
    spec = SPEC.replace('model "tiny:random"', 'model "model"')
    (project / "project.concept").write_text(spec, encoding="utf-8")
    code, out, err = cli(project, "run", ".", "--quiet")
    assert code == 0, err
    time.sleep(0.01)  # a new mtime even on coarse clocks
    tiny_pipeline(1).save_pretrained(folder, safe_serialization=True)
    from perfusion_runtime.build import status

    status._STAMPS.clear()  # a new run is a new process; this test reuses one
    code, out, _ = cli(project, "plan", ".")
    assert "teddy*           changed: the base model's weights changed" in out
    assert "(0 up to date)" not in out and "(2 changed)" in out


def test_run_without_the_runtime_extra_says_what_to_install(project: Path) -> None:
    code = textwrap.dedent("""
        import sys
        sys.modules["torch"] = None  # as if the runtime extra were not installed
        from perfusion_dsl.cli import main
        sys.exit(main(["run", "."]))
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True,
                          text=True, env=subprocess_env(), timeout=60)
    assert done.returncode == 1, done.stderr
    assert "need torch, which is not installed: pip install 'perfusion-concepts[runtime]'" \
        in done.stderr
    assert "internal error" not in done.stderr
