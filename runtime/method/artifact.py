"""The concept artifact: one safetensors file per concept, saved atomically, read strictly.

File layout (format_version "2"), every tensor float32 (or every one float16, `half=True`),
every metadata value a string; only what loading needs (docs/runtime.md, "The concept file"):

    embedding [D_tok]   the token's input embedding
    i_star    [D]       the concept's text-encoder output
    i_super   [D]       locked keys: o*_K = W_K · i_super per layer, rebuilt from the
                        pipeline's W_K when loading (12,480 floats fewer for SD 1.5)
      or o_k  [ΣO]      keys trained (the benchmarks' ablation): every layer's o*_K
    o_v       [ΣO]      every layer's o*_V, concatenated in the order of `layers`
    metadata  format="perfusion-concept", format_version="2", token, supercategory (the
              first: global locking renders through it), lock, base_model, base_fingerprint,
              cinv_fingerprint, layers (JSON object {attn2 module path: O}, in order)

What explains or rebuilds a concept (all supercategories, adjectives, options, the plan's
key) is in the store's manifest and the build history, not here: the file's size does not
grow with templates or adjectives. Format "1" (four float32 tensors, o_k in full, every
option in the metadata) is still read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import safetensors.torch
import torch
from safetensors.torch import load as load_safetensors  # bytes in, tensors out; no pickle
from torch import Tensor

from ..files.atomic import FileError, write_atomically
from ..files.safetensors_file import (
    FormatProblem,
    canonical,
    no_duplicates,
    parse_header,
    read_file,
)

FORMAT = "perfusion-concept"
FORMAT_VERSION = "2"
SUPPORTED_VERSIONS: tuple[str, ...] = ("1", "2")
# Bounds that keep a hostile file from costing memory. An SD 1.5 concept is ~108 KB with a
# ~2 KB header; SDXL-sized ones stay well under a megabyte.
MAX_FILE_BYTES = 64 * 1024 * 1024

_METADATA_KEYS = {
    "1": ("format", "format_version", "token", "supercategories", "adjectives", "base_model",
          "base_fingerprint", "cinv_fingerprint", "options", "key", "layers"),
    "2": ("format", "format_version", "token", "supercategory", "lock", "base_model",
          "base_fingerprint", "cinv_fingerprint", "layers"),
}
# the tensor sets a file may hold: v1 has only the first; v2 either (i_super: keys locked)
_TENSOR_SETS = (("embedding", "i_star", "o_k", "o_v"), ("embedding", "i_star", "i_super", "o_v"))
_DTYPES = {"F32": 4, "F16": 2}  # safetensors dtype -> bytes per value
_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})
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
class ConceptInfo:
    """What describes a concept, without its tensors: a file's metadata fields. (eq=False
    as for Concept, which must not inherit a comparison of these fields alone.)"""

    token: str
    supercategories: tuple[str, ...]
    adjectives: tuple[str, ...]
    base_model: str
    base_fingerprint: str
    cinv_fingerprint: str
    options: dict[str, Any]    # JSON-able; stored as its JSON round trip
    key: str                   # cache key, lowercase hex


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
    def layers(self) -> dict[str, int]:
        """Layer path -> output width O of its to_k/to_v, in the order of `o_k`."""
        return {name: int(t.numel()) for name, t in self.o_k.items()}

    @property
    def num_floats(self) -> int:
        return size_for(self.layers, int(self.embedding.numel()), int(self.i_star.numel()))


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
    if not c.o_k:
        return "no layers"
    if "" in c.o_k:
        return "a layer name is empty"
    if set(c.o_k) != set(c.o_v):
        return f"o_k and o_v name different layers: {_names(set(c.o_k) ^ set(c.o_v))}"
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


def _names(names: Iterable[str], most: int = 5) -> str:
    ordered = sorted(names)
    shown = ", ".join(ordered[:most])
    return shown + (f" and {len(ordered) - most} more" if len(ordered) > most else "")


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
        "lock": c.lock, "base_model": c.base_model, "base_fingerprint": c.base_fingerprint,
        "cinv_fingerprint": c.cinv_fingerprint, "layers": _compact(c.layers),
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


class _Entry(NamedTuple):
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


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
        header, start = parse_header(data)
        metadata, entries = _split_header(header, len(data) - start)
        info, version, layers = _check_metadata(metadata)
        d_token, d_text = _check_entries(entries, layers, version)
        _check_base(info, expect_base_fingerprint, pipeline_model)
        _check_expected(d_token, d_text, layers, expect_dims, expect_layers)
        return _build(info, _decode(data), layers, key_weights)
    except _Problem as problem:
        raise ArtifactError(path, str(problem)) from None


def _split_header(
    header: dict[str, Any], data_size: int,
) -> tuple[dict[str, str], dict[str, _Entry]]:
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        raise _Problem(f"no metadata: not a {FORMAT} file")
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _Problem("the metadata is not a map of strings")
    entries = {name: _entry(name, info) for name, info in header.items()}
    _check_layout(entries, data_size)
    return metadata, entries


def _entry(name: str, info: Any) -> _Entry:
    if not isinstance(info, dict) or set(info) != _ENTRY_KEYS:
        raise _Problem(f"tensor {name}: malformed header entry {info!r}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not (isinstance(dtype, str) and isinstance(shape, list) and isinstance(offsets, list)
            and all(_is_count(n) for n in shape) and len(offsets) == 2
            and all(_is_count(n) for n in offsets) and offsets[0] <= offsets[1]):
        raise _Problem(f"tensor {name}: malformed header entry {info!r}")
    return _Entry(dtype, tuple(shape), offsets[0], offsets[1])


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_layout(entries: Mapping[str, _Entry], data_size: int) -> None:
    """The tensors tile the data region exactly: no gap, no overlap, nothing after it."""
    declared = max((e.end for e in entries.values()), default=0)
    if data_size < declared:
        raise _Problem(f"truncated: the header declares {declared:,} bytes of tensor data but "
                       f"the file holds {data_size:,}")
    if data_size > declared:
        raise _Problem(f"{data_size - declared:,} unexpected bytes after the tensor data "
                       f"(the header declares {declared:,})")
    position = 0
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin != position:
            raise _Problem(f"tensor {name}: its data overlaps another tensor or leaves a gap")
        position = entry.end


def _check_metadata(metadata: Mapping[str, str]) -> tuple[ConceptInfo, str, dict[str, int]]:
    if "format" not in metadata:
        raise _Problem(f"no 'format' in its metadata: not a {FORMAT} file")
    if metadata["format"] != FORMAT:
        raise _Problem(f"format is {metadata['format']!r}, not {FORMAT!r}")
    version = metadata.get("format_version")
    if version not in SUPPORTED_VERSIONS:
        raise _Problem(f"format version {version!r} is not supported (this version of "
                       f"perfusion reads format version {', '.join(SUPPORTED_VERSIONS)})")
    keys = _METADATA_KEYS[version]
    missing = set(keys) - set(metadata)
    extra = set(metadata) - set(keys)
    if missing or extra:
        parts = [f"lacks {_names(missing)}"] if missing else []
        parts += [f"has unexpected {_names(extra)}"] if extra else []
        raise _Problem(f"the metadata {' and '.join(parts)}")
    if version == "1":
        info = ConceptInfo(
            metadata["token"], _json_words(metadata, "supercategories"),
            _json_words(metadata, "adjectives"), metadata["base_model"],
            metadata["base_fingerprint"], metadata["cinv_fingerprint"],
            _json_field(metadata, "options", dict), metadata["key"])
    else:
        if metadata["lock"] not in ("local", "global"):
            raise _Problem(f"metadata lock is {metadata['lock'][:20]!r}, not local or global")
        sup = metadata["supercategory"]
        info = ConceptInfo(metadata["token"], (sup,) if sup else (), (),
                           metadata["base_model"], metadata["base_fingerprint"],
                           metadata["cinv_fingerprint"], {"lock": metadata["lock"]}, "")
    return info, version, _json_layers(metadata)


def _json_field(metadata: Mapping[str, str], key: str, kind: type) -> Any:
    try:
        value = json.loads(metadata[key], object_pairs_hook=no_duplicates)
    except ValueError:
        value = None
    if not isinstance(value, kind):
        raise _Problem(f"metadata {key} is not a JSON {kind.__name__}: {metadata[key][:80]!r}")
    return value


def _json_words(metadata: Mapping[str, str], key: str) -> tuple[str, ...]:
    words = _json_field(metadata, key, list)
    if not all(isinstance(w, str) for w in words):
        raise _Problem(f"metadata {key} is not a list of strings: {metadata[key][:80]!r}")
    return tuple(words)


def _json_layers(metadata: Mapping[str, str]) -> dict[str, int]:
    """metadata `layers`: {module path: O}, in the order the targets are concatenated."""
    text = metadata["layers"]
    try:
        layers = json.loads(text, object_pairs_hook=no_duplicates)
    except ValueError as exc:
        raise _Problem(f"metadata layers is not valid JSON: {exc}") from None
    if not (isinstance(layers, dict) and layers and all(
            name and _is_count(width) and width > 0 for name, width in layers.items())):
        raise _Problem(f"metadata layers is not a non-empty JSON object of layer paths and "
                       f"widths: {text[:80]!r}")
    return layers


def _check_entries(entries: Mapping[str, _Entry], layers: Mapping[str, int], version: str
                   ) -> tuple[int, int]:
    """Names, dtypes and shapes, consistent with `layers`; returns (D_tok, D)."""
    allowed = _TENSOR_SETS[:1] if version == "1" else _TENSOR_SETS
    names = set(allowed[-1] if "i_super" in entries else allowed[0])
    if set(entries) - names:
        raise _Problem(f"unexpected tensor(s): {_names(set(entries) - names)}")
    if names - set(entries):
        raise _Problem(f"missing tensor(s): {_names(names - set(entries))}")
    dtypes = {"F32"} if version == "1" else {entries["embedding"].dtype} & set(_DTYPES)
    for name in sorted(names):
        entry = entries[name]
        if entry.dtype not in dtypes:
            raise _Problem(f"tensor {name} has dtype {entry.dtype}; concept tensors are "
                           f"{' or '.join(sorted(dtypes)) or 'F32 or F16, all alike'}")
        if len(entry.shape) != 1 or entry.shape[0] == 0:
            raise _Problem(f"tensor {name} has shape {list(entry.shape)}; "
                           f"expected a non-empty vector")
        if entry.end - entry.begin != _DTYPES[entry.dtype] * entry.shape[0]:
            raise _Problem(f"tensor {name}: {entry.end - entry.begin} bytes of data for "
                           f"{entry.shape[0]} {entry.dtype} values")
    total = sum(layers.values())
    for name in sorted(names & {"o_k", "o_v"}):
        if entries[name].shape[0] != total:
            raise _Problem(f"tensor {name} has {entries[name].shape[0]} values but its "
                           f"{len(layers)} layers add up to {total}")
    if "i_super" in names and entries["i_super"].shape != entries["i_star"].shape:
        raise _Problem(f"tensor i_super has {entries['i_super'].shape[0]} values, i_star "
                       f"{entries['i_star'].shape[0]}")
    return entries["embedding"].shape[0], entries["i_star"].shape[0]


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
        raise _Problem(f"no targets for layer(s) {_names(set(expect_layers) - set(layers))} "
                       f"of this pipeline")
    if set(layers) - set(expect_layers):
        raise _Problem(f"layer(s) {_names(set(layers) - set(expect_layers))} are not "
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
