"""The concept file's container read strictly, without torch: the safetensors header, the
metadata, every tensor's name, dtype, shape and place, and every value finite. The store runs
this check on each hit and in `cache verify`, so a stored entry that would fail to load is
found, moved aside and rebuilt like a digest mismatch, before any model loads; `artifact.load`
runs it first, then the checks that need the pipeline (docs/runtime.md, "The concept file")."""

from __future__ import annotations

import json
import sys
from array import array
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from .safetensors_file import FormatProblem, names_of, no_duplicates, parse_header

FORMAT = "perfusion-concept"
FORMAT_VERSION = "4"
SUPPORTED_VERSIONS: tuple[str, ...] = ("1", "2", "3", "4")
# where the edit applies: "prompt", the prompt's own positions only (the trainer's);
# "all", every text position, padding included (formats 1 and 2) (docs/runtime.md)
POSITIONS = ("prompt", "all")
# Bounds that keep a hostile file from costing memory. An SD 1.5 concept is ~59 KiB with a
# ~2 KB header; SDXL-sized ones stay well under a megabyte.
MAX_FILE_BYTES = 64 * 1024 * 1024

_METADATA_KEYS = {
    "1": ("format", "format_version", "token", "supercategories", "adjectives", "base_model",
          "base_fingerprint", "cinv_fingerprint", "options", "key", "layers"),
    "2": ("format", "format_version", "token", "supercategory", "lock", "base_model",
          "base_fingerprint", "cinv_fingerprint", "layers"),
    "3": ("format", "format_version", "token", "supercategory", "lock", "positions",
          "base_model", "base_fingerprint", "cinv_fingerprint", "layers"),
    # 4: and `context`, the supercategory's leading words that stand before the token
    "4": ("format", "format_version", "token", "supercategory", "lock", "positions", "context",
          "base_model", "base_fingerprint", "cinv_fingerprint", "layers"),
}
# the tensor sets a file may hold: v1 has only the first; v2 either (i_super: keys locked)
_TENSOR_SETS = (("embedding", "i_star", "o_k", "o_v"), ("embedding", "i_star", "i_super", "o_v"))
_DTYPES = {"F32": 4, "F16": 2}  # safetensors dtype -> bytes per value
_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})


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


class Header(NamedTuple):
    """What a concept file's header says, checked: its description, format version, layers
    ({attn2 module path: O}, in the order the targets are concatenated) and widths."""

    info: ConceptInfo
    version: str
    layers: dict[str, int]
    d_token: int  # embedding width
    d_text: int   # text-encoder output width (i_star, i_super)


def read(data: bytes) -> Header:
    """The checked header of the concept file `data`; FormatProblem says what is wrong."""
    header, start = parse_header(data)
    metadata, entries = _split_header(header, len(data) - start)
    info, version, layers = _check_metadata(metadata)
    d_token, d_text = _check_entries(entries, layers, version)
    for name, e in sorted(entries.items()):
        for part, raw in _parts(name, data[start + e.begin:start + e.end], layers,
                                _DTYPES[e.dtype]):
            bad = non_finite(raw, e.dtype)
            if bad:
                raise FormatProblem(f"tensor {part} has {bad} non-finite value(s) (NaN or "
                                    "infinity)")
    return Header(info, version, layers, d_token, d_text)


def _parts(name: str, raw: bytes, layers: Mapping[str, int], width: int
           ) -> list[tuple[str, bytes]]:
    """A tensor's bytes, the concatenated targets split per layer (named `o_v.<layer>`)."""
    if name not in ("o_k", "o_v"):
        return [(name, raw)]
    parts, at = [], 0
    for layer, count in layers.items():
        parts.append((f"{name}.{layer}", raw[at:at + count * width]))
        at += count * width
    return parts


# an IEEE float is NaN or infinite when its exponent bits are all set
_EXPONENT = {"F32": ("I", 0x7F800000), "F16": ("H", 0x7C00)}


