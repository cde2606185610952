"""The concept file: bit-exact round trip, strict loading (M1, S8), atomic saving (R2, R11, M3).

A zeroed or flipped byte inside the tensor data still decodes to finite float32 values, so no
loader can see it; the artifact store checks a digest on every cache hit (R6, issue 4).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from perfusion_runtime.files import concept_file
from perfusion_runtime.method import artifact
from perfusion_runtime.method.artifact import (
    ArtifactError,
    Concept,
    InvalidConcept,
    encode,
    load,
    save,
    size_for,
)

LAYERS = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2": 4,
    "mid_block.attentions.0.transformer_blocks.0.attn2": 6,
    "up_blocks.1.attentions.0.transformer_blocks.0.attn2": 4,
}
D_TOKEN, D_TEXT = 8, 6  # different, so that a swap of the two cannot pass
BASE = "f" * 64
KEY = "0123456789abcdef" * 4


def make_concept(seed: int = 0, **changes: Any) -> Concept:
    gen = torch.Generator().manual_seed(seed)

    def vec(n: int) -> torch.Tensor:
        return torch.randn(n, generator=gen)

    fields: dict[str, Any] = dict(
        token="teddy*", supercategories=("teddy bear", "toy"), adjectives=("brown",),
        base_model="runwayml/stable-diffusion-v1-5", base_fingerprint=BASE,
        cinv_fingerprint="c" * 64, options={"steps": 400, "lr": 0.03, "templates": ["a {}"]},
        key=KEY, embedding=vec(D_TOKEN), i_star=vec(D_TEXT),
        o_k={name: vec(o) for name, o in LAYERS.items()},
        o_v={name: vec(o) for name, o in LAYERS.items()},
    )
    fields.update(changes)
    return Concept(**fields)


@pytest.fixture(autouse=True)
def never_unpickle(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any call to torch.load or pickle's loaders fails the test (M1, S8)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a concept file was unpickled")

    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(module, name, refuse)


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "teddy.safetensors"
    save(make_concept(), path)
    return path


def read_parts(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A saved file's tensors and metadata, read with safetensors (no pickle)."""
    with safe_open(str(path), framework="pt") as file:
        names = file.keys()  # safe_open is not iterable
        return {name: file.get_tensor(name) for name in names}, dict(file.metadata())


def rewrite(path: Path, tensors: dict[str, torch.Tensor] | None = None,
            **metadata: str | None) -> Path:
    """Write a variant of `path` next to it: tensors replaced, metadata keys set (None: removed)."""
    old_tensors, old_metadata = read_parts(path)
    new_metadata = {k: v for k, v in {**old_metadata, **metadata}.items() if v is not None}
    out = path.with_name("variant.safetensors")
    safetensors.torch.save_file(old_tensors if tensors is None else tensors, str(out),
                                metadata=new_metadata)
    return out


def assert_rejected(path: Path, *words: str, **expect: Any) -> ArtifactError:
    with pytest.raises(ArtifactError) as info:
        load(path, **expect)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert info.value.path == path
    for word in words:
        assert word in message, message
    assert "Traceback" not in message
    return info.value


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.int32)


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------------------------------
# Round trip


