"""C⁻¹ per base model (covariance.py): fingerprints, the second moment over all 77 positions
(padding included, no attention mask), the cache and its recovery, and the caption corpus."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from torch import Tensor, nn
from transformers import CLIPTokenizer

from perfusion_runtime.method import covariance
from perfusion_runtime.method.covariance import (
    CAPTIONS_PATH,
    TEXT_POSITIONS,
    CaptionFileError,
    caption_moment,
    cinv_for,
    estimate_cinv,
    load_captions,
    text_encoder_fingerprint,
)
from perfusion_runtime.method.key_locking import (
    coefficients,
    inverse_covariance,
    make_basis,
    second_moment,
)
from perfusion_runtime.method.tiny import TOKENIZER_DIR, tiny_pipeline, tiny_tokenizer
from perfusion_runtime.method.tokens import add_concepts, placeholder, remove_extension

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "make_caption_corpus.py"
SMALL = (
    "a photo of a dog",
    "A red car parked on a city street.",
    "an oil painting of a lighthouse at sunset, dramatic lighting, 85mm lens",
    "two cats sleeping on a couch",
    "A chef in a white apron cooking dinner in a kitchen.",
    "a close-up of a ceramic mug on a wooden table, soft natural light",
    "There is a small boat on a lake.",
)


@pytest.fixture()
def pipe() -> Any:
    return tiny_pipeline(seed=0)


@contextmanager
def counting_forwards(text_encoder: nn.Module) -> Iterator[list[int]]:
    """Counts the text encoder's forward calls (a real hook on the real module)."""
    calls: list[int] = []
    handle = text_encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


def write_captions(path: Path, captions: tuple[str, ...] | list[str]) -> Path:
    path.write_text("\n".join(captions) + "\n", encoding="utf-8")
    return path


