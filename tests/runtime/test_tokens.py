"""Concept tokens: case-sensitive placeholders, an embedding extension that leaves the base
weights alone, and positions found by token id."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from perfusion_runtime.method import text
from perfusion_runtime.method.tokens import (
    ExtendedEmbedding,
    add_concepts,
    leading_words,
    placeholder,
    positions,
    remove_extension,
    rewrite,
    with_context,
)

TOKENIZER = Path(__file__).resolve().parents[2] / "runtime" / "tokenizer"


@pytest.fixture()
def parts() -> tuple[CLIPTokenizer, CLIPTextModel]:
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER)
    torch.manual_seed(0)
    config = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                            num_hidden_layers=2, vocab_size=len(tokenizer),
                            bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    return tokenizer, CLIPTextModel(config).eval()


def test_tokens_are_case_sensitive_through_placeholders() -> None:
    assert placeholder("Me*") != placeholder("me*")
    assert placeholder("me*") == placeholder("me*")
    assert rewrite("me* and Me* hug teddy* (5* stars)", ["me*", "Me*"]) == \
        f"{placeholder('me*')} and {placeholder('Me*')} hug teddy* (5* stars)"


def test_a_supercategorys_leading_words_are_all_but_its_last() -> None:
    assert leading_words("purple and yellow striped diamond") == "purple and yellow striped"
    assert leading_words("  teddy   bear ") == "teddy"
    assert leading_words("person") == ""
    assert leading_words("sunflower") == ""  # one word, however many tokens


def test_context_words_stand_before_each_token_once() -> None:
    contexts = {"badge*": "purple and yellow striped", "me*": ""}
    assert with_context("a small badge* on the left", contexts) == \
        "a small purple and yellow striped badge* on the left"
    # said already (any case, any spacing): kept once; said in part: the whole context
    assert with_context("a Purple and  yellow STRIPED badge*", contexts) == \
        "a Purple and  yellow STRIPED badge*"
    assert with_context("a striped badge*", contexts) == \
        "a striped purple and yellow striped badge*"
    assert with_context("badge* beside badge*, me* and you*", contexts) == \
        ("purple and yellow striped badge* beside purple and yellow striped badge*, me* "
         "and you*")  # no context, or not a concept of `contexts`: as it was
    assert with_context("a small badge*", {}) == "a small badge*"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["a", "badge*", "striped", "yellow", "and", "Purple", ",",
                                 "me*", "on"]), max_size=12))
def test_with_context_is_idempotent_and_adds_only_the_context(words: list[str]) -> None:
    """The renderer applies it to prompts that may already have been through it (the
    supercategory prompt of an expanded prompt): a second pass must change nothing. And it
    only ever inserts the context words, before tokens."""
    contexts = {"badge*": "purple and yellow striped"}
    prompt = " ".join(words)
    once = with_context(prompt, contexts)
    assert with_context(once, contexts) == once
    assert once.replace("purple and yellow striped ", "").split() == \
        prompt.replace("purple and yellow striped ", "").split() or \
        "purple and yellow striped" in prompt.lower()
    assert once.count("badge*") == prompt.count("badge*")
    for k, word in enumerate(once.split()):
        if word == "badge*":
            assert [w.lower() for w in once.split()[max(0, k - 4):k]] == \
                ["purple", "and", "yellow", "striped"]


def test_added_tokens_get_their_vectors_and_base_rows_stay(
        parts: tuple[CLIPTokenizer, CLIPTextModel]) -> None:
    tokenizer, encoder = parts
    before = encoder.get_input_embeddings().weight.detach().clone()
    vec_a, vec_b = torch.randn(32), torch.randn(32)
    ids = add_concepts(tokenizer, encoder, {"Me*": vec_a, "me*": vec_b})
    assert ids["Me*"] != ids["me*"]
    prompt = rewrite("a photo of Me* with me*", ids)
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    emb = encoder.get_input_embeddings()
    assert isinstance(emb, ExtendedEmbedding)
    out = emb(input_ids)
    hit_a = positions(input_ids, ids["Me*"])
    hit_b = positions(input_ids, ids["me*"])
    assert hit_a.sum() == 1 and hit_b.sum() == 1
    assert torch.equal(out[hit_a][0], vec_a) and torch.equal(out[hit_b][0], vec_b)
    plain = ~(hit_a | hit_b)
    assert torch.equal(out[plain], before[input_ids[plain]])
    assert torch.equal(emb.base.weight, before)  # invariant 5: base rows untouched
    encoder(input_ids)  # the whole encoder runs with the extension
    remove_extension(encoder)
    assert not isinstance(encoder.get_input_embeddings(), ExtendedEmbedding)


def test_trainable_vector_gets_gradients_and_base_does_not(
        parts: tuple[CLIPTokenizer, CLIPTextModel]) -> None:
    tokenizer, encoder = parts
    encoder.requires_grad_(False)
    ids = add_concepts(tokenizer, encoder, {"teddy*": torch.zeros(32)}, trainable=True)
    input_ids = tokenizer(rewrite("a teddy* toy", ids), return_tensors="pt").input_ids
    # squared: the plain sum of a LayerNorm's output does not depend on its input (every
    # feature vector is centred), so its gradient is rounding noise, zero for some weights
    encoder(input_ids).last_hidden_state.pow(2).sum().backward()
    emb = encoder.get_input_embeddings()
    assert isinstance(emb, ExtendedEmbedding)
    grad = emb.vectors[str(ids["teddy*"])].grad
    assert grad is not None and grad.abs().sum() > 0
    assert emb.base.weight.grad is None


def test_base_vocabulary_ids_are_refused(parts: tuple[CLIPTokenizer, CLIPTextModel]) -> None:
    _, encoder = parts
    emb = ExtendedEmbedding(encoder.get_input_embeddings())
    with pytest.raises(ValueError, match="base vocabulary"):
        emb.set_vector(5, torch.zeros(32))


# text.splice: the supercategory prompt in line with the prompt (global key locking).
START, EOS, PAD = 1, 2, 0


def test_splice_reads_a_phrase_at_its_last_token_and_moves_the_words_after_it() -> None:
    ids = [START, 10, 99, 11, 12, EOS, PAD, PAD, PAD, PAD]  # 99: a concept's placeholder
    spliced, take = text.splice(ids, {99: [20, 21, 22]}, EOS)
    assert spliced == [START, 10, 20, 21, 22, 11, 12, EOS, PAD, PAD]
    # the words and the end of text move two places on; the padding stays where it is,
    # reading the end of text where the longer text still holds words
    assert take == [0, 1, 4, 5, 6, 7, 7, 7, 8, 9]


def test_splice_keeps_the_end_of_text_when_the_phrase_overflows() -> None:
    ids = [START, 10, 99, 11, 12, EOS, PAD]
    spliced, take = text.splice(ids, {99: [20, 21, 22]}, EOS)
    assert spliced == [START, 10, 20, 21, 22, 11, EOS]  # 12 and the padding fall off
    assert take == [0, 1, 4, 5, 6, 6, 6]  # 12, cut off, stands for the end of text


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(10, 14), max_size=12), st.integers(12, 24),
       st.lists(st.integers(20, 30), min_size=1, max_size=4),
       st.lists(st.integers(20, 30), min_size=1, max_size=4))
def test_splice_puts_every_kept_token_where_its_position_reads(
        words: list[int], length: int, first: list[int], second: list[int]) -> None:
    body = [w + (87 if w == 12 else 0) + (89 if w == 13 else 0) for w in words]  # 99, 102
    body = body[:length - 2]
    ids = [START, *body, EOS] + [PAD] * (length - 2 - len(body))
    phrases = {99: first, 102: second}
    spliced, take = text.splice(ids, phrases, EOS)
    assert len(spliced) == len(take) == length
    assert spliced[0] == START and EOS in spliced
    assert take == sorted(take)
    end = spliced.index(EOS)
    for k, token in enumerate(ids[:ids.index(EOS)]):
        if take[k] == end and k > 0:
            continue  # cut off by the longer text: it reads the end of text
        assert spliced[take[k]] == (phrases[token][-1] if token in phrases else token)
    assert take[ids.index(EOS)] == end
    for k in range(ids.index(EOS) + 1, length):  # padding: its own position, or the end
        assert take[k] == max(k, end) and spliced[take[k]] in (EOS, PAD)
