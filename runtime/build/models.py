"""Where a plan's model name points, and what identifies its weights, read without loading
anything (no torch): built in, a local diffusers folder, a single checkpoint file, or a
Hugging Face model id resolved through the hub's cache (docs/models.md)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from perfusion_dsl.keys import digest

from ..files.atomic import file_sha256

BUILTIN_TEST_MODEL = "tiny:random"  # a random tiny pipeline, for tests and CPU benches
# Pretrained built-in models: diffusers folders shipped as package data (docs/toy.md).
BUILTIN_MODELS = {"toy:shapes": Path(__file__).resolve().parent.parent / "toy" / "shapes"}

# `org/name` or `org/name@revision` (a branch, a tag or a commit), as the hub spells them
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?")
COMMIT = re.compile(r"[0-9a-f]{40}")
# Formats that run code when loaded (Python pickles): never read
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
# What a diffusers pipeline needs from a model repository, in safetensors only: the configs,
# the tokenizers, and each component's full-precision weights (not the repository's
# single-file copies, fp16 or EMA variants, nor pickled `.bin` weights)
HUB_FILES = ("model_index.json", "*/*.json", "*/*.txt", "*/*.model",
             "*/diffusion_pytorch_model.safetensors", "*/diffusion_pytorch_model-*.safetensors",
             "*/model.safetensors", "*/model-*.safetensors")

# ... and what reading a single checkpoint file needs from its configuration's repository
CONFIG_FILES = ("model_index.json", "*/*.json", "*/*.txt", "*/*.model")
MAX_CHECKPOINT_HEADER = 100 << 20  # a safetensors header: JSON names, dtypes and offsets
# Where each family keeps its text encoder in the original (A1111, civitai) layout
FAMILY_PREFIXES = (("sdxl", "conditioner.embedders."), ("sd2", "cond_stage_model.model."),
                   ("sd1", "cond_stage_model.transformer."))
UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."

Kind = Literal["tiny", "builtin", "folder", "file", "hub"]


class ModelUnavailable(RuntimeError):
    """The base model cannot be found or read; the message says what is missing and how to
    get it."""


@dataclass(frozen=True)
class ModelSource:
    """A model name, classified."""

    name: str  # as the plan spells it
    kind: Kind
    path: Path | None = None  # builtin, folder and file: where it is
    repo: str | None = None  # hub
    revision: str | None = None  # hub: None means the default branch


def source_of(name: str) -> ModelSource:
    """What `name` names. An existing path wins over a model id (write `./org/name` for a
    folder that does not exist yet); pickle formats are refused here, before any reading."""
    if name == BUILTIN_TEST_MODEL:
        return ModelSource(name, "tiny")
    if name.startswith("toy:"):
        return ModelSource(name, "builtin", BUILTIN_MODELS.get(name))
    path = Path(name).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelUnavailable(
            f"model {name!r} is a {path.suffix} file, a Python pickle that can run code when "
            "loaded; perfusion reads only safetensors: convert it (e.g. with diffusers' "
            "conversion scripts) or use the model's .safetensors release")
    if path.suffix.lower() == ".safetensors":
        return ModelSource(name, "file", path)
    found = HUB_ID.fullmatch(name)
    if found and not path.exists() and not name.startswith((".", "/", "~")):
        return ModelSource(name, "hub", repo=found["repo"], revision=found["revision"])
    return ModelSource(name, "folder", path)


# ---------------------------------------------------------------- the Hugging Face cache


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def offline() -> bool:
    """HF_HUB_OFFLINE, read when asked (not when huggingface_hub was imported)."""
    return _env_true("HF_HUB_OFFLINE")


def hub_cache() -> Path:
    """The hub's cache folder, read when asked: HF_HUB_CACHE, else HF_HOME/hub, else
    ~/.cache/huggingface/hub (XDG_CACHE_HOME honoured), as huggingface_hub finds it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base).expanduser() / "huggingface" / "hub"


# A model id's revision resolved to its commit by this process (`resolve`), by cache folder
# and name: what a run's keys and its downloads use, so that both name the same weights
_RESOLVED: dict[tuple[str, str], str] = {}


def _resolved(source: ModelSource) -> str | None:
    return _RESOLVED.get((str(hub_cache()), source.name))


def _repo_folder(source: ModelSource) -> Path:
    assert source.kind == "hub" and source.repo is not None
    return hub_cache() / ("models--" + source.repo.replace("/", "--"))


def _cached_commit(source: ModelSource) -> str | None:
    """The commit the local cache has for the id's revision (`refs/`), without network."""
    revision = source.revision or "main"
    if COMMIT.fullmatch(revision):
        return revision
    try:
        return (_repo_folder(source) / "refs" / revision).read_text("utf-8").strip() or None
    except OSError:
        return None