def non_finite(raw: bytes, dtype: str) -> int:
    """How many of the little-endian `dtype` values in `raw` are NaN or infinite."""
    code, mask = _EXPONENT[dtype]
    words = array(code, raw)
    if sys.byteorder != "little":
        words.byteswap()
    return sum(1 for w in words if w & mask == mask)


class _Entry(NamedTuple):
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _split_header(
    header: dict[str, Any], data_size: int,
) -> tuple[dict[str, str], dict[str, _Entry]]:
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        raise FormatProblem(f"no metadata: not a {FORMAT} file")
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatProblem("the metadata is not a map of strings")
    entries = {name: _entry(name, info) for name, info in header.items()}
    _check_layout(entries, data_size)
    return metadata, entries


def _entry(name: str, info: Any) -> _Entry:
    if not isinstance(info, dict) or set(info) != _ENTRY_KEYS:
        raise FormatProblem(f"tensor {name}: malformed header entry {info!r}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not (isinstance(dtype, str) and isinstance(shape, list) and isinstance(offsets, list)
            and all(_is_count(n) for n in shape) and len(offsets) == 2
            and all(_is_count(n) for n in offsets) and offsets[0] <= offsets[1]):
        raise FormatProblem(f"tensor {name}: malformed header entry {info!r}")
    return _Entry(dtype, tuple(shape), offsets[0], offsets[1])


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_layout(entries: Mapping[str, _Entry], data_size: int) -> None:
    """The tensors tile the data region exactly: no gap, no overlap, nothing after it."""
    declared = max((e.end for e in entries.values()), default=0)
    if data_size < declared:
        raise FormatProblem(f"truncated: the header declares {declared:,} bytes of tensor data but "
                       f"the file holds {data_size:,}")
    if data_size > declared:
        raise FormatProblem(f"{data_size - declared:,} unexpected bytes after the tensor data "
                       f"(the header declares {declared:,})")
    position = 0
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin != position:
            raise FormatProblem(f"tensor {name}: its data overlaps another tensor or leaves a gap")
        position = entry.end


def _check_metadata(metadata: Mapping[str, str]) -> tuple[ConceptInfo, str, dict[str, int]]:
    if "format" not in metadata:
        raise FormatProblem(f"no 'format' in its metadata: not a {FORMAT} file")
    if metadata["format"] != FORMAT:
        raise FormatProblem(f"format is {metadata['format']!r}, not {FORMAT!r}")
    version = metadata.get("format_version")
    if version not in SUPPORTED_VERSIONS:
        raise FormatProblem(f"format version {version!r} is not supported (this version of "
                       f"perfusion reads format version {', '.join(SUPPORTED_VERSIONS)})")
    keys = _METADATA_KEYS[version]
    missing = set(keys) - set(metadata)
    extra = set(metadata) - set(keys)
    if missing or extra:
        parts = [f"lacks {names_of(missing)}"] if missing else []
        parts += [f"has unexpected {names_of(extra)}"] if extra else []
        raise FormatProblem(f"the metadata {' and '.join(parts)}")
    if version == "1":
        info = ConceptInfo(
            metadata["token"], _json_words(metadata, "supercategories"),
            _json_words(metadata, "adjectives"), metadata["base_model"],
            metadata["base_fingerprint"], metadata["cinv_fingerprint"],
            _json_field(metadata, "options", dict), metadata["key"])
    else:
        if metadata["lock"] not in ("local", "global"):
            raise FormatProblem(f"metadata lock is {metadata['lock'][:20]!r}, not local or global")
        positions = metadata.get("positions", "all")
        if positions not in POSITIONS:
            raise FormatProblem(f"metadata positions is {positions[:20]!r}, not prompt or all")
        sup = metadata["supercategory"]
        context = metadata.get("context", "")  # "" in format 3: trained without
        problem = context_problem(context, (sup,) if sup else ())
        if problem:
            raise FormatProblem(f"metadata {problem}")
        info = ConceptInfo(metadata["token"], (sup,) if sup else (), (),
                           metadata["base_model"], metadata["base_fingerprint"],
                           metadata["cinv_fingerprint"],
                           {"lock": metadata["lock"], "positions": positions,
                            "context": context}, "")
    return info, version, _json_layers(metadata)


