"""The tiny tokenizer and pipeline, and SD 1.5's shapes, all built in-process from configs."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import regex
import torch
from architectures import sd15_unet_and_text_encoder  # bench/, on the path through conftest

from perfusion_runtime.method.layers import cross_attention_layers
from perfusion_runtime.method.tiny import TOKENIZER_DIR, tiny_pipeline, tiny_tokenizer

TOOL = Path(__file__).resolve().parents[2] / "tools" / "make_tiny_tokenizer.py"
TEXTS = [
    "a photo of a teddy bear",
    "A PHOTO of a Dog,   in the SNOW!!",
    "a red circle on the left of a blue square",
    "an oil painting of a cat's face, trending on artstation",
    "zxqv sks <teddy*> 1999 ~!@#$%^&*()",
    "naïve café crème brûlée 日本語 🐶🐱 — «quotes»",
    "it's a dog's life; they're, we've, i'm, you'll, he'd",
    "",
]
# CLIP's word pattern (OpenAI's simple_tokenizer, transformers' CLIPTokenizer pre-tokenizer).
WORD = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
                     r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)


@pytest.fixture(scope="module")
def tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_tiny_tokenizer", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return tiny_tokenizer()


def state_dicts(pipe: Any) -> dict[str, torch.Tensor]:
    parts = {"unet": pipe.unet, "text": pipe.text_encoder, "vae": pipe.vae}
    return {f"{p}.{k}": v for p, m in parts.items() for k, v in m.state_dict().items()}


def test_tokenizer_files_are_committed_output_of_the_tool(tool: ModuleType) -> None:
    files = tool.build()
    assert sorted(p.name for p in TOKENIZER_DIR.iterdir()) == sorted(files)
    for name, text in files.items():
        assert (TOKENIZER_DIR / name).read_text("utf-8") == text, f"rerun {TOOL.name}: {name}"
    assert sum((TOKENIZER_DIR / name).stat().st_size for name in files) < 100_000


def test_vocabulary_layout(tokenizer: Any, tool: ModuleType) -> None:
    vocab = tokenizer.get_vocab()
    symbols = list(tool.bytes_to_unicode().values())
    assert [vocab[s] for s in symbols] == list(range(256))
    assert [vocab[s + "</w>"] for s in symbols] == list(range(256, 512))
    assert sorted(vocab.values()) == list(range(len(vocab))) and len(tokenizer) == len(vocab)
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|startoftext|>", "<|endoftext|>")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (len(vocab) - 2, len(vocab) - 1)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert tokenizer.model_max_length == 77


def test_caption_words_are_single_tokens(tokenizer: Any, tool: ModuleType) -> None:
    words = tool.words()
    assert len(words) > 300
    for word in words:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    ids = tokenizer("a photo of a teddy bear").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "<|startoftext|>", "a</w>", "photo</w>", "of</w>", "a</w>", "teddy</w>", "bear</w>",
        "<|endoftext|>"]


@pytest.mark.parametrize("text", TEXTS)
def test_any_text_tokenizes_and_decodes(tokenizer: Any, text: str) -> None:
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids[1:-1]
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    assert decoded.replace(" ", "") == text.lower().replace(" ", "")


def reference_bpe(text: str, vocab: dict[str, int], ranks: dict[tuple[str, str], int],
                  byte_map: dict[int, str]) -> list[int]:
    """OpenAI CLIP's original (pure Python, "slow") BPE on a whitespace-cleaned, lowercased text."""
    ids = [vocab["<|startoftext|>"]]
    for piece in WORD.findall(" ".join(text.split()).lower()):
        chars = [byte_map[b] for b in piece.encode("utf-8")]
        word = (*chars[:-1], chars[-1] + "</w>")
        while len(word) > 1:
            pair = min(pairwise(word), key=lambda p: ranks.get(p, math.inf))
            if pair not in ranks:
                break
            word = tuple(merge(word, pair))
        ids += [vocab[symbol] for symbol in word]
    return [*ids, vocab["<|endoftext|>"]]


def merge(word: tuple[str, ...], pair: tuple[str, str]) -> Iterator[str]:
    i = 0
    while i < len(word):
        if word[i:i + 2] == pair:
            yield word[i] + word[i + 1]
            i += 2
        else:
            yield word[i]
            i += 1


def test_matches_reference_bpe_on_the_files(tokenizer: Any, tool: ModuleType) -> None:
    """The committed files mean the same to the original CLIP algorithm and to transformers."""
    vocab = tokenizer.get_vocab()
    lines = (TOKENIZER_DIR / "merges.txt").read_text("utf-8").splitlines()
    assert lines[0].startswith("#version")
    ranks = {tuple(line.split()): rank for rank, line in enumerate(lines[1:])}
    byte_map = tool.bytes_to_unicode()
    for text in [*TEXTS, " ".join(tool.words())]:
        assert tokenizer(text).input_ids == reference_bpe(text, vocab, ranks, byte_map), text


def test_tiny_pipeline_is_seeded_and_leaves_the_global_generator_alone() -> None:
    before = torch.random.get_rng_state()
    first, again, other = (state_dicts(tiny_pipeline(seed=s)) for s in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_tiny_pipeline_architecture(pipe: Any) -> None:
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    assert pipe.text_encoder.config.hidden_size == 32
    assert pipe.text_encoder.config.num_hidden_layers == 2
    assert pipe.text_encoder.config.max_position_embeddings == 77
    assert pipe.unet.config.cross_attention_dim == 32 and pipe.unet.config.sample_size == 8
    assert pipe.vae_scale_factor == 4
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    layers = cross_attention_layers(pipe.unet)
    assert len(layers) == 7  # 2 down blocks, the mid block, 2 up blocks of 2
    assert all(a.to_k.in_features == 32 and a.to_k.bias is None for a in layers.values())
    params = [*pipe.unet.parameters(), *pipe.text_encoder.parameters(), *pipe.vae.parameters()]
    assert not any(p.requires_grad for p in params)


def test_tiny_pipeline_renders_reproducibly(pipe: Any) -> None:
    def render() -> torch.Tensor:
        out = pipe("a photo of a teddy bear", num_inference_steps=2, output_type="pt",
                   generator=torch.Generator().manual_seed(3))
        image: torch.Tensor = out.images
        return image

    image = render()
    assert image.shape == (1, 3, 32, 32) and bool(torch.isfinite(image).all())
    assert torch.equal(image, render())


def test_sd15_shapes_on_meta() -> None:
    unet, text_encoder = sd15_unet_and_text_encoder()
    assert all(p.is_meta for p in [*unet.parameters(), *text_encoder.parameters()])
    layers = cross_attention_layers(unet)
    assert len(layers) == 16
    assert sum(a.to_k.out_features for a in layers.values()) == 12_480
    assert {a.to_k.in_features for a in layers.values()} == {768}
    assert {a.to_k.bias is None and a.to_v.bias is None for a in layers.values()} == {True}
    config = text_encoder.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.intermediate_size, config.vocab_size, config.max_position_embeddings) == (
        768, 12, 12, 3072, 49_408, 77)
    assert unet.config.block_out_channels == (320, 640, 1280, 1280)
    assert unet.config.sample_size == 64 and unet.config.attention_head_dim == 8
