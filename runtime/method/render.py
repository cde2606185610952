"""Concepts applied to a stock diffusers pipeline, and rendering with them (one call each)."""

from __future__ import annotations

import numbers
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..files.store import cache_root
from . import text
from .artifact import Concept, load
from .covariance import cinv_for
from .fingerprint import base_fingerprint
from .key_locking import make_basis, strength_to_beta
from .layers import cross_attention_layers
from .processor import (
    SUPER_KWARG,
    ConceptSet,
    ConceptState,
    Installed,
    install,
    is_installed,
)
from .tokens import (
    TOKEN,
    add_concepts,
    drop_concept,
    is_extended,
    placeholder,
    remove_extension,
    rewrite,
    with_context,
)

# Images per pipeline call when none is given: one on the CPU, where torch's kernels give
# different bits for different batch sizes and even for different places in one batch;
# on CUDA a batch of 8, where throughput matters more than the same bits in any batch.
CPU_BATCH, CUDA_BATCH = 1, 8
DEFAULT_STRENGTH = 0.5  # the published default gate (β = 0.7 when locking locally)


@dataclass(eq=False)
class Applied:
    """Concepts installed in a pipeline. Call it like the pipeline, with concept tokens in
    the prompt; `remove()` (or leaving a `with`) restores the pipeline."""

    pipe: Any
    concepts: dict[str, Concept]
    cinv: Tensor
    installed: Installed
    state: ConceptState = field(default_factory=ConceptState)
    batch_size: int = CPU_BATCH  # images per pipeline call, always exactly this many
    removed: bool = False  # remove() gave the pipeline back

    def __enter__(self) -> Applied:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self, *tokens: str) -> None:
        """No tokens: take every concept out and give the pipeline back as it was (its
        processors and token embedding; the tokenizer keeps its unused placeholders).
        With tokens: unload only those concepts; the others stay applied."""
        if not tokens:
            self.state.deactivate()
            self.installed.restore()
            for _, encoder in text.pairs(self.pipe):
                remove_extension(encoder)
            self.removed = True
            return
        missing = [t for t in tokens if t not in self.concepts]
        if missing:
            raise ValueError(f"{', '.join(missing)}: not applied (applied: "
                             f"{', '.join(self.concepts) or 'none'})")
        for token in tokens:
            for tokenizer, encoder in text.pairs(self.pipe):
                drop_concept(tokenizer, encoder, token)
            del self.concepts[token]

    def tokens_in(self, prompts: Sequence[str]) -> list[str]:
        """The loaded concept tokens the prompts name, in the order they were loaded (not of
        appearance: the concept basis, and so every image, must not depend on prompt order)."""
        seen = {t for p in prompts for t in TOKEN.findall(p)}
        return [t for t in self.concepts if t in seen]

    def concept_set(self, tokens: Sequence[str], strength: float | Mapping[str, float]
                    ) -> ConceptSet | None:
        """The loaded concepts `tokens`, gated by their strengths, as one set (None: none).
        A token the strength mapping leaves out gets DEFAULT_STRENGTH."""
        if not tokens:
            return None
        chosen = [self.concepts[t] for t in tokens]
        locks = {c.lock for c in chosen}
        lock = locks.pop() if len(locks) == 1 else "local"  # mixed modes: lock locally
        betas = [strength_to_beta(strength.get(t, DEFAULT_STRENGTH) if isinstance(
            strength, Mapping) else strength, lock) for t in tokens]
        device = self.pipe.unet.device
        basis = make_basis(torch.stack([c.i_star for c in chosen]).to(device), self.cinv.to(device))
        layers = list(chosen[0].o_k)
        return ConceptSet.make(
            basis, {n: torch.stack([c.o_k[n] for c in chosen]).to(device) for n in layers},
            {n: torch.stack([c.o_v[n] for c in chosen]).to(device) for n in layers},
            beta=torch.tensor(betas), lock=lock)

    def with_context(self, prompt: str) -> str:
        """The prompt as the text encoder reads it: each concept token after its context
        words (`Concept.context`, once), as the concept was trained."""
        return with_context(prompt, {t: c.context for t, c in self.concepts.items()})

    def supercategory_prompt(self, prompt: str) -> str:
        """The prompt with each concept token (after its context words) replaced by what it
        stands for: its first supercategory, whole."""
        return TOKEN.sub(lambda m: self.concepts[m.group()].stands_for
                         if m.group() in self.concepts else m.group(),
                         self.with_context(prompt))

    def __call__(self, prompt: str | Sequence[str], *, seed: int | Sequence[int] = 0,
                 strength: float | Mapping[str, float] = DEFAULT_STRENGTH,
                 negative_prompt: str = "", **pipe_kwargs: Any) -> list[Any]:
        """Images for the prompts (one per prompt), image i seeded by its own generator.

        Each prompt is edited by the concepts it names and by no other, whatever else is in
        its pipeline call (per row of the encoder batch, its unconditional row included);
        after the call no concept is active. Prompts go through the pipeline in chunks of
        exactly `batch_size`, the last one padded with copies (their images dropped), so
        every call has the same shape. On the CPU the default is one image per call: torch's
        CPU kernels (oneDNN convolutions, GroupNorm) give slightly different bits for
        different batch sizes and for different places in a batch, and image k must not
        depend on what else is rendered with it (docs/build.md)."""
        if self.removed:
            raise RuntimeError("these concepts were removed from the pipeline: apply them again")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        seeds = _seeds(seed, len(prompts))
        self._warn_unknown(prompts)
        prompts = [self.with_context(p) for p in prompts]
        named = [tuple(self.tokens_in([p])) for p in prompts]
        sets: dict[tuple[str, ...], ConceptSet | None] = {}
        for names in named:
            if names not in sets:
                sets[names] = self.concept_set(names, strength)
        chosen = [sets[names] for names in named]
        # a row is edited where its concepts were trained to be: at every position, or, when
        # all of them were trained up to it, up to its prompt's end-of-text token
        whole = [any(self.concepts[t].positions == "all" for t in names) for names in named]
        images: list[Any] = []
        try:
            for start in range(0, len(prompts), self.batch_size):
                part = slice(start, start + self.batch_size)
                images += self._chunk(prompts[part], seeds[part], chosen[part], whole[part],
                                      negative_prompt, pipe_kwargs)
        finally:
            self.state.deactivate()  # outside a call the pipeline is the base model
        return images

    def _chunk(self, prompts: list[str], seeds: list[int], chosen: list[ConceptSet | None],
               whole: list[bool], negative: str, pipe_kwargs: dict[str, Any]) -> list[Any]:
        """One pipeline call of exactly `batch_size` images; the images of `prompts`."""
        pad = self.batch_size - len(prompts)
        guided = float(pipe_kwargs.get("guidance_scale", 7.5)) > 1.0
        rows = chosen + chosen[-1:] * pad
        chunk, chunk_seeds = _padded(prompts, seeds, self.batch_size)
        lengths = self._lengths(chunk, whole + whole[-1:] * pad, negative, guided)
        self.state.activate_rows(rows + rows if guided else rows,  # [uncond; cond] rows
                                 lengths=lengths)
        kwargs = self._embeddings(chunk, negative, guided, pipe_kwargs)
        generators = [torch.Generator("cpu").manual_seed(s) for s in chunk_seeds]
        done = list(self.pipe(generator=generators, **kwargs).images)
        return done[:len(prompts)]

    def _lengths(self, prompts: list[str], whole: list[bool], negative: str, guided: bool
                 ) -> Tensor | None:
        """Per encoder row ([uncond; cond] under guidance), how many positions the edit
        touches: the prompt's own (`text.prompt_lengths`), or all where `whole`; None when
        every row is edited at every position (the processors then skip the cut)."""
        if all(whole):
            return None
        tokenizer = self.pipe.tokenizer
        texts = [rewrite(p, self.concepts) for p in prompts]
        found = text.prompt_lengths(tokenizer, text.tokenize(tokenizer, texts))
        if guided:
            negatives = text.tokenize(tokenizer, [negative] * len(prompts))
            found = torch.cat([text.prompt_lengths(tokenizer, negatives), found])
        everything = torch.tensor(whole * (2 if guided else 1))
        return torch.where(everything, int(tokenizer.model_max_length), found)

    def _warn_unknown(self, prompts: Sequence[str]) -> None:
        unknown = sorted({t for p in prompts for t in TOKEN.findall(p)} - set(self.concepts))
        if unknown:
            warnings.warn(f"{', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not "
                          f"an applied concept and will be drawn as plain text (applied: "
                          f"{', '.join(self.concepts) or 'none'})", UserWarning, stacklevel=3)

    def _embeddings(self, prompts: list[str], negative: str, guided: bool,
                    pipe_kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The pipeline's keyword arguments: the caller's, the prompt encodings and, when a
        row locks keys globally, the supercategory prompts' (merged into the caller's own
        cross_attention_kwargs)."""
        out = dict(pipe_kwargs)
        with torch.no_grad():
            negatives = [negative] * len(prompts)
            encoded = _encode_prompt(self.pipe, [rewrite(p, self.concepts) for p in prompts],
                                     guided, negatives)
            cond, uncond = encoded[0], encoded[1]
            out.update(prompt_embeds=cond, negative_prompt_embeds=uncond)
            if text.is_xl(self.pipe):
                # SDXL's pooled text from the supercategory prompt, as in training: the
                # concept reaches the UNet only through the gated cross-attention, and a
                # prompt without a concept gets the base model's pooled text
                sup = _encode_prompt(self.pipe, [self.supercategory_prompt(p) for p in prompts],
                                     False, None)
                out.update(pooled_prompt_embeds=sup[2], negative_pooled_prompt_embeds=encoded[3])
            if self.state.needs_super:
                keys = self.supercategory_encodings(prompts).to(cond.dtype)
                both = torch.cat([uncond, keys]) if guided else keys
                out["cross_attention_kwargs"] = {**(pipe_kwargs.get("cross_attention_kwargs")
                                                    or {}), SUPER_KWARG: both}
        return out

    def supercategory_encodings(self, prompts: Sequence[str]) -> Tensor:
        """What global key locking reads its keys from [B, 77, D]: the prompts, read with each
        concept's context words before its token as `__call__` reads them, encoded with what
        each token stands for (`Concept.stands_for`) in its place, position by position in
        line with the prompts' own encodings (`text.splice`): what spans several tokens
        ("teddy bear" of a concept without context words) is read at its last, and the words
        after it where they sit in the prompt."""
        texts = [rewrite(self.with_context(p), self.concepts) for p in prompts]
        spliced, takes = [], None
        for tokenizer, _ in text.pairs(self.pipe):
            words = {int(tokenizer.convert_tokens_to_ids(placeholder(token))):
                     text.word_ids(tokenizer, concept.stands_for)
                     for token, concept in self.concepts.items()}
            rows = [text.splice(row.tolist(), words, int(tokenizer.eos_token_id))
                    for row in text.tokenize(tokenizer, texts)]
            spliced.append(torch.tensor([ids for ids, _ in rows]))
            found = [take for _, take in rows]
            if takes is not None and found != takes:
                raise RuntimeError("the text encoders' tokenizers split the supercategory "
                                   "prompts differently")
            takes = found
        hidden = text.encode_ids(self.pipe, spliced)
        index = torch.tensor(takes, device=hidden.device)[..., None]
        return torch.gather(hidden, 1, index.expand(-1, -1, hidden.shape[-1]))


def _encode_prompt(pipe: Any, prompts: list[str], guided: bool,
                   negatives: list[str] | None) -> tuple[Any, ...]:
    """The pipeline's own prompt encoding, by keyword (SDXL's takes a second prompt after
    the first): (cond, uncond) for SD 1.x/2.x, (cond, uncond, pooled, uncond pooled) for
    SDXL."""
    found: tuple[Any, ...] = pipe.encode_prompt(
        prompt=prompts, device=pipe.unet.device, num_images_per_prompt=1,
        do_classifier_free_guidance=guided, negative_prompt=negatives)
    return found


def _seeds(seed: int | Sequence[int], count: int) -> list[int]:
    """One int seed per prompt; any integer type (numpy's too) is accepted."""
    if isinstance(seed, numbers.Integral):
        return [int(seed)] * count
    if isinstance(seed, str) or not isinstance(seed, Iterable):
        raise TypeError(f"seed must be an integer or one integer per prompt, got "
                        f"{type(seed).__name__}")
    seeds = list(seed)
    if not all(isinstance(s, numbers.Integral) for s in seeds):
        raise TypeError("seed must be an integer or one integer per prompt")
    if len(seeds) != count:
        raise ValueError("give one seed per prompt")
    return [int(s) for s in seeds]


def _padded(prompts: list[str], seeds: list[int], size: int) -> tuple[list[str], list[int]]:
    """The chunk filled up to `size` with copies of its last prompt and seed."""
    pad = size - len(prompts)
    return prompts + prompts[-1:] * pad, seeds + seeds[-1:] * pad


def load_for(pipe: Any, path: Path) -> Concept:
    """The concept file at `path`, checked against this pipeline as it is read: base model
    fingerprint, cross-attention layers and widths, token-embedding and text widths (an
    embedding of the wrong size would otherwise fail later, inside rendering); locked keys
    are rebuilt from the pipeline's W_K. Raises ArtifactError."""
    cross = cross_attention_layers(pipe.unet)
    # SDXL: the token's rows in both encoders side by side, and both encoders' widths
    return load(path, expect_base_fingerprint=base_fingerprint(pipe),
                expect_layers={n: int(a.to_k.out_features) for n, a in cross.items()},
                expect_dims=(sum(text.token_widths(pipe)),
                             sum(int(e.config.hidden_size) for _, e in text.pairs(pipe))),
                key_weights={n: a.to_k.weight for n, a in cross.items()})


def _load_all(pipe: Any, items: Sequence[Path | Concept], layers: Mapping[str, int]
              ) -> dict[str, Concept]:
    """Every concept, each file checked against this pipeline (`load_for`)."""
    concepts: dict[str, Concept] = {}
    for item in items:
        concept = item if isinstance(item, Concept) else load_for(pipe, Path(item))
        if concept.layers != layers:
            raise ValueError(f"concept {concept.token!r} was made for other cross-attention "
                             "layers than this pipeline's")
        if concept.token in concepts:
            raise ValueError(f"two concepts use the token {concept.token!r}")
        concepts[concept.token] = concept
    return concepts


def apply_concepts(pipe: Any, concepts: Sequence[str | os.PathLike[str] | Concept], *,
                   cache_dir: Path | None = None, captions: Path | None = None,
                   cinv: Tensor | None = None, batch_size: int | None = None) -> Applied:
    """Load concept files (or Concepts) into a stock diffusers StableDiffusionPipeline.

    Validates each file against this pipeline (base model fingerprint, layers, sizes) before
    anything costly or lasting happens, then gets C⁻¹, adds the tokens to its tokenizer and
    installs the Perfusion processors. The pipeline's base weights are never modified;
    `Applied.remove()` undoes the rest. C⁻¹ comes from the cache (estimated on the shipped
    caption corpus, or on `captions`) unless given as `cinv`. A pipeline takes one Applied
    at a time: remove it before applying again."""
    if batch_size is None:
        batch_size = CPU_BATCH if pipe.unet.device.type == "cpu" else CUDA_BATCH
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if is_installed(pipe.unet) or any(is_extended(e) for _, e in text.pairs(pipe)):
        raise ValueError("concepts are already applied to this pipeline (or it is training): "
                         "call Applied.remove() on the one apply_concepts returned (or leave "
                         "its `with` block) first; Applied.remove(token) unloads one concept")
    cross = cross_attention_layers(pipe.unet)
    layers = {n: int(a.to_k.out_features) for n, a in cross.items()}
    loaded = _load_all(pipe, [c if isinstance(c, Concept) else Path(c) for c in concepts],
                       layers)
    cinv_print = None
    if not loaded:  # nothing to gate: C⁻¹ (minutes to estimate on a CPU) is not needed
        cinv = torch.zeros(0, 0)
    elif cinv is None:
        cinv, cinv_print = cinv_for(pipe, cache_root(cache_dir), captions)
    for concept in loaded.values():
        if cinv_print is not None and concept.cinv_fingerprint != cinv_print:
            raise ValueError(f"concept {concept.token!r} was trained with another C⁻¹ "
                             f"({concept.cinv_fingerprint[:12]}, here {cinv_print[:12]})")
    widths = text.token_widths(pipe)
    for k, (tokenizer, encoder) in enumerate(text.pairs(pipe)):
        add_concepts(tokenizer, encoder,
                     {t: torch.split(c.embedding, widths)[k] for t, c in loaded.items()})
    state = ConceptState()
    return Applied(pipe, loaded, cinv.float(), install(pipe.unet, state), state, batch_size)