def test_roundtrip_bit_exact(tmp_path: Path) -> None:
    specials = torch.tensor([-0.0, 1e-45, -3.4028235e38, 1 / 3, 2.0**-126, 0.1],
                            dtype=torch.float32)  # negative zero, subnormals, extremes
    concept = make_concept(o_v={**make_concept().o_v, next(iter(LAYERS)): specials[:4]},
                           embedding=torch.cat([specials, specials[:2]]))
    path = tmp_path / "c.safetensors"
    save(concept, path)
    again = load(path, expect_base_fingerprint=BASE, expect_layers=LAYERS,
                 expect_dims=(D_TOKEN, D_TEXT))
    assert list(again.layers.items()) == list(concept.layers.items())  # order kept too
    for name in ("embedding", "i_star"):
        assert torch.equal(bits(getattr(again, name)), bits(getattr(concept, name)))
    for layer in LAYERS:
        assert torch.equal(bits(again.o_k[layer]), bits(concept.o_k[layer]))
        assert torch.equal(bits(again.o_v[layer]), bits(concept.o_v[layer]))
    for field in ("token", "base_model", "base_fingerprint", "cinv_fingerprint", "lock"):
        assert getattr(again, field) == getattr(concept, field), field
    # only what loading needs: the rest is in the store's manifest and the build history
    assert again.supercategories == concept.supercategories[:1]
    assert (again.adjectives, again.options, again.key) == (
        (), {"lock": "local", "positions": concept.positions, "context": ""}, "")
    assert again.num_floats == concept.num_floats == size_for(LAYERS, D_TOKEN, D_TEXT)
    assert encode(again) == path.read_bytes()
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_size_for_counts_every_float() -> None:
    sd15 = {f"l{i}": o for i, o in enumerate([320] * 5 + [640] * 5 + [1280] * 6)}
    assert sum(sd15.values()) == 12_480
    assert size_for(sd15, 768, 768) == 26_496


def test_file_holds_four_float32_tensors_and_string_metadata(saved: Path) -> None:
    tensors, metadata = read_parts(saved)
    assert sorted(tensors) == ["embedding", "i_star", "o_k", "o_v"]
    assert all(t.dtype == torch.float32 and t.dim() == 1 for t in tensors.values())
    assert metadata["format"] == "perfusion-concept"
    assert metadata["format_version"] == "4"
    assert json.loads(metadata["layers"]) == LAYERS
    assert metadata["supercategory"] == "teddy bear"
    assert metadata["lock"] == "local"
    assert metadata["positions"] == "all"  # make_concept's: no "positions" option
    assert metadata["context"] == ""  # nor "context"
    assert sorted(metadata) == sorted(concept_file._METADATA_KEYS["4"])  # no options, no adjectives
    assert tensors["o_k"].numel() == sum(LAYERS.values())


def key_weights(seed: int = 3) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {n: torch.randn(o, D_TEXT, generator=generator) for n, o in LAYERS.items()}


def test_locked_keys_are_stored_as_i_super_and_rebuilt_exactly(tmp_path: Path) -> None:
    """o*_K = W_K · i_super: the file keeps i_super [D] instead of o*_K [ΣO] (12,480 floats
    for SD 1.5) and loading rebuilds o*_K from the pipeline's W_K, bit for bit."""
    weights = key_weights()
    i_super = torch.randn(D_TEXT, generator=torch.Generator().manual_seed(5))
    concept = make_concept(o_k=artifact.locked_key_targets(weights, i_super), i_super=i_super)
    path = tmp_path / "locked.safetensors"
    save(concept, path)
    tensors, _ = read_parts(path)
    assert sorted(tensors) == ["embedding", "i_star", "i_super", "o_v"]
    again = load(path, expect_layers=LAYERS, key_weights=weights)
    assert again.i_super is not None and torch.equal(again.i_super, i_super)
    for layer in LAYERS:
        assert torch.equal(bits(again.o_k[layer]), bits(concept.o_k[layer]))
    assert encode(again) == path.read_bytes()
    assert len(path.read_bytes()) < len(encode(make_concept()))
    assert_rejected(path, "keys are locked", "key_weights")  # no weights: a clear error
    assert_rejected(path, "not those of the file's layers",
                    key_weights={**weights, next(iter(LAYERS)): torch.zeros(9, D_TEXT)})


def test_half_precision_file_is_half_the_size_and_reads_as_float32(tmp_path: Path) -> None:
    concept = make_concept()
    path = tmp_path / "half.safetensors"
    save(concept, path, half=True)
    tensors, _ = read_parts(path)
    assert all(t.dtype == torch.float16 for t in tensors.values())
    again = load(path, expect_layers=LAYERS)
    assert again.embedding.dtype == torch.float32
    torch.testing.assert_close(again.embedding, concept.embedding.half().float(), rtol=0, atol=0)
    def data_bytes(data: bytes) -> int:  # the tensors, past the 8-byte length and header
        return len(data) - 8 - int.from_bytes(data[:8], "little")

    # two bytes a float instead of four (the headers differ in their offsets' digits)
    assert data_bytes(path.read_bytes()) == data_bytes(encode(concept)) - 2 * concept.num_floats
    mixed = {**tensors, "o_v": tensors["o_v"].float()}
    assert_rejected(rewrite(path, mixed), "o_v", "dtype F32", "F16")


