"""Device and precision policy, in one place: CUDA in bf16/fp16 when present, CPU in fp32."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

DEVICE_FORMS = '"auto", "cpu", "cuda" or "cuda:N" (N a device index)'
PREFERENCES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_CUDA_INDEXED = re.compile(r"cuda:(\d+)")


class DeviceError(ValueError):
    """A device string that is malformed or names a device this machine does not have."""


@dataclass(frozen=True)
class Precision:
    """Where the models run and in which dtype."""

    device: torch.device
    dtype: torch.dtype  # weights/activations: bf16 (or fp16) on CUDA, fp32 on CPU
    autocast: bool  # whether to wrap the forward passes in torch.autocast


def choose(device: str = "auto", prefer: str = "bf16") -> Precision:
    """The precision for a device string; "auto" is CUDA when present, else CPU in fp32."""
    if prefer not in PREFERENCES:
        raise ValueError(f"prefer must be one of {', '.join(PREFERENCES)}, got {prefer!r}")
    name = device.strip().lower()
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return Precision(device=torch.device("cpu"), dtype=torch.float32, autocast=False)
    if name in ("auto", "cuda"):
        return _cuda(None, prefer)
    match = _CUDA_INDEXED.fullmatch(name)
    if match is None:
        raise DeviceError(f"unknown device {device!r}: expected {DEVICE_FORMS}")
    return _cuda(int(match.group(1)), prefer)


def _cuda(index: int | None, prefer: str) -> Precision:
    """CUDA device `index` (None: the current one), checked to exist."""
    if not torch.cuda.is_available():
        raise DeviceError(
            "CUDA was requested but is not available (no GPU visible, or this torch build is "
            'CPU-only): use device "cpu" or "auto"'
        )
    count = torch.cuda.device_count()
    if index is None:
        index = torch.cuda.current_device()
    if index >= count:
        raise DeviceError(
            f"cuda:{index} was requested but only {count} CUDA device(s) are visible "
            f"(cuda:0 to cuda:{count - 1})"
        )
    dtype = PREFERENCES[prefer]
    if dtype == torch.bfloat16 and not _native_bf16(index):
        dtype = torch.float16  # emulated bf16 is slow; pre-Ampere GPUs run fp16 natively
    return Precision(
        device=torch.device("cuda", index), dtype=dtype, autocast=dtype != torch.float32
    )


def _native_bf16(index: int) -> bool:
    """Whether CUDA device `index` computes in bf16 natively (Ampere or later, or ROCm)."""
    if torch.version.hip:
        return True
    return torch.cuda.get_device_properties(index).major >= 8
