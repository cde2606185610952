"""The diffusers attention processor that applies Perfusion's gated rank-1 edit to K and V.

`PerfusionAttnProcessor` sits on every cross-attention `attn2` of a UNet and reads one shared
`ConceptState`. It is diffusers' `AttnProcessor2_0` line for line except where K and V come
from (docs/runtime.md, "Inference"):

- no concept active: `to_k(e)`, `to_v(e)` exactly as diffusers does (the parity test);
- local key locking: K and V both through `key_locking.edited_projection`;
- global key locking: K = `to_k(e_super)` with the plain weight, where `e_super` encodes the
  prompt with each concept token replaced by its supercategory (the caller passes it as
  `cross_attention_kwargs={"perfusion_super": e_super}`); V edited from the prompt itself.

Text encodings do not change across denoising steps, so K and V of a prompt are computed once
and reused while the same `encoder_hidden_states` tensor (identity, `_version`, `data_ptr`)
and the same `ConceptState.version` come back (an inference-mode tensor has no version
counter: only its identity counts). Caching is off when `ConceptState.caching` is False
(training) or autograd is recording.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .key_locking import INFERENCE_TAU, LOCK_MODES, Basis, edited_projection
from .layers import cross_attention_layers

SUPER_KWARG = "perfusion_super"  # cross_attention_kwargs key of the global-lock encodings


@dataclass(frozen=True, eq=False)
class ConceptSet:
    """Concepts applied together (to all rows, or to the rows of one prompt): their basis,
    targets per layer, gate biases and lock mode."""

    basis: Basis  # K concepts: i*_k [K, D] and the C⁻¹ readout [D, K]
    o_k: Mapping[str, Tensor]  # layer path -> o*_K [K, O]
    o_v: Mapping[str, Tensor]  # layer path -> o*_V [K, O]
    beta: Tensor  # [K], one gate bias per concept
    lock: str = "local"  # "local" or "global" key locking

    @classmethod
    def make(cls, basis: Basis, o_k: Mapping[str, Tensor], o_v: Mapping[str, Tensor],
             beta: Tensor | float, lock: str = "local") -> ConceptSet:
        """Checked: the lock mode, one target row per concept, one β per concept."""
        if lock not in LOCK_MODES:
            raise ValueError(f"lock must be 'local' or 'global', got {lock!r}")
        k = basis.size
        beta_t = torch.as_tensor(beta, dtype=torch.float32).expand(k).clone()  # [K]
        for name, targets in (("o_k", o_k), ("o_v", o_v)):
            for layer, tensor in targets.items():
                if tensor.ndim != 2 or tensor.shape[0] != k:
                    raise ValueError(f"{name}[{layer!r}] must have shape [{k}, O], "
                                     f"got {tuple(tensor.shape)}")
        return cls(basis, dict(o_k), dict(o_v), beta_t, lock)


@dataclass(eq=False)
class ConceptState:
    """The concepts every installed processor applies; any field assignment bumps `version`.

    Either one set for every row of the encoder batch (`activate`: training, and the
    fields below), or one set, or none, per row (`activate_rows`: rendering, where a prompt
    is edited only by the concepts it names). Tensors changed in place (an optimiser step on
    `o_v`) do not bump the version: turn `caching` off while training, or call `touch()`."""

    basis: Basis | None = None  # K concepts: i*_k [K, D] and the C⁻¹ readout [D, K]
    o_k: Mapping[str, Tensor] = field(default_factory=dict)  # layer path -> o*_K [K, O]
    o_v: Mapping[str, Tensor] = field(default_factory=dict)  # layer path -> o*_V [K, O]
    beta: Tensor | None = None  # [K], one gate bias per concept
    lock: str = "local"  # "local" or "global" key locking
    tau: float = INFERENCE_TAU
    caching: bool = True  # reuse K/V of a prompt across denoising steps
    # per encoder row (unconditional rows first under guidance, as the pipeline stacks
    # them): the set applied to it, None for a row left as the base model has it
    rows: tuple[ConceptSet | None, ...] | None = None
    # per encoder row, how many leading positions the edit applies to (the prompt's start
    # token, words and end-of-text token: `text.prompt_lengths`); past them K and V are the
    # base model's. None: every position (concepts trained with `positions` "all").
    lengths: Tensor | None = None
    version: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "version", 0)

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if name not in ("version", "caching"):
            object.__setattr__(self, "version", getattr(self, "version", 0) + 1)

    @property
    def active(self) -> bool:
        """Whether any concept is applied (to any row)."""
        return self.basis is not None or any(r is not None for r in self.rows or ())

    @property
    def needs_super(self) -> bool:
        """Whether some row locks keys globally (and so needs the supercategory prompt)."""
        if self.rows is not None:
            return any(r is not None and r.lock == "global" for r in self.rows)
        return self.basis is not None and self.lock == "global"

    def touch(self) -> None:
        """Invalidate cached K/V after changing a tensor of this state in place."""
        self.version += 1

    def activate(self, basis: Basis, o_k: Mapping[str, Tensor], o_v: Mapping[str, Tensor],
                 beta: Tensor | float, lock: str = "local", tau: float = INFERENCE_TAU,
                 lengths: Tensor | None = None) -> None:
        """Apply the K concepts of `basis` to every row, with their targets and gate biases,
        at the first `lengths[b]` positions of row b (None: at all)."""
        chosen = ConceptSet.make(basis, o_k, o_v, beta, lock)
        self.rows, self.lengths = None, lengths
        self.basis, self.o_k, self.o_v = chosen.basis, chosen.o_k, chosen.o_v
        self.beta, self.lock, self.tau = chosen.beta, chosen.lock, tau

    def activate_rows(self, rows: Sequence[ConceptSet | None], tau: float = INFERENCE_TAU,
                      lengths: Tensor | None = None) -> None:
        """Apply `rows[b]` to row b of the encoder batch only (None: that row unedited), at
        its first `lengths[b]` positions (None: at all)."""
        self.deactivate()
        self.rows, self.tau, self.lengths = tuple(rows), tau, lengths

    def deactivate(self) -> None:
        """No concept: every processor behaves as diffusers' default one."""
        self.basis, self.o_k, self.o_v, self.beta, self.rows = None, {}, {}, None, None
        self.lengths = None

    def whole(self) -> ConceptSet | None:
        """The set `activate` applies to every row, or None."""
        if self.basis is None or self.beta is None:
            return None
        return ConceptSet(self.basis, self.o_k, self.o_v, self.beta, self.lock)