def encode_all(pipe: Any, captions: list[str] | tuple[str, ...],
               mask: bool = False) -> tuple[Tensor, Tensor]:
    """Reference encoding in one batch: ([N, 77, D] last hidden state, [N, 77] attention mask)."""
    tokens = pipe.tokenizer(list(captions), padding="max_length", max_length=TEXT_POSITIONS,
                            truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = pipe.text_encoder(input_ids=tokens.input_ids,
                                attention_mask=tokens.attention_mask if mask else None)
    return out.last_hidden_state, tokens.attention_mask


def direct_moment(encodings: Tensor) -> Tensor:
    flat = encodings.reshape(-1, encodings.shape[-1]).to(torch.float64)
    return flat.T @ flat / flat.shape[0]


# ---- fingerprints -------------------------------------------------------------------------


def test_fingerprint_is_stable_across_identical_builds() -> None:
    first, second = tiny_pipeline(seed=0), tiny_pipeline(seed=0)
    fingerprint = text_encoder_fingerprint(first.tokenizer, first.text_encoder)
    assert fingerprint == text_encoder_fingerprint(second.tokenizer, second.text_encoder)
    assert len(fingerprint) == 64 and int(fingerprint, 16) >= 0
    other = tiny_pipeline(seed=1)
    assert fingerprint != text_encoder_fingerprint(other.tokenizer, other.text_encoder)


@pytest.mark.parametrize("name", ["final_layer_norm.weight", "encoder.layers.1.mlp.fc2.weight",
                                  "embeddings.token_embedding.weight"])
def test_fingerprint_changes_when_one_weight_moves_one_ulp(pipe: Any, name: str) -> None:
    before = text_encoder_fingerprint(pipe.tokenizer, pipe.text_encoder)
    [weight] = [p for n, p in pipe.text_encoder.named_parameters() if n.endswith(name)]
    flat = weight.data.view(-1)
    index = flat.numel() // 2
    flat[index] = torch.nextafter(flat[index], torch.tensor(float("inf")))
    assert text_encoder_fingerprint(pipe.tokenizer, pipe.text_encoder) != before


def test_fingerprint_covers_dtype_and_the_tokenizer_vocabulary(pipe: Any) -> None:
    before = text_encoder_fingerprint(pipe.tokenizer, pipe.text_encoder)
    vocab = json.loads((TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    lines = (TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split()) for line in lines[1:] if line]  # after "#version"
    rebuilt = CLIPTokenizer(vocab=vocab, merges=merges)  # same content, built another way
    assert text_encoder_fingerprint(rebuilt, pipe.text_encoder) == before
    one_merge_less = CLIPTokenizer(vocab=vocab, merges=merges[:-1])
    assert text_encoder_fingerprint(one_merge_less, pipe.text_encoder) != before
    assert text_encoder_fingerprint(pipe.tokenizer, pipe.text_encoder.double()) != before


def test_fingerprint_names_the_base_model_not_the_concept_tokens(pipe: Any) -> None:
    """Installing concept tokens (tokens.py) neither changes nor breaks the base fingerprint."""
    before = text_encoder_fingerprint(pipe.tokenizer, pipe.text_encoder)
    add_concepts(pipe.tokenizer, pipe.text_encoder, {placeholder("teddy*"): torch.ones(32)})
    assert text_encoder_fingerprint(pipe.tokenizer, pipe.text_encoder) == before
    remove_extension(pipe.text_encoder)
    assert text_encoder_fingerprint(pipe.tokenizer, pipe.text_encoder) == before


# ---- the second moment --------------------------------------------------------------------


def test_second_moment_equals_a_direct_float64_computation(pipe: Any) -> None:
    captions = [*SMALL, *load_captions(CAPTIONS_PATH)[:10]]
    moment = caption_moment(pipe.tokenizer, pipe.text_encoder, captions, batch_size=3)
    encodings, _ = encode_all(pipe, captions)  # [N, 77, D]
    assert moment.dtype == torch.float64 and moment.shape == (32, 32)
    reference = direct_moment(encodings)
    assert torch.allclose(moment, reference, rtol=1e-5, atol=1e-7 * float(reference.abs().max()))
    assert torch.allclose(second_moment(encodings.reshape(-1, 32)), reference,
                          rtol=1e-12, atol=0.0)


def test_every_position_counts_padding_included_and_no_attention_mask(pipe: Any) -> None:
    moment = caption_moment(pipe.tokenizer, pipe.text_encoder, SMALL)
    encodings, attention = encode_all(pipe, SMALL)  # [N, 77, D], [N, 77]
    assert int(attention.sum()) < attention.numel() / 2  # mostly padding: the test has power
    all_positions = direct_moment(encodings)
    real_tokens_only = direct_moment(encodings[attention.bool()])
    masked, _ = encode_all(pipe, SMALL, mask=True)
    tolerance = {"rtol": 1e-5, "atol": 1e-7 * float(all_positions.abs().max())}
    assert torch.allclose(moment, all_positions, **tolerance)
    assert not torch.allclose(moment, real_tokens_only, rtol=1e-2)
    assert not torch.allclose(moment, direct_moment(masked), rtol=1e-3)


def test_cinv_is_the_ridged_inverse_and_symmetric_positive_definite(pipe: Any) -> None:
    moment = caption_moment(pipe.tokenizer, pipe.text_encoder, SMALL)
    cinv = estimate_cinv(pipe.tokenizer, pipe.text_encoder, SMALL)
    assert cinv.dtype == torch.float32 and cinv.shape == (32, 32)
    assert torch.equal(cinv, inverse_covariance(moment))
    assert torch.equal(cinv, cinv.T)
    assert float(torch.linalg.eigvalsh(cinv.double()).min()) > 0
    ridged = moment + covariance.RIDGE * moment.diagonal().mean() * torch.eye(32)
    assert torch.allclose(cinv.double() @ ridged, torch.eye(32, dtype=torch.float64),
                          atol=1e-3)


def test_rescaling_c_leaves_the_score_unchanged(pipe: Any) -> None:
    """Invariant 3 on a C estimated here: s(e) is the same for C and 1000·C."""
    moment = caption_moment(pipe.tokenizer, pipe.text_encoder, SMALL)
    encodings, _ = encode_all(pipe, ["a photo of a teddy bear", "a dog on a beach"])
    i_star = encodings[0, 5:6]  # [1, D]: a token of the first prompt
    scores = []
    for scale in (1.0, 1000.0):
        basis = make_basis(i_star, inverse_covariance(moment * scale))
        scores.append(coefficients(encodings, basis))  # [2, 77, 1]
    # float32 rounding of the inverse differs between the two scales by about 1e-5 on this
    # random encoder's badly conditioned C (scores are of order 0.01 to 1)
    assert torch.allclose(scores[0], scores[1], rtol=1e-4, atol=1e-4)
    assert torch.allclose(scores[0][0, 5], torch.ones(1), atol=1e-4)  # s(i*) = 1


def test_estimation_restores_the_training_mode_and_uses_eval_behaviour(pipe: Any) -> None:
    reference = estimate_cinv(pipe.tokenizer, pipe.text_encoder, SMALL)
    pipe.text_encoder.train()
    assert torch.equal(estimate_cinv(pipe.tokenizer, pipe.text_encoder, SMALL, device="cpu"),
                       reference)
    assert pipe.text_encoder.training


# ---- the cache ----------------------------------------------------------------------------


def test_full_corpus_cinv_is_cached_and_hit_the_second_time(pipe: Any, tmp_path: Path) -> None:
    with counting_forwards(pipe.text_encoder) as calls:
        cinv, fingerprint = cinv_for(pipe, tmp_path)
    assert len(calls) == -(-len(load_captions(CAPTIONS_PATH)) // 64)  # every batch encoded
    entry = tmp_path / "cinv" / f"{fingerprint}.safetensors"
    assert sorted(p.name for p in entry.parent.iterdir()) == [entry.name]  # no temp file left
    assert torch.equal(cinv, cinv.T)
    assert float(torch.linalg.eigvalsh(cinv.double()).min()) > 0
    with counting_forwards(pipe.text_encoder) as calls:
        again, same = cinv_for(pipe, tmp_path)
    assert calls == [] and same == fingerprint and torch.equal(again, cinv)


def test_cache_entry_holds_the_fingerprints_in_metadata(pipe: Any, tmp_path: Path) -> None:
    captions = write_captions(tmp_path / "captions.txt", SMALL)
    cinv, fingerprint = cinv_for(pipe, tmp_path / "cache", captions)
    entry = tmp_path / "cache" / "cinv" / f"{fingerprint}.safetensors"
    with safetensors.safe_open(str(entry), framework="pt") as handle:
        metadata = handle.metadata()
        assert torch.equal(handle.get_tensor("cinv"), cinv)
    assert metadata["fingerprint"] == fingerprint
    assert metadata["text_encoder_fingerprint"] == text_encoder_fingerprint(
        pipe.tokenizer, pipe.text_encoder)
    assert metadata["captions"] == str(len(SMALL))
    assert metadata["format"] == "perfusion-cinv"


def _damage(kind: str, data: bytes, cinv: Tensor, metadata: dict[str, str]) -> bytes:
    def saved(tensors: dict[str, Tensor], **changes: str) -> bytes:
        return bytes(safetensors.torch.save(tensors, {**metadata, **changes}))

    asymmetric, nan = cinv.clone(), cinv.clone()
    asymmetric[0, 1] += 1.0
    nan[3, 3] = float("nan")
    return {
        "empty": lambda: b"",
        "garbage": lambda: b"this is not a safetensors file at all",
        "truncated": lambda: data[: len(data) // 2],
        "bad header": lambda: b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......",
        "nan": lambda: saved({"cinv": nan}),
        "asymmetric": lambda: saved({"cinv": asymmetric}),
        "wrong shape": lambda: saved({"cinv": torch.eye(33)}),
        "float64": lambda: saved({"cinv": cinv.double()}),
        "other fingerprint": lambda: saved({"cinv": cinv}, fingerprint="0" * 64),
        "extra tensor": lambda: saved({"cinv": cinv, "moment": cinv.clone()}),
        # a finite, symmetric, well-formed C⁻¹ off by one bit: only its digest tells
        "flipped bit": lambda: data[:-5] + bytes([data[-5] ^ 0x01]) + data[-4:],
        "no digest": lambda: bytes(safetensors.torch.save(
            {"cinv": cinv}, {k: v for k, v in metadata.items() if k != "cinv_sha256"})),
    }[kind]()


@pytest.mark.parametrize("kind", ["empty", "garbage", "truncated", "bad header", "nan",
                                  "asymmetric", "wrong shape", "float64", "other fingerprint",
                                  "extra tensor", "flipped bit", "no digest"])
def test_a_corrupt_cache_entry_is_logged_recomputed_and_replaced(
    pipe: Any, tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    captions = write_captions(tmp_path / "captions.txt", SMALL)
    cinv, fingerprint = cinv_for(pipe, tmp_path / "cache", captions)
    entry = tmp_path / "cache" / "cinv" / f"{fingerprint}.safetensors"
    with safetensors.safe_open(str(entry), framework="pt") as handle:
        metadata = handle.metadata()
    entry.write_bytes(_damage(kind, entry.read_bytes(), cinv, metadata))
    with caplog.at_level(logging.WARNING, logger=covariance.logger.name), \
            counting_forwards(pipe.text_encoder) as calls:
        recomputed, same = cinv_for(pipe, tmp_path / "cache", captions)
    assert calls and same == fingerprint and torch.equal(recomputed, cinv)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(entry) in warnings[0].getMessage()
    with counting_forwards(pipe.text_encoder) as calls:  # the entry was replaced: a hit now
        assert torch.equal(cinv_for(pipe, tmp_path / "cache", captions)[0], cinv)
    assert calls == []


def test_an_unwritable_cache_is_logged_and_the_estimate_still_returned(
    pipe: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    captions = write_captions(tmp_path / "captions.txt", SMALL)
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("a file where the cache folder should be", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger=covariance.logger.name):
        cinv, _ = cinv_for(pipe, not_a_folder, captions)
    assert torch.equal(cinv, estimate_cinv(pipe.tokenizer, pipe.text_encoder, SMALL))
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "cannot write" in caplog.records[0].getMessage()


def test_the_caption_file_enters_the_fingerprint(pipe: Any, tmp_path: Path) -> None:
    first = write_captions(tmp_path / "a.txt", SMALL)
    second = write_captions(tmp_path / "b.txt", SMALL[:-1])
    copy = write_captions(tmp_path / "copy-of-a.txt", SMALL)
    cache = tmp_path / "cache"
    cinv_a, fingerprint_a = cinv_for(pipe, cache, first)
    cinv_b, fingerprint_b = cinv_for(pipe, cache, second)
    assert fingerprint_a != fingerprint_b and not torch.equal(cinv_a, cinv_b)
    with counting_forwards(pipe.text_encoder) as calls:  # same bytes elsewhere: a hit
        assert cinv_for((pipe.tokenizer, pipe.text_encoder), cache, copy)[1] == fingerprint_a
    assert calls == []
    shipped = covariance.cinv_fingerprint(
        text_encoder_fingerprint(pipe.tokenizer, pipe.text_encoder),
        hashlib.sha256(CAPTIONS_PATH.read_bytes()).hexdigest())
    assert shipped not in (fingerprint_a, fingerprint_b)
    other = tiny_pipeline(seed=1)
    assert cinv_for(other, cache, first)[1] != fingerprint_a
    assert len(list((cache / "cinv").glob("*.safetensors"))) == 3


def test_cinv_for_rejects_what_is_not_a_pipeline(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="tokenizer"):
        cinv_for(object(), tmp_path)
    with pytest.raises(TypeError, match="tokenizer"):
        cinv_for((tiny_tokenizer(), "not a model"), tmp_path)


# ---- captions -----------------------------------------------------------------------------


def test_load_captions_skips_blank_lines_comments_and_a_bom(tmp_path: Path) -> None:
    path = tmp_path / "captions.txt"
    path.write_bytes("\ufeff# my prompts\r\n\r\n  a dog on a beach  \r\n#x\r\nçà et là\n\n"
                     .encode("utf-8"))
    assert load_captions(path) == ["a dog on a beach", "çà et là"]


@pytest.mark.parametrize(("content", "message"), [
    (b"", "no captions"),
    (b"# only a comment\n\n   \n", "no captions"),
    (b"a dog\nsome caf\xe9 latte\n", "not UTF-8 text .*line 2"),
])
def test_load_captions_refuses_an_unusable_file(tmp_path: Path, content: bytes,
                                                message: str) -> None:
    path = tmp_path / "captions.txt"
    path.write_bytes(content)
    with pytest.raises(CaptionFileError, match=message) as error:
        load_captions(path)
    assert str(path) in str(error.value)


def test_cinv_for_refuses_a_missing_or_empty_caption_file(pipe: Any, tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(CaptionFileError, match="cannot read"):
        load_captions(missing)
    with pytest.raises(CaptionFileError, match="cannot read"):
        cinv_for(pipe, tmp_path, missing)
    with pytest.raises(CaptionFileError, match="no captions"):
        cinv_for(pipe, tmp_path, write_captions(tmp_path / "empty.txt", ["# nothing"]))
    assert not (tmp_path / "cinv").exists()


# ---- the corpus ---------------------------------------------------------------------------


def test_the_corpus_generator_reproduces_the_committed_file_byte_for_byte(
    tmp_path: Path,
) -> None:
    out = tmp_path / "captions.txt"
    subprocess.run([sys.executable, str(TOOL), "--out", str(out)], check=True,
                   capture_output=True, cwd=tmp_path)
    assert out.read_bytes() == CAPTIONS_PATH.read_bytes()


def test_the_corpus_has_5000_distinct_captions_of_3_to_30_words() -> None:
    data = CAPTIONS_PATH.read_bytes()
    captions = load_captions(CAPTIONS_PATH)
    assert len(data) < 400_000
    assert len(captions) == 5000
    assert len({c.lower().rstrip(".") for c in captions}) == len(captions)
    assert all(3 <= len(c.split()) <= 30 for c in captions)
    assert len({w.strip(".,").lower() for c in captions for w in c.split()}) > 1000
