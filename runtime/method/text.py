"""The text side of a pipeline: its (tokenizer, text encoder) pairs and the encodings its
UNet's cross-attention reads.

SD 1.x and 2.x have one pair, and the UNet reads the encoder's last hidden state. SDXL has
two (CLIP ViT-L and OpenCLIP ViT-bigG), and the UNet reads both encoders' penultimate
hidden states side by side, as `StableDiffusionXLPipeline.encode_prompt` makes them; the
second encoder's pooled projection and six size numbers go to the time embedding instead
(`added_conditions`). Every vector of the method (i*, i_super, C) lives in that joint
space (docs/runtime.md, "SDXL")."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor


def is_xl(pipe: Any) -> bool:
    """Whether `pipe` has SDXL's two text encoders."""
    return getattr(pipe, "text_encoder_2", None) is not None


def pairs(pipe: Any) -> list[tuple[Any, Any]]:
    """(tokenizer, text encoder) of each encoder the UNet reads, in the order of its input."""
    found = [(pipe.tokenizer, pipe.text_encoder)]
    if is_xl(pipe):
        found.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return found


def token_widths(pipe: Any) -> list[int]:
    """The width of each encoder's token embedding (a concept has a row in each)."""
    return [int(encoder.get_input_embeddings().weight.shape[1]) for _, encoder in pairs(pipe)]


def device_of(pipe: Any) -> torch.device:
    """Where the (first) text encoder's weights are."""
    found: torch.device = pipe.text_encoder.device
    return found


def tokenize(tokenizer: Any, prompts: Sequence[str]) -> Tensor:
    """Input ids [B, 77]: padded to the tokenizer's length, truncated, no attention mask."""
    ids: Tensor = tokenizer(list(prompts), padding="max_length", truncation=True,
                            max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    return ids


def prompt_lengths(tokenizer: Any, ids: Tensor) -> Tensor:
    """How many leading positions [B] of each row of `ids` ([B, 77], from `tokenize`) the
    prompt itself fills: its start token, its words and its end-of-text token, not the padding
    after it (which SD 1.x fills with more end-of-text tokens). A concept trained with
    `positions` "prompt" is edited at these positions only (docs/runtime.md, "Which
    positions the edit touches")."""
    end = (ids == int(tokenizer.eos_token_id)).int()  # [B, T]; tokenize always ends with one
    return end.argmax(dim=1) + 1  # the first end-of-text token, counted


def word_ids(tokenizer: Any, words: str) -> list[int]:
    """The ids of `words` alone, without start or end-of-text tokens."""
    return [int(i) for i in tokenizer(words, add_special_tokens=False).input_ids]


def splice(ids: Sequence[int], words: Mapping[int, Sequence[int]], eos: int
           ) -> tuple[list[int], list[int]]:
    """A prompt's ids ([start, ..., end of text, padding], from `tokenize`) with each concept
    placeholder (a key of `words`) replaced by its supercategory's ids, cut back to the same
    length with the end of text kept; and, for each position of the prompt, the position of
    the result that stands for it. A placeholder stands for its supercategory's last token
    (the only one of a causal encoder that has seen the whole phrase, as training's i_super
    is read), every other word for itself, moved by the tokens spliced in before it, and the
    end of text for the end of text. Padding stays where it is: it has no word of its own,
    its encoding is told apart by its position, and a padding key moved against its value
    wrecked the image (fidelity 0.19 against 0.70 on the control ring; docs/runtime.md,
    "Global key locking"); where the longer text still holds words, it reads the end of
    text. With that map, a key read from the supercategory prompt sits beside the value it
    goes with, however many tokens the supercategory has."""
    length = len(ids)
    end = list(ids).index(eos, 1)
    body: list[int] = []
    stands = []  # where each word of the prompt ends up, counting the start token
    for token in ids[1:end]:
        body += words.get(token, [token])
        stands.append(len(body))
    body = body[:length - 2]  # room for the start and end-of-text tokens
    eos_at = 1 + len(body)
    tail = list(ids[end:])  # the end of text and the padding after it
    spliced = [ids[0], *body, *tail][:length]
    # a word cut off by the longer text stands for the end of text (it has seen all there is)
    take = [0, *(min(t, eos_at) for t in stands), eos_at,
            *(max(k, eos_at) for k in range(end + 1, length))]
    return spliced, take


def hidden_of(pipe: Any, encoder: Any, ids: Tensor) -> Tensor:
    """What the UNet reads of one encoder: the last hidden state, or SDXL's penultimate."""
    if is_xl(pipe):
        out = encoder(ids.to(encoder.device), output_hidden_states=True)
        hidden: Tensor = out.hidden_states[-2]
        return hidden
    last: Tensor = encoder(ids.to(encoder.device))[0]
    return last


def encode_ids(pipe: Any, ids: Sequence[Tensor]) -> Tensor:
    """The UNet's text input [B, 77, D] from each encoder's ids (one per `pairs`)."""
    parts = [hidden_of(pipe, encoder, i) for (_, encoder), i in zip(pairs(pipe), ids,
                                                                    strict=True)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def encode(pipe: Any, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
    """(the UNet's text input [B, 77, D], the first tokenizer's ids [B, 77]). The concept
    token's placeholder is one added token in each tokenizer, at the same position."""
    ids = [tokenize(tokenizer, prompts) for tokenizer, _ in pairs(pipe)]
    return encode_ids(pipe, ids), ids[0].to(device_of(pipe))


def pooled(pipe: Any, prompts: Sequence[str]) -> Tensor:
    """SDXL's pooled text [B, P]: the second encoder's projection at the end of the text."""
    tokenizer, encoder = pairs(pipe)[1]
    ids = tokenize(tokenizer, prompts).to(encoder.device)
    text_embeds: Tensor = encoder(ids).text_embeds
    return text_embeds


def added_conditions(pipe: Any, prompts: Sequence[str], size: int) -> dict[str, Tensor] | None:
    """SDXL's `added_cond_kwargs` for a batch at `size` px: the pooled text of `prompts` and
    the six size numbers (original size, crop corner 0, 0, target size); None otherwise."""
    if not is_xl(pipe):
        return None
    embeds = pooled(pipe, prompts)
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=embeds.dtype,
                            device=embeds.device).expand(len(prompts), -1)
    return {"text_embeds": embeds, "time_ids": time_ids}