@dataclass(eq=False)
class _Cached:
    """K and V of one prompt batch, with what they were computed from."""

    sources: tuple[weakref.ref[Tensor] | None, ...]  # the prompt (and super) tensors, weakly
    stamp: tuple[object, ...]
    key: Tensor
    value: Tensor


def _stamp(tensor: Tensor | None) -> tuple[int, int, int] | None:
    if tensor is None:
        return None
    # Inference tensors have no version counter; they cannot change in place outside
    # inference mode, and pipelines do not change their prompt encodings inside it.
    version = -1 if tensor.is_inference() else tensor._version
    return id(tensor), version, tensor.data_ptr()


def _alive(sources: tuple[weakref.ref[Tensor] | None, ...],
           tensors: tuple[Tensor | None, ...]) -> bool:
    """The cached sources are these very tensors (a freed tensor's id may be reused)."""
    return all((ref is None and t is None) or (ref is not None and ref() is t)
               for ref, t in zip(sources, tensors, strict=True))


class PerfusionAttnProcessor:
    """AttnProcessor2_0 with K/V from the Perfusion edit of one layer, cached per prompt."""

    def __init__(self, state: ConceptState, layer: str) -> None:
        self.state = state
        self.layer = layer  # module path of the attn2, the key of o_k / o_v
        self._cache: _Cached | None = None

    def __call__(
        self,
        attn: Any,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        perfusion_super: Tensor | None = None,
        **kwargs: Any,  # anything else diffusers forwards is ignored, as AttnProcessor2_0 does
    ) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = _sdpa_mask(attn, attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:  # self-attention: nothing to edit or cache
            key, value = attn.to_k(hidden_states), attn.to_v(hidden_states)
        else:
            key, value = self.key_value(attn, encoder_hidden_states, perfusion_super)
        hidden_states = _attend(attn, query, key, value, attention_mask, batch_size)
        hidden_states = attn.to_out[0](hidden_states)  # linear proj
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height,
                                                                    width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor  # type: ignore[no-any-return]

    def key_value(self, attn: Any, context: Tensor, super_context: Tensor | None
                  ) -> tuple[Tensor, Tensor]:
        """K and V [B, T, inner] of the prompt, from the cache when it still holds them."""
        state = self.state
        if not state.caching or torch.is_grad_enabled():
            self._cache = None
            return self._project(attn, context, super_context)
        tensors = (context, super_context if state.needs_super else None)
        stamp = (id(attn), state.version, attn.to_k.weight._version, attn.to_v.weight._version,
                 *map(_stamp, tensors))
        cached = self._cache
        if cached is not None and cached.stamp == stamp and _alive(cached.sources, tensors):
            return cached.key, cached.value
        key, value = self._project(attn, context, super_context)
        sources = tuple(None if t is None else weakref.ref(t) for t in tensors)
        self._cache = _Cached(sources, stamp, key, value)
        return key, value

    def _project(self, attn: Any, context: Tensor, super_context: Tensor | None
                 ) -> tuple[Tensor, Tensor]:
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = self._project_rows(attn, context, super_context)
        state = self.state
        lengths = state.lengths
        if lengths is None:
            return key, value
        if tuple(lengths.shape) != (context.shape[0],):
            raise ValueError(f"the concept state has lengths of shape {tuple(lengths.shape)}, "
                             f"the encoder batch {context.shape[0]} rows (layer {self.layer})")
        # past the prompt's end-of-text token, the edit is off: the padding carries no text
        # of its own, and editing it leaked the concept into every image (docs/runtime.md,
        # "Which positions the edit touches"). There V is to_v of the prompt, and K to_k of
        # the prompt, or of the supercategory prompt in rows that lock keys globally (those
        # keys are not edited: they are the supercategory's, at every position).
        where = torch.arange(context.shape[1], device=context.device)
        inside = (where[None] < lengths.to(context.device)[:, None])[..., None]  # [B, T, 1]
        sets = state.rows if state.rows is not None else (state.whole(),) * context.shape[0]
        global_rows = torch.tensor([s is not None and s.lock == "global" for s in sets],
                                   device=context.device)[:, None, None]  # [B, 1, 1]
        return (torch.where(inside | global_rows, key, attn.to_k(context)),
                torch.where(inside, value, attn.to_v(context)))

    def _project_rows(self, attn: Any, context: Tensor, super_context: Tensor | None
                      ) -> tuple[Tensor, Tensor]:
        """K and V of every row with its own set applied (at every position)."""
        state = self.state
        if state.rows is None:
            return self._project_set(attn, context, super_context, state.whole())
        rows = state.rows
        if len(rows) != context.shape[0]:
            raise ValueError(f"the concept state has sets for {len(rows)} rows, the encoder "
                             f"batch has {context.shape[0]} (layer {self.layer})")
        groups: dict[int, list[int]] = {}
        for b, chosen in enumerate(rows):
            groups.setdefault(id(chosen), []).append(b)
        if len(groups) == 1:  # one set for the whole batch: no gathering, the very same maths
            return self._project_set(attn, context, super_context, rows[0])
        parts = []
        for members in groups.values():
            index = torch.tensor(members, device=context.device)
            sup = None if super_context is None else super_context.index_select(0, index)
            parts.append((index, *self._project_set(attn, context.index_select(0, index), sup,
                                                    rows[members[0]])))
        return _scatter(parts, 0, context.shape[0]), _scatter(parts, 1, context.shape[0])

    def _project_set(self, attn: Any, context: Tensor, super_context: Tensor | None,
                     chosen: ConceptSet | None) -> tuple[Tensor, Tensor]:
        """K and V of `context` (normalised already) with `chosen` applied, or plain."""
        if chosen is None:
            return attn.to_k(context), attn.to_v(context)
        if chosen.lock == "local":
            return self._edited_pair(attn, context, chosen)
        if chosen.lock == "global":
            if super_context is None:
                raise ValueError(
                    f"global key locking needs the supercategory prompt's encodings: pass "
                    f"cross_attention_kwargs={{{SUPER_KWARG!r}: tensor}} (layer {self.layer})")
            if super_context.shape != context.shape:
                raise ValueError(f"{SUPER_KWARG} has shape {tuple(super_context.shape)}, the "
                                 f"prompt's encodings {tuple(context.shape)}")
            if attn.norm_cross:
                super_context = attn.norm_encoder_hidden_states(super_context)
            key = attn.to_k(super_context)
        else:
            raise ValueError(f"lock must be 'local' or 'global', got {chosen.lock!r}")
        return key, self._edited(attn.to_v, context, chosen.o_v, "o_v", chosen)

    def _edited_pair(self, attn: Any, e: Tensor, chosen: ConceptSet | None = None
                     ) -> tuple[Tensor, Tensor]:
        """Local locking: K and V edited together. Both read the same coefficients a(e) and
        gates, so one edit of the stacked weight [W_K; W_V] with targets [o*_K | o*_V] gives
        both at the cost of one (each output column of eq. 3 is independent of the others).
        `chosen`: the set to apply (default: the one `activate` applies to every row)."""
        chosen = chosen or self.state.whole()
        assert chosen is not None
        for name, layers in (("o_k", chosen.o_k), ("o_v", chosen.o_v)):
            if self.layer not in layers:
                raise KeyError(f"the concept state has no {name} for layer {self.layer!r}")
        to_k, to_v = attn.to_k, attn.to_v
        device = to_k.weight.device
        weight = torch.cat([to_k.weight, to_v.weight])  # [O_k + O_v, D]
        targets = torch.cat([chosen.o_k[self.layer], chosen.o_v[self.layer]], dim=1).to(device)
        h = edited_projection(e, weight, chosen.basis.to(device), targets,
                              chosen.beta.to(device), self.state.tau)
        key, value = torch.split(h, [to_k.out_features, to_v.out_features], dim=-1)
        if to_k.bias is not None:
            key = key + to_k.bias.to(key.dtype)
        if to_v.bias is not None:
            value = value + to_v.bias.to(value.dtype)
        return key, value

    def _edited(self, linear: nn.Linear, e: Tensor, targets: Mapping[str, Tensor], name: str,
                chosen: ConceptSet | None = None) -> Tensor:
        """h(e) of docs/runtime.md for one projection of this layer; [B, T, D] -> [B, T, O]."""
        chosen = chosen or self.state.whole()
        assert chosen is not None
        if self.layer not in targets:
            raise KeyError(f"the concept state has no {name} for layer {self.layer!r}")
        device = linear.weight.device
        h = edited_projection(e, linear.weight, chosen.basis.to(device),
                              targets[self.layer].to(device), chosen.beta.to(device),
                              self.state.tau)
        return h if linear.bias is None else h + linear.bias.to(h.dtype)


def _scatter(parts: list[tuple[Tensor, Tensor, Tensor]], which: int, rows: int) -> Tensor:
    """The rows of each part (index, K, V) put back in their places: [rows, T, O]."""
    first = parts[0][1 + which]
    out = first.new_empty((rows, *first.shape[1:]))
    for index, *pair in parts:
        out.index_copy_(0, index, pair[which])
    return out


def _sdpa_mask(attn: Any, attention_mask: Tensor | None, sequence_length: int,
               batch_size: int) -> Tensor | None:
    """The attention mask as scaled_dot_product_attention wants it: (batch, heads, source,
    target), prepared by diffusers' own `Attention.prepare_attention_mask`."""
    if attention_mask is None:
        return None
    attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
    return attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])