def test_format_1_files_are_still_read(tmp_path: Path) -> None:
    """A file of the previous format (every option in the metadata, o_k in full)."""
    concept = make_concept()
    tensors = {"embedding": concept.embedding, "i_star": concept.i_star,
               "o_k": torch.cat(list(concept.o_k.values())),
               "o_v": torch.cat(list(concept.o_v.values()))}
    metadata = {"format": "perfusion-concept", "format_version": "1", "token": "teddy*",
                "supercategories": '["teddy bear","toy"]', "adjectives": '["brown"]',
                "base_model": "m", "base_fingerprint": BASE, "cinv_fingerprint": "c" * 64,
                "options": '{"lock":"global","steps":400}', "key": KEY,
                "layers": json.dumps(LAYERS)}
    path = tmp_path / "v1.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    again = load(path, expect_layers=LAYERS)
    assert again.supercategories == ("teddy bear", "toy") and again.lock == "global"
    assert torch.equal(again.o_k[next(iter(LAYERS))], concept.o_k[next(iter(LAYERS))])


def test_M3_same_concept_same_bytes_across_processes(tmp_path: Path) -> None:
    """safetensors orders metadata by a per-process hash; we re-serialise it sorted."""
    here = tmp_path / "here.safetensors"
    save(make_concept(), here)
    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
              f"from test_artifact import make_concept; "
              f"from perfusion_runtime.method.artifact import save; "
              f"save(make_concept(), {str(tmp_path / 'there.safetensors')!r})")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    assert (tmp_path / "there.safetensors").read_bytes() == here.read_bytes()


def test_concept_refuses_invalid_tensors() -> None:
    layer = next(iter(LAYERS))
    bad: list[dict[str, Any]] = [
        {"embedding": torch.ones(D_TOKEN, dtype=torch.float16)},
        {"i_star": torch.ones(2, 3)},
        {"o_v": {**make_concept().o_v, layer: torch.tensor([0.0, float("nan"), 0, 0])}},
        {"o_v": {layer: torch.ones(4)}},
        {"o_k": {}, "o_v": {}},
        {"key": "not hex"},
        {"options": {"lr": float("inf")}},
    ]
    for change in bad:
        with pytest.raises(InvalidConcept):
            make_concept(**change)


def test_with_options_changes_what_it_names_and_keeps_the_rest() -> None:
    """Rendering a concept with the other lock must not drop where its edit applies (a
    benchmark that replaced the options whole rendered prompt-trained concepts everywhere)."""
    trained = make_concept(options={"steps": 300, "lock": "local", "positions": "prompt"})
    as_global = trained.with_options(lock="global")
    assert (as_global.lock, as_global.positions) == ("global", "prompt")
    assert as_global.options["steps"] == 300
    assert (trained.lock, trained.positions) == ("local", "prompt")  # the original is frozen
    assert bits(as_global.o_v[next(iter(LAYERS))]).equal(bits(trained.o_v[next(iter(LAYERS))]))
    with pytest.raises(InvalidConcept):
        trained.with_options(positions="somewhere")


# ---------------------------------------------------------------------------------------------
# M1: the loader accepts only what `save` wrote


def test_M1_rejects_pickle(tmp_path: Path) -> None:
    concept = make_concept()
    state = {"embedding": concept.embedding, "o_k": concept.o_k}
    zipped, legacy, plain = (tmp_path / f"{n}.safetensors" for n in ("zip", "legacy", "plain"))
    torch.save(state, zipped)  # writing the hostile file; it is never loaded
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    plain.write_bytes(pickle.dumps({"embedding": [1.0, 2.0]}))
    assert_rejected(zipped, "not a safetensors file", "zip archive", "torch.save")
    assert_rejected(legacy, "not a safetensors file", "pickle")
    assert_rejected(plain, "not a safetensors file", "pickle")


