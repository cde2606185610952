"""C⁻¹ per base model: encode a caption corpus, invert its second moment, cache it by fingerprint.

C is the uncentered covariance E[e eᵀ] of the text encoder's outputs e over typical prompts
(docs/runtime.md, "Inverse covariance"): every one of the 77 positions the cross-attention
sees, padding included, with no attention mask (SD 1.x was trained without one). The caption
corpus shipped in `data/captions.txt` (provenance in `data/README.md`) stands in for the
paper's dataset captions; a user-supplied file replaces it. Accumulation is float64; C⁻¹ is float32.

The cache entry `<cache_dir>/cinv/<fingerprint>.safetensors` is named by a fingerprint of the
text encoder (weights and tokenizer vocabulary), the caption file's bytes and the estimation
settings, so any change to one of them is a miss. A corrupt entry is logged and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors  # bytes in, tensors out; no pickle
from torch import Tensor, nn

from ..files.atomic import FileError, read_regular, reason, write_atomically
from ..files.safetensors_file import FormatProblem, tensor_sha256
from ..files.store import CINV_DIGEST, CINV_DIR, MAX_CINV_BYTES
from . import text
from .key_locking import DEFAULT_RIDGE, inverse_covariance, second_moment
from .tokens import ExtendedEmbedding

logger = logging.getLogger(__name__)

CAPTIONS_PATH = Path(__file__).resolve().parent.parent / "data" / "captions.txt"
TEXT_POSITIONS = 77  # T of SD 1.x: every position is a sample of C, padding included
RIDGE = DEFAULT_RIDGE
CACHE_FORMAT = "perfusion-cinv"
CACHE_FORMAT_VERSION = "1"  # bump when the cached content or its estimation changes
_HASH_CHUNK = 1 << 24  # bytes per hash update: bounds the CPU copy of one GPU tensor slice
_SYMMETRY_RTOL = 1e-5  # |C⁻¹ − C⁻¹ᵀ| allowed, relative to max |C⁻¹|


class CaptionFileError(ValueError):
    """A caption file that cannot be read, is not UTF-8, or holds no caption."""


class _CacheProblem(ValueError):
    """Why a cache entry is unusable (logged, then the entry is recomputed)."""


# ---- fingerprints -------------------------------------------------------------------------


def _tokenizer_content(tokenizer: Any) -> dict[str, Any]:
    """The base vocabulary, merges and special ids; tokens added later (concepts) are left out."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # a `tokenizers`-backed tokenizer (transformers 5, *Fast in 4.x)
        model = json.loads(backend.to_str())["model"]
        vocab, merges = model.get("vocab"), model.get("merges", [])
    elif hasattr(tokenizer, "encoder") and hasattr(tokenizer, "bpe_ranks"):  # slow CLIP BPE
        vocab, ranks = tokenizer.encoder, tokenizer.bpe_ranks
        merges = sorted(ranks, key=ranks.__getitem__)
    else:
        raise TypeError(f"cannot read the vocabulary of {type(tokenizer).__name__}")
    if isinstance(vocab, dict):
        vocab = sorted(vocab.items(), key=lambda item: (item[1], item[0]))
    pairs = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in merges]
    special = {name: getattr(tokenizer, f"{name}_token_id", None)
               for name in ("bos", "eos", "pad", "unk")}
    return {"vocab": vocab, "merges": pairs, "special": special}


def _named_tensors(text_encoder: nn.Module) -> list[tuple[str, Tensor]]:
    """Every parameter and buffer by name, sorted; concept-token rows (tokens.py) left out."""
    tensors: dict[str, Tensor] = dict(text_encoder.named_parameters())
    tensors.update(text_encoder.named_buffers())
    for prefix, module in text_encoder.named_modules():
        if isinstance(module, ExtendedEmbedding):  # hash it as the base table it wraps
            inner = prefix + "."
            tensors = {k: v for k, v in tensors.items() if not k.startswith(inner)}
            tensors[inner + "weight"] = module.base.weight
    # transformers 4 nests CLIPTextModel's tensors under `text_model.`, 5 does not: hash the
    # unnested names so the same weights keep their fingerprint across that upgrade.
    return sorted((name.removeprefix("text_model."), t) for name, t in tensors.items())