def _attend(attn: Any, query: Tensor, key: Tensor, value: Tensor,
            attention_mask: Tensor | None, batch_size: int) -> Tensor:
    """Multi-head scaled dot-product attention as in AttnProcessor2_0; -> [B, N, heads·head_dim]."""
    inner_dim = key.shape[-1]
    head_dim = inner_dim // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    hidden_states = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
    )  # (batch, heads, seq_len, head_dim)
    hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
    return hidden_states.to(query.dtype)


class _DropsSuper:
    """Wraps a self-attention processor so that `perfusion_super` reaches it silently
    (diffusers forwards cross_attention_kwargs to every attention and warns on unknown ones)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, attn: Any, hidden_states: Tensor,
                 encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None,
                 perfusion_super: Tensor | None = None) -> Tensor:
        extra = {} if temb is None else {"temb": temb}
        out: Tensor = self.inner(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                 attention_mask=attention_mask, **extra)
        return out


@dataclass(eq=False)
class Installed:
    """The processors replaced by `install`; `restore()` (or leaving a `with`) puts them back."""

    originals: dict[str, tuple[Any, Any]]  # module path -> (Attention, its original processor)
    processors: dict[str, PerfusionAttnProcessor]  # attn2 path -> ours

    def restore(self) -> None:
        for module, original in self.originals.values():
            module.set_processor(original)
        self.originals = {}

    def __enter__(self) -> Installed:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.restore()


def is_installed(unet: nn.Module) -> bool:
    """Whether Perfusion processors sit on `unet` (applied concepts, or a training)."""
    return any(isinstance(m.processor, PerfusionAttnProcessor)
               for m in cross_attention_layers(unet).values())


def install(unet: nn.Module, state: ConceptState) -> Installed:
    """Our processor on every cross-attention attn2 of `unet`, reading `state`."""
    cross = cross_attention_layers(unet)
    if not cross:
        raise ValueError("the UNet has no cross-attention attn2 layer")
    if is_installed(unet):
        raise ValueError("Perfusion processors are already installed: restore() them first")
    originals: dict[str, tuple[Any, Any]] = {}
    processors: dict[str, PerfusionAttnProcessor] = {}
    for name, module in unet.named_modules():
        if not hasattr(module, "get_processor"):  # how diffusers finds attention modules
            continue
        originals[name] = (module, module.processor)
        if name in cross:
            processors[name] = PerfusionAttnProcessor(state, name)
            module.set_processor(processors[name])
        else:
            module.set_processor(_DropsSuper(module.processor))
    return Installed(originals, processors)
