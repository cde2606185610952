"""Render outputs: confined symlink-safe atomic writes, PNG text, contact sheets, manifests."""

from __future__ import annotations

import errno
import fcntl
import io
import json
import logging
import math
import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

from .atomic import (
    FOLDER_FLAGS,
    FileError,
    check_target,
    fsync_folder,
    read_regular,
    reason,
    replace_in,
)

if TYPE_CHECKING:  # Pillow is imported inside the functions that use it: importing is cheap
    from typing import TypeAlias

    from PIL import Image, ImageFont

    _Font: TypeAlias = ImageFont.ImageFont | ImageFont.FreeTypeFont | ImageFont.TransposedFont

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "perfusion-renders"
MANIFEST_VERSION = 1
MAX_MANIFEST_BYTES = 16 << 20

MIN_TILE_WIDTH = 128  # 64 px renders are doubled so that their details can be seen
MAX_COLUMNS = 8
MAX_LABEL_LINES = 3
_PAD = 8
_BACKGROUND = (255, 255, 255)
_INK = (32, 32, 32)
_ELLIPSIS = "..."  # ASCII: every font has the glyph

_DIR_FLAGS = FOLDER_FLAGS | getattr(os, "O_NOFOLLOW", 0)  # folders below the root: never links

log = logging.getLogger(__name__)


class OutputError(FileError):
    """An output could not be written; names the path and the reason."""


# --- confined, symlink-safe, atomic writes ------------------------------------------------


def write_output(root: Path, rel: str, data: bytes) -> Path:
    """Write `data` to root/rel atomically and return the final path.

    Missing folders are created one at a time below root; a folder component that is a
    symlink or not a folder is refused, and so is a symlink or non-file at the final name.
    Every step goes through folder descriptors opened with O_NOFOLLOW, so a link
    swapped in meanwhile makes the write fail rather than go through it. The data goes to a
    temp file renamed over the final name: on any OSError the temp file is removed and the
    earlier file is intact.
    """
    *folders, name = _parts(root, rel)
    final = root.joinpath(*folders, name)
    fd = _open_folders(root, folders)
    try:
        check_target(fd, name, final, OutputError)
        _check_inside(root, final)  # defence in depth: nothing above may have escaped
        replace_in(fd, name, data)
    except OSError as exc:
        raise OutputError(final, f"cannot write: {reason(exc)}") from exc
    finally:
        os.close(fd)
    return final


def _parts(root: Path, rel: str) -> list[str]:
    """The components of `rel` with `.` and inner `..` resolved lexically; refuses escapes."""
    if "\x00" in rel:
        raise OutputError(root / rel, "the path contains a NUL byte")
    path = PurePath(rel)
    if path.is_absolute() or path.drive:
        raise OutputError(rel, f"not a path relative to the output root {root}")
    parts: list[str] = []
    for part in path.parts:
        if part != "..":
            parts.append(part)
        elif parts:
            parts.pop()
        else:
            raise OutputError(root / rel, f"'..' leaves the output root {root}")
    if not parts:
        raise OutputError(root / rel, "names the output root itself, not a file")
    return parts


def _check_inside(root: Path, path: Path) -> None:
    base, real = os.path.realpath(root), os.path.realpath(path)
    if os.path.commonpath([base, real]) != base:
        raise OutputError(path, f"resolves to {real}, outside the output root {base}")


def _open_folders(root: Path, folders: Sequence[str]) -> int:
    """A descriptor of root/folders, creating missing folders; symlinks are refused."""
    try:
        fd = os.open(root, FOLDER_FLAGS)
    except OSError as exc:
        raise OutputError(root, f"cannot open the output root: {reason(exc)}") from exc
    here = root
    try:
        for name in folders:
            here = here / name
            child = _enter(fd, name, here)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _enter(parent: int, name: str, here: Path) -> int:
    """A descriptor of the folder `name` in `parent`, made if missing; never a link."""
    try:
        try:
            os.mkdir(name, 0o777, dir_fd=parent)
            fsync_folder(parent)  # the new folder's name survives a power cut too
        except FileExistsError:
            pass
        mode = os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode
        if stat.S_ISLNK(mode):
            raise OutputError(here, "refusing to write through a symbolic link to a folder")
        if not stat.S_ISDIR(mode):
            raise OutputError(here, "cannot create the folder: something else has its name")
        return os.open(name, _DIR_FLAGS, dir_fd=parent)
    except OSError as exc:
        raise OutputError(here, f"cannot create the folder: {reason(exc)}") from exc


# --- PNG text chunks ---------------------------------------------------------------------


def png_with_text(image: Image.Image, text: Mapping[str, str]) -> bytes:
    """The image encoded as PNG with one iTXt chunk per item (UTF-8 keys/values, in the
    mapping's order), deterministic bytes for the same input (no timestamps).

    PNG keywords are 1-79 Latin-1 characters (the PNG specification); other keys are a
    ValueError. Values may be any text.
    """
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        _check_keyword(key)
        info.add_itxt(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=6)
    return buffer.getvalue()