def context_problem(context: str, supercategories: tuple[str, ...]) -> str | None:
    """What is wrong with a concept's context words, or None: they must be the first
    supercategory's words before its last (a concept renders them before its token, and
    global locking reads the rest of that supercategory in its place), written as
    `tokens.leading_words` writes them."""
    if not context:
        return None
    first = supercategories[0].split() if supercategories else []
    if context != " ".join(first[:-1]):
        return (f"context {context[:80]!r} is not the words before the last of the "
                f"supercategory {' '.join(first)[:80]!r}")
    return None


def _json_field(metadata: Mapping[str, str], key: str, kind: type) -> Any:
    try:
        value = json.loads(metadata[key], object_pairs_hook=no_duplicates)
    except ValueError:
        value = None
    if not isinstance(value, kind):
        raise FormatProblem(f"metadata {key} is not a JSON {kind.__name__}: {metadata[key][:80]!r}")
    return value


def _json_words(metadata: Mapping[str, str], key: str) -> tuple[str, ...]:
    words = _json_field(metadata, key, list)
    if not all(isinstance(w, str) for w in words):
        raise FormatProblem(f"metadata {key} is not a list of strings: {metadata[key][:80]!r}")
    return tuple(words)


def _json_layers(metadata: Mapping[str, str]) -> dict[str, int]:
    """metadata `layers`: {module path: O}, in the order the targets are concatenated."""
    text = metadata["layers"]
    try:
        layers = json.loads(text, object_pairs_hook=no_duplicates)
    except ValueError as exc:
        raise FormatProblem(f"metadata layers is not valid JSON: {exc}") from None
    if not (isinstance(layers, dict) and layers and all(
            name and _is_count(width) and width > 0 for name, width in layers.items())):
        raise FormatProblem(f"metadata layers is not a non-empty JSON object of layer paths and "
                       f"widths: {text[:80]!r}")
    return layers


def _check_entries(entries: Mapping[str, _Entry], layers: Mapping[str, int], version: str
                   ) -> tuple[int, int]:
    """Names, dtypes and shapes, consistent with `layers`; returns (D_tok, D)."""
    allowed = _TENSOR_SETS[:1] if version == "1" else _TENSOR_SETS
    names = set(allowed[-1] if "i_super" in entries else allowed[0])
    if set(entries) - names:
        raise FormatProblem(f"unexpected tensor(s): {names_of(set(entries) - names)}")
    if names - set(entries):
        raise FormatProblem(f"missing tensor(s): {names_of(names - set(entries))}")
    dtypes = {"F32"} if version == "1" else {entries["embedding"].dtype} & set(_DTYPES)
    for name in sorted(names):
        entry = entries[name]
        if entry.dtype not in dtypes:
            raise FormatProblem(f"tensor {name} has dtype {entry.dtype}; concept tensors are "
                           f"{' or '.join(sorted(dtypes)) or 'F32 or F16, all alike'}")
        if len(entry.shape) != 1 or entry.shape[0] == 0:
            raise FormatProblem(f"tensor {name} has shape {list(entry.shape)}; "
                           f"expected a non-empty vector")
        if entry.end - entry.begin != _DTYPES[entry.dtype] * entry.shape[0]:
            raise FormatProblem(f"tensor {name}: {entry.end - entry.begin} bytes of data for "
                           f"{entry.shape[0]} {entry.dtype} values")
    total = sum(layers.values())
    for name in sorted(names & {"o_k", "o_v"}):
        if entries[name].shape[0] != total:
            raise FormatProblem(f"tensor {name} has {entries[name].shape[0]} values but its "
                           f"{len(layers)} layers add up to {total}")
    if "i_super" in names and entries["i_super"].shape != entries["i_star"].shape:
        raise FormatProblem(f"tensor i_super has {entries['i_super'].shape[0]} values, i_star "
                       f"{entries['i_star'].shape[0]}")
    return entries["embedding"].shape[0], entries["i_star"].shape[0]
