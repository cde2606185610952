"""The concept store: digest checked on every hit (R6), atomic publish (R1, R2), disk full (R11).

Artifacts here are small but real concept files (the store also runs the file's own checks
on every hit); all files are real.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pickle
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from perfusion_runtime.files.store import (
    ARTIFACT,
    MANIFEST,
    Store,
    StoreError,
    cache_root,
)
from perfusion_runtime.method.artifact import Concept, encode


def concept_bytes(seed: int, *, half: bool = False) -> bytes:
    """A tiny concept file (one layer of width 3), different for each seed."""
    gen = torch.Generator().manual_seed(seed)
    layer = "mid_block.attentions.0.transformer_blocks.0.attn2"
    return encode(Concept(
        token="teddy*", supercategories=("teddy bear",), adjectives=(), base_model="tiny:random",
        base_fingerprint="b" * 64, cinv_fingerprint="c" * 64, options={}, key="",
        embedding=torch.randn(4, generator=gen), i_star=torch.randn(5, generator=gen),
        o_k={layer: torch.randn(3, generator=gen)}, o_v={layer: torch.randn(3, generator=gen)}),
        half=half)


DATA, OTHER = concept_bytes(0), concept_bytes(1)


def key_of(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


KEY, KEY2, KEY3 = key_of("teddy"), key_of("cat"), key_of("dog")


def put(store: Store, key: str = KEY, data: bytes = DATA) -> Path:
    return store.put(key, data, token="teddy*", tool_version="perfusion 0.1.0")


def entries(store: Store) -> list[str]:
    return sorted(p.name for p in store.concepts.iterdir()) if store.concepts.exists() else []


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def assert_miss_reported_and_rebuilt(store: Store, caplog: pytest.LogCaptureFixture,
                                     bad_path: Path, actual: str) -> None:
    """The corrupt entry is a miss, logged with path and both digests, trashed, then rebuilt."""
    with caplog.at_level(logging.WARNING, logger="perfusion_runtime.files.store"):
        assert store.get(KEY) is None
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
    message = record.getMessage()
    assert str(bad_path) in message
    assert actual in message
    assert "expected" in message
    assert not store.entry(KEY).exists()
    assert len(leftovers(store.trash)) == 1
    path = put(store)
    assert store.get(KEY) == path
    assert path.read_bytes() == DATA


def test_R6_flipped_byte_is_a_miss_and_reported(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    store = Store(tmp_path)
    path = put(store)
    data = bytearray(path.read_bytes())
    data[10] ^= 0x01
    path.write_bytes(data)
    assert_miss_reported_and_rebuilt(store, caplog, path, hashlib.sha256(data).hexdigest())
    assert hashlib.sha256(DATA).hexdigest() in caplog.text


def test_R6_truncated(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = Store(tmp_path)
    path = put(store)
    path.write_bytes(DATA[:-7])
    assert_miss_reported_and_rebuilt(store, caplog, path, hashlib.sha256(DATA[:-7]).hexdigest())
    assert f"{len(DATA) - 7:,} bytes (manifest: {len(DATA):,} bytes)" in caplog.text


def test_R6_zeroed_tail(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Same size, wrong content: what a safetensors loader cannot see (docs/build.md)."""
    store = Store(tmp_path)
    path = put(store)
    zeroed = DATA[:-16] + bytes(16)
    path.write_bytes(zeroed)
    assert path.stat().st_size == len(DATA)
    assert_miss_reported_and_rebuilt(store, caplog, path, hashlib.sha256(zeroed).hexdigest())


def test_R6_swapped_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = Store(tmp_path)
    path = put(store)
    other = put(store, KEY2, OTHER)
    shutil.copyfile(other, path)
    assert_miss_reported_and_rebuilt(store, caplog, path, hashlib.sha256(OTHER).hexdigest())
    assert store.get(KEY2) == other  # the other entry is untouched


