"""What a run would do: each plan step is new, up to date or changed (and why), without torch."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from perfusion_dsl.keys import digest
from perfusion_dsl.plan import PLAN_VERSION, ConceptStep, Plan, RenderStep

from ..files.atomic import file_sha256, read_regular, write_json_atomically
from ..files.outputs import read_manifest
from ..files.store import Store, StoreError
from .models import ModelUnavailable, source_of, stamp

State = Literal["new", "up to date", "changed"]
RENDER_KEY_FORMAT = 1  # bump when a render's bytes would change for the same inputs
MAX_HISTORY_BYTES = 1 << 24  # a build record lists every image: 10,000 of them fit


@dataclass(frozen=True)
class Status:
    state: State
    reasons: tuple[str, ...] = ()

    def __str__(self) -> str:
        return self.state + (f": {'; '.join(self.reasons)}" if self.reasons else "")


def tool_version() -> str:
    """`perfusion X.Y.Z`, from the installed distribution (the runtime reads nothing else of
    the compiler than its plan model)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"perfusion {version('perfusion-concepts')}"
    except PackageNotFoundError:
        return "perfusion (not installed)"


_STAMPS: dict[str, str | None] = {}


def model_stamp(model: str) -> str | None:
    """What identifies a base model's weights beyond its name, read without loading it
    (`models.stamp`): a model retrained, replaced or at a new revision under the same name
    thus changes every key made with it. Remembered per process, except a model id not yet
    in the hub's cache, which a run may download meanwhile."""
    if model not in _STAMPS:
        found = stamp(model)
        if found == "missing" and _is_hub(model):
            return found
        _STAMPS[model] = found
    return _STAMPS[model]


def _is_hub(model: str) -> bool:
    try:
        return source_of(model).kind == "hub"
    except ModelUnavailable:
        return False


def forget_stamp(model: str) -> None:
    """After a run downloaded or resolved `model` again."""
    _STAMPS.pop(model, None)


def store_key(step: ConceptStep, captions_sha256: str | None = None) -> str:
    """The store key of a concept: the plan's key, with the base model's weights stamp and a
    user caption corpus (which changes C⁻¹) mixed in when there are any."""
    stamp = model_stamp(step.model)
    if captions_sha256 is None and stamp is None:
        return step.key
    return digest({"concept": step.key, "captions": captions_sha256, "model": stamp})


# ---------------------------------------------------------------- concepts


def concept_inputs(step: ConceptStep, root: Path) -> dict[str, Any]:
    """What a concept was built from, as recorded in the store's history (for "why")."""
    return {
        "model": step.model, "model_stamp": model_stamp(step.model),
        "supercategories": list(step.supercategories),
        "adjectives": list(step.adjectives),
        "options": step.options.model_dump(mode="json"),
        "images": [[image, file_sha256(root / image)] for image in step.images],
    }


def _list_changes(what: str, old: Sequence[Any], new: Sequence[Any]) -> list[str]:
    return [] if list(old) == list(new) else [f"{what} {_show(old)} → {_show(new)}"]


def _show(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False) if isinstance(value, str) else repr(value)


def _image_changes(old: Sequence[Sequence[Any]], new: Sequence[Sequence[Any]]) -> list[str]:
    before = {str(p): d for p, d in old}
    after = {str(p): d for p, d in new}
    out = [f"image {p} added" for p in after if p not in before]
    out += [f"image {p} removed" for p in before if p not in after]
    out += [f"image {p} changed" for p in after if p in before and before[p] != after[p]]
    if not out and list(before) != list(after):
        out.append("image order changed")
    return out


