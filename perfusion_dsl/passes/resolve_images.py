"""Resolves `learn` patterns and mask patterns to decodable images, and caption patterns to
each image's caption template."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from perfusion_dsl.context import Context, Unit
from perfusion_dsl.diagnostics import error, warning
from perfusion_dsl.images import ImageInfo, ImageProblem, check_image
from perfusion_dsl.nodes import Learn, Span
from perfusion_dsl.options import shorten, template_problem
from perfusion_dsl.patterns import MatchLimitExceeded, WalkLimitExceeded, glob_files


class _Images:
    """Checks each file once per run, however many patterns match it and however its path
    is spelled (`specs/a/../photos/1.png` from one folder, `specs/b/../photos/1.png` from
    another): decoding is the slow part of `check`."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.seen: dict[Path, ImageInfo | ImageProblem] = {}
        self.by_file: dict[tuple[int, int], ImageInfo | ImageProblem] = {}  # (st_dev, st_ino)

    def check(self, path: Path) -> ImageInfo | ImageProblem:
        if path not in self.seen:
            self.seen[path] = self._check_file(path)
        return self.seen[path]

    def _check_file(self, path: Path) -> ImageInfo | ImageProblem:
        limits = self.ctx.config.limits
        try:
            st = os.stat(path)
        except (OSError, ValueError):  # check_image says why
            return check_image(path, limits.max_image_pixels, limits.max_image_bytes)
        key = (st.st_dev, st.st_ino)
        if key not in self.by_file:
            self.by_file[key] = check_image(path, limits.max_image_pixels, limits.max_image_bytes)
        return dataclasses.replace(self.by_file[key], path=path)  # as this pattern names it


def _match(ctx: Context, unit: Unit, pattern: str, span: Span, what: str) -> list[Path]:
    limit = ctx.config.limits.max_glob_matches
    if not pattern.strip():
        ctx.add(error("no-match", f"{what} is empty", unit.file, span,
                      help="give a path or a glob such as `photos/*.png`"))
        return []
    try:
        found = glob_files(unit.path.parent, pattern, limit)
    except MatchLimitExceeded as exc:
        how = exc.args[0] if isinstance(exc, WalkLimitExceeded) else \
            f"matches more than {limit:,} files"
        ctx.add(error("too-many-matches", f"{what} `{shorten(pattern, 80)}` {how}",
                      unit.file, span, help="narrow the pattern, or raise `max_glob_matches` "
                                            "in perfusion.toml"))
        return []
    if not found:
        where = ctx.display(unit.path.parent / Path(pattern).parent)
        ctx.add(error("no-match", f"{what} `{shorten(pattern, 80)}` matches no files", unit.file,
                      span, help=f"patterns are relative to this file's folder; looked in "
                                 f"`{shorten(where, 80)}/`"))
    return found


def _decode_all(images: _Images, unit: Unit, paths: list[Path], span: Span,
                ) -> tuple[ImageInfo, ...]:
    good, bad = [], []
    for path in paths:
        got = images.check(path)
        if isinstance(got, ImageProblem):
            bad.append(f"`{images.ctx.display(path)}` {got.message}")
        else:
            good.append(got)
    if len(bad) == 1:
        images.ctx.add(error("bad-image", bad[0], unit.file, span))
    elif bad:  # one diagnostic per pattern: 10,000 bad files are not 10,000 errors
        shown = bad[:BAD_IMAGES_SHOWN]
        more = [f"... and {len(bad) - len(shown):,} more"] if len(bad) > len(shown) else []
        images.ctx.add(error("bad-image", f"{len(bad):,} of the {len(paths):,} files this "
                             "pattern matches are not usable images", unit.file, span,
                             extra=tuple(shown + more)))
    return tuple(good)


BAD_IMAGES_SHOWN = 5  # the first few unusable files of a pattern are named, then a count


def _masks(images: _Images, unit: Unit, index: int, learn: Learn, pattern: str) -> None:
    ctx = images.ctx
    span = _option_span(learn, "mask")
    found = _decode_all(images, unit, _match(ctx, unit, pattern, span, "mask pattern"), span)
    by_stem = {info.path.stem: info for info in found}
    wanted = ctx.images.get((unit.path, index), ())
    missing = [i.path.name for i in wanted if i.path.stem not in by_stem]
    if found and missing:
        ctx.add(error("mask-missing", f"no mask for {len(missing)} image(s): "
                      + ", ".join(missing[:5]) + (" …" if len(missing) > 5 else ""),
                      unit.file, span, help="masks are matched to images by file name stem "
                                            "(`photos/1.png` ↔ `masks/1.png`)"))
    ctx.masks[(unit.path, index)] = tuple(by_stem[i.path.stem] for i in wanted
                                          if i.path.stem in by_stem)


