"""Training checkpoints: one safetensors file (tensors + JSON metadata, no pickle), atomic."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors.torch import load as load_safetensors  # bytes in, tensors out; no pickle
from torch import Tensor

from ..files.atomic import FileError, write_atomically
from ..files.safetensors_file import FormatProblem, parse_header, read_file

# File layout (format_version "1"): the tensors the caller names (a run's parameters, optimiser
# slots, generator state as uint8, ...), and the metadata strings format, format_version, step,
# losses (JSON list), sha256 (of every tensor's name, dtype, shape and bytes) and the caller's
# identity fields (what run the checkpoint belongs to).
FORMAT = "perfusion-checkpoint"
FORMAT_VERSION = "1"
_OWN_KEYS = ("format", "format_version", "step", "losses", "sha256")
MAX_FILE_BYTES = 64 * 1024 * 1024  # a concept's training state is well under a megabyte

Layout = Mapping[str, tuple[torch.dtype, tuple[int, ...]]]  # name -> (dtype, shape)
log = logging.getLogger(__name__)


class CheckpointError(FileError):
    """A checkpoint that cannot be written, or used for this run; names the file and why."""


@dataclass(frozen=True)
class Saved:
    """The state after `step` completed steps (`losses` has one value per step)."""

    step: int
    losses: tuple[float, ...]
    tensors: dict[str, Tensor]


def save(path: Path, identity: Mapping[str, str], saved: Saved) -> None:
    """Write `saved` to `path` atomically (temp file in the same folder, fsync, rename; the
    folder is created). A failure raises CheckpointError naming `path`; the old file stays."""
    if set(identity) & set(_OWN_KEYS):
        raise ValueError(f"identity fields may not be named {_OWN_KEYS}")
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in saved.tensors.items()}
    metadata = {**identity, "format": FORMAT, "format_version": FORMAT_VERSION,
                "step": str(saved.step), "losses": json.dumps(list(saved.losses)),
                "sha256": _digest(tensors)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(path, f"cannot create its folder: {exc}") from exc
    write_atomically(path, safetensors.torch.save(tensors, metadata=metadata), CheckpointError)


def resume(path: Path, identity: Mapping[str, str], layout: Layout, steps: int) -> Saved | None:
    """The checkpoint at `path` if it is valid for this run (same identity, tensors of
    `layout`, 1 <= step <= steps); else None, with a warning unless there is no file."""
    if not path.exists() and not path.is_symlink():
        return None
    try:
        return load(path, identity, layout, steps)
    except CheckpointError as exc:
        log.warning("ignoring the training checkpoint %s; training starts over", exc)
        return None


def load(path: Path, identity: Mapping[str, str], layout: Layout, steps: int) -> Saved:
    """Read and check a checkpoint; raises CheckpointError (never unpickles)."""
    try:
        data = read_file(path, MAX_FILE_BYTES, "training checkpoint")
        header, _ = parse_header(data)
    except FormatProblem as problem:
        raise CheckpointError(path, str(problem)) from None
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict):
        raise CheckpointError(path, "no metadata: not a training checkpoint")
    _check_identity(path, metadata, identity)
    tensors = _tensors(path, data, metadata, layout)
    step, losses = _progress(path, metadata, steps)
    return Saved(step, losses, tensors)


def _check_identity(path: Path, metadata: Mapping[str, Any], identity: Mapping[str, str]) -> None:
    if metadata.get("format") != FORMAT:
        raise CheckpointError(path, "not a training checkpoint")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(path, f"format version {metadata.get('format_version')!r}, "
                                    f"this version reads {FORMAT_VERSION!r}")
    for field, wanted in identity.items():
        if metadata.get(field) != wanted:
            raise CheckpointError(path, f"it belongs to another training ({field} differs)")


def _tensors(path: Path, data: bytes, metadata: Mapping[str, Any],
             layout: Layout) -> dict[str, Tensor]:
    try:
        tensors: dict[str, Tensor] = load_safetensors(data)
    except Exception as exc:  # a malformed layout: safetensors says why
        raise CheckpointError(path, f"safetensors could not decode it: {exc}") from None
    if metadata.get("sha256") != _digest(tensors):
        raise CheckpointError(path, "its tensors do not match their sha256 (corrupt)")
    if set(tensors) != set(layout):
        raise CheckpointError(path, "it holds other tensors than this run has")
    for name, (dtype, shape) in layout.items():
        tensor = tensors[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise CheckpointError(path, f"tensor {name} is {tensor.dtype} {list(tensor.shape)}, "
                                        f"this run's is {dtype} {list(shape)}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(path, f"tensor {name} is not finite")
    return tensors


def _progress(path: Path, metadata: Mapping[str, Any], steps: int) -> tuple[int, tuple[float, ...]]:
    step_text = metadata.get("step")
    if not (isinstance(step_text, str) and re.fullmatch(r"[0-9]{1,9}", step_text)
            and 1 <= int(step_text) <= steps):
        raise CheckpointError(path, f"step {step_text!r} is not in 1..{steps}")
    try:
        losses = json.loads(str(metadata.get("losses")))
    except ValueError:
        losses = None
    if not (isinstance(losses, list) and len(losses) == int(step_text) and all(
            isinstance(x, float) and math.isfinite(x) for x in losses)):
        raise CheckpointError(path, "its losses are not one finite number per step")
    return int(step_text), tuple(losses)


def _digest(tensors: Mapping[str, Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