def option_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    return [f"`{k}` {_show(old.get(k, '(unset)'))} → {_show(new.get(k, '(unset)'))}"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def concept_reasons(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Human reasons between two `concept_inputs` records."""
    out = _list_changes("model", [old.get("model")], [new.get("model")])
    if not out and old.get("model_stamp") != new["model_stamp"]:
        out.append("the base model's weights changed")
    out += _list_changes("supercategories", old.get("supercategories", []),
                         new["supercategories"])
    out += _list_changes("adjectives", old.get("adjectives", []), new["adjectives"])
    out += _image_changes(old.get("images", []), new["images"])
    return out + option_changes(old.get("options", {}), new["options"])


def since_format(record: Mapping[str, Any], reason: str) -> str:
    """`reason`, unless `record` was written under another plan format (records before
    format 2 carry none): then that is what the reasons cannot see past."""
    return reason if record.get("plan", 1) == PLAN_VERSION else "the plan format changed"


def _safely(reasons: Callable[[Any, Any], list[str]], old: Any, new: Any,
            unreadable: str) -> list[str]:
    """Reasons against a record read from disk, which a person may have edited: a record of
    the wrong shape gives the one reason `unreadable`, never a crash."""
    try:
        return reasons(old, new)
    except (TypeError, ValueError, KeyError, AttributeError):
        return [unreadable]


def history_path(store: Store, token: str) -> Path:
    return store.root / "history" / f"{hashlib.sha256(token.encode()).hexdigest()[:32]}.json"


def read_history(store: Store, token: str) -> dict[str, Any] | None:
    """The last build of `token` recorded in this store, or None."""
    try:  # never through a link, and bounded: the store's files may have been tampered with
        record = json.loads(read_regular(history_path(store, token), MAX_HISTORY_BYTES))
    except (OSError, ValueError):
        return None
    ok = isinstance(record, dict) and record.get("token") == token and "inputs" in record
    return record if ok else None


def write_history(store: Store, token: str, key: str, inputs: Mapping[str, Any]) -> None:
    record = {"token": token, "key": key, "plan": PLAN_VERSION, "inputs": dict(inputs)}
    if read_history(store, token) != record:
        write_json_atomically(history_path(store, token), record, StoreError)


def concept_status(step: ConceptStep, key: str, store: Store, root: Path) -> Status:
    """Up to date when the store holds a valid entry for `key` (checked read-only)."""
    if store.peek(key) is not None:
        return Status("up to date")
    old = read_history(store, step.token)
    if old is None:
        if os.path.lexists(history_path(store, step.token)):  # there, but not a record
            return Status("changed", ("the record of its last build is unreadable",))
        return Status("new")
    if old.get("key") == key:
        return Status("changed", ("its artifact is missing from the store or corrupt",))
    reasons = _safely(concept_reasons, old["inputs"], concept_inputs(step, root),
                      since_format(old, "the record of its last build is unreadable"))
    return Status("changed", tuple(reasons or [since_format(
        old, "the cache key's format or caption corpus changed")]))


# ---------------------------------------------------------------- renders


def render_inputs(step: RenderStep, concept_keys: Mapping[str, str]) -> dict[str, Any]:
    """Everything that changes a rendered image's pixels."""
    o = step.options
    return {
        "prompt": step.prompt, "negative": o.negative, "seed": step.seed,
        "strength": step.strength, "steps": o.steps, "guidance": o.guidance,
        "size": o.size, "model": step.model, "model_stamp": model_stamp(step.model),
        "concepts": {token: concept_keys[token] for token in step.concepts},
    }


def render_key(inputs: Mapping[str, Any]) -> str:
    return digest({"format": RENDER_KEY_FORMAT, **inputs})


def render_reasons(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    old_concepts, new_concepts = old.get("concepts", {}), new["concepts"]
    for token in sorted(set(old_concepts) | set(new_concepts)):
        if token not in old_concepts or token not in new_concepts:
            continue  # a different prompt says it
        if old_concepts[token] != new_concepts[token]:
            out.append(f"concept {token} changed")
    if old.get("model") == new["model"] and old.get("model_stamp") != new["model_stamp"]:
        out.append("the base model's weights changed")
    rest = {k: v for k, v in new.items() if k not in ("concepts", "model_stamp")}
    was = {k: old.get(k) for k in rest}
    return out + option_changes(was, rest)


class Manifests:
    """The manifests of the output folders a run touches, read once each."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._cache: dict[str, dict[str, Any]] = {}
        self.changed: dict[str, set[tuple[str, str]]] = {}  # folder -> {(section, name)}

    def set(self, folder: str, section: str, name: str, record: dict[str, Any]) -> None:
        """Record `name` in the folder's "images" or "sheets", to be merged on write."""
        self.folder(folder)[section][name] = record
        self.changed.setdefault(folder, set()).add((section, name))

    def changes(self, folder: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """(images, sheets) this run recorded in `folder`, and forget them."""
        manifest, names = self.folder(folder), self.changed.pop(folder, set())
        return ({n: manifest["images"][n] for s, n in names if s == "images"},
                {n: manifest["sheets"][n] for s, n in names if s == "sheets"})

    def folder(self, rel_folder: str) -> dict[str, Any]:
        if rel_folder not in self._cache:
            self._cache[rel_folder] = read_manifest(self.root / rel_folder)
        return self._cache[rel_folder]

    def record(self, out: str) -> dict[str, Any] | None:
        path = PurePosixPath(out)
        record = self.folder(str(path.parent))["images"].get(path.name)
        return record if isinstance(record, dict) else None


def render_status(step: RenderStep, key: str, inputs: Mapping[str, Any],
                  manifests: Manifests) -> Status:
    """Up to date when the manifest records this key for the file and its bytes match."""
    record = manifests.record(step.out)
    path = manifests.root / step.out
    if record is None:
        return Status("new") if not os.path.lexists(path) else \
            Status("changed", ("the file has no manifest record",))
    if record.get("render_key") != key:
        reasons = _safely(render_reasons, record.get("inputs", {}), inputs,
                          since_format(record, "its manifest record is unreadable"))
        return Status("changed", tuple(reasons or [since_format(record,
                                                                "the render format changed")]))
    if file_sha256(path) != record.get("sha256"):
        missing = not os.path.lexists(path)
        return Status("changed", ("the image file is missing" if missing
                                  else "the image file was modified since it was rendered",))
    return Status("up to date")


# ---------------------------------------------------------------- the whole plan


@dataclass(frozen=True)
class PlanStatus:
    """Each concept's store key and status, each render's key, inputs and status."""

    concept_keys: dict[str, str]  # token → store key
    concepts: dict[str, Status]  # token → status
    render_keys: tuple[str, ...]
    render_inputs: tuple[dict[str, Any], ...]
    renders: tuple[Status, ...]

    def counts(self) -> tuple[int, int]:
        """(concepts to train, images to render)."""
        return (sum(s.state != "up to date" for s in self.concepts.values()),
                sum(s.state != "up to date" for s in self.renders))


def plan_status(plan: Plan, root: Path, store: Store,
                captions_sha256: str | None = None) -> PlanStatus:
    keys = {c.token: store_key(c, captions_sha256) for c in plan.concepts}
    concepts = {c.token: concept_status(c, keys[c.token], store, root) for c in plan.concepts}
    manifests = Manifests(root)
    inputs = tuple(render_inputs(r, keys) for r in plan.renders)
    rkeys = tuple(render_key(i) for i in inputs)
    renders = tuple(_cached(render_status(r, k, i, manifests), store, k)
                    for r, k, i in zip(plan.renders, rkeys, inputs, strict=True))
    # a changed concept changes every render that uses it: its key is in the render key
    return PlanStatus(keys, concepts, rkeys, inputs, renders)


def concept_statuses(plan: Plan, store: Store, root: Path) -> dict[str, str]:
    """Each concept's status as `perfusion plan` words it (`new`, `up to date`, `changed:
    steps 300 → 400`), by token; read-only, for an editor's hints (`perfusion lsp`)."""
    return {c.token: str(concept_status(c, store_key(c), store, root)) for c in plan.concepts}


def _cached(status: Status, store: Store, key: str) -> Status:
    if status.state == "up to date" or not (store.root / "renders" / key).is_dir():
        return status
    return Status(status.state, (*status.reasons, "its image is in the cache (no model needed)"))