def test_R6_missing_manifest(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = Store(tmp_path)
    put(store)
    manifest = store.entry(KEY) / MANIFEST
    manifest.unlink()
    assert_miss_reported_and_rebuilt(store, caplog, manifest, hashlib.sha256(DATA).hexdigest())


def crash_in_rename(tmp_path: Path, *, after: bool) -> None:
    """A real process dies (os._exit, no cleanup) just before or just after the rename."""
    script = (
        "import os, sys\n"
        "from perfusion_runtime.files.store import Store\n"
        "real = os.rename\n"
        "def crash(src, dst):\n"
        f"    if {after}: real(src, dst)\n"
        "    os._exit(137)\n"
        "os.rename = crash\n"
        f"Store(sys.argv[1]).put({KEY!r}, {DATA!r}, token='t', tool_version='v')\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], timeout=60)
    assert done.returncode == 137


def test_R2_crash_before_rename_leaves_no_entry(tmp_path: Path) -> None:
    crash_in_rename(tmp_path, after=False)
    store = Store(tmp_path)
    assert entries(store) == []
    assert len(leftovers(store.tmp)) == 1  # the staged copy a real crash leaves behind
    assert store.get(KEY) is None
    assert store.gc(set()) == []  # too young: it might be another process staging
    assert len(store.gc(set(), grace=0)) == 1
    assert leftovers(store.tmp) == []
    assert put(store).read_bytes() == DATA


def test_R2_crash_after_rename_is_a_complete_entry(tmp_path: Path) -> None:
    crash_in_rename(tmp_path, after=True)
    store = Store(tmp_path)
    assert entries(store) == [KEY]
    assert leftovers(store.tmp) == []
    path = store.get(KEY)
    assert path is not None and path.read_bytes() == DATA
    assert store.verify() == []


@pytest.mark.parametrize("call", ["write", "fsync", "rename"])
def test_R11_enospc_cleans_temp_and_keeps_old_entry(tmp_path: Path, call: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path)
    old = put(store, KEY2, OTHER)

    def disk_full(*args: Any) -> Any:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, call, disk_full)
    with pytest.raises(StoreError) as caught:
        put(store)
    monkeypatch.undo()
    assert str(store.entry(KEY)) in str(caught.value)
    assert "ENOSPC" in str(caught.value)
    assert caught.value.path == store.entry(KEY)
    assert leftovers(store.tmp) == []
    assert entries(store) == [KEY2]
    assert store.get(KEY2) == old and old.read_bytes() == OTHER
    assert store.get(KEY) is None


def test_put_is_idempotent(tmp_path: Path) -> None:
    store = Store(tmp_path)
    first = put(store)
    manifest = (store.entry(KEY) / MANIFEST).read_bytes()
    second = put(store)
    assert first == second == store.get(KEY)
    assert (store.entry(KEY) / MANIFEST).read_bytes() == manifest  # kept, not rewritten
    assert entries(store) == [KEY]
    assert leftovers(store.tmp) == [] and leftovers(store.trash) == []
    assert sorted(p.name for p in store.entry(KEY).iterdir()) == [ARTIFACT, MANIFEST]


def test_put_replaces_an_invalid_entry(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.entry(KEY).mkdir(parents=True)
    (store.entry(KEY) / ARTIFACT).write_bytes(b"half")
    assert put(store).read_bytes() == DATA
    assert store.verify() == []
    assert len(leftovers(store.trash)) == 1


def test_verify_lists_every_problem(tmp_path: Path) -> None:
    store = Store(tmp_path)
    keys = [key_of(str(i)) for i in range(5)]
    paths = [put(store, k, concept_bytes(2 + i)) for i, k in enumerate(keys)]
    assert store.verify() == []
    corrupt: list[Callable[[Path], Any]] = [
        lambda p: p.write_bytes(b"x" + p.read_bytes()[1:]),
        lambda p: p.write_bytes(p.read_bytes()[:3]),
        lambda p: (p.parent / MANIFEST).write_text("{not json"),
    ]
    for damage, path in zip(corrupt, paths[1:4], strict=True):
        damage(path)
    (store.concepts / "stray.txt").write_text("?")
    problems = store.verify()
    assert [p.path.parent.name for p in problems[:3]] == sorted(keys[1:4])
    assert problems[3].path == store.concepts / "stray.txt"
    for problem in problems[:3]:
        assert "expected" in problem.message and "actual" in problem.message
    assert entries(store) == sorted([*keys, "stray.txt"])  # verify only reports


def _header_changed(data: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    """`data` with its safetensors header rewritten by `change` (the tensor bytes kept)."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    change(header)
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data[8 + length:]


def _value_set(data: bytes, tensor: str, raw: bytes) -> bytes:
    """`data` with the first value of `tensor` replaced by `raw` (same width)."""
    length = int.from_bytes(data[:8], "little")
    begin = 8 + length + json.loads(data[8:8 + length])[tensor]["data_offsets"][0]
    return data[:begin] + raw + data[begin + len(raw):]


def _as_float64(data: bytes) -> bytes:
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    body = data[8 + length:]
    metadata = header.pop("__metadata__")
    tensors = {name: torch.frombuffer(bytearray(body[e["data_offsets"][0]:e["data_offsets"][1]]),
                                      dtype=torch.float32).double()
               for name, e in header.items()}
    return safetensors.torch.save(tensors, metadata=metadata)


def _layers_off_by_one(header: dict[str, Any]) -> None:
    layers = json.loads(header["__metadata__"]["layers"])
    header["__metadata__"]["layers"] = json.dumps({name: o + 1 for name, o in layers.items()})


def _overlapping(header: dict[str, Any]) -> None:
    header["i_star"]["data_offsets"] = header["embedding"]["data_offsets"]


HALF = concept_bytes(0, half=True)

UNLOADABLE: dict[str, tuple[bytes, str]] = {
    "pickle": (pickle.dumps({"embedding": [1.0, 2.0]}), "it is a Python pickle"),
    "huge header length": ((1 << 62).to_bytes(8, "little") + DATA[8:], "not a safetensors file"),
    "NaN": (_value_set(DATA, "o_v", struct.pack("<f", float("nan"))),
            "tensor o_v.mid_block.attentions.0.transformer_blocks.0.attn2 has 1 non-finite"),
    "infinity in float16": (_value_set(HALF, "embedding", struct.pack("<e", float("inf"))),
                            "tensor embedding has 1 non-finite value(s)"),
    "float64": (_as_float64(DATA), "has dtype F64"),
    "overlapping offsets": (_header_changed(DATA, _overlapping), "overlaps another tensor"),
    "wrong layers": (_header_changed(DATA, _layers_off_by_one), "layers add up to"),
}


@pytest.mark.parametrize("case", list(UNLOADABLE))
def test_R6_entry_whose_digest_matches_but_cannot_load_is_a_miss(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str) -> None:
    """Bytes that match their manifest's digest but could never load (written so, or by a
    bug) are as corrupt as a flipped bit: `verify` names the problem, `get` moves the entry
    aside and misses, so the build trains it again in the same run."""
    bad, says = UNLOADABLE[case]
    store = Store(tmp_path)
    put(store, KEY, bad)
    [problem] = store.verify()
    assert problem.path == store.entry(KEY) / ARTIFACT
    assert "digest matches but it is not a usable concept file" in problem.message
    assert says in problem.message
    with caplog.at_level(logging.WARNING, logger="perfusion_runtime.files.store"):
        assert store.get(KEY) is None
    assert says in caplog.text
    assert not store.entry(KEY).exists() and len(leftovers(store.trash)) == 1
    assert store.get(KEY) is None  # a miss, so the caller rebuilds it
    assert put(store).read_bytes() == DATA and store.verify() == []


def test_gc_keeps_referenced_keys(tmp_path: Path) -> None:
    store = Store(tmp_path)
    for key in (KEY, KEY2, KEY3):
        put(store, key, concept_bytes(int(key[:4], 16)))
    (store.entry(KEY3) / ARTIFACT).write_bytes(b"corrupt, but referenced")
    store.tmp.mkdir(exist_ok=True)
    (store.tmp / "stale.0123").mkdir()
    removed = store.gc({KEY, KEY3, key_of("not built yet")}, grace=0)
    assert sorted(removed) == sorted([str(store.entry(KEY2)), str(store.tmp / "stale.0123")])
    assert entries(store) == sorted([KEY, KEY3])
    assert store.get(KEY) is not None
    assert store.gc({KEY, KEY3}) == []


def test_keys_are_never_paths(tmp_path: Path) -> None:
    store = Store(tmp_path)
    for bad in ("", "..", "a/b", ".hidden", "x" * 200):
        with pytest.raises(ValueError):
            put(store, bad)


def test_cache_root_explicit_then_environment_then_run_root_then_user_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One resolver for the store and the C⁻¹ cache, for the CLI and the Python API."""
    monkeypatch.delenv("PERFUSION_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "perfusion"
    assert cache_root(None, tmp_path / "run") == tmp_path / "run" / ".perfusion"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "perfusion"
    monkeypatch.setenv("PERFUSION_CACHE", str(tmp_path / "elsewhere"))
    assert cache_root(None, tmp_path / "run") == tmp_path / "elsewhere"
    assert cache_root() == tmp_path / "elsewhere"
    assert cache_root(tmp_path / "given", tmp_path / "run") == tmp_path / "given"


def test_manifest_keeps_what_the_concept_was_built_from(tmp_path: Path) -> None:
    """The artifact holds only what loading needs; the manifest explains the concept."""
    inputs = {"model": "tiny:random", "supercategories": ["teddy bear", "toy"],
              "adjectives": ["brown"], "options": {"templates": ["a {}"] * 40, "steps": 8},
              "images": [[f"photos/{i}.png", "0" * 64] for i in range(2_000)]}
    store = Store(tmp_path / "store")
    path = store.put(KEY, DATA, token="teddy*", tool_version="perfusion 0.1.0", inputs=inputs)
    manifest = json.loads((path.parent / "manifest.json").read_text())
    assert manifest["inputs"] == inputs
    assert store.get(KEY) == path  # a large manifest is still a valid entry


def test_S2_a_cached_render_folder_that_is_a_link_is_never_written_through(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store, outside, key = Store(tmp_path / "store"), tmp_path / "outside", "a" * 64
    outside.mkdir()
    (outside / f"{hashlib.sha256(b'theirs').hexdigest()}.png").write_bytes(b"theirs")
    (store.root / "renders").mkdir(parents=True)
    (store.root / "renders" / key).symlink_to(outside)
    with caplog.at_level(logging.WARNING):
        assert store.render(key) is None  # what the link points at is not the store's
    assert "a symbolic link" in caplog.text
    store.put_render(key, b"ours")
    assert [p.name for p in outside.iterdir()] == [f"{hashlib.sha256(b'theirs').hexdigest()}.png"]
    assert store.render(key) == b"ours" and not (store.root / "renders" / key).is_symlink()


def test_R6_verify_covers_cinv_entries_and_cached_renders(tmp_path: Path) -> None:
    """A bit flipped in a cached C⁻¹ or a cached render used to pass `cache verify`."""
    import safetensors.torch
    import torch

    store = Store(tmp_path / "store")
    (store.root / "cinv").mkdir(parents=True)
    cinv = torch.eye(8)
    good = safetensors.torch.save({"cinv": cinv}, {
        "cinv_sha256": hashlib.sha256(cinv.numpy().tobytes()).hexdigest()})
    (store.root / "cinv" / "good.safetensors").write_bytes(good)
    (store.root / "cinv" / "flipped.safetensors").write_bytes(
        good[:-5] + bytes([good[-5] ^ 0x01]) + good[-4:])
    (store.root / "cinv" / "old.safetensors").write_bytes(
        safetensors.torch.save({"cinv": cinv}))
    store.put_render("a" * 64, b"png bytes")
    (cached,) = (store.root / "renders" / ("a" * 64)).iterdir()
    cached.write_bytes(b"png bytez")
    problems = {p.path.name: p.message for p in store.verify()}
    assert set(problems) == {"flipped.safetensors", "old.safetensors", cached.name}, problems
    assert problems["flipped.safetensors"].startswith("sha256 expected ")
    assert "no digest" in problems["old.safetensors"]
    assert "does not match its name" in problems[cached.name]