def test_M1_rejects_truncated(saved: Path) -> None:
    data = saved.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    for size, words in [(0, ("too small", "empty")), (5, ("too small",)),
                        (header - 10, ("truncated", "header")),
                        (header + 10, ("truncated", "tensor data")),
                        (len(data) - 1, ("truncated", "tensor data"))]:
        saved.write_bytes(data[:size])
        assert_rejected(saved, *words)


def test_M1_rejects_appended_bytes(saved: Path) -> None:
    data = saved.read_bytes()
    for tail in (b"\0", b"garbage" * 100):
        saved.write_bytes(data + tail)
        assert_rejected(saved, f"{len(tail):,} unexpected bytes after the tensor data")


def test_M1_rejects_wrong_shapes(saved: Path) -> None:
    tensors, _ = read_parts(saved)
    variants: list[tuple[dict[str, torch.Tensor], tuple[str, ...]]] = [
        ({**tensors, "embedding": tensors["embedding"].reshape(2, 4)}, ("embedding", "[2, 4]")),
        ({**tensors, "i_star": torch.zeros(0)}, ("i_star", "[0]")),
        ({**tensors, "o_v": tensors["o_v"][:-1].clone()}, ("o_v has 13 values", "add up to 14")),
        ({**tensors, "o_k": torch.cat([tensors["o_k"], tensors["o_k"]])}, ("o_k has 28",)),
    ]
    for variant, words in variants:
        assert_rejected(rewrite(saved, variant), *words)


def test_M1_rejects_shapes_of_another_pipeline(saved: Path) -> None:
    assert_rejected(saved, "embedding has 8 values", "768", expect_dims=(768, D_TEXT))
    assert_rejected(saved, "i_star has 6 values", "768", expect_dims=(D_TOKEN, 768))
    wider = {**LAYERS, "mid_block.attentions.0.transformer_blocks.0.attn2": 1280}
    assert_rejected(saved, "mid_block", "6 values in the file", "1280", expect_layers=wider)
    more = {**LAYERS, "up_blocks.3.attentions.2.transformer_blocks.0.attn2": 4}
    assert_rejected(saved, "no targets for layer(s) up_blocks.3", expect_layers=more)
    fewer = dict(list(LAYERS.items())[1:])
    assert_rejected(saved, "down_blocks.0", "not cross-attention layers", expect_layers=fewer)


def test_M1_rejects_inconsistent_layers_metadata(saved: Path) -> None:
    cases = [("[]", "not a non-empty JSON object"), ('{"a": 0}', "not a non-empty JSON object"),
             ('{"a": 7, "a": 7}', "twice"), ('{"a": 7, "b": 8}', "add up to 15"),
             ('{"a": 14', "not valid JSON"), ('{"": 14}', "not a non-empty JSON object")]
    for text, words in cases:
        assert_rejected(rewrite(saved, layers=text), words)


def test_M1_rejects_wrong_dtype(saved: Path) -> None:
    tensors, _ = read_parts(saved)
    halves = {name: t.half() for name, t in tensors.items()}
    assert_rejected(rewrite(saved, {**halves, "embedding": tensors["embedding"]}),
                    "dtype F16", "F32")
    assert_rejected(rewrite(saved, {**tensors, "o_v": tensors["o_v"].double()}), "o_v", "F64")
    assert_rejected(rewrite(saved, {**tensors, "i_star": tensors["i_star"].bfloat16()}), "BF16")
    assert_rejected(rewrite(saved, {**tensors, "o_k": tensors["o_k"].int()}), "I32")


def test_M1_rejects_unknown_format_version(saved: Path) -> None:
    for version in ("5", "0", "1.0", ""):
        error = assert_rejected(rewrite(saved, format_version=version),
                                f"format version {version!r} is not supported", "reads format "
                                "version 1, 2, 3, 4")
        assert "1" in error.problem
    assert_rejected(rewrite(saved, format_version=None), "format version None")