def _hash_tensor(digest: Any, name: str, tensor: Tensor) -> None:
    """Name, dtype and shape, then the raw bytes, a slice at a time (no second model copy)."""
    if tensor.is_meta:
        raise ValueError(f"{name} is on the meta device: it has no values to fingerprint")
    header = json.dumps([name, str(tensor.dtype), list(tensor.shape)])
    digest.update(header.encode("utf-8") + b"\n")
    raw = tensor.detach().reshape(-1).contiguous().view(torch.uint8)  # [bytes], a view on CPU
    for start in range(0, raw.numel(), _HASH_CHUNK):
        digest.update(raw[start:start + _HASH_CHUNK].cpu().numpy())


def text_encoder_fingerprint(tokenizer: Any, text_encoder: nn.Module) -> str:
    """sha256 (hex) of the tokenizer's vocabulary and merges and every text-encoder tensor."""
    digest = hashlib.sha256(b"perfusion text encoder fingerprint v1\n")
    vocabulary = json.dumps(_tokenizer_content(tokenizer), ensure_ascii=False,
                            separators=(",", ":"), sort_keys=True)
    digest.update(vocabulary.encode("utf-8") + b"\n")
    for name, tensor in _named_tensors(text_encoder):
        _hash_tensor(digest, name, tensor)
    return digest.hexdigest()