def _check_keyword(key: str) -> None:
    latin1 = all(" " <= c <= "~" or "\xa1" <= c <= "\xff" for c in key)
    spaced = key != key.strip() or "  " in key
    if not (1 <= len(key) <= 79 and latin1 and not spaced):
        raise ValueError(f"not a PNG text keyword (1-79 printable Latin-1 characters, "
                         f"no leading, trailing or double spaces): {key!r}")


def read_png_text(path: Path) -> dict[str, str]:
    """The text chunks of a PNG file (for tests and `perfusion` users)."""
    from PIL import Image, PngImagePlugin

    with Image.open(path, formats=["PNG"]) as image:
        if not isinstance(image, PngImagePlugin.PngImageFile):
            raise ValueError(f"{path}: not a PNG file")
        return {key: str(value) for key, value in image.text.items()}


# --- contact sheets ----------------------------------------------------------------------


def contact_sheet(tiles: Sequence[tuple[Image.Image, str]], title: str,
                  columns: int | None = None) -> Image.Image:
    """A labelled grid: a title line at the top, then each tile with its label under it
    (label wrapped/truncated to the tile width, at most 3 lines), tiles upscaled with
    NEAREST to at least 128 px wide so small (64 px) renders stay readable; columns default
    to ceil(sqrt(n)) capped at 8. White background, dark text, PIL's default font
    (ImageFont.load_default()). Deterministic pixels for the same input. Empty tiles ->
    ValueError."""
    from PIL import Image, ImageDraw, ImageFont

    if not tiles:
        raise ValueError("a contact sheet needs at least one tile")
    cols = columns if columns is not None else min(MAX_COLUMNS, math.ceil(math.sqrt(len(tiles))))
    if cols < 1:
        raise ValueError(f"columns must be at least 1, not {cols}")
    font = ImageFont.load_default()
    line = _line_height(font)
    images = [_upscaled(tile) for tile, _ in tiles]
    cell_w = max(image.width for image in images)
    cell_h = max(image.height for image in images) + _PAD // 2 + MAX_LABEL_LINES * line
    rows = math.ceil(len(images) / cols)
    top = _PAD + line + _PAD
    size = (_PAD + cols * (cell_w + _PAD), top + rows * (cell_h + _PAD))
    sheet = Image.new("RGB", size, _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    draw.text((_PAD, _PAD), _fit(title, font, size[0] - 2 * _PAD), fill=_INK, font=font)
    for index, (image, (_, label)) in enumerate(zip(images, tiles, strict=True)):
        x = _PAD + (index % cols) * (cell_w + _PAD)
        y = top + (index // cols) * (cell_h + _PAD)
        _paste(sheet, image, (x, y))
        for n, text in enumerate(_wrap(label, font, image.width)):
            draw.text((x, y + image.height + _PAD // 2 + n * line), text, fill=_INK, font=font)
    return sheet


def _line_height(font: _Font) -> int:
    return int(font.getbbox("Agy|")[3]) + 2


def _upscaled(tile: Image.Image) -> Image.Image:
    """The tile scaled by a whole factor (NEAREST keeps pixels crisp) to ≥ 128 px wide."""
    from PIL import Image

    factor = max(1, math.ceil(MIN_TILE_WIDTH / max(1, tile.width)))
    if factor == 1:
        return tile
    return tile.resize((tile.width * factor, tile.height * factor), Image.Resampling.NEAREST)


def _paste(sheet: Image.Image, tile: Image.Image, at: tuple[int, int]) -> None:
    """Paste `tile`, composited onto the white background where it is transparent."""
    if tile.mode in ("RGBA", "LA", "PA") or "transparency" in tile.info:
        rgba = tile.convert("RGBA")
        sheet.paste(rgba, at, rgba)
    else:
        sheet.paste(tile.convert("RGB"), at)


def _width(text: str, font: _Font) -> float:
    return float(font.getlength(_drawable(text, font)))


def _drawable(text: str, font: _Font) -> str:
    """The bitmap fallback font only has Latin-1 glyphs; FreeType draws a box for missing ones."""
    from PIL import ImageFont

    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    return text.encode("latin-1", "replace").decode("latin-1")


def _wrap(label: str, font: _Font, width: int) -> list[str]:
    """Greedy word wrap to `width` px, a new line at each newline; long words are broken; at
    most 3 lines, then '...'."""
    lines: list[str] = []
    for paragraph in label.splitlines():
        current = ""
        for word in paragraph.split():
            candidate = f"{current} {word}" if current else word
            if _width(candidate, font) <= width:
                current = candidate
                continue
            if current:
                lines.append(current)
            current = _break_word(word, font, width, lines)
        if current:
            lines.append(current)
    if len(lines) > MAX_LABEL_LINES:  # the last line shown says that more was cut
        lines = [*lines[:MAX_LABEL_LINES - 1], _ellipsized(lines[MAX_LABEL_LINES - 1], font, width)]
    return [_drawable(text, font) for text in lines]


def _break_word(word: str, font: _Font, width: int, lines: list[str]) -> str:
    """Append full-width pieces of `word` to `lines`; return the rest (the current line)."""
    while len(word) > 1 and _width(word, font) > width:
        cut = 1  # at least one character per line, however narrow the tile
        while _width(word[:cut + 1], font) <= width:
            cut += 1
        lines.append(word[:cut])
        word = word[cut:]
    return word


def _fit(text: str, font: _Font, width: int) -> str:
    """`text` on one line of `width` px, cut and ended with '...' when it is too long."""
    return _drawable(text, font) if _width(text, font) <= width else _ellipsized(text, font, width)


def _ellipsized(text: str, font: _Font, width: int) -> str:
    """`text` cut so that it and a trailing '...' fit in `width` px."""
    while text and _width(text + _ELLIPSIS, font) > width:
        text = text[:-1]
    return _drawable(text.rstrip() + _ELLIPSIS, font)


# --- the render manifest -----------------------------------------------------------------


def empty_manifest() -> dict[str, Any]:
    """A manifest with no images and no sheets."""
    return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "images": {}, "sheets": {}}


def read_manifest(folder: Path) -> dict[str, Any]:
    """The folder's manifest.json as {"format":..., "version": 1, "images": {name: record},
    "sheets": {name: record}}. Missing -> an empty manifest of that shape. Unreadable, not JSON,
    wrong format/version, a symlink, or > 16 MiB -> an empty manifest plus a logged warning
    (logging.getLogger(__name__)) naming the path and why; never raises for bad content.
    Records are opaque dicts to this module."""
    path = folder / MANIFEST
    try:
        return _parse_manifest(_read_small(path))
    except FileNotFoundError:
        return empty_manifest()
    except OSError as exc:
        why = f"cannot read it: {reason(exc)}"
    except (ValueError, RecursionError) as exc:  # bad JSON, bad UTF-8, deep nesting, shape
        why = str(exc) or type(exc).__name__
    log.warning("ignoring the render manifest %s (%s); starting from an empty one",
                path, why)
    return empty_manifest()


def update_manifest(root: Path, folder_rel: str, images: Mapping[str, Any],
                    sheets: Mapping[str, Any]) -> dict[str, Any]:
    """Merge these image and contact-sheet records into root/folder_rel/manifest.json under
    a lock on that folder, so that two builds (with different stores, or different specs
    sharing an `out:` folder) never drop each other's records; returns what was written."""
    folder = root / folder_rel
    try:  # the lock is on the folder itself: no lock file among the user's images
        fd = os.open(folder, _DIR_FLAGS)
    except OSError as exc:
        raise OutputError(folder, f"cannot lock the folder's manifest: {reason(exc)}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held briefly: a read, a merge and a write
        manifest = read_manifest(folder)
        manifest["images"].update(images)
        manifest["sheets"].update(sheets)
        write_manifest(root, folder_rel, manifest)
        return manifest
    finally:
        os.close(fd)  # releases the lock


def write_manifest(root: Path, folder_rel: str, manifest: Mapping[str, Any]) -> Path:
    """Write root/folder_rel/manifest.json via write_output (json, indent 2, sort_keys,
    trailing newline, ensure_ascii=False)."""
    text = json.dumps(dict(manifest), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    return write_output(root, str(PurePath(folder_rel, MANIFEST)), text.encode("utf-8"))


def _read_small(path: Path) -> bytes:
    """The bytes of the regular file `path`, never through a link, at most 16 MiB."""
    if path.is_symlink():  # O_NOFOLLOW's ELOOP would name no link; say what it is
        raise OSError(errno.ELOOP, "it is a symbolic link")
    data = read_regular(path, MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise OSError(errno.EFBIG, f"larger than {MAX_MANIFEST_BYTES >> 20} MiB")
    return data


def _parse_manifest(data: bytes) -> dict[str, Any]:
    value = json.loads(data.decode("utf-8"))
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    form, version = value.get("format"), value.get("version")
    if form != MANIFEST_FORMAT or type(version) is not int or version != MANIFEST_VERSION:
        raise ValueError(f"unknown format {form!r} version {version!r}, "
                         f"expected {MANIFEST_FORMAT!r} version {MANIFEST_VERSION}")
    manifest = empty_manifest()
    for section in ("images", "sheets"):
        records = value.get(section, {})
        if not (isinstance(records, dict)
                and all(isinstance(r, dict) for r in records.values())):
            raise ValueError(f"{section!r} is not an object of records")
        manifest[section] = records
    return manifest