MAX_CAPTION_BYTES = 4096  # a caption is a line of text; a larger file is not one
# words a horizontal flip makes wrong (the flip mirrors the picture, not its caption)
SIDE_WORDS = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def _option_span(learn: Learn, key: str) -> Span:
    """The learn's own `key:` value, else (set by `defaults`) the learn's pattern."""
    own = [o.value.span for o in learn.block.options if o.key == key] if learn.block else []
    return own[0] if own else learn.pattern.span


def _caption_text(path: Path) -> str:
    """A caption file's text, stripped, lines joined by spaces; ValueError says what is
    wrong with it."""
    try:
        data = path.read_bytes()[:MAX_CAPTION_BYTES + 1]
    except OSError as exc:
        raise ValueError(f"cannot be read ({exc.strerror or exc})") from None
    if len(data) > MAX_CAPTION_BYTES:
        raise ValueError(f"is over {MAX_CAPTION_BYTES:,} bytes: a caption is a line of text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError("is not UTF-8 text") from None
    text = " ".join(text.split())
    if (problem := template_problem(text)) is not None:
        raise ValueError(problem)
    return text


def _caption_for(image: Path, by_stem: dict[str, list[Path]]) -> Path | list[Path] | None:
    """The caption file of `image`: the one with its stem in its own folder, else the only one
    with its stem; None when there is none, the candidates when several could be it."""
    found = by_stem.get(image.stem, [])
    beside = [c for c in found if c.parent == image.parent]
    if beside:
        return beside[0]
    if len(found) > 1:
        return found
    return found[0] if found else None


def _captions(ctx: Context, unit: Unit, index: int, learn: Learn, pattern: str) -> None:
    span = _option_span(learn, "captions")
    found = _match(ctx, unit, pattern, span, "caption pattern")
    by_stem: dict[str, list[Path]] = {}
    for path in found:
        by_stem.setdefault(path.stem, []).append(path)
    wanted = ctx.images.get((unit.path, index), ())
    chosen = [_caption_for(i.path, by_stem) for i in wanted]
    missing = [i.path.name for i, c in zip(wanted, chosen, strict=True) if c is None]
    if found and missing:
        ctx.add(error("caption-missing", f"no caption for {len(missing)} image(s): "
                      + ", ".join(missing[:5]) + (" …" if len(missing) > 5 else ""),
                      unit.file, span, help="captions are text files matched to images by "
                                            "file name stem (`photos/1.png` ↔ `captions/1.txt`)"))
    texts, bad = [], []
    for info, where in zip(wanted, chosen, strict=True):
        if isinstance(where, list):
            bad.append(f"`{ctx.display(info.path)}` could take any of "
                       + ", ".join(f"`{ctx.display(c)}`" for c in where[:3])
                       + ": put its caption beside it, or give the images distinct stems")
        elif where is not None:
            try:
                texts.append(_caption_text(where))
            except ValueError as exc:
                bad.append(f"`{ctx.display(where)}` {exc}")
    if bad:
        ctx.add(error("bad-caption", bad[0] if len(bad) == 1 else
                      f"the captions of {len(bad):,} images are not usable", unit.file, span,
                      help="a caption file holds its picture's whole caption, with `{}` "
                           "where the concept goes, e.g. \"a {} on the beach\"",
                      extra=tuple(bad[:BAD_IMAGES_SHOWN]) if len(bad) > 1 else ()))
        return
    if missing or not found:
        return
    ctx.captions[(unit.path, index)] = tuple(texts)
    flip = ctx.options.get((unit.path, index), {}).get("flip", True)
    sided = [t for t in texts if SIDE_WORDS.search(t)]
    if flip and sided:
        ctx.add(warning("flip-captions", f"{len(sided)} caption(s) say left or right, but "
                        "`flip` mirrors the pictures and not their captions, so the mirrored "
                        "copies are captioned wrongly", unit.file, span,
                        help="add `flip: false`", extra=(f"e.g. “{shorten(sided[0], 80)}”",)))


def run(ctx: Context) -> None:
    images = _Images(ctx)
    limit = ctx.config.limits.max_images_per_concept
    for unit, index, learn in ctx.statements(Learn):
        span = learn.pattern.span
        paths = _match(ctx, unit, learn.pattern.value, span, "pattern")
        if len(paths) > limit:
            ctx.add(error("too-many-images", f"`{learn.token}` would learn from {len(paths):,} "
                          f"images; the limit is {limit:,}", unit.file, span))
            paths = paths[:limit]
        ctx.images[(unit.path, index)] = _decode_all(images, unit, paths, span)
        mask = ctx.options.get((unit.path, index), {}).get("mask", "none")
        if mask not in ("none", "attention"):
            _masks(images, unit, index, learn, mask)
        captions = ctx.options.get((unit.path, index), {}).get("captions", "none")
        if captions != "none":
            _captions(ctx, unit, index, learn, captions)