def cinv_fingerprint(encoder_fingerprint: str, captions_sha256: str) -> str:
    """sha256 (hex) of exactly what changes C⁻¹: encoder, caption bytes, estimation settings."""
    key = {"format": CACHE_FORMAT, "format_version": CACHE_FORMAT_VERSION,
           "text_encoder": encoder_fingerprint, "captions_sha256": captions_sha256,
           "positions": TEXT_POSITIONS, "ridge": RIDGE, "attention_mask": False}
    canonical = json.dumps(key, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# ---- captions ----------------------------------------------------------------------------


def _caption_lines(path: Path, data: bytes) -> list[str]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise CaptionFileError(
            f"{path}: not UTF-8 text (byte {exc.start}, line {line}): save it as UTF-8"
        ) from None
    lines = (line.strip() for line in text.splitlines())
    captions = [line for line in lines if line and not line.startswith("#")]
    if not captions:
        raise CaptionFileError(
            f"{path}: no captions (one per line; blank lines and # comments are skipped)"
        )
    return captions


def _read_caption_file(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CaptionFileError(f"{path}: cannot read the caption file: {exc.strerror}") from None


def load_captions(path: Path) -> list[str]:
    """One caption per line (UTF-8), stripped; blank lines and `#` comment lines skipped."""
    return _caption_lines(Path(path), _read_caption_file(Path(path)))


# ---- estimation ---------------------------------------------------------------------------


def _encoder_device(text_encoder: nn.Module) -> torch.device:
    first = next(iter(text_encoder.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def _batches(captions: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(captions), size):
        yield captions[start:start + size]


def _encode(tokenizer: Any, text_encoder: nn.Module, batch: Sequence[str],
            device: torch.device) -> Tensor:
    """Last hidden state [B·T, D] of a batch: 77 positions, padded, no attention mask."""
    ids = tokenizer(list(batch), padding="max_length", max_length=TEXT_POSITIONS,
                    truncation=True, return_tensors="pt").input_ids  # [B, T]
    # No attention_mask: SD 1.x conditions on the padding positions as they come out.
    hidden: Tensor = text_encoder(input_ids=ids.to(device)).last_hidden_state  # [B, T, D]
    return hidden.reshape(-1, hidden.shape[-1])  # [B·T, D]


def caption_moment(tokenizer: Any, text_encoder: nn.Module, captions: Sequence[str],
                   batch_size: int = 64, device: torch.device | str | None = None) -> Tensor:
    """C = E[e eᵀ] over all 77 positions of every caption, [D, D] float64 (on the CPU)."""
    where = torch.device(device) if device is not None else _encoder_device(text_encoder)
    return _moment(lambda batch: _encode(tokenizer, text_encoder, batch, where), [text_encoder],
                   captions, batch_size, where)


def _moment(encode: Callable[[Sequence[str]], Tensor], encoders: Sequence[nn.Module],
            captions: Sequence[str], batch_size: int, where: torch.device) -> Tensor:
    """E[e eᵀ] [D, D] float64 (CPU) of `encode(batch)` [B·T, D] over the captions, with the
    encoders in eval mode (dropout off: C of the model as it renders) for the duration."""
    if not captions:
        raise ValueError("no captions: C needs at least one")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    summing = where if where.type in ("cpu", "cuda") else torch.device("cpu")  # has float64
    total: Tensor | None = None  # Σ e eᵀ [D, D] float64
    count, started = 0, time.monotonic()
    modes = [e.training for e in encoders]
    for encoder in encoders:
        encoder.eval()
    try:
        with torch.no_grad():
            for index, batch in enumerate(_batches(captions, batch_size)):
                flat = encode(batch)  # [B·T, D]
                part = second_moment(flat.to(summing)) * flat.shape[0]  # float64 Σ [D, D]
                total = part if total is None else total + part
                count += flat.shape[0]
                _progress(index + 1, -(-len(captions) // batch_size), started)
    finally:
        for encoder, mode in zip(encoders, modes, strict=True):
            encoder.train(mode)
    assert total is not None
    return (total / count).cpu()


def _progress(done: int, batches: int, started: float) -> None:
    """Log about ten progress lines per estimate (shown only where logging is configured)."""
    if done == batches or done % max(1, batches // 10) == 0:
        elapsed = time.monotonic() - started
        eta = elapsed / done * (batches - done)
        logger.info("C: encoded batch %d/%d (%.1f s, about %.0f s left)",
                    done, batches, elapsed, eta)


def estimate_cinv(tokenizer: Any, text_encoder: nn.Module, captions: Sequence[str],
                  batch_size: int = 64, device: torch.device | str | None = None) -> Tensor:
    """C⁻¹ [D, D] float32 (CPU) of the captions' text encodings (`key_locking` ridge).

    `device` is where the token ids go; by default the text encoder's own device (the
    encoder is never moved)."""
    return _inverse(caption_moment(tokenizer, text_encoder, captions, batch_size, device))


def _inverse(moment: Tensor) -> Tensor:
    return inverse_covariance(moment, ridge=RIDGE).contiguous()  # LAPACK's is column-major


# ---- cache --------------------------------------------------------------------------------


def _parts(pipeline_or_parts: Any) -> tuple[Any, nn.Module]:
    """(tokenizer, text_encoder) of a pipeline, or the pair itself."""
    if isinstance(pipeline_or_parts, tuple | list) and len(pipeline_or_parts) == 2:
        tokenizer, text_encoder = pipeline_or_parts
    else:
        tokenizer = getattr(pipeline_or_parts, "tokenizer", None)
        text_encoder = getattr(pipeline_or_parts, "text_encoder", None)
    if tokenizer is None or not isinstance(text_encoder, nn.Module):
        raise TypeError("expected a pipeline with .tokenizer and .text_encoder, "
                        "or a (tokenizer, text_encoder) pair")
    return tokenizer, text_encoder


@dataclass(frozen=True)
class _TextSide:
    """What C⁻¹ is estimated on: one (tokenizer, encoder) pair, or an SDXL pipeline (`pipe`
    set), whose two encoders the UNet reads side by side."""

    tokenizer: Any
    text_encoder: nn.Module
    width: int
    pipe: Any = None

    def fingerprint(self) -> str:
        if self.pipe is None:
            return text_encoder_fingerprint(self.tokenizer, self.text_encoder)
        return joint_fingerprint(self.pipe)

    def encoders(self) -> list[nn.Module]:
        return [self.text_encoder] if self.pipe is None else [e for _, e in
                                                              text.pairs(self.pipe)]

    def encode(self, batch: Sequence[str]) -> Tensor:
        """The UNet's text input of a batch, flat [B·T, D]: one encoder's last hidden state,
        or SDXL's two side by side (`text.encode`)."""
        if self.pipe is None:
            return _encode(self.tokenizer, self.text_encoder, batch,
                           _encoder_device(self.text_encoder))
        return text.encode(self.pipe, batch)[0].reshape(-1, self.width)


def joint_fingerprint(pipe: Any) -> str:
    """Of an SDXL pipeline's text side: each (tokenizer, encoder)'s fingerprint, in order."""
    parts = [text_encoder_fingerprint(t, e) for t, e in text.pairs(pipe)]
    return hashlib.sha256(("perfusion joint text fingerprint v1\n" + "\n".join(parts))
                          .encode("ascii")).hexdigest()


def _side(pipeline_or_parts: Any) -> _TextSide:
    if not isinstance(pipeline_or_parts, tuple | list) and text.is_xl(pipeline_or_parts):
        pipe = pipeline_or_parts
        width = sum(_width(e) for _, e in text.pairs(pipe))
        return _TextSide(pipe.tokenizer, pipe.text_encoder, width, pipe)
    tokenizer, text_encoder = _parts(pipeline_or_parts)
    return _TextSide(tokenizer, text_encoder, _width(text_encoder))


def _width(text_encoder: nn.Module) -> int:
    """D, the width of the encoder's outputs (`config.hidden_size` of a CLIPTextModel)."""
    width = getattr(getattr(text_encoder, "config", None), "hidden_size", None)
    if not isinstance(width, int):
        raise TypeError(f"{type(text_encoder).__name__} has no config.hidden_size")
    return width


def _header_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file's JSON header."""
    if len(data) < 8:
        raise _CacheProblem("file is truncated")
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise _CacheProblem("file is truncated")
    try:
        header = json.loads(data[8:8 + size])
    except (UnicodeDecodeError, ValueError):
        raise _CacheProblem("header is not JSON") from None
    metadata = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        raise _CacheProblem("header has no metadata")
    return metadata


def _cinv_problem(cinv: Tensor, width: int) -> str | None:
    """Why `cinv` is not a usable C⁻¹ ([D, D] float32, finite, symmetric), or None."""
    if tuple(cinv.shape) != (width, width):
        return f"shape {tuple(cinv.shape)}, expected ({width}, {width})"
    if cinv.dtype != torch.float32:
        return f"dtype {cinv.dtype}, expected torch.float32"
    if not bool(torch.isfinite(cinv).all()):
        return "non-finite values"
    limit = _SYMMETRY_RTOL * float(cinv.abs().max())
    if float((cinv - cinv.T).abs().max()) > limit:
        return "not symmetric"
    return None


def _read_cache(path: Path, fingerprint: str, width: int) -> Tensor:
    """The cached C⁻¹, checked; raises _CacheProblem when the entry is unusable."""
    try:
        data = read_regular(path, MAX_CINV_BYTES)  # never through a link
    except OSError as exc:
        raise _CacheProblem(f"unreadable: {exc.strerror}") from None
    metadata = _header_metadata(data)
    recorded = metadata.get(CINV_DIGEST)
    if recorded is None:
        raise _CacheProblem("no digest: an older version wrote it")
    try:
        actual = tensor_sha256(data, "cinv")
    except FormatProblem as exc:
        raise _CacheProblem(str(exc)) from None
    if actual != recorded:  # a flipped bit would otherwise change every concept silently
        raise _CacheProblem(f"sha256 expected {recorded}, actual {actual}")
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError, TypeError) as exc:
        raise _CacheProblem(f"not a valid safetensors file: {exc}") from None
    expected = {"format": CACHE_FORMAT, "format_version": CACHE_FORMAT_VERSION,
                "fingerprint": fingerprint}
    for key, value in expected.items():
        if metadata.get(key) != value:
            raise _CacheProblem(f"metadata {key} is {metadata.get(key)!r}, expected {value!r}")
    if set(tensors) != {"cinv"}:
        raise _CacheProblem(f"tensors {sorted(tensors)}, expected ['cinv']")
    cinv: Tensor = tensors["cinv"]
    problem = _cinv_problem(cinv, width)
    if problem is not None:
        raise _CacheProblem(problem)
    return cinv


def _metadata(fingerprint: str, encoder: str, captions_sha256: str,
              count: int) -> dict[str, str]:
    return {"format": CACHE_FORMAT, "format_version": CACHE_FORMAT_VERSION,
            "fingerprint": fingerprint, "text_encoder_fingerprint": encoder,
            "captions_sha256": captions_sha256, "captions": str(count),
            "positions": str(TEXT_POSITIONS), "ridge": repr(RIDGE)}


def _estimate(side: _TextSide, source: Path, caption_bytes: bytes) -> tuple[Tensor, int]:
    """(C⁻¹, number of captions) from a caption file's bytes, checked."""
    captions = _caption_lines(source, caption_bytes)
    logger.info("estimating C⁻¹ on %d captions from %s", len(captions), source)
    cinv = _inverse(_moment(side.encode, side.encoders(), captions, 64,
                            _encoder_device(side.text_encoder)))
    problem = _cinv_problem(cinv, side.width)
    if problem is not None:  # not a cache problem: the estimate itself is wrong
        raise ValueError(f"the C⁻¹ estimated from {source} is unusable: {problem}")
    return cinv, len(captions)


def _store(path: Path, cinv: Tensor, metadata: dict[str, str]) -> None:
    cinv = cinv.contiguous()
    digest = hashlib.sha256(cinv.numpy().tobytes()).hexdigest()  # the bytes safetensors stores
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, safetensors.torch.save({"cinv": cinv},
                                                      {**metadata, CINV_DIGEST: digest}))
    except (OSError, FileError) as exc:  # the cache only saves time: C⁻¹ is still returned
        problem = exc.problem if isinstance(exc, FileError) else reason(exc)
        logger.warning("cannot write the C⁻¹ cache entry %s (%s): it will be recomputed "
                       "next time", path, problem)


def cinv_for(pipeline_or_parts: Any, cache_dir: Path,
             captions_path: Path | None = None) -> tuple[Tensor, str]:
    """(C⁻¹ [D, D] float32 on the CPU, its fingerprint) for a pipeline's text encoder.

    `pipeline_or_parts`: a pipeline with `.tokenizer` and `.text_encoder`, or that pair.
    Read from `<cache_dir>/cinv/<fingerprint>.safetensors` when that entry is valid; otherwise
    estimated on `captions_path` (default: the shipped corpus) and written there atomically.
    Call it on the base model: concept tokens added later do not change the fingerprint."""
    side = _side(pipeline_or_parts)
    source = Path(captions_path) if captions_path is not None else CAPTIONS_PATH
    caption_bytes = _read_caption_file(source)
    captions_sha256 = hashlib.sha256(caption_bytes).hexdigest()
    encoder = side.fingerprint()
    fingerprint = cinv_fingerprint(encoder, captions_sha256)
    path = Path(cache_dir) / CINV_DIR / f"{fingerprint}.safetensors"
    if path.exists():
        try:
            return _read_cache(path, fingerprint, side.width), fingerprint
        except _CacheProblem as why:
            logger.warning("C⁻¹ cache entry %s is unusable (%s): recomputing it", path, why)
    cinv, count = _estimate(side, source, caption_bytes)
    _store(path, cinv, _metadata(fingerprint, encoder, captions_sha256, count))
    return cinv, fingerprint
