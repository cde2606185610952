"""The device and precision policy: CPU in fp32 everywhere, CUDA branches where a GPU exists."""

from __future__ import annotations

import pytest
import torch

from perfusion_runtime.method.device import DeviceError, Precision, choose

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device on this machine")
needs_no_cuda = pytest.mark.skipif(CUDA, reason="asserts the error raised without CUDA")

CPU_FP32 = Precision(device=torch.device("cpu"), dtype=torch.float32, autocast=False)


@pytest.mark.parametrize("prefer", ["bf16", "fp16", "fp32"])
def test_cpu_is_fp32_without_autocast_whatever_the_preference(prefer: str) -> None:
    assert choose("cpu", prefer) == CPU_FP32
    assert choose(" CPU ") == CPU_FP32


def test_auto_picks_cuda_when_present_else_cpu() -> None:
    chosen = choose("auto")
    if CUDA:
        assert chosen.device.type == "cuda"
        assert chosen.dtype in (torch.bfloat16, torch.float16)
        assert chosen.autocast
    else:
        assert chosen == CPU_FP32
    assert choose() == chosen


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "cuda:-1", "mps", "", "cpu:0"])
def test_unknown_device_strings_name_the_allowed_forms(device: str) -> None:
    with pytest.raises(ValueError, match=r'"auto", "cpu", "cuda" or "cuda:N"'):
        choose(device)


def test_unknown_preference_is_rejected() -> None:
    with pytest.raises(ValueError, match="prefer must be one of bf16, fp16, fp32"):
        choose("cpu", "int8")


def test_precision_is_frozen() -> None:
    with pytest.raises(AttributeError):
        CPU_FP32.autocast = True  # type: ignore[misc]


@needs_no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_without_a_gpu_is_a_clear_error(device: str) -> None:
    with pytest.raises(DeviceError, match=r"CUDA was requested but is not available.*\"cpu\""):
        choose(device)


@needs_cuda
def test_cuda_uses_bf16_on_ampere_or_later_else_fp16_with_autocast() -> None:
    chosen = choose("cuda")
    assert chosen.device == torch.device("cuda", torch.cuda.current_device())
    native = torch.cuda.get_device_properties(chosen.device).major >= 8 or bool(torch.version.hip)
    assert chosen.dtype == (torch.bfloat16 if native else torch.float16)
    assert chosen.autocast
    assert choose("cuda", "fp16").dtype == torch.float16
    assert choose("cuda", "fp32") == Precision(chosen.device, torch.float32, autocast=False)


@needs_cuda
def test_cuda_index_must_exist() -> None:
    count = torch.cuda.device_count()
    assert choose(f"cuda:{count - 1}").device == torch.device("cuda", count - 1)
    with pytest.raises(DeviceError, match=rf"cuda:{count} was requested but only {count}"):
        choose(f"cuda:{count}")
