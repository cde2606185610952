"""Filesystem helpers against real files: hostile images (S3), symlink-safe discovery (S5)."""

from __future__ import annotations

import hashlib
import os
import struct
import threading
import zlib
from pathlib import Path

import pytest
from PIL import Image

from perfusion_dsl.images import ImageInfo, ImageProblem, check_image, file_digest
from perfusion_dsl.patterns import MatchLimitExceeded, WalkLimitExceeded, glob_files
from perfusion_dsl.spec_files import discover_specs, is_within

MAX_PIXELS = 64_000_000
MAX_BYTES = 64 << 20


def _check(path: Path, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_BYTES) -> object:
    return check_image(path, max_pixels, max_bytes)


def _problem(path: Path, **limits: int) -> str:
    result = _check(path, **limits)
    assert isinstance(result, ImageProblem), result
    assert result.path == path
    assert str(path) not in result.message
    return result.message


def _noise_image(size: tuple[int, int] = (64, 48)) -> Image.Image:
    return Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3))


def _save(path: Path, fmt: str, size: tuple[int, int] = (64, 48)) -> Path:
    _noise_image(size).save(path, format=fmt)
    return path


def _chunk(kind: bytes, payload: bytes) -> bytes:
    body = kind + payload
    return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny PNG that declares width x height 1-bit pixels (its data would be truncated)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    data = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat)
    path.write_bytes(data + _chunk(b"IEND", b""))
    return path


# ---------------------------------------------------------------------------------------------
# S3 hostile images


