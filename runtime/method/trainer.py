"""Trains one concept with Perfusion's key-locked rank-1 edit on a stock diffusers pipeline."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from perfusion_dsl.plan import LearnOptions

from . import checkpoint as checkpoints
from . import noise as noise_schedule
from . import text
from .artifact import Concept, locked_key_targets
from .attention_mask import attention_maps, binarise
from .device import Precision
from .images import load_images, load_masks
from .key_locking import make_basis
from .layers import cross_attention_layers
from .processor import ConceptState, install
from .tokens import (
    add_concepts,
    ends_with_words,
    extended_embedding,
    leading_words,
    positions,
    remove_extension,
    rewrite,
    stands_for,
    with_context,
)

EMA_DECAY = 0.99  # i* is an exponential moving average (docs/runtime.md)
ADAMW_SLOTS = ("step", "exp_avg", "exp_avg_sq")  # AdamW's state per parameter (no amsgrad)

log = logging.getLogger(__name__)


_PLANNED = LearnOptions()  # the compiler's defaults: the one declaration of them


@dataclass(frozen=True)
class Recipe:
    """Training hyperparameters: a plan's learn options as the trainer reads them."""

    steps: int = _PLANNED.steps
    batch: int = _PLANNED.batch
    lr: float = _PLANNED.lr
    embedding_lr: float = _PLANNED.embedding_lr
    resolution: int | None = _PLANNED.resolution  # None: the model's native resolution
    flip: bool = _PLANNED.flip
    seed: int = _PLANNED.seed
    templates: tuple[str, ...] = _PLANNED.templates
    beta: float = _PLANNED.beta
    tau: float = _PLANNED.tau
    mask: str = "none"  # "none", "attention", or "files" (Subject.masks holds them)
    micro_batch: int | None = None  # images per forward pass; None: the whole batch
    # each image's own caption template, in Subject.images order (the `captions` option);
    # empty: every image is captioned from `templates`
    captions: tuple[str, ...] = ()

    @property
    def caption_templates(self) -> tuple[str, ...]:
        """The templates the captions are made from: the images' own, else `templates`."""
        return self.captions or self.templates

    @classmethod
    def from_options(cls, options: LearnOptions, micro_batch: int | None = None) -> Recipe:
        return cls(steps=options.steps, batch=options.batch, lr=options.lr,
                   embedding_lr=options.embedding_lr, resolution=options.resolution,
                   flip=options.flip, seed=options.seed, templates=options.templates,
                   beta=options.beta, tau=options.tau,
                   mask=options.mask if isinstance(options.mask, str) else "files",
                   micro_batch=micro_batch,
                   captions=() if isinstance(options.captions, str) else options.captions)


@dataclass(frozen=True)
class Subject:
    """What to learn: a plan ConceptStep's fields, with image paths made absolute."""

    token: str
    supercategories: tuple[str, ...]
    adjectives: tuple[str, ...]
    images: tuple[Path, ...]
    masks: tuple[Path, ...] | None = None  # one per image, or None (no loss mask)
    key: str = "0" * 64
    base_model: str = ""
    # the sha256 the images' (and masks') bytes must have: those the key was computed from
    image_sha256: tuple[str, ...] | None = None
    mask_sha256: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Progress:
    step: int
    steps: int
    loss: float
    elapsed: float  # seconds since this call's first step (after a resume: since resuming)
    resumed_from: int = 0  # the steps a checkpoint already held

    @property
    def eta(self) -> float:
        done = self.step - self.resumed_from
        return self.elapsed / max(done, 1) * (self.steps - self.step)


class TrainingError(RuntimeError):
    """Training cannot go on; nothing is published."""


class TrainingInterrupted(Exception):  # not a TrainingError: the caller asked for it
    """stop() asked training to end after `step` completed steps. `checkpoint`: the file that
    resumes it from there (pass it to train() again), or None when none was written."""

    def __init__(self, step: int, checkpoint: Path | None) -> None:
        how = (f"rerun to resume from the checkpoint {checkpoint}" if checkpoint is not None
               else "no checkpoint was saved, so a rerun starts over")
        super().__init__(f"training stopped after step {step}; {how}")
        self.step = step
        self.checkpoint = checkpoint


