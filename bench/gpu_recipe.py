"""The GPU recipe, ready to run: Perfusion's SD 1.5 recipe (400 steps, effective batch 16,
512 px) on SD 1.5's architecture with random weights, and an SDXL recipe (400 steps of 4,
1,024 px) on SDXL's (both built from their published configs: nothing is downloaded),
timed end to end, then 8 renders with and without the concept.

    .venv/bin/python bench/gpu_recipe.py --time-limit 540          # on a GPU (the device tool)
    .venv/bin/python bench/gpu_recipe.py --model sdxl --time-limit 540
    .venv/bin/python bench/gpu_recipe.py --cpu-proof                 # the same code, tiny sizes

Prints, and writes as JSON to `--out`:
- training: seconds, steps per second, peak GPU memory (CUDA only), the precision used
  (`method.device.choose`: bf16 autocast where the GPU has it);
- C⁻¹: seconds to estimate it on the shipped caption corpus (once per base model);
- rendering 8 images (25 steps, guidance 7.5, batch 8): seconds without a concept, with
  the concept, and their ratio (target: with concepts no slower than without);
- `--gradient-checkpointing`: the UNet recomputes activations in the backward pass (less
  memory, more time); run once with and once without to measure it;
- `--weights fp16|bf16`: the pipeline's weights in half precision for rendering (training
  keeps the runtime's choice), to measure the render time and memory it saves.

Targets on an H100-class GPU: training ≤ 60 s and ≤ 12 GB peak (the paper: about 4
minutes on an A100); rendering with concepts no slower than without. `--time-limit` stops
the run (exit 124) and prints what was measured so far.

The tokenizer is the tiny one in the package (no CLIP vocabulary ships), with the text
encoder's table sized to it: token ids and prompt lengths are SD 1.5's (77), so the cost is
SD 1.5's but for the embedding table (a lookup).

SDXL's batch is 4: its UNet is about three times SD 1.5's and the images four times the
pixels; 16 of them would not fit the 12 GB the SD 1.5 target allows. SDXL has no target of
its own here.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from _images import make_images
from architectures import VAES, unet_and_text_encoders
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from perfusion_runtime.method.covariance import CAPTIONS_PATH, cinv_for
from perfusion_runtime.method.device import choose
from perfusion_runtime.method.fingerprint import base_fingerprint
from perfusion_runtime.method.render import apply_concepts
from perfusion_runtime.method.tiny import SD_SCHEDULER, tiny_tokenizer
from perfusion_runtime.method.trainer import Recipe, Subject, train

FULL = {"sd15": {"resolution": 512, "steps": 400, "batch": 16, "renders": 8,
                 "render_steps": 25, "captions": None},
        "sdxl": {"resolution": 1024, "steps": 400, "batch": 4, "renders": 8,
                 "render_steps": 25, "captions": None}}
CPU_PROOF = {"sd15": {"resolution": 64, "steps": 3, "batch": 2, "renders": 2,
                      "render_steps": 2, "captions": 64},
             "sdxl": {"resolution": 64, "steps": 2, "batch": 1, "renders": 2,
                      "render_steps": 2, "captions": 16}}
PROMPTS = ["a photo of {} on a beach", "a painting of {}", "{} in the snow",
           "a close-up photo of {}", "{} on a wooden table", "a sketch of {}",
           "{} at night, city lights", "a watercolor of {} in a garden"]


class OutOfTime(Exception):
    pass


@contextmanager
def time_limit(seconds: int) -> Any:
    def stop(signum: int, frame: Any) -> None:
        raise OutOfTime

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def pipeline(name: str, seed: int = 0) -> Any:
    """The UNet, VAE and text encoder(s) of ARCHITECTURES[name] ("sd15" or "sdxl") with
    random weights (`architectures.py`), the tiny tokenizer (both of SDXL's)."""
    tokenizer = tiny_tokenizer()
    unet, encoders = unet_and_text_encoders(name, "cpu", seed, text={
        "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id})
    vae, scheduler = AutoencoderKL(**VAES[name]), DDIMScheduler(**SD_SCHEDULER)
    if name == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=tokenizer,
            tokenizer_2=tiny_tokenizer(), unet=unet, scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=encoders[0], tokenizer=tokenizer, unet=unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None,
            image_encoder=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def render_seconds(pipe: Any, concepts: list[Any], cinv: torch.Tensor, token: str | None,
                   sizes: dict[str, Any], device: torch.device) -> float:
    """Seconds for one call of `renders` images after a warm-up call."""
    count = sizes["renders"]
    prompts = [PROMPTS[i % len(PROMPTS)].format(token or "a teddy bear") for i in range(count)]
    with apply_concepts(pipe, concepts, cinv=cinv, batch_size=count) as applied:
        kwargs = {"seed": list(range(count)), "num_inference_steps": sizes["render_steps"],
                  "guidance_scale": 7.5, "height": sizes["resolution"],
                  "width": sizes["resolution"], "output_type": "np"}
        applied(prompts, **{**kwargs, "num_inference_steps": 1})  # warm-up
        synchronize(device)
        started = time.perf_counter()
        applied(prompts, **kwargs)
        synchronize(device)
        return time.perf_counter() - started


def run(args: argparse.Namespace, results: dict[str, Any]) -> None:
    sizes = (CPU_PROOF if args.cpu_proof else FULL)[args.model]
    precision = choose("cpu" if args.cpu_proof else args.device)
    device = precision.device
    results["settings"] = {**sizes, "model": args.model, "device": str(device),
                           "dtype": str(precision.dtype),
                           "autocast": precision.autocast,
                           "gradient_checkpointing": args.gradient_checkpointing,
                           "weights": args.weights, "torch": torch.__version__,
                           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda"
                           else None}
    print(json.dumps(results["settings"]))
    pipe = pipeline(args.model).to(device)
    work = Path(tempfile.mkdtemp(prefix="gpu-recipe-"))
    captions = CAPTIONS_PATH
    if sizes["captions"]:
        lines = CAPTIONS_PATH.read_text("utf-8").splitlines()[:sizes["captions"]]
        captions = work / "captions.txt"
        captions.write_text("\n".join(lines) + "\n", "utf-8")
    started = time.perf_counter()
    cinv, cinv_print = cinv_for(pipe, work / "cache", captions)
    results["cinv_seconds"] = time.perf_counter() - started
    print(f"C⁻¹ estimated in {results['cinv_seconds']:.1f} s")

    images = make_images(work / "images", 5, sizes["resolution"])
    subject = Subject("teddy*", ("teddy bear",), (), images)
    recipe = Recipe(steps=sizes["steps"], batch=sizes["batch"],
                    resolution=sizes["resolution"])
    if args.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    reset_peak(device)
    synchronize(device)
    started = time.perf_counter()
    concept = train(pipe, subject, recipe, cinv, cinv_fingerprint=cinv_print,
                    base_fingerprint=base_fingerprint(pipe), precision=precision)
    synchronize(device)
    seconds = time.perf_counter() - started
    if args.gradient_checkpointing:
        pipe.unet.disable_gradient_checkpointing()
    results["train"] = {"seconds": seconds, "steps_per_second": sizes["steps"] / seconds,
                        "peak_gib": peak_gib(device)}
    print(f"trained {sizes['steps']} steps of {sizes['batch']} at {sizes['resolution']} px in "
          f"{seconds:.1f} s ({sizes['steps'] / seconds:.2f} steps/s), peak "
          f"{results['train']['peak_gib'] or 0:.2f} GiB")

    if args.weights != "fp32":
        pipe = pipe.to(dtype=torch.float16 if args.weights == "fp16" else torch.bfloat16)
    reset_peak(device)
    plain = render_seconds(pipe, [], cinv, None, sizes, device)
    with_concept = render_seconds(pipe, [concept], cinv, concept.token, sizes, device)
    results["render"] = {"images": sizes["renders"], "seconds_without": plain,
                         "seconds_with": with_concept, "ratio": with_concept / plain,
                         "peak_gib": peak_gib(device)}
    print(f"rendered {sizes['renders']} images ({sizes['render_steps']} steps): "
          f"{plain:.2f} s without a concept, {with_concept:.2f} s with it "
          f"(×{with_concept / plain:.3f}), peak {results['render']['peak_gib'] or 0:.2f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="sd15", choices=["sd15", "sdxl"])
    parser.add_argument("--cpu-proof", action="store_true",
                        help="the same code at tiny sizes on the CPU (proves the script)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--weights", default="fp32", choices=["fp32", "fp16", "bf16"],
                        help="the pipeline's weights for rendering")
    parser.add_argument("--time-limit", type=int, default=540, help="seconds (exit 124 after)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None,
                        help="default: $OUT/gpu_recipe_<model>.json (/tmp without $OUT)")
    args = parser.parse_args()
    args.out = args.out or Path(os.environ.get("OUT", "/tmp")) / f"gpu_recipe_{args.model}.json"
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {}
    code = 0
    try:
        with time_limit(args.time_limit):
            run(args, results)
    except OutOfTime:
        print(f"stopped at the time limit ({args.time_limit} s); measured so far above")
        results["stopped_at_time_limit"] = True
        code = 124
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", "utf-8")
    print(f"results: {args.out}")
    sys.exit(code)


if __name__ == "__main__":
    main()