def cached_snapshot(source: ModelSource) -> Path | None:
    """The snapshot folder of a model id in the local cache, or None: the revision read from
    the cache's `refs/` (or a commit's own snapshot), with no network and no download."""
    commit = _resolved(source) or _cached_commit(source)
    if commit is None:
        return None
    folder = _repo_folder(source) / "snapshots" / commit
    return folder if (folder / "model_index.json").is_file() else None


def _transport_errors() -> tuple[type[Exception], ...]:
    """The connection and timeout errors of huggingface_hub's HTTP client: httpx2's in hub
    2.x; older hubs use requests, whose errors are OSErrors."""
    try:
        from httpx2 import HTTPError
    except ImportError:
        return ()
    return (HTTPError,)


def resolve(source: ModelSource) -> str | None:
    """The commit a model id's revision names now, without downloading weights: a commit
    as given; the hub's answer when it can be reached (one small request); else the local
    cache's `refs/`. Remembered for this process (the run's keys and its download then
    agree); None when neither knows it (the steps that need the model will say why)."""
    revision = source.revision or "main"
    commit: str | None = revision if COMMIT.fullmatch(revision) else None
    if commit is None and not offline():
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

        failures: tuple[type[Exception], ...] = (
            HfHubHTTPError, OfflineModeIsEnabled, OSError, ValueError, *_transport_errors())
        try:
            commit = HfApi().repo_info(source.repo or "", revision=revision).sha
        except failures:
            commit = None  # unreachable, private, unknown: the cache may still know it
    commit = commit or _cached_commit(source)
    if commit is not None:
        _RESOLVED[str(hub_cache()), source.name] = commit
    return commit


def fetch(source: ModelSource, files: tuple[str, ...] = HUB_FILES) -> Path:
    """The snapshot folder of a model id, downloading what is missing on first use (the
    pipeline's `files` only: `HUB_FILES`, or `CONFIG_FILES` for a checkpoint's
    configuration). Offline (HF_HUB_OFFLINE, or no network), the cache must hold it;
    ModelUnavailable says what is missing and how to get it."""
    assert source.kind == "hub" and source.repo is not None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # Online, by the branch or tag itself, so that the hub writes `refs/` and a later
    # offline run finds the same commit; then by the resolved commit if the branch moved
    # meanwhile (the run's keys name that one). Offline, by the resolved commit.
    resolved, revision = _resolved(source), source.revision or "main"
    if offline() and resolved is not None:
        revision = resolved
    try:
        folder = Path(snapshot_download(source.repo, revision=revision, cache_dir=hub_cache(),
                                        allow_patterns=list(files),
                                        local_files_only=offline()))
        if resolved is not None and folder.name != resolved:
            revision = resolved
            folder = Path(snapshot_download(source.repo, revision=resolved,
                                            cache_dir=hub_cache(), allow_patterns=list(files),
                                            local_files_only=offline()))
    except GatedRepoError as exc:
        raise ModelUnavailable(
            f"model {source.repo!r} is gated: accept its licence on huggingface.co, then log in "
            "(`hf auth login`) or set HF_TOKEN") from exc
    except RepositoryNotFoundError as exc:
        raise ModelUnavailable(
            f"no model {source.repo!r} on the Hugging Face hub (or it is private: log in with "
            "`hf auth login` or set HF_TOKEN); a local folder must exist") from exc
    except RevisionNotFoundError as exc:
        raise ModelUnavailable(f"model {source.repo!r} has no revision {revision!r}") from exc
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelUnavailable(_not_cached(source, exc)) from exc
    if not (folder / "model_index.json").is_file():
        raise ModelUnavailable(f"model {source.name!r} is not a diffusers pipeline (its "
                               "repository has no model_index.json)")
    return folder


def download_command(source: ModelSource) -> str:
    """The command that fetches a model id into the cache by hand."""
    return f"hf download {source.repo}" + (f" --revision {source.revision}"
                                           if source.revision else "")


def checkpoint_tensors(path: Path) -> dict[str, list[int]]:
    """The tensor names and shapes of a single `.safetensors` checkpoint, from its header
    alone (the weights are not read); ModelUnavailable when it is not one."""
    from ..files.safetensors_file import FormatProblem, parse_header

    try:
        with open(path, "rb") as file:
            size = file.read(8)
            length = int.from_bytes(size, "little") if len(size) == 8 else 0
            data = size + file.read(min(length, MAX_CHECKPOINT_HEADER))
        header, _ = parse_header(data)
    except OSError as exc:
        raise ModelUnavailable(f"cannot read the checkpoint {str(path)!r}: "
                               f"{exc.strerror or exc}") from exc
    except FormatProblem as exc:
        raise ModelUnavailable(f"the checkpoint {str(path)!r} is not usable: {exc}") from exc
    return {k: list(v.get("shape", [])) for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict)}