def test_positions_round_trip_and_older_formats_edit_every_position(saved: Path,
                                                                     tmp_path: Path) -> None:
    """A trained concept says its edit stops at the prompt's end ("prompt"); a file of format
    2, which has no such field, was trained with the edit everywhere and loads as "all"."""
    trained = make_concept(options={"lock": "local", "positions": "prompt"})
    path = tmp_path / "trained.safetensors"
    save(trained, path)
    assert read_parts(path)[1]["positions"] == "prompt"
    assert load(path).positions == "prompt"
    older = rewrite(path, format_version="2", positions=None, context=None)
    assert load(older).positions == "all"
    with pytest.raises(InvalidConcept, match="positions must be one of prompt, all"):
        make_concept(options={"positions": "words"})


def test_context_round_trips_and_format_3_files_load_without(tmp_path: Path) -> None:
    """A concept trained with its supercategory's leading words before the token keeps them
    in the file, and renders with them; a file of format 3, which has no such field, was
    trained without and loads with none."""
    trained = make_concept(options={"lock": "local", "positions": "prompt", "context": "teddy"})
    assert (trained.context, trained.stands_for) == ("teddy", "bear")
    path = tmp_path / "trained.safetensors"
    save(trained, path)
    assert read_parts(path)[1]["context"] == "teddy"
    again = load(path)
    assert (again.context, again.stands_for) == ("teddy", "bear")
    older = rewrite(path, format_version="3", context=None)
    assert (load(older).context, load(older).stands_for) == ("", "teddy bear")
    assert_rejected(rewrite(path, format_version="3"), "unexpected context")


def test_context_must_be_the_supercategorys_leading_words(saved: Path) -> None:
    """Anything else would render words the concept was not trained with, and global locking
    would read a supercategory prompt that is not the supercategory."""
    for wrong in ("bear", "teddy bear", "fluffy", "teddy ", "Teddy"):
        with pytest.raises(InvalidConcept, match="is not the words before the last"):
            make_concept(options={"context": wrong})
        assert_rejected(rewrite(saved, context=wrong), "is not the words before the last")
    with pytest.raises(InvalidConcept, match="context must be a string"):
        make_concept(options={"context": ["teddy"]})
    assert make_concept(supercategories=("purple and yellow striped diamond",), options={
        "context": "purple and yellow striped"}).stands_for == "diamond"


def test_M1_rejects_other_safetensors_files(saved: Path, tmp_path: Path) -> None:
    lora = tmp_path / "lora.safetensors"
    safetensors.torch.save_file({"lora_up.weight": torch.zeros(4, 4)}, str(lora))
    assert_rejected(lora, "no metadata", "not a perfusion-concept file")
    assert_rejected(rewrite(saved, format="pt"), "format is 'pt'")
    assert_rejected(rewrite(saved, format=None), "no 'format'")


def test_M1_rejects_bad_metadata(saved: Path) -> None:
    assert_rejected(rewrite(saved, token=None), "lacks token")
    assert_rejected(rewrite(saved, trained_by="me"), "unexpected trained_by")
    assert_rejected(rewrite(saved, options="{}"), "unexpected options")
    assert_rejected(rewrite(saved, lock="sideways"), "lock is 'sideways'")
    assert_rejected(rewrite(saved, positions="padding"), "positions is 'padding'")
    assert_rejected(rewrite(saved, positions=None), "lacks positions")
    assert_rejected(rewrite(saved, context=None), "lacks context")
    assert_rejected(rewrite(saved, token=""), "the token is empty")
    old = rewrite(saved, format_version="1", supercategory=None, lock=None, positions=None,
                  context=None,
                  key="XYZ",
                  supercategories="toy", adjectives="[1]", options="[]")
    assert_rejected(old, "supercategories is not a JSON list")


def test_M1_rejects_missing_tensor(saved: Path) -> None:
    tensors, _ = read_parts(saved)
    for name in tensors:
        rest = {k: v for k, v in tensors.items() if k != name}
        assert_rejected(rewrite(saved, rest), f"missing tensor(s): {name}")


