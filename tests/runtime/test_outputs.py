"""Render outputs: confinement (S1), no writes through symlinks (S2), disk full (R11), PNG text,
contact sheets and the render manifest. All files are real; ENOSPC is injected."""

from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from perfusion_runtime.files.outputs import (
    MANIFEST,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    OutputError,
    contact_sheet,
    png_with_text,
    read_manifest,
    read_png_text,
    write_manifest,
    write_output,
)

DATA = b"rendered image bytes \x00\x01" * 16
OLD = b"the earlier render" * 16


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "root").mkdir()
    return tmp_path / "root"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder beside the root with one file, which no test may change."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.png").write_bytes(OLD)
    return tmp_path / "outside"


def tree(folder: Path) -> list[str]:
    """Every name below `folder` (links not followed), relative and sorted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def untouched(outside: Path) -> bool:
    return tree(outside) == ["secret.png"] and (outside / "secret.png").read_bytes() == OLD


def gradient(size: int = 64, mode: str = "RGB") -> Image.Image:
    image = Image.new("RGB", (size, size))
    image.putdata([(x * 4 % 256, y * 4 % 256, (x + y) % 256)
                   for y in range(size) for x in range(size)])
    return image.convert(mode)


# --- S1: nothing leaves the root ----------------------------------------------------------


@pytest.mark.parametrize("rel", ["../x.png", "a/../../x.png", "../outside/secret.png",
                                 "a/b/../../../x.png", "..", ".", "", "a/.."])
def test_S1_dotdot_escapes_and_root_itself_are_refused(root: Path, outside: Path,
                                                       rel: str) -> None:
    with pytest.raises(OutputError):
        write_output(root, rel, DATA)
    assert tree(root) == [] and untouched(outside)


def test_S1_absolute_path_is_refused(root: Path, outside: Path) -> None:
    target = str(outside / "secret.png")
    with pytest.raises(OutputError, match="not a path relative"):
        write_output(root, target, DATA)
    assert tree(root) == [] and untouched(outside)


def test_S1_inner_dotdot_that_stays_inside_is_allowed(root: Path) -> None:
    assert write_output(root, "a/../b/./c.png", DATA) == root / "b" / "c.png"
    assert tree(root) == ["b", "b/c.png"]


def test_S1_folder_symlink_out_of_the_root_is_refused(root: Path, outside: Path) -> None:
    (root / "renders").symlink_to(outside)
    for rel in ("renders/secret.png", "renders/new.png", "renders/sub/new.png"):
        with pytest.raises(OutputError, match="symbolic link") as caught:
            write_output(root, rel, DATA)
        assert caught.value.path == root / "renders"
    assert untouched(outside)


def test_S1_nul_byte_is_refused(root: Path) -> None:
    with pytest.raises(OutputError, match="NUL"):
        write_output(root, "a\x00.png", DATA)


def test_S1_root_may_be_a_symlink(tmp_path: Path, root: Path) -> None:
    (tmp_path / "link").symlink_to(root)
    assert write_output(tmp_path / "link", "a/x.png", DATA) == tmp_path / "link" / "a" / "x.png"
    assert (root / "a" / "x.png").read_bytes() == DATA


# --- S2: never write through a symlink ----------------------------------------------------


@pytest.mark.parametrize("dangling", [False, True])
def test_S2_symlink_at_the_final_path_is_refused(root: Path, outside: Path,
                                                 dangling: bool) -> None:
    target = outside / ("missing.png" if dangling else "secret.png")
    (root / "x.png").symlink_to(target)
    with pytest.raises(OutputError, match="refusing to replace the symbolic link") as caught:
        write_output(root, "x.png", DATA)
    assert caught.value.path == root / "x.png"
    assert (root / "x.png").is_symlink() and os.readlink(root / "x.png") == str(target)
    assert tree(root) == ["x.png"]  # no temp file either
    assert untouched(outside)


def test_S2_symlinked_folder_inside_the_root_is_refused(root: Path) -> None:
    (root / "real").mkdir()
    (root / "alias").symlink_to(root / "real")
    with pytest.raises(OutputError, match="symbolic link"):
        write_output(root, "alias/x.png", DATA)
    assert tree(root) == ["alias", "real"]


def test_S2_folder_or_file_in_the_way_is_refused(root: Path) -> None:
    (root / "x.png").mkdir()
    (root / "file").write_bytes(OLD)
    with pytest.raises(OutputError, match="not a regular file"):
        write_output(root, "x.png", DATA)
    with pytest.raises(OutputError, match="something else has its name"):
        write_output(root, "file/x.png", DATA)
    assert tree(root) == ["file", "x.png"] and (root / "file").read_bytes() == OLD


# --- R11: disk full -----------------------------------------------------------------------


@pytest.fixture
def disk_full_after(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """os.write stores 10 bytes, then fails with ENOSPC, as a full disk does."""
    real_write = os.write
    calls = 0

    def write(fd: int, data: Any) -> int:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, bytes(data)[:10])

    monkeypatch.setattr(os, "write", write)
    yield
    monkeypatch.undo()


def test_R11_enospc_names_path_removes_temp_keeps_old_file(root: Path,
                                                           disk_full_after: None) -> None:
    (root / "out").mkdir()
    (root / "out" / "x.png").write_bytes(OLD)
    with pytest.raises(OutputError) as caught:
        write_output(root, "out/x.png", DATA)
    assert caught.value.path == root / "out" / "x.png"
    assert str(root / "out" / "x.png") in str(caught.value)
    assert "No space left on device (ENOSPC)" in str(caught.value)
    assert tree(root) == ["out", "out/x.png"]
    assert (root / "out" / "x.png").read_bytes() == OLD


@pytest.mark.parametrize("call", ["fsync", "replace"])
def test_R11_enospc_in_fsync_or_rename_removes_temp(root: Path, call: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    (root / "x.png").write_bytes(OLD)

    def disk_full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, call, disk_full)
    with pytest.raises(OutputError, match="ENOSPC"):
        write_output(root, "x.png", DATA)
    monkeypatch.undo()
    assert tree(root) == ["x.png"] and (root / "x.png").read_bytes() == OLD


# --- atomic writes ------------------------------------------------------------------------


def test_write_creates_folders_and_replaces_atomically(root: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    assert write_output(root, "a/b/x.png", OLD) == root / "a" / "b" / "x.png"
    real_replace = os.replace
    seen: list[tuple[bytes, list[str]]] = []

    def replace(*args: Any, **kwargs: Any) -> None:
        folder = root / "a" / "b"  # just before the rename: old content, complete temp file
        temps = [p.read_bytes() for p in folder.iterdir() if p.name != "x.png"]
        seen.append(((folder / "x.png").read_bytes(), [t.hex() for t in temps]))
        real_replace(*args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    write_output(root, "a/b/x.png", DATA)
    assert seen == [(OLD, [DATA.hex()])]
    assert (root / "a" / "b" / "x.png").read_bytes() == DATA
    assert tree(root) == ["a", "a/b", "a/b/x.png"]


def test_temp_file_is_hidden_in_the_same_folder(root: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    names: list[str] = []
    real_replace = os.replace

    def replace(src: str, dst: str, **kwargs: Any) -> None:
        names.append(src)
        real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    write_output(root, "sub/x.png", DATA)
    [name] = names
    assert name.startswith(".x.png.") and name.endswith(".tmp") and "/" not in name


def test_file_mode_respects_umask(root: Path) -> None:
    before = os.umask(0o027)
    try:
        path = write_output(root, "m/x.png", DATA)
    finally:
        os.umask(before)
    assert path.stat().st_mode & 0o777 == 0o640
    assert path.parent.stat().st_mode & 0o777 == 0o750


# --- PNG text -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_png_text_round_trips_and_pixels_are_unchanged(tmp_path: Path, mode: str) -> None:
    image = gradient(mode=mode)
    text = {"prompt": "a café ★", "seed": "7", "Comment": "second\nline"}
    data = png_with_text(image, text)
    assert data == png_with_text(image, dict(text))  # deterministic bytes
    path = tmp_path / "x.png"
    path.write_bytes(data)
    assert read_png_text(path) == text
    assert list(read_png_text(path)) == list(text)  # in the mapping's order
    with Image.open(path) as back:
        assert back.mode == mode and back.tobytes() == image.tobytes()


@pytest.mark.parametrize("key", ["", "k" * 80, "café★", " lead", "two  spaces"])
def test_png_text_refuses_keys_png_cannot_hold(key: str) -> None:
    with pytest.raises(ValueError, match="PNG text keyword"):
        png_with_text(gradient(8), {key: "v"})


# --- contact sheets -----------------------------------------------------------------------


def test_contact_sheet_grows_with_tiles_and_is_deterministic() -> None:
    tiles = [(gradient(), f"seed {i}") for i in range(9)]
    sizes = [contact_sheet(tiles[:n], "teddy").size for n in (1, 2, 4, 9)]
    assert sizes[0][0] >= 128 + 16  # a 64 px tile is shown at least 128 px wide
    assert all(a[0] <= b[0] and a[1] <= b[1] and a != b for a, b in itertools.pairwise(sizes))
    assert contact_sheet(tiles, "t").tobytes() == contact_sheet(tiles, "t").tobytes()
    assert contact_sheet(tiles, "t", columns=9).size[0] > contact_sheet(tiles, "t").size[0]


def test_contact_sheet_tiles_are_upscaled_nearest() -> None:
    image = gradient(64)
    sheet = contact_sheet([(image, "x")], "t")
    big = image.resize((128, 128), Image.Resampling.NEAREST)
    found = [(x, y) for y in range(40) for x in range(20)
             if sheet.crop((x, y, x + 128, y + 128)).tobytes() == big.tobytes()]
    assert len(found) == 1


def test_contact_sheet_labels_and_title_render() -> None:
    image = gradient()
    one = contact_sheet([(image, "wizard")], "teddy")
    two = contact_sheet([(image, "pirate")], "teddy")
    other_title = contact_sheet([(image, "wizard")], "cat")
    assert one.size == two.size == other_title.size
    label_rows = (0, 160, one.width, one.height)  # below the 128 px tile and the title
    assert one.crop(label_rows).tobytes() != two.crop(label_rows).tobytes()
    assert one.crop((0, 0, one.width, 20)).tobytes() != other_title.crop(
        (0, 0, one.width, 20)).tobytes()


def test_contact_sheet_long_labels_stay_within_three_lines() -> None:
    image = gradient()
    long = " ".join(["averyveryverylongwordindeed"] * 20)
    short = contact_sheet([(image, "a"), (image, "b")], "t", columns=1)
    sheet = contact_sheet([(image, long), (image, "b")], "t", columns=1)
    assert sheet.size == short.size  # the cell keeps its height: the label was cut
    second_tile = (0, sheet.height // 2 + 8, sheet.width, sheet.height)
    assert sheet.crop(second_tile).tobytes() == short.crop(second_tile).tobytes()


def test_contact_sheet_label_newline_starts_a_line() -> None:
    image = gradient()
    one = contact_sheet([(image, "seed 7")], "t")
    two = contact_sheet([(image, "seed 7\nx")], "t")
    spaced = contact_sheet([(image, "seed 7 x")], "t")
    assert two.size == one.size  # room for three lines either way
    assert two.tobytes() != spaced.tobytes()  # "x" went to the second line


def test_contact_sheet_handles_transparency_and_unicode() -> None:
    clear = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    sheet = contact_sheet([(clear, "a café ★")], "★ title")
    assert sheet.mode == "RGB"
    assert sheet.getpixel((sheet.width // 2, 80)) == (255, 255, 255)


def test_contact_sheet_refuses_nothing() -> None:
    with pytest.raises(ValueError):
        contact_sheet([], "empty")
    with pytest.raises(ValueError):
        contact_sheet([(gradient(), "x")], "t", columns=0)


# --- the render manifest ------------------------------------------------------------------


def example_manifest() -> dict[str, Any]:
    return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
            "images": {"teddy-0.png": {"prompt": "a café ★", "seed": 7}},
            "sheets": {"sheet.png": {"images": ["teddy-0.png"]}}}


def empty() -> dict[str, Any]:
    return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "images": {}, "sheets": {}}


def test_manifest_round_trip(root: Path) -> None:
    path = write_manifest(root, "renders/teddy", example_manifest())
    assert path == root / "renders" / "teddy" / MANIFEST
    text = path.read_text(encoding="utf-8")
    assert text.endswith("}\n") and "a café ★" in text and '\n  "format"' in text
    assert read_manifest(root / "renders" / "teddy") == example_manifest()
    assert read_manifest(root / "missing") == empty()
    assert write_manifest(root, ".", empty()) == root / MANIFEST


def test_manifest_is_written_like_any_output(root: Path, outside: Path) -> None:
    (root / "renders").symlink_to(outside)
    with pytest.raises(OutputError):
        write_manifest(root, "renders", example_manifest())
    with pytest.raises(OutputError):
        write_manifest(root, "..", example_manifest())
    assert untouched(outside)


BAD_MANIFESTS = {
    "not JSON": b'{"format": "perfusion-renders", ',
    "not UTF-8": b'{"format": "\xff"}',
    "a list": b"[]",
    "wrong version": json.dumps({**empty(), "version": 2}).encode(),
    "version true": json.dumps({**empty(), "version": True}).encode(),
    "wrong format": json.dumps({**empty(), "format": "other"}).encode(),
    "bad records": json.dumps({**empty(), "images": {"x.png": 3}}).encode(),
    "deep nesting": b"[" * 100_000,
}


@pytest.mark.parametrize("why", sorted(BAD_MANIFESTS))
def test_bad_manifest_is_empty_with_a_warning(root: Path, why: str,
                                              caplog: pytest.LogCaptureFixture) -> None:
    (root / MANIFEST).write_bytes(BAD_MANIFESTS[why])
    assert_ignored(root, caplog)


def test_symlinked_manifest_is_not_followed(root: Path, outside: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    (outside / MANIFEST).write_text(json.dumps(example_manifest()))
    (root / MANIFEST).symlink_to(outside / MANIFEST)
    assert_ignored(root, caplog, "symbolic link")


def test_oversized_or_odd_manifest_is_ignored(root: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    with (root / MANIFEST).open("wb") as f:
        f.truncate((16 << 20) + 1)  # sparse: no 16 MiB written on a shared disk
    assert_ignored(root, caplog, "16 MiB")
    (root / MANIFEST).unlink()
    (root / MANIFEST).mkdir()
    caplog.clear()
    assert_ignored(root, caplog)


def assert_ignored(folder: Path, caplog: pytest.LogCaptureFixture, why: str = "") -> None:
    with caplog.at_level(logging.WARNING, logger="perfusion_runtime.files.outputs"):
        assert read_manifest(folder) == empty()
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert str(folder / MANIFEST) in record.getMessage()
    assert why in record.getMessage()


# --- boundaries ---------------------------------------------------------------------------


def test_importing_outputs_loads_no_torch_numpy_or_pillow() -> None:
    script = ("import sys, perfusion_runtime.files.outputs; "
              "print(sorted(m for m in ('torch', 'numpy', 'diffusers', 'PIL') "
              "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.strip() == "[]"