@pytest.mark.parametrize(("fmt", "suffix"), [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")])
def test_S3_valid_images_accepted(tmp_path: Path, fmt: str, suffix: str) -> None:
    path = _save(tmp_path / f"ok.{suffix}", fmt, (40, 30))
    result = _check(path)
    assert result == ImageInfo(
        path=path,
        digest=hashlib.sha256(path.read_bytes()).hexdigest(),
        width=40,
        height=30,
        format=fmt,
    )


def test_S3_format_follows_content_not_name(tmp_path: Path) -> None:
    path = _save(tmp_path / "really-a-jpeg.png", "JPEG")
    result = _check(path)
    assert isinstance(result, ImageInfo)
    assert result.format == "JPEG"


def test_S3_truncated_png(tmp_path: Path) -> None:
    full = _save(tmp_path / "full.png", "PNG", (256, 256)).read_bytes()
    path = tmp_path / "x.png"
    path.write_bytes(full[: len(full) // 2])
    assert _problem(path) == "is not a readable image: the PNG data is truncated"


def test_S3_truncated_png_header(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    path.write_bytes(_save(tmp_path / "full.png", "PNG").read_bytes()[:12])
    assert _problem(path) == "is not a readable image: the PNG header is truncated or damaged"


def test_S3_truncated_jpeg(tmp_path: Path) -> None:
    full = _save(tmp_path / "full.jpg", "JPEG", (256, 256)).read_bytes()
    path = tmp_path / "x.jpg"
    path.write_bytes(full[: len(full) // 2])
    assert _problem(path) == "is not a readable image: the JPEG data is truncated"


def test_S3_corrupt_png_checksum(tmp_path: Path) -> None:
    data = bytearray(_save(tmp_path / "full.png", "PNG").read_bytes())
    data[29] ^= 0xFF  # inside the IHDR CRC
    path = tmp_path / "x.png"
    path.write_bytes(bytes(data))
    assert _problem(path).startswith("is not a readable image: the PNG ")


def test_S3_decompression_bomb(tmp_path: Path) -> None:
    path = _png_header_only(tmp_path / "x.png", 20_000, 20_000)
    assert path.stat().st_size < 200
    assert _problem(path) == (
        "has 400,000,000 pixels; the limit is 64,000,000 (decompression bomb guard)"
    )


def test_S3_decompression_bomb_between_pillow_warning_and_error(tmp_path: Path) -> None:
    # 100 MP: Pillow would only warn (its error starts near 179 MP); our limit refuses it.
    path = _png_header_only(tmp_path / "x.png", 10_000, 10_000)
    assert _problem(path) == (
        "has 100,000,000 pixels; the limit is 64,000,000 (decompression bomb guard)"
    )


def test_S3_decompression_bomb_below_pillow_warning(tmp_path: Path) -> None:
    path = _save(tmp_path / "x.png", "PNG", (20, 20))
    assert _problem(path, max_pixels=399) == (
        "has 400 pixels; the limit is 399 (decompression bomb guard)"
    )
    assert isinstance(_check(path, max_pixels=400), ImageInfo)


def test_S3_decompression_bomb_above_pillow_limit_with_higher_own_limit(tmp_path: Path) -> None:
    path = _png_header_only(tmp_path / "x.png", 20_000, 20_000)
    message = _problem(path, max_pixels=10**9)
    assert message.startswith("has 400,000,000 pixels; Pillow's limit is ")
    assert message.endswith("(decompression bomb guard)")


def test_S3_text_named_png(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    path.write_text('model "sd-1.5"\nlearn photos/*.png as me* <person>\n')
    assert _problem(path) == "is not a readable image: it looks like a text file"


def test_S3_binary_garbage_named_png(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    path.write_bytes(b"\x00\x01\x02garbage" * 10)
    assert _problem(path) == "is not a readable image: not a PNG, JPEG, WEBP file"


def test_S3_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    path.touch()
    assert _problem(path) == "is empty (0 bytes)"


def test_S3_too_large_file_is_not_read(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    with path.open("wb") as handle:
        handle.truncate((64 << 20) + 1)  # sparse: costs no disk
    assert _problem(path) == "is larger than 64 MiB"
    small = _save(tmp_path / "small.png", "PNG")
    assert _problem(small, max_bytes=100) == "is larger than 100 bytes"


def test_S3_directory_named_png(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    path.mkdir()
    assert _problem(path) == "is a directory, not an image"


def test_S3_fifo_named_png(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    os.mkfifo(path)
    results: list[object] = []
    worker = threading.Thread(target=lambda: results.append(_check(path)), daemon=True)
    worker.start()
    worker.join(timeout=5)
    if worker.is_alive():  # unblock the reader so the test run can end, then fail
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("check_image blocked on a FIFO")
    assert results == [ImageProblem(path, "is not a regular file (a FIFO)")]


def test_S3_gif_not_allowed(tmp_path: Path) -> None:
    path = _save(tmp_path / "x.png", "GIF")
    assert _problem(path) == "is a GIF image; allowed formats are PNG, JPEG, WEBP"


def test_S3_bmp_not_allowed(tmp_path: Path) -> None:
    path = _save(tmp_path / "x.bmp", "BMP")
    assert _problem(path) == "is a BMP image; allowed formats are PNG, JPEG, WEBP"


def test_S3_missing_and_broken_symlink(tmp_path: Path) -> None:
    assert _problem(tmp_path / "missing.png") == "does not exist"
    link = tmp_path / "broken.png"
    link.symlink_to(tmp_path / "nowhere.png")
    assert _problem(link) == "is a broken symbolic link"


def test_S3_symlink_to_file_is_followed(tmp_path: Path) -> None:
    target = _save(tmp_path / "real.png", "PNG")
    link = tmp_path / "link.png"
    link.symlink_to(target)
    result = _check(link)
    assert isinstance(result, ImageInfo)
    assert result.path == link
    assert result.digest == file_digest(target)


def test_file_digest(tmp_path: Path) -> None:
    path = tmp_path / "mask.png"
    data = os.urandom(3 << 20)
    path.write_bytes(data)
    assert file_digest(path) == hashlib.sha256(data).hexdigest()
    with pytest.raises(IsADirectoryError):
        file_digest(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file"):
        file_digest(fifo)


# ---------------------------------------------------------------------------------------------
# S5 globbing


def _tree(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def _rel(root: Path, paths: list[Path]) -> list[str]:
    return [p.relative_to(root).as_posix() for p in paths]


def test_S5_glob_does_not_follow_dir_symlink(tmp_path: Path) -> None:
    _tree(tmp_path, "a.png", "sub/b.png", "sub/deep/c.png")
    (tmp_path / "sub" / "root").symlink_to("/")
    (tmp_path / "sub" / "deep" / "loop").symlink_to(tmp_path)
    (tmp_path / "self").symlink_to(".")
    matches = glob_files(tmp_path, "**/*.png", limit=100)
    assert _rel(tmp_path, matches) == ["a.png", "sub/b.png", "sub/deep/c.png"]
    # A wildcard segment does not descend into a linked directory either.
    assert _rel(tmp_path, glob_files(tmp_path, "*/b.png", limit=100)) == ["sub/b.png"]
    assert glob_files(tmp_path, "sub/*/etc/passwd", limit=100) == []


def test_S5_glob_returns_dir_symlink_itself_when_it_matches(tmp_path: Path) -> None:
    (tmp_path / "link.png").symlink_to("/")
    assert _rel(tmp_path, glob_files(tmp_path, "*.png", limit=10)) == ["link.png"]


def test_S5_glob_match_limit(tmp_path: Path) -> None:
    _tree(tmp_path, *(f"d{i}/img{j}.png" for i in range(5) for j in range(10)))
    assert len(glob_files(tmp_path, "**/*.png", limit=50)) == 50
    with pytest.raises(MatchLimitExceeded) as info:
        glob_files(tmp_path, "**/*.png", limit=49)
    assert info.value.limit == 49
    assert "49" in str(info.value)


def test_S5_glob_walk_limit_bounds_a_search_that_matches_nothing(tmp_path: Path) -> None:
    """A pattern matching nothing must still not search without bound (`/**/*.x`)."""
    _tree(tmp_path, *(f"d{i}/e{j}/keep.txt" for i in range(6) for j in range(3)))
    folders = 1 + 6 + 6 * 3  # the base, d*, d*/e*
    assert glob_files(tmp_path, "**/*.png", limit=folders) == []
    with pytest.raises(WalkLimitExceeded) as info:
        glob_files(tmp_path, "**/*.png", limit=folders - 1)
    assert isinstance(info.value, MatchLimitExceeded)
    assert f"searches more than {folders - 1} folders" in str(info.value)


def test_glob_double_star_matches_zero_or_more_dirs(tmp_path: Path) -> None:
    _tree(tmp_path, "x.png", "a/x.png", "a/b/x.png", "a/b/c/x.png", "a/b/c/y.jpg")
    assert _rel(tmp_path, glob_files(tmp_path, "a/**/x.png", limit=10)) == [
        "a/b/c/x.png",
        "a/b/x.png",
        "a/x.png",
    ]
    assert _rel(tmp_path, glob_files(tmp_path, "**/**/x.png", limit=10)) == [
        "a/b/c/x.png",
        "a/b/x.png",
        "a/x.png",
        "x.png",
    ]
    assert _rel(tmp_path, glob_files(tmp_path, "a/**/c/*", limit=10)) == [
        "a/b/c/x.png",
        "a/b/c/y.jpg",
    ]
    assert _rel(tmp_path, glob_files(tmp_path, "a/b/**", limit=10)) == [
        "a/b/c",
        "a/b/c/x.png",
        "a/b/c/y.jpg",
        "a/b/x.png",
    ]


def test_glob_question_mark_and_brackets(tmp_path: Path) -> None:
    _tree(tmp_path, "a.png", "b.png", "c.png", "ab.png", "A.png")
    assert _rel(tmp_path, glob_files(tmp_path, "?.png", limit=10)) == [
        "A.png",
        "a.png",
        "b.png",
        "c.png",
    ]
    assert _rel(tmp_path, glob_files(tmp_path, "[ab].png", limit=10)) == ["a.png", "b.png"]
    assert _rel(tmp_path, glob_files(tmp_path, "[!ab].png", limit=10)) == ["A.png", "c.png"]


def test_glob_hidden_names(tmp_path: Path) -> None:
    _tree(tmp_path, "a.png", ".hidden.png", ".git/x.png", "sub/.cache/y.png")
    assert _rel(tmp_path, glob_files(tmp_path, "*.png", limit=10)) == ["a.png"]
    assert _rel(tmp_path, glob_files(tmp_path, "**/*.png", limit=10)) == ["a.png"]
    assert _rel(tmp_path, glob_files(tmp_path, ".*.png", limit=10)) == [".hidden.png"]
    assert _rel(tmp_path, glob_files(tmp_path, "?hidden.png", limit=10)) == []
    assert _rel(tmp_path, glob_files(tmp_path, ".git/*.png", limit=10)) == [".git/x.png"]
    assert _rel(tmp_path, glob_files(tmp_path, "*/.cache/*", limit=10)) == ["sub/.cache/y.png"]


def test_glob_results_sorted_by_path_string(tmp_path: Path) -> None:
    names = ["b.png", "a-b/z.png", "a/z.png", "a.png", "B.png", "a0/z.png"]
    _tree(tmp_path, *names)
    matches = glob_files(tmp_path, "**/*.png", limit=10)
    assert [str(p) for p in matches] == sorted(str(tmp_path / n) for n in names)


def test_glob_literal_pattern_is_existence_check(tmp_path: Path) -> None:
    _tree(tmp_path, "photos/me.png")
    assert glob_files(tmp_path, "photos/me.png", limit=1) == [tmp_path / "photos/me.png"]
    assert glob_files(tmp_path, "photos/you.png", limit=1) == []
    assert glob_files(tmp_path, "photos/me.png/x", limit=1) == []
    broken = tmp_path / "photos" / "broken.png"
    broken.symlink_to("nowhere")
    assert glob_files(tmp_path, "photos/broken.png", limit=1) == [broken]
    assert glob_files(tmp_path, "photos/*.png", limit=2) == [broken, tmp_path / "photos/me.png"]


def test_glob_directories_are_returned_for_the_caller_to_report(tmp_path: Path) -> None:
    _tree(tmp_path, "a.png", "d.png/inner.png")
    assert _rel(tmp_path, glob_files(tmp_path, "*.png", limit=10)) == ["a.png", "d.png"]


def test_glob_absolute_pattern(tmp_path: Path) -> None:
    _tree(tmp_path, "abs/one.png", "abs/two.png")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    matches = glob_files(elsewhere, f"{tmp_path}/abs/*.png", limit=10)
    assert matches == [tmp_path / "abs/one.png", tmp_path / "abs/two.png"]


def test_glob_parent_and_current_dir_segments(tmp_path: Path) -> None:
    _tree(tmp_path, "shared/one.png", "spec/x.png")
    base = tmp_path / "spec"
    matches = glob_files(base, "../shared/*.png", limit=10)
    assert matches == [base / ".." / "shared" / "one.png"]
    assert [p.resolve() for p in matches] == [(tmp_path / "shared/one.png").resolve()]
    assert glob_files(base, "./*.png", limit=10) == [base / "x.png"]
    assert glob_files(base, "../*/../spec/x.png", limit=10) == [
        base / ".." / "shared" / ".." / "spec" / "x.png",
        base / ".." / "spec" / ".." / "spec" / "x.png",
    ]


def test_glob_missing_base_and_odd_patterns(tmp_path: Path) -> None:
    assert glob_files(tmp_path / "missing", "**/*.png", limit=10) == []
    assert glob_files(tmp_path, "", limit=10) == []
    assert glob_files(tmp_path, "a\x00b/*.png", limit=10) == []
    assert glob_files(tmp_path, "[", limit=10) == []


# ---------------------------------------------------------------------------------------------
# S5 spec discovery


def test_S5_discovery_does_not_follow_dir_symlinks(tmp_path: Path) -> None:
    project = tmp_path / "project"
    outside = tmp_path / "outside"
    _tree(project, "a.concept", "sub/b.concept", "sub/notes.txt", ".hidden/c.concept")
    _tree(outside, "evil.concept")
    (project / "sub" / "ext").symlink_to(outside)
    (project / "sub" / "root").symlink_to("/")
    (project / "loop").symlink_to(project)
    (project / "dir.concept").symlink_to(outside)
    files, problems = discover_specs([project], limit=10)
    assert _rel(project, files) == ["a.concept", "sub/b.concept"]
    assert problems == []


def test_S5_discovery_limit(tmp_path: Path) -> None:
    _tree(tmp_path, *(f"d{i}/s{j}.concept" for i in range(3) for j in range(4)))
    assert len(discover_specs([tmp_path], limit=12)[0]) == 12
    with pytest.raises(MatchLimitExceeded) as info:
        discover_specs([tmp_path], limit=11)
    assert info.value.limit == 11


def test_discovery_explicit_paths_and_problems(tmp_path: Path) -> None:
    _tree(tmp_path, "specs/a.concept", "specs/b.concept", "readme.md")
    specs = tmp_path / "specs"
    fifo = specs / "pipe.concept"
    os.mkfifo(fifo)
    (specs / "broken.concept").symlink_to("nowhere")
    paths = [specs, specs / "a.concept", tmp_path / "readme.md", tmp_path / "missing"]
    files, problems = discover_specs(paths, limit=10)
    assert files == [specs / "a.concept", specs / "b.concept"]
    assert sorted(problems) == sorted(
        [
            f"not a .concept file: {tmp_path / 'readme.md'}",
            f"no such file or directory: {tmp_path / 'missing'}",
            f"not a regular file: {fifo}",
            f"broken symbolic link: {specs / 'broken.concept'}",
        ]
    )


def test_discovery_dedupes_the_same_file_under_two_names(tmp_path: Path) -> None:
    _tree(tmp_path, "b.concept")
    (tmp_path / "a.concept").symlink_to("b.concept")
    files, problems = discover_specs([tmp_path, tmp_path / "b.concept"], limit=1)
    assert files == [tmp_path / "a.concept"]
    assert problems == []


def test_discovery_explicit_symlinked_directory_is_used(tmp_path: Path) -> None:
    _tree(tmp_path, "real/a.concept")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    files, _ = discover_specs([tmp_path / "link"], limit=10)
    assert files == [tmp_path / "link" / "a.concept"]


# ---------------------------------------------------------------------------------------------
# S1 containment


def test_is_within_with_symlink_escaping_root(tmp_path: Path) -> None:
    root = tmp_path / "run"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    (root / "inner").mkdir()
    assert is_within(root, root)
    assert is_within(root, root / "inner" / "new.png")
    assert is_within(root, root / "not-yet" / "deeper" / "file.png")
    assert is_within(root, root / "not-yet" / ".." / "x.png")
    assert not is_within(root, root / "escape")
    assert not is_within(root, root / "escape" / "new.png")
    assert not is_within(root, root / ".." / "outside" / "x.png")
    assert not is_within(root, tmp_path / "run2" / "x.png")  # a shared prefix is not containment


def test_is_within_through_symlinked_root(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    alias = tmp_path / "alias"
    alias.symlink_to(real)
    assert is_within(alias, real / "x.png")
    assert is_within(real, alias / "x.png")