def test_M1_rejects_extra_tensor(saved: Path) -> None:
    tensors, _ = read_parts(saved)
    extra = {**tensors, "o_q": torch.zeros(3), f"o_k.{next(iter(LAYERS))}": torch.zeros(4)}
    assert_rejected(rewrite(saved, extra), "unexpected tensor(s): o_k.down_blocks", "o_q")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", ["embedding", "i_star", "o_k", "o_v"])
def test_M1_rejects_nan_and_inf(saved: Path, name: str, value: float) -> None:
    tensors, _ = read_parts(saved)
    broken = tensors[name].clone()
    broken[-1] = value
    where = {"o_k": "o_k.up_blocks.1", "o_v": "o_v.up_blocks.1"}.get(name, name)
    assert_rejected(rewrite(saved, {**tensors, name: broken}), where, "1 non-finite value")


def test_M1_rejects_different_base_model(saved: Path) -> None:
    other = "e" * 64
    assert_rejected(saved, "trained on base model 'runwayml/stable-diffusion-v1-5'",
                    f"(fingerprint {BASE})", f"this pipeline is 'sdxl' (fingerprint {other})",
                    expect_base_fingerprint=other, pipeline_model="sdxl")
    assert_rejected(saved, f"a base model with fingerprint {other}",
                    expect_base_fingerprint=other)
    assert load(saved, expect_base_fingerprint=BASE).base_fingerprint == BASE


def test_M1_text_file_named_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "teddy.safetensors"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 108160\n")
    assert_rejected(path, "not a safetensors file", "looks like a text file")
    path.write_text('{"embedding": [1, 2, 3]}')
    assert_rejected(path, "not a safetensors file", "text file")


def test_M1_rejects_what_is_not_a_regular_file(tmp_path: Path) -> None:
    assert_rejected(tmp_path / "missing.safetensors", "no such file")
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    assert_rejected(folder, "not a regular file", "directory")
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    assert_rejected(fifo, "not a regular file", "named pipe")  # and does not block


def test_M1_rejects_a_malformed_header(saved: Path) -> None:
    data = saved.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])

    def with_header(obj: Any = None, text: bytes | None = None) -> Path:
        body = json.dumps(obj).encode() if text is None else text
        body += b" " * (-len(body) % 8)
        saved.write_bytes(len(body).to_bytes(8, "little") + body + data[8 + length:])
        return saved

    assert_rejected(with_header(text=b"{not json}"), "not valid JSON")
    assert_rejected(with_header(text=b'{"a": "\xff"}'), "not UTF-8")
    assert_rejected(with_header(text=b"{" + data[9:8 + length].rstrip()[:-1] + b","
                                     b'"o_k":{}}'), "appears twice", "o_k")
    overlap = {**header, "i_star": {**header["i_star"], "data_offsets": [0, 24]}}
    assert_rejected(with_header(overlap), "overlaps another tensor or leaves a gap")
    odd = {**header, "o_k": {**header["o_k"], "extra": 1}}
    assert_rejected(with_header(odd), "malformed header entry")
    negative = {**header, "o_k": {**header["o_k"], "shape": [-14]}}
    assert_rejected(with_header(negative), "malformed header entry")
    saved.write_bytes((2**40).to_bytes(8, "little") + data[8:])
    assert_rejected(saved, "not a safetensors file", "length of a JSON header")


def test_S8_runtime_never_unpickles() -> None:
    unpickling = re.compile(r"(?<!safetensors\.)\btorch\.load\(|\bpickle\.|weights_only")
    for source in sorted(Path(artifact.__file__).parent.parent.rglob("*.py")):
        found = unpickling.search(source.read_text())
        assert found is None, f"{source.name} uses {found.group()}"


# ---------------------------------------------------------------------------------------------
# Saving: atomic, clean on failure


@pytest.fixture
def old_state(tmp_path: Path) -> Iterator[tuple[Path, bytes]]:
    """A folder with an earlier concept and a neighbour; both must survive a failed save."""
    path = tmp_path / "teddy.safetensors"
    save(make_concept(seed=1), path)
    save(make_concept(seed=2), tmp_path / "other.safetensors")
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    yield path, path.read_bytes()
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing else left


