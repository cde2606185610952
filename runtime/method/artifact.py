"""The concept artifact: one safetensors file per concept, saved atomically, read strictly.

File layout (format_version "4"), every tensor float32 (or every one float16, `half=True`),
every metadata value a string; only what loading needs (docs/runtime.md, "The concept file"):

    embedding [D_tok]   the token's input embedding
    i_star    [D]       the concept's text-encoder output
    i_super   [D]       locked keys: o*_K = W_K · i_super per layer, rebuilt from the
                        pipeline's W_K when loading (12,480 floats fewer for SD 1.5)
      or o_k  [ΣO]      keys trained (the benchmarks' ablation): every layer's o*_K
    o_v       [ΣO]      every layer's o*_V, concatenated in the order of `layers`
    metadata  format="perfusion-concept", format_version="4", token, supercategory (the
              first: global locking renders through it), lock, positions ("all": edited at
              every text position; "prompt": up to its end-of-text token), context (the
              supercategory's words before its last, which stand before the token in every
              prompt; "" for none), base_model, base_fingerprint,
              cinv_fingerprint, layers (JSON object {attn2 module path: O}, in order)

What explains or rebuilds a concept (all supercategories, adjectives, options, the plan's
key) is in the store's manifest and the build history, not here: the file's size does not
grow with templates or adjectives. Formats "1" (four float32 tensors, o_k in full, every
option in the metadata) and "2" (format 3 without `positions`) are still read, as concepts
edited at every position, as they were trained; and "3" (format 4 without `context`), as
concepts trained without context words.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors.torch import load as load_safetensors  # bytes in, tensors out; no pickle
from torch import Tensor

from ..files import concept_file
from ..files.atomic import FileError, write_atomically
from ..files.concept_file import (  # the format's constants and description: one place
    FORMAT,
    FORMAT_VERSION,
    MAX_FILE_BYTES,
    POSITIONS,
    SUPPORTED_VERSIONS,
    ConceptInfo,
)
from ..files.safetensors_file import FormatProblem, canonical, names_of, read_file
from . import tokens

__all__ = ["FORMAT", "FORMAT_VERSION", "MAX_FILE_BYTES", "SUPPORTED_VERSIONS", "ArtifactError",
           "Concept", "ConceptInfo", "InvalidConcept", "encode", "load", "locked_key_targets",
           "save", "size_for"]
_HEX = re.compile(r"[0-9a-f]*")
_PROJECTIONS = ("o_k", "o_v")


class ArtifactError(FileError):
    """A concept file that cannot be read or written; the message names the file."""


class InvalidConcept(ValueError):
    """A Concept whose fields break the rules of the file format; `problem` says which."""

    def __init__(self, problem: str, token: object = None) -> None:
        super().__init__(f"invalid concept {token!r}: {problem}" if token else
                         f"invalid concept: {problem}")
        self.problem = problem


_Problem = FormatProblem  # raised by the checks below; `load` adds the path (ArtifactError)


@dataclass(frozen=True, eq=False)
class Concept(ConceptInfo):
    """One trained concept (tensors fp32, any device). Construction validates everything and
    raises InvalidConcept.

    eq=False: tensors have no truth value, so two concepts compare by identity.
    """

    embedding: Tensor          # [D_tok] the token's input embedding
    i_star: Tensor             # [D] the concept's text-encoder output (target input)
    o_k: dict[str, Tensor]     # layer path (diffusers module path of attn2) -> [O] key target
    o_v: dict[str, Tensor]     # same layers -> [O] value target
    # [D] when keys are locked (o*_K = W_K · i_super, what the file stores instead of o_k);
    # None when o_k was trained
    i_super: Tensor | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # normalise copies; the dataclass stays frozen to callers
        set_(self, "supercategories", _words("supercategories", self.supercategories))
        set_(self, "adjectives", _words("adjectives", self.adjectives))
        set_(self, "options", json.loads(_options_json(self.options)))
        set_(self, "o_k", dict(self.o_k))
        set_(self, "o_v", dict(self.o_v))
        problem = _concept_problem(self)
        if problem:
            raise InvalidConcept(problem, self.token)

    @property
    def lock(self) -> str:
        """The key-locking mode it renders with: "local" or "global"."""
        return str(self.options.get("lock", "local"))

    @property
    def positions(self) -> str:
        """Where its edit applies: "prompt" (the prompt's start, words and end-of-text token
        only: how the trainer trains) or "all" (every text position, padding included: files
        of formats 1 and 2, which load without `positions`)."""
        return str(self.options.get("positions", "all"))

    @property
    def context(self) -> str:
        """The words that stand before its token wherever a prompt is encoded: its first
        supercategory's leading words, as it was trained (`tokens.leading_words`); "" for
        concepts trained without them (files before format 4)."""
        return str(self.options.get("context", ""))

    @property
    def stands_for(self) -> str:
        """What its token stands for in the supercategory prompt that global locking reads
        its keys from: the first supercategory, less the context words that the prompt
        already holds before the token."""
        return tokens.stands_for(self.supercategories[0] if self.supercategories else "",
                                 self.context)

    @property
    def layers(self) -> dict[str, int]:
        """Layer path -> output width O of its to_k/to_v, in the order of `o_k`."""
        return {name: int(t.numel()) for name, t in self.o_k.items()}

    @property
    def num_floats(self) -> int:
        return size_for(self.layers, int(self.embedding.numel()), int(self.i_star.numel()))

    def with_options(self, **changes: Any) -> Concept:
        """The same concept with some render options changed (say `lock="global"`) and the
        rest, where its edit applies among them, kept; checked as any concept is."""
        return dataclasses.replace(self, options={**self.options, **changes})


def size_for(layers: Mapping[str, int], d_token: int, d_text: int) -> int:
    """Floats in a concept: embedding [d_token] + i* [d_text] + o*_K and o*_V [O] per layer."""
    return d_token + d_text + 2 * sum(layers.values())


# ---------------------------------------------------------------------------------------------
# Validating a Concept (shared by construction and loading)


def _words(field: str, value: Iterable[str]) -> tuple[str, ...]:
    words = tuple(value)
    if not all(isinstance(w, str) for w in words):
        raise InvalidConcept(f"{field} must be strings, got {words!r}")
    return words


def _options_json(options: Mapping[str, Any]) -> str:
    try:
        return json.dumps(options, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidConcept(f"options are not JSON-able: {exc}") from exc


def _concept_problem(c: Concept) -> str | None:
    texts = {"token": c.token, "base_model": c.base_model,
             "base_fingerprint": c.base_fingerprint, "cinv_fingerprint": c.cinv_fingerprint}
    for field, text in texts.items():
        if not isinstance(text, str):
            return f"{field} must be a string"
    if not c.token:
        return "the token is empty"
    if not isinstance(c.key, str) or not _HEX.fullmatch(c.key):
        return f"key must be lowercase hex, got {c.key!r}"
    if c.positions not in POSITIONS:
        return f"options positions must be one of {', '.join(POSITIONS)}, got {c.positions!r}"
    if not isinstance(c.options.get("context", ""), str):
        return "options context must be a string"
    problem = concept_file.context_problem(c.context, c.supercategories)
    if problem:
        return problem
    if not c.o_k:
        return "no layers"
    if "" in c.o_k:
        return "a layer name is empty"
    if set(c.o_k) != set(c.o_v):
        return f"o_k and o_v name different layers: {names_of(set(c.o_k) ^ set(c.o_v))}"
    for name, tensor in _named_tensors(c):
        problem = _tensor_problem(name, tensor)
        if problem:
            return problem
    for layer, tensor in c.o_k.items():
        if tensor.shape != c.o_v[layer].shape:
            return _width_problem(layer, int(tensor.numel()), int(c.o_v[layer].numel()))
    if c.i_super is not None and c.i_super.shape != c.i_star.shape:
        return f"i_super has {c.i_super.numel()} values, i_star {c.i_star.numel()}"
    return None


def _named_tensors(c: Concept) -> list[tuple[str, Tensor]]:
    named = [("embedding", c.embedding), ("i_star", c.i_star)]
    if c.i_super is not None:
        named.append(("i_super", c.i_super))
    for prefix, targets in zip(_PROJECTIONS, (c.o_k, c.o_v), strict=True):
        named += [(f"{prefix}.{layer}", t) for layer, t in targets.items()]
    return named


def _tensor_problem(name: str, tensor: object) -> str | None:
    if not isinstance(tensor, Tensor):
        return f"{name} is not a tensor"
    if tensor.dtype != torch.float32:
        return f"tensor {name} has dtype {tensor.dtype}; concept tensors are float32"
    if tensor.dim() != 1 or tensor.numel() == 0:
        return f"tensor {name} has shape {list(tensor.shape)}; expected a non-empty vector"
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        return f"tensor {name} has {bad} non-finite value(s) (NaN or infinity)"
    return None


def _width_problem(layer: str, k: int, v: int) -> str:
    return f"layer {layer}: o_k has {k} values but o_v has {v}; they must match"




# ---------------------------------------------------------------------------------------------
# Saving


def save(concept: Concept, path: str | os.PathLike[str], *, half: bool = False) -> None:
    """Write `concept` to `path` atomically: temp file in the same folder, fsync, rename.

    Readers see the old file or the new one, never a mixture. On any failure, disk
    full included, the temp file is removed, the old file is untouched and the error
    is an ArtifactError naming `path`. A symlink at `path` is replaced, not written through.
    The bytes depend only on the concept (sorted header), so a retrain is byte-identical.
    """
    problem = _concept_problem(concept)  # tensors may have been changed in place since
    if problem:
        raise InvalidConcept(problem, concept.token)
    write_atomically(Path(path), encode(concept, half=half), ArtifactError)


def encode(concept: Concept, *, half: bool = False) -> bytes:
    """The file's bytes: safetensors' layout with the header re-serialised canonically.
    half: every tensor in float16 (half the size; what it costs in pixels is in
    docs/runtime.md, "The concept file")."""
    dtype = torch.float16 if half else torch.float32

    def flat(parts: Iterable[Tensor]) -> Tensor:
        return torch.cat([t.detach().to("cpu", torch.float32) for t in parts]).to(
            dtype).contiguous()

    layers = list(concept.o_k)
    tensors = {"embedding": flat([concept.embedding]), "i_star": flat([concept.i_star]),
               "o_v": flat(concept.o_v[layer] for layer in layers)}
    if concept.i_super is not None:
        tensors["i_super"] = flat([concept.i_super])
    else:
        tensors["o_k"] = flat(concept.o_k[layer] for layer in layers)
    return canonical(safetensors.torch.save(tensors, metadata=_metadata(concept)))


def _metadata(c: Concept) -> dict[str, str]:
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "token": c.token,
        "supercategory": c.supercategories[0] if c.supercategories else "",
        "lock": c.lock, "positions": c.positions, "context": c.context,
        "base_model": c.base_model,
        "base_fingerprint": c.base_fingerprint, "cinv_fingerprint": c.cinv_fingerprint,
        "layers": _compact(c.layers),
    }


def locked_key_targets(key_weights: Mapping[str, Tensor], i_super: Tensor
                       ) -> dict[str, Tensor]:
    """o*_K = W_K · i_super per layer [O], in float32 on the CPU: computed the same way when
    training (the trainer calls this) and when loading, so a reload is bit-exact."""
    out = {}
    for name, weight in key_weights.items():
        w = weight.detach().float()
        out[name] = (w @ i_super.to(w.device, torch.float32)).cpu()
    return out


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


# ---------------------------------------------------------------------------------------------
# Loading


def load(
    path: str | os.PathLike[str],
    *,
    expect_base_fingerprint: str | None = None,
    expect_layers: Mapping[str, int] | None = None,
    expect_dims: tuple[int, int] | None = None,
    pipeline_model: str | None = None,
    key_weights: Mapping[str, Tensor] | None = None,
) -> Concept:
    """Read a concept file, accepting only what `save` writes; never unpickles.

    expect_layers: layer path -> O of the pipeline's to_k/to_v; expect_dims: (D_tok, D), the
    token-embedding width and the text-encoder output width. `pipeline_model` only names the
    pipeline's base model in the fingerprint-mismatch message. key_weights: layer path -> the
    pipeline's to_k weight [O, D], needed for a file with locked keys (it stores i_super, and
    o*_K = W_K · i_super is rebuilt here). Values are returned in float32 whatever the file
    holds. A zeroed or flipped byte inside the tensor data still decodes to finite numbers:
    the store's digest catches that.
    """
    try:
        data = read_file(Path(path), MAX_FILE_BYTES, "concept file")
        head = concept_file.read(data)  # everything that needs no pipeline, NaN included
        _check_base(head.info, expect_base_fingerprint, pipeline_model)
        _check_expected(head.d_token, head.d_text, head.layers, expect_dims, expect_layers)
        return _build(head.info, _decode(data), head.layers, key_weights)
    except _Problem as problem:
        raise ArtifactError(path, str(problem)) from None


def _check_base(info: ConceptInfo, expected: str | None, pipeline_model: str | None) -> None:
    if expected is None or info.base_fingerprint == expected:
        return
    this = f"{pipeline_model!r} (fingerprint {expected})" if pipeline_model else (
        f"a base model with fingerprint {expected}")
    raise _Problem(f"trained on base model {info.base_model!r} (fingerprint "
                   f"{info.base_fingerprint}), this pipeline is {this}")


def _check_expected(
    d_token: int, d_text: int, layers: Mapping[str, int],
    expect_dims: tuple[int, int] | None, expect_layers: Mapping[str, int] | None,
) -> None:
    if expect_dims is not None:
        want_token, want_text = expect_dims
        if d_token != want_token:
            raise _Problem(f"embedding has {d_token} values, this pipeline's token "
                           f"embeddings have {want_token}")
        if d_text != want_text:
            raise _Problem(f"i_star has {d_text} values, this pipeline's text encoder "
                           f"outputs {want_text}")
    if expect_layers is None:
        return
    if set(expect_layers) - set(layers):
        raise _Problem(f"no targets for layer(s) {names_of(set(expect_layers) - set(layers))} "
                       f"of this pipeline")
    if set(layers) - set(expect_layers):
        raise _Problem(f"layer(s) {names_of(set(layers) - set(expect_layers))} are not "
                       f"cross-attention layers of this pipeline")
    for layer, width in layers.items():
        if expect_layers[layer] != width:
            raise _Problem(f"layer {layer}: {width} values in the file, this pipeline's "
                           f"projections output {expect_layers[layer]}")


def _decode(data: bytes) -> dict[str, Tensor]:
    try:
        tensors: dict[str, Tensor] = load_safetensors(data)
    except Exception as exc:  # the header passed our checks, so this is unexpected
        raise _Problem(f"safetensors could not decode it: {exc}") from None
    return tensors


def _build(info: ConceptInfo, stored: Mapping[str, Tensor], layers: Mapping[str, int],
           key_weights: Mapping[str, Tensor] | None) -> Concept:
    tensors = {name: t.float() for name, t in stored.items()}  # float16 is read as float32
    widths = list(layers.values())
    o_v = dict(zip(layers, (t.clone() for t in torch.split(tensors["o_v"], widths)), strict=True))
    i_super = tensors.get("i_super")
    if i_super is None:
        o_k = dict(zip(layers, (t.clone() for t in torch.split(tensors["o_k"], widths)),
                       strict=True))
    else:
        o_k = _rebuilt_keys(i_super, layers, key_weights)
    named = [("embedding", tensors["embedding"]), ("i_star", tensors["i_star"])]
    named += [] if i_super is None else [("i_super", i_super)]
    named += [(f"o_k.{layer}", t) for layer, t in o_k.items()]
    named += [(f"o_v.{layer}", t) for layer, t in o_v.items()]
    for name, tensor in named:  # safetensors accepts NaN and infinity; we do not
        problem = _tensor_problem(name, tensor)
        if problem:
            raise _Problem(problem)
    try:
        described = {f.name: getattr(info, f.name) for f in dataclasses.fields(ConceptInfo)}
        return Concept(**described, embedding=tensors["embedding"], i_star=tensors["i_star"],
                       o_k=o_k, o_v=o_v, i_super=i_super)
    except InvalidConcept as exc:  # e.g. an empty token or a key that is not hex
        raise _Problem(exc.problem) from None


def _rebuilt_keys(i_super: Tensor, layers: Mapping[str, int],
                  key_weights: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    """o*_K per layer from the pipeline's W_K, checked against the file's layers."""
    if key_weights is None:
        raise _Problem("its keys are locked to its supercategory (o*_K = W_K · i_super): load "
                       "it with the pipeline's key weights (key_weights=…; apply_concepts "
                       "does)")
    if list(key_weights) != list(layers) or any(
            int(key_weights[n].shape[0]) != o for n, o in layers.items()):
        raise _Problem("the key weights given are not those of the file's layers")
    if not bool(torch.isfinite(i_super).all()):
        raise _Problem("tensor i_super has non-finite values (NaN or infinity)")
    return locked_key_targets(key_weights, i_super)
