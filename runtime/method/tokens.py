"""Concept tokens in a stock tokenizer and text encoder, without touching the base weights."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

# A concept token in a prompt, as the language defines it (docs/language.md; the runtime may
# not import the compiler's template module, so the pattern is restated here).
TOKEN = re.compile(r"(?<![A-Za-z0-9_-])[A-Za-z_][A-Za-z0-9_-]*\*")


def placeholder(token: str) -> str:
    """The tokenizer-side stand-in for a concept token. Concept tokens are case-sensitive
    but CLIP's tokenizer lowercases (`Me*` would become `me*`), so each token is mapped to
    a lowercase, collision-free name derived from its exact spelling."""
    return f"<pf-{hashlib.sha256(token.encode('utf-8')).hexdigest()[:12]}>"


def leading_words(supercategory: str) -> str:
    """The words of a supercategory phrase before its last ("purple and yellow striped" of
    "purple and yellow striped diamond"; "" of one word): the context a concept's token is
    read in, in training and rendering alike, while the token stands for the last word
    (docs/runtime.md, "The supercategory's leading words")."""
    return " ".join(supercategory.split()[:-1])


def stands_for(supercategory: str, context: str) -> str:
    """What a token read after `context` stands for: the supercategory less those words (its
    last word; the whole supercategory when there is no context)."""
    return " ".join(supercategory.split()[len(context.split()):])


def ends_with_words(text: str, words: Sequence[str]) -> bool:
    """Whether `text`'s last words are `words`, ignoring case and runs of white space, as
    CLIP's tokenizer does."""
    said = text.split()
    return len(said) >= len(words) and \
        [w.lower() for w in said[len(said) - len(words):]] == [w.lower() for w in words]


def with_context(prompt: str, contexts: Mapping[str, str]) -> str:
    """`prompt` with each concept token of `contexts` preceded by its context words, unless
    the prompt already has those words right before it ("a purple badge*" gets "purple and
    yellow striped" once: "a purple purple and yellow striped badge*" would be a new prompt,
    but a prompt that already says the words keeps them once). Matching ignores case and
    runs of white space, as CLIP's tokenizer does."""

    def expand(m: re.Match[str]) -> str:
        words = contexts.get(m.group(), "").split()
        if not words:
            return m.group()
        if ends_with_words(prompt[:m.start()], words):
            return m.group()
        return " ".join(words) + " " + m.group()

    return TOKEN.sub(expand, prompt)


def rewrite(prompt: str, tokens: Iterable[str]) -> str:
    """`prompt` with each known concept token replaced by its placeholder."""
    known = set(tokens)
    return TOKEN.sub(lambda m: placeholder(m.group()) if m.group() in known else m.group(),
                     prompt)


class ExtendedEmbedding(nn.Module):
    """The text encoder's token embedding plus one learned row per concept token.

    The base `nn.Embedding` is kept as it is (frozen, bit-identical: invariant 5 of
    docs/runtime.md); ids at or above its vocabulary size are looked up in `vectors`."""

    def __init__(self, base: nn.Embedding) -> None:
        super().__init__()
        self.base = base
        self.vectors = nn.ParameterDict()  # str(token id) -> [D]

    @property
    def weight(self) -> Tensor:  # some callers read `.weight` (dtype, device, width)
        return self.base.weight

    def set_vector(self, token_id: int, vector: Tensor, trainable: bool = False) -> None:
        if token_id < self.base.num_embeddings:
            raise ValueError(f"token id {token_id} belongs to the base vocabulary")
        row = vector.detach().to(self.base.weight.device, torch.float32).clone()
        self.vectors[str(token_id)] = nn.Parameter(row, requires_grad=trainable)

    def forward(self, input_ids: Tensor) -> Tensor:
        vocab = self.base.num_embeddings
        out: Tensor = self.base(input_ids.clamp(max=vocab - 1))  # [B, T, D]
        for key, vector in self.vectors.items():
            hit = (input_ids == int(key)).unsqueeze(-1)  # [B, T, 1]
            out = torch.where(hit, vector.to(out.dtype), out)
        return out


def extended_embedding(text_encoder: Any) -> ExtendedEmbedding:
    """The text encoder's ExtendedEmbedding, installed on first use."""
    current = text_encoder.get_input_embeddings()
    if isinstance(current, ExtendedEmbedding):
        return current
    if not isinstance(current, nn.Embedding):
        raise TypeError(f"unsupported token embedding {type(current).__name__}")
    extended = ExtendedEmbedding(current)
    text_encoder.set_input_embeddings(extended)
    return extended


def remove_extension(text_encoder: Any) -> None:
    """Put the original embedding back (the tokenizer keeps its added tokens, harmlessly)."""
    current = text_encoder.get_input_embeddings()
    if isinstance(current, ExtendedEmbedding):
        text_encoder.set_input_embeddings(current.base)


def is_extended(text_encoder: Any) -> bool:
    """Whether concept tokens are installed in the text encoder."""
    return isinstance(text_encoder.get_input_embeddings(), ExtendedEmbedding)


def drop_concept(tokenizer: Any, text_encoder: Any, token: str) -> None:
    """Forget `token`'s learned row (its placeholder stays in the tokenizer, unused)."""
    extended = extended_embedding(text_encoder)
    key = str(token_id(tokenizer, token))
    if key in extended.vectors:
        del extended.vectors[key]


def token_id(tokenizer: Any, token: str) -> int:
    """The id of concept token `token` (its placeholder), added to the tokenizer if new."""
    name = placeholder(token)
    if name not in tokenizer.get_vocab():
        tokenizer.add_tokens([name])
    ids = tokenizer.convert_tokens_to_ids([name])
    if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer cannot represent the concept token {token!r}")
    return int(ids[0])


def add_concepts(tokenizer: Any, text_encoder: Any, vectors: Mapping[str, Tensor],
                 trainable: bool = False) -> dict[str, int]:
    """Registers each token with its embedding vector; returns token -> id."""
    extended = extended_embedding(text_encoder)
    ids = {}
    for token, vector in vectors.items():
        ids[token] = token_id(tokenizer, token)
        extended.set_vector(ids[token], vector, trainable)
    return ids


def positions(input_ids: Tensor, ids: Tensor | int) -> Tensor:
    """Boolean [B, T] mask of the positions holding any of `ids` (found by token id, never by
    word index, which shifts when a word splits into several tokens)."""
    wanted = torch.as_tensor(ids, device=input_ids.device).reshape(-1)
    return (input_ids.unsqueeze(-1) == wanted).any(-1)