def failing_on_call(number: int, error: BaseException,
                    real: Callable[..., Any]) -> Callable[..., Any]:
    calls = iter(range(1, 1_000_000))

    def fake(*args: Any, **kwargs: Any) -> Any:
        if next(calls) == number:
            raise error
        return real(*args, **kwargs)

    return fake


def test_R11_enospc_leaves_no_temp_file_and_keeps_old_file(
    old_state: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch,
) -> None:
    path, _ = old_state
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    real_write = os.write

    def write_half_then_fail(fd: int, data: memoryview) -> int:
        if len(data) > 1024:
            return real_write(fd, data[: len(data) // 2])
        raise full

    with monkeypatch.context() as patch:
        patch.setattr(os, "write", write_half_then_fail)
        with pytest.raises(ArtifactError) as info:
            save(make_concept(seed=3), path)
    assert str(info.value).startswith(f"{path}: cannot save: ")
    assert "No space left on device (ENOSPC)" in str(info.value)
    assert info.value.__cause__ is full


def test_R11_enospc_from_fsync(
    old_state: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Some filesystems report a full disk only when the data is flushed."""
    path, _ = old_state
    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", failing_on_call(1, OSError(errno.ENOSPC, "full"), os.fsync))
        with pytest.raises(ArtifactError, match="cannot save: full \\(ENOSPC\\)"):
            save(make_concept(seed=3), path)


@pytest.mark.parametrize("crash", [RuntimeError("crash"), KeyboardInterrupt(),
                                   OSError(errno.EIO, "I/O error")])
def test_R2_crash_before_rename_leaves_old_state(
    old_state: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch, crash: BaseException,
) -> None:
    path, _ = old_state
    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", failing_on_call(1, crash, os.replace))
        with pytest.raises((type(crash), ArtifactError)):
            save(make_concept(seed=3), path)


def test_R2_crash_before_first_rename_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", failing_on_call(1, KeyboardInterrupt(), os.replace))
        with pytest.raises(KeyboardInterrupt):
            save(make_concept(), tmp_path / "teddy.safetensors")
    assert files_in(tmp_path) == []


def test_R2_crash_after_rename_leaves_new_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = tmp_path / "teddy.safetensors"
    save(make_concept(seed=1), path)
    new = make_concept(seed=3)
    with monkeypatch.context() as patch:  # the second fsync is the folder's, after the rename
        patch.setattr(os, "fsync", failing_on_call(2, OSError(errno.EIO, "I/O error"), os.fsync))
        with pytest.raises(ArtifactError, match="saved, but syncing its folder failed"):
            save(new, path)
    assert path.read_bytes() == encode(new)
    assert files_in(tmp_path) == ["teddy.safetensors"]


def test_save_replaces_a_symlink_instead_of_writing_through_it(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.txt"
    target.write_text("keep me")
    link = tmp_path / "teddy.safetensors"
    link.symlink_to(target)
    save(make_concept(), link)
    assert target.read_text() == "keep me"
    assert not link.is_symlink()
    assert load(link).token == "teddy*"


def test_save_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "folder" / "teddy.safetensors"
    with pytest.raises(ArtifactError, match="cannot create a file in"):
        save(make_concept(), missing)
    folder = tmp_path / "taken.safetensors"
    (folder / "inside").mkdir(parents=True)
    with pytest.raises(ArtifactError) as info:
        save(make_concept(), folder)
    assert str(info.value).startswith(f"{folder}: cannot save: ")
    assert files_in(tmp_path) == ["taken.safetensors"]


def test_save_refuses_a_concept_changed_in_place(tmp_path: Path) -> None:
    concept = make_concept()
    concept.i_star[0] = float("nan")
    with pytest.raises(InvalidConcept, match="i_star has 1 non-finite value"):
        save(concept, tmp_path / "c.safetensors")
    assert files_in(tmp_path) == []