def checkpoint_family(names: Iterable[str]) -> str:
    """`sd1`, `sd2` or `sdxl`, from where a checkpoint keeps its text encoder; ValueError
    for a file that holds no Stable Diffusion UNet or text encoder."""
    names = list(names)
    if not any(n.startswith(UNET_PREFIX) for n in names):
        raise ValueError(f"it holds no Stable Diffusion UNet (no `{UNET_PREFIX}*` tensors): a "
                         "LoRA, an embedding or a lone component is not a base model")
    for family, prefix in FAMILY_PREFIXES:
        if any(n.startswith(prefix) for n in names):
            return family
    raise ValueError("it holds no text encoder in a known layout (SD 1.x, SD 2.x or SDXL)")


def _not_cached(source: ModelSource, exc: BaseException) -> str:
    why = ("HF_HUB_OFFLINE is set" if offline() else
           f"the hub could not be reached ({type(exc).__name__})")
    get = download_command(source)
    return (f"model {source.name!r} is not in the Hugging Face cache ({hub_cache()}) and {why}; "
            f"on a machine with a network, run `{get}` (or a first `perfusion run` there) "
            "with the same HF_HOME, then copy the cache folder here")


def describe(name: str) -> str:
    """Where a model comes from and whether it is there, for `perfusion plan`."""
    try:
        source = source_of(name)
    except ModelUnavailable as exc:
        return f"refused: {exc}"
    if source.kind == "tiny":
        return "built in (random weights, for tests)"
    if source.kind == "builtin":
        ok = source.path is not None and (source.path / "model_index.json").is_file()
        return "built in" if ok else "not a built-in model here"
    if source.kind == "file":
        assert source.path is not None
        return "single checkpoint file" if source.path.is_file() else "missing file"
    if source.kind == "folder":
        assert source.path is not None
        return ("local diffusers folder" if (source.path / "model_index.json").is_file() else
                "missing: not a diffusers folder (no model_index.json)")
    snapshot = cached_snapshot(source)
    if snapshot is not None:
        return f"Hugging Face cache, snapshot {snapshot.name[:12]}"
    return ("not in the Hugging Face cache; HF_HUB_OFFLINE is set, so a run will fail"
            if offline() else "not in the Hugging Face cache yet: downloaded by the first run")


def local_folder(name: str) -> Path | None:
    """The diffusers folder `name` reads from here, without downloading: a built-in model's,
    a local folder, or a model id's cached snapshot; None for anything else."""
    try:
        source = source_of(name)
    except ModelUnavailable:
        return None
    if source.kind == "hub":
        return cached_snapshot(source)
    return source.path if source.kind in ("builtin", "folder") else None


# ---------------------------------------------------------------- weights stamps


def stamp(name: str) -> str | None:
    """What identifies a model's weights beyond its name, without loading it: a built-in
    model's training record, caption corpus and sampler (its folder's scheduler class in
    model_index.json and scheduler config, which the record does not cover: the renders
    change with them); a folder's or a file's names, sizes and times; a model id's
    cached snapshot (its commit). None for the code-defined `tiny:random`; "missing" when
    there is nothing to read (so no key made with it matches one made with the weights)."""
    try:
        source = source_of(name)
    except ModelUnavailable:
        return "missing"
    if source.kind == "tiny":
        return None
    if source.kind == "builtin":
        if source.path is None:
            return "missing"
        record = file_sha256(source.path / "training.json")
        if record is None:
            return "missing"
        corpus = file_sha256(source.path / "captions.txt")  # it ships with the model
        sampler = [file_sha256(source.path / part)
                   for part in ("model_index.json", "scheduler/scheduler_config.json")]
        return digest({"record": record, "captions": corpus, "sampler": sampler})
    if source.kind == "hub":  # the commit in use: resolved by this run, else the cache's
        commit = _resolved(source)
        if commit is None and (snapshot := cached_snapshot(source)) is not None:
            commit = snapshot.name
        return f"hub:{commit}" if commit is not None else "missing"
    assert source.path is not None
    return _files_stamp(source.path)


def _files_stamp(path: Path) -> str:
    try:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        stats = [(p.relative_to(path).as_posix() if p != path else p.name, p.stat().st_size,
                  p.stat().st_mtime_ns) for p in files]
    except OSError:
        return "missing"
    return digest(stats) if stats else "missing"