class NonFiniteLoss(TrainingError):
    def __init__(self, step: int, loss: float) -> None:
        super().__init__(f"the loss became {loss} at step {step}; training stopped and "
                         "nothing was saved (try a lower `lr` or `embedding_lr`)")
        self.step = step


def phrase(subject: str, adjectives: Sequence[str]) -> str:
    """`tall, bearded me*`: the adjectives are asserted next to the subject."""
    return f"{', '.join(adjectives)} {subject}" if adjectives else subject


def captions(template: str, subject: str, adjectives: Sequence[str]) -> str:
    return template.replace("{}", phrase(subject, adjectives))


def encode(pipe: Any, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
    """(the UNet's text input [B, 77, D], the first tokenizer's ids [B, 77]); no attention
    mask (`text.encode`: SDXL's two encoders side by side)."""
    return text.encode(pipe, prompts)


def super_caption(tokenizer: Any, template: str, sup: str, adjectives: Sequence[str]
                  ) -> tuple[Tensor, range]:
    """Token ids [T] of `template` with the supercategory (after the adjectives) in place of
    `{}`, and the positions of the supercategory's own tokens in them.

    The ids are spliced from the tokens of the text before `{}`, the adjectives, the word and
    the text after, so the positions are those of the substitution even when the template
    repeats the word ("a photo of a {} in a dog bed"). That is also how the concept token's
    own caption is tokenized (its placeholder is an added token, split from its
    neighbours); where `{}` sits between spaces or punctuation it equals the tokenizer's
    result (`test_super_caption_equals_the_tokenizer_on_word_boundaries`)."""
    before, _, after = template.partition("{}")
    head = text.word_ids(tokenizer, before) + text.word_ids(tokenizer, ", ".join(adjectives))
    word = text.word_ids(tokenizer, sup)
    tail = text.word_ids(tokenizer, after.replace("{}", phrase(sup, adjectives)))
    room = int(tokenizer.model_max_length) - 2  # BOS and EOS
    if not word or len(head) + len(word) > room:
        raise TrainingError(f"the supercategory {sup!r} does not fit in the text encoder's "
                            f"{room + 2} tokens in the template {template!r}")
    body = (head + word + tail)[:room]
    ids = [int(tokenizer.bos_token_id), *body, int(tokenizer.eos_token_id)]
    ids += [int(tokenizer.pad_token_id)] * (room + 2 - len(ids))
    return torch.tensor(ids), range(1 + len(head), 1 + len(head) + len(word))


@torch.no_grad()
def super_encoding(pipe: Any, subject: Subject, templates: Sequence[str]) -> Tensor:
    """i_super [D]: the encoder output at the supercategory's last token where it replaced
    the concept token, in the captions with the supercategory in place of the token; mean
    over supercategories and captions. Of a word of several tokens ("sunflower" = "sun",
    "flower") the last is used: the text encoder is causal, so only the last token has seen
    the whole word, as the concept's own single token stands for the whole concept."""
    rows = []
    for sup in subject.supercategories:
        hidden, spans = _super_hidden(pipe, templates, sup, subject.adjectives)
        for b, span in enumerate(spans):
            rows.append(hidden[b, span[-1]].float())
    return torch.stack(rows).mean(0)


def _super_hidden(pipe: Any, templates: Sequence[str], sup: str, adjectives: Sequence[str]
                  ) -> tuple[Tensor, list[range]]:
    """The UNet's text input for `templates` with `sup` in place of the token, and where the
    word is in each. Each encoder's tokenizer splices its own ids; they split text alike
    (SDXL's two share one vocabulary), so the word sits at the same positions in both."""
    ids, spans = [], []
    for tokenizer, _ in text.pairs(pipe):
        spliced = [super_caption(tokenizer, t, sup, adjectives) for t in templates]
        ids.append(torch.stack([i for i, _ in spliced]))
        spans.append([span for _, span in spliced])
    if any(other != spans[0] for other in spans[1:]):
        raise TrainingError(f"the text encoders' tokenizers split {sup!r} differently")
    return text.encode_ids(pipe, ids), spans[0]


@torch.no_grad()
def initial_embedding(pipe: Any, words: str) -> Tensor:
    """The mean input embedding of the tokens of `words` (the word the token stands for: the
    first supercategory, or its last word when the words before it stand before the token),
    in each encoder's own table, side by side (SDXL: a row for each encoder)."""
    starts = []
    for tokenizer, encoder in text.pairs(pipe):
        base = extended_embedding(encoder).base
        ids = torch.tensor(text.word_ids(tokenizer, words), device=base.weight.device)
        starts.append(base(ids).float().mean(0))
    return torch.cat(starts)


@torch.no_grad()
def encode_latents(pipe: Any, pixels: Tensor) -> Tensor:
    """VAE latents of every training image, once (docs/runtime.md), deterministic (the mean)."""
    vae = pipe.vae
    out = []
    for chunk in torch.split(pixels, 8):
        dist = vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist
        out.append(dist.mean.float() * vae.config.scaling_factor)
    return torch.cat(out)


def _vae_scale(pipe: Any) -> int:
    return 1 << (len(pipe.vae.config.block_out_channels) - 1)


def native_resolution(pipe: Any) -> int:
    return int(pipe.unet.config.sample_size) * _vae_scale(pipe)


class Method:
    """What a training optimises and how each step edits the UNet: Perfusion's, the only one
    the language reaches. Keys locked (o*_K = W_K i_super, never optimised: invariant 4),
    o*_V and the token embedding trained, the gated edit on in every step. The benchmarks
    subclass it for their ablations (`bench/ablations.py`); the trainer has this one path."""

    name = "perfusion"  # recorded in a checkpoint's identity
    # where the edit applies: "prompt", each caption's start token, words and end-of-text
    # token only; "all", every text position, padding included (the benchmarks' ablation
    # `AllPositions`, and every concept file before format 3): it leaks twice as much into
    # the rest of the image for the same fidelity (docs/runtime.md, "Which positions the
    # edit touches"). The artifact records it, and rendering follows it.
    positions = "prompt"
    # whether the first supercategory's leading words ("purple and yellow striped" of
    # "purple and yellow striped diamond") stand before the token, in training and rendering
    # alike, so that the token is read where the supercategory's last word is read for
    # i_super: one position cannot carry a whole phrase (docs/runtime.md, "The
    # supercategory's leading words"). The benchmarks' ablation `NoContext` turns it off.
    context = True

    def key_target(self, locked: Tensor) -> Tensor:
        """o*_K of one layer, from its locked value W_K i_super: that value, a constant."""
        return locked

    def trainable(self, run: _Run) -> dict[str, nn.Parameter]:
        """The optimised parameters by stable name: the embedding (SDXL: and the second
        encoder's, `embedding_2`), then o*_V per layer."""
        rows = {"embedding": run.embedding}
        if run.embedding_2 is not None:
            rows["embedding_2"] = run.embedding_2
        return {**rows, **{f"o_v.{n}": p for n, p in run.o_v.items()}}

    def edit(self, state: ConceptState, run: _Run, i_star: Tensor) -> None:
        """Switch the gated edit on for this step (every prompt names the concept)."""
        names = list(run.o_k)
        state.activate(make_basis(i_star[None], run.cinv),
                       {n: run.o_k[n][None] for n in names},
                       {n: run.o_v[n][None] for n in names},
                       beta=run.recipe.beta, lock="local", tau=run.recipe.tau)

    def stored_i_super(self, run: _Run) -> Tensor | None:
        """What the artifact stores for the keys: i_super (locked keys are rebuilt from it)."""
        return run.i_super


PERFUSION = Method()


@dataclass
class _Run:
    """The tensors of one training run."""

    pipe: Any
    subject: Subject
    recipe: Recipe
    cinv: Tensor
    token_id: int
    embedding: nn.Parameter
    o_k: dict[str, Tensor]
    o_v: dict[str, nn.Parameter]
    latents: Tensor  # [N, C, h, w]
    masks: Tensor | None  # [N, 1, h, w] or None
    generator: torch.Generator
    precision: Precision | None = None
    i_star: Tensor | None = None
    i_super: Tensor | None = None  # [D]: o*_K = W_K · i_super while keys are locked
    losses: list[float] = field(default_factory=list)
    method: Method = PERFUSION
    embedding_2: nn.Parameter | None = None  # SDXL: the token's row in the second encoder
    noise: Any = None  # noise_schedule.schedule of the pipeline's scheduler
    context: str = ""  # the words before the token in every caption (`tokens.leading_words`)

    def __post_init__(self) -> None:
        if self.noise is None:
            self.noise = noise_schedule.schedule(self.pipe.scheduler)

    @property
    def embeddings(self) -> list[nn.Parameter]:
        """The token's learned row in each text encoder."""
        return [self.embedding] + ([self.embedding_2] if self.embedding_2 is not None else [])


def attention_maps_for(pipe: Any, subject: Subject, recipe: Recipe, latents: Tensor) -> Tensor:
    """[N, h, w] maps of the base model's cross-attention to the (first) supercategory, read in the
    first caption template with the supercategory in place of the token (each image's own
    caption when the recipe has them): every token of the substituted word, and only those
    (not a repetition of the word elsewhere)."""
    own = recipe.captions
    chosen = [own[k % len(own)] for k in range(latents.shape[0])] if own else \
        list(recipe.templates[:1])
    hidden, spans = _super_hidden(pipe, chosen, subject.supercategories[0], subject.adjectives)
    hit = torch.zeros(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    for row, span in enumerate(spans):
        hit[row, span.start:span.stop] = True
    generator = torch.Generator().manual_seed(recipe.seed)
    added = text.added_conditions(pipe, [captions(t, subject.supercategories[0],
                                                  subject.adjectives) for t in chosen],
                                  int(latents.shape[-1]) * _vae_scale(pipe))
    return attention_maps(pipe, latents, hidden.detach(), hit, generator, added)


def _targets(pipe: Any, i_super: Tensor, method: Method
             ) -> tuple[dict[str, Tensor], dict[str, nn.Parameter]]:
    """o*_K per layer from its locked value W_K i_super (`method.key_target`); o*_V starts
    at W_V i_super."""
    layers = cross_attention_layers(pipe.unet)
    # the artifact rebuilds locked keys with the same function when loading: bit-exact
    locked = locked_key_targets({n: a.to_k.weight for n, a in layers.items()}, i_super)
    o_k: dict[str, Tensor] = {}
    o_v = {}
    for name, attn in layers.items():
        w_v = attn.to_v.weight.detach().float()
        o_k[name] = method.key_target(locked[name].to(w_v.device))
        o_v[name] = nn.Parameter((w_v @ i_super).detach().clone())
    return o_k, o_v


@contextlib.contextmanager
def _frozen(pipe: Any) -> Iterator[None]:
    """The base modules in eval mode with no parameter requiring grad, for the duration; then
    each module's mode and each parameter's flag as they were."""
    modules = (pipe.unet, pipe.vae, *(encoder for _, encoder in text.pairs(pipe)))
    modes = [m.training for m in modules]
    flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    try:
        for module in modules:
            module.requires_grad_(False)
            module.eval()
        yield
    finally:
        for module, mode in zip(modules, modes, strict=True):
            module.train(mode)
        for param, wanted in flags:  # the parameters that were there (not a concept's own)
            param.requires_grad_(wanted)


@contextlib.contextmanager
def _checkpointing(unet: Any, wanted: bool) -> Iterator[None]:
    """diffusers' gradient checkpointing of the UNet on (when `wanted`), then as it was."""
    was = bool(getattr(unet, "is_gradient_checkpointing", False))
    if wanted and not was:
        unet.enable_gradient_checkpointing()
    try:
        yield
    finally:
        if wanted and not was:
            unet.disable_gradient_checkpointing()


def without_context(template: str, context: str, adjectives: Sequence[str]) -> str:
    """`template` less the context words where it already says them right before its `{}`
    ("a purple and yellow striped {} on the left" → "a {} on the left"; not when adjectives
    stand between): `with_context` puts them back before the token once, and i_super's
    caption, the supercategory in the token's place, then holds them once too, so that the
    token and the supercategory's last word are read in the same caption."""
    words = context.split()
    before, brace, after = template.partition("{}")
    if not words or not brace or adjectives or not ends_with_words(before, words):
        return template
    # the words before them, single-spaced (as CLIP's tokenizer reads them anyway)
    return " ".join([*before.split()[:-len(words)], brace]) + after


def _prepare(pipe: Any, subject: Subject, recipe: Recipe, cinv: Tensor,
             method: Method = PERFUSION) -> _Run:
    # the first supercategory's leading words stand before the token in every caption, and
    # the token for its last word (docs/runtime.md, "The supercategory's leading words")
    first = subject.supercategories[0]
    context = leading_words(first) if method.context else ""
    recipe = dataclasses.replace(
        recipe, templates=tuple(without_context(t, context, subject.adjectives)
                                for t in recipe.templates),
        captions=tuple(without_context(t, context, subject.adjectives) for t in recipe.captions))
    resolution = recipe.resolution or native_resolution(pipe)
    pixels = load_images(subject.images, resolution, recipe.flip, subject.image_sha256)
    latents = encode_latents(pipe, pixels)
    masks = None
    if subject.masks is not None:
        masks = load_masks(subject.masks, latents.shape[-1], recipe.flip, subject.mask_sha256)
    elif recipe.mask == "attention":
        masks = binarise(attention_maps_for(pipe, subject, recipe, latents))  # `mask: attention`
    start = initial_embedding(pipe, stands_for(first, context))
    rows: list[nn.Parameter] = []
    first_id = None
    for (tokenizer, encoder), part in zip(text.pairs(pipe), torch.split(
            start, text.token_widths(pipe)), strict=True):
        ids = add_concepts(tokenizer, encoder, {subject.token: part}, trainable=True)
        first_id = ids[subject.token] if first_id is None else first_id
        rows.append(extended_embedding(encoder).vectors[str(ids[subject.token])])
    assert first_id is not None
    if recipe.captions and len(recipe.captions) != len(subject.images):
        raise TrainingError(f"{len(recipe.captions)} captions for {len(subject.images)} images")
    i_super = super_encoding(pipe, subject, recipe.caption_templates)
    o_k, o_v = _targets(pipe, i_super, method)
    generator = torch.Generator().manual_seed(recipe.seed)
    return _Run(pipe, subject, recipe, cinv.float(), first_id, rows[0],
                o_k, o_v, latents, masks, generator, i_super=i_super, method=method,
                embedding_2=rows[1] if len(rows) > 1 else None, context=context)


def _batch(run: _Run, size: int) -> tuple[Tensor, Tensor | None, list[str], list[str]]:
    """Latents, masks, the captions with the token, and the same captions with the first
    supercategory in its place (SDXL's pooled text is read from those). Each image is
    captioned from a random template, or with its own caption when the recipe has them
    (a mirrored copy, after the originals in `latents`, with its original's)."""
    n = run.latents.shape[0]
    pick = torch.randint(0, n, (size,), generator=run.generator)
    own, templates = run.recipe.captions, run.recipe.templates
    if own:
        chosen = [own[int(k) % len(own)] for k in pick]
    else:
        which = torch.randint(0, len(templates), (size,), generator=run.generator)
        chosen = [templates[int(t)] for t in which]
    subject = run.subject
    contexts = {subject.token: run.context}
    prompts = [rewrite(with_context(captions(t, subject.token, subject.adjectives), contexts),
                       [subject.token]) for t in chosen]
    supers = [captions(t, subject.supercategories[0], subject.adjectives) for t in chosen]
    masks = run.masks[pick] if run.masks is not None else None
    return run.latents[pick], masks, prompts, supers


def _update_i_star(run: _Run, hidden: Tensor, ids: Tensor) -> Tensor:
    """i*: the encoder output at the token's positions (found by id), batch-meaned, as an
    exponential moving average (a buffer: detached, not a parameter)."""
    hit = positions(ids, run.token_id)
    current = hidden[hit].detach().float().mean(0)
    run.i_star = current if run.i_star is None else \
        EMA_DECAY * run.i_star + (1 - EMA_DECAY) * current
    return run.i_star


def masked_mse(pred: Tensor, target: Tensor, masks: Tensor | None) -> Tensor:
    """ε-prediction MSE; with masks, normalised per image (not per row: a known bug)."""
    err = (pred.float() - target.float()) ** 2  # [B, C, h, w]
    if masks is None:
        return err.mean()
    weight = masks.expand_as(err)
    per_image = (err * weight).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp_min(1e-8)
    return per_image.mean()


def _micro_step(run: _Run, state: ConceptState, size: int) -> Tensor:
    pipe = run.pipe
    latents, masks, prompts, supers = _batch(run, size)
    noise = torch.randn(latents.shape, generator=run.generator)
    steps = run.noise.config.num_train_timesteps
    t = torch.randint(0, steps, (size,), generator=run.generator)
    noisy = run.noise.add_noise(latents, noise, t)
    hidden, ids = encode(pipe, prompts)
    i_star = _update_i_star(run, hidden, ids)
    run.method.edit(state, run, i_star)
    # a method with positions "prompt" stops the edit at each caption's end-of-text token,
    # as rendering then does (docs/runtime.md, "Which positions the edit touches")
    state.lengths = (text.prompt_lengths(pipe.tokenizer, ids)
                     if run.method.positions == "prompt" else None)
    device = pipe.unet.device
    # SDXL's pooled text comes from the supercategory captions, in training as in rendering:
    # the concept reaches the UNet only through the gated cross-attention (docs/runtime.md)
    with torch.no_grad():
        added = text.added_conditions(pipe, supers, int(latents.shape[-1]) * _vae_scale(pipe))
    pred = pipe.unet(noisy.to(device), t.to(device), encoder_hidden_states=hidden,
                     added_cond_kwargs=added).sample
    target = noise_schedule.denoising_target(run.noise, latents, noise, t)
    return masked_mse(pred, target.to(device), None if masks is None else masks.to(device))


def _optimiser(run: _Run) -> torch.optim.Optimizer:
    """AdamW: the embedding at `embedding_lr`, the layer targets (o*_V; o*_K too when keys are
    trained) at `lr`."""
    targets = [p for name, p in run.method.trainable(run).items()
               if not name.startswith("embedding")]
    groups: list[dict[str, Any]] = [{"params": run.embeddings, "lr": run.recipe.embedding_lr}]
    if targets:
        groups.append({"params": targets, "lr": run.recipe.lr})
    return torch.optim.AdamW(groups, weight_decay=0.0)


def _autocast(precision: Precision | None) -> contextlib.AbstractContextManager[Any]:
    """Mixed precision where the device policy asks for it (CUDA); a no-op on the CPU."""
    if precision is None or not precision.autocast:
        return contextlib.nullcontext()
    return torch.autocast(precision.device.type, dtype=precision.dtype)


def _step(run: _Run, state: ConceptState, optimiser: torch.optim.Optimizer, step: int) -> float:
    optimiser.zero_grad(set_to_none=True)
    micro = run.recipe.micro_batch or run.recipe.batch
    total, left = 0.0, run.recipe.batch
    while left > 0:
        size = min(micro, left)
        with _autocast(run.precision):
            loss = _micro_step(run, state, size)
        value = float(loss.detach())
        if not torch.isfinite(loss):
            raise NonFiniteLoss(step, value)
        torch.autograd.backward(loss * size / run.recipe.batch)
        total += value * size / run.recipe.batch
        left -= size
    optimiser.step()
    return total


def train(pipe: Any, subject: Subject, recipe: Recipe, cinv: Tensor, *,
          cinv_fingerprint: str, base_fingerprint: str, options: Mapping[str, Any] | None = None,
          progress: Callable[[Progress], None] | None = None,
          precision: Precision | None = None, checkpoint: Path | None = None,
          checkpoint_every: int = 50, stop: Callable[[], bool] | None = None,
          method: Method = PERFUSION, gradient_checkpointing: bool = False) -> Concept:
    """Train `subject` on `pipe` (left as it was found, whatever happens) and return the concept.

    checkpoint: a file to resume from and save to (None: no checkpoints). A valid checkpoint of
    this very run (same subject key and words, recipe, C⁻¹ and base fingerprints, format
    version) resumes it, and the concept is bit-identical to an uninterrupted run's; an
    invalid or foreign one is ignored with a warning and training starts from step 0. It is
    saved atomically every `checkpoint_every` completed steps (a failed save is a warning) and
    left in place on success: the caller deletes it once the artifact is published.
    stop: polled after every completed step but the last; when it returns True the checkpoint
    is saved and TrainingInterrupted raised. method: the benchmarks' ablations only.
    gradient_checkpointing: the UNet recomputes its activations in the backward pass instead
    of keeping them (less memory, more time; the same concept), for the duration.
    """
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be at least 1, not {checkpoint_every}")
    identity = _identity(subject, recipe, method, cinv_fingerprint, base_fingerprint)
    keeper = _Checkpoints(checkpoint, checkpoint_every, identity, stop)
    state = ConceptState(caching=False)
    try:  # _prepare already adds the token: a failure there must take it out again
        with _frozen(pipe), _checkpointing(pipe.unet, gradient_checkpointing):
            run = _prepare(pipe, subject, recipe, cinv, method)
            run.precision = precision
            _loop(run, state, progress, keeper)
    finally:
        for _, encoder in text.pairs(pipe):
            remove_extension(encoder)
    return _concept(run, cinv_fingerprint, base_fingerprint, options or {})


def _loop(run: _Run, state: ConceptState, progress: Callable[[Progress], None] | None,
          keeper: _Checkpoints) -> None:
    """The optimisation steps, with the Perfusion processors installed for their duration."""
    recipe = run.recipe
    with install(run.pipe.unet, state), torch.enable_grad():
        optimiser = _optimiser(run)
        first = keeper.resume(run, optimiser) + 1
        started = time.perf_counter()
        for step in range(first, recipe.steps + 1):
            run.losses.append(_step(run, state, optimiser, step))
            if progress is not None:
                progress(Progress(step, recipe.steps, run.losses[-1],
                                  time.perf_counter() - started, first - 1))
            keeper.after(run, optimiser, step)


def _identity(subject: Subject, recipe: Recipe, method: Method, cinv_fingerprint: str,
              base_fingerprint: str) -> dict[str, str]:
    """What a checkpoint must match to resume this run (not image paths: projects move)."""
    words = [subject.token, subject.supercategories, subject.adjectives, subject.base_model,
             len(subject.images), subject.masks is not None]
    return {"key": subject.key, "subject": json.dumps(words),
            # "variant": the method's name, under the key it had when Recipe held it
            "recipe": json.dumps({**dataclasses.asdict(recipe), "variant": method.name},
                                 sort_keys=True),
            "steps": str(recipe.steps), "cinv_fingerprint": cinv_fingerprint,
            "base_fingerprint": base_fingerprint}


@dataclass
class _Checkpoints:
    """When to save, where, and whether to stop."""

    path: Path | None
    every: int
    identity: dict[str, str]
    stop: Callable[[], bool] | None

    def resume(self, run: _Run, optimiser: torch.optim.Optimizer) -> int:
        """Load a valid checkpoint into `run` and `optimiser`; the steps it holds (or 0)."""
        if self.path is None:
            return 0
        saved = checkpoints.resume(self.path, self.identity, _layout(run), run.recipe.steps)
        if saved is None:
            return 0
        try:
            torch.Generator().set_state(saved.tensors["generator"])
        except RuntimeError as exc:
            log.warning("ignoring the training checkpoint %s: its generator state is invalid "
                        "(%s); training starts over", self.path, exc)
            return 0
        _restore(run, optimiser, saved)
        log.info("resuming the training of %s at step %d from %s", run.subject.token,
                 saved.step, self.path)
        return saved.step

    def after(self, run: _Run, optimiser: torch.optim.Optimizer, step: int) -> None:
        """Save every `every` steps; save and raise TrainingInterrupted when stop() says so."""
        stopping = self.stop is not None and step < run.recipe.steps and self.stop()
        saved = False
        if self.path is not None and (stopping or step % self.every == 0):
            try:
                checkpoints.save(self.path, self.identity,
                                 checkpoints.Saved(step, tuple(run.losses),
                                                   _snapshot(run, optimiser)))
                saved = True
            except checkpoints.CheckpointError as exc:
                log.warning("could not save the training checkpoint (%s); training goes on "
                            "without it", exc)
        if stopping:
            raise TrainingInterrupted(step, self.path if saved else None)


def _layout(run: _Run) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Name -> (dtype, shape) of every tensor in this run's checkpoint."""
    layout = {"generator": (torch.uint8, tuple(run.generator.get_state().shape)),
              "i_star": (torch.float32, (int(run.cinv.shape[-1]),))}
    for name, param in run.method.trainable(run).items():
        layout[f"param.{name}"] = (torch.float32, tuple(param.shape))
        for slot in ADAMW_SLOTS:
            layout[f"adamw.{slot}.{name}"] = (torch.float32,
                                              () if slot == "step" else tuple(param.shape))
    return layout


def _snapshot(run: _Run, optimiser: torch.optim.Optimizer) -> dict[str, Tensor]:
    """Everything that decides the rest of the run (the losses so far go in the metadata)."""
    assert run.i_star is not None  # set by the first step
    tensors = {"generator": run.generator.get_state(), "i_star": run.i_star.detach()}
    for name, param in run.method.trainable(run).items():
        tensors[f"param.{name}"] = param.detach()
        for slot in ADAMW_SLOTS:
            tensors[f"adamw.{slot}.{name}"] = optimiser.state[param][slot].detach()
    return tensors


@torch.no_grad()
def _restore(run: _Run, optimiser: torch.optim.Optimizer, saved: checkpoints.Saved) -> None:
    """Put a checkpoint's state into a freshly prepared run and its unused optimiser."""
    tensors = saved.tensors
    run.generator.set_state(tensors["generator"])
    run.i_star = tensors["i_star"].to(run.embedding.device)
    for name, param in run.method.trainable(run).items():
        param.copy_(tensors[f"param.{name}"])
        optimiser.state[param] = {
            "step": tensors[f"adamw.step.{name}"].clone(),  # AdamW keeps it on the CPU
            "exp_avg": tensors[f"adamw.exp_avg.{name}"].to(param.device, copy=True),
            "exp_avg_sq": tensors[f"adamw.exp_avg_sq.{name}"].to(param.device, copy=True)}
    run.losses = list(saved.losses)


def _concept(run: _Run, cinv_fingerprint: str, base_fingerprint: str,
             options: Mapping[str, Any]) -> Concept:
    assert run.i_star is not None
    subject = run.subject
    return Concept(
        token=subject.token, supercategories=subject.supercategories,
        adjectives=subject.adjectives, base_model=subject.base_model,
        base_fingerprint=base_fingerprint, cinv_fingerprint=cinv_fingerprint,
        # where the edit applied in training (_micro_step): so it renders
        options={**options, "positions": run.method.positions, "context": run.context},
        key=subject.key,
        # SDXL: both encoders' rows side by side, split again by their widths when loaded
        embedding=torch.cat([e.detach().float().cpu() for e in run.embeddings]),
        i_star=run.i_star.detach().float().cpu().clone(),
        o_k={n: t.detach().float().cpu().clone() for n, t in run.o_k.items()},
        o_v={n: t.detach().float().cpu().clone() for n, t in run.o_v.items()},
        i_super=None if (kept := run.method.stored_i_super(run)) is None
        else kept.detach().float().cpu().clone(),
    )
