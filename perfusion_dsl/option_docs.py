"""The options table of docs/language.md, as data: the editor's hover (`perfusion lsp`) and
the docs read the same rows, and a test keeps the docs' table equal to `markdown_table()`
so the two cannot drift. Types, ranges and defaults are checked against the plan's option
models by that test too."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class OptionDoc:
    key: str
    kind: str  # "learn", "generate" or "both"
    type: str  # type and range, as the docs write it
    default: str
    meaning: str


TOY = "`toy:shapes`"
OPTION_DOCS: tuple[OptionDoc, ...] = (
    OptionDoc("steps", "learn", "integer 1 … 1,000,000", f"`400`; `150` for {TOY}",
              "optimisation steps"),
    OptionDoc("steps", "generate", "integer 1 … 1,000,000",
              f"model's default (`null`; `15` for {TOY})", "sampling steps"),
    OptionDoc("seed", "both", "integer 0 … 2⁶³−1", "`0`",
              "learn: training seed. generate: image k of each prompt uses `seed + k`"),
    OptionDoc("batch", "learn", "integer 1 … 4,096", f"`16` (for {TOY} too)",
              "effective batch (may be reached by accumulation)"),
    OptionDoc("lr", "learn", "number > 0 and ≤ 10", "`0.03`",
              "learning rate of the value targets"),
    OptionDoc("embedding_lr", "learn", "number > 0 and ≤ 10", "`0.006`",
              "learning rate of the token embedding"),
    OptionDoc("lock", "learn", "`local` or `global`", "`local`", "key-locking variant"),
    OptionDoc("mask", "learn", "`none`, `attention` or a path pattern", "`none`",
              "loss mask: none; from the base model's cross-attention to the supercategory; "
              "or your own mask images, matched to the training images by file stem"),
    OptionDoc("captions", "learn", "`none` or a path pattern", "`none`",
              "each picture's own caption: text files matched to the training images by file "
              "stem, each with exactly one `{}` (the adjectives and the token). They replace "
              "`templates`"),
    OptionDoc("resolution", "learn", "integer 8 … 4,096, a multiple of 8",
              "model's native (`null`)", "training resolution"),
    OptionDoc("flip", "learn", "`true` or `false`", "`true`", "random horizontal flips"),
    OptionDoc("templates", "learn",
              "a quoted string or a list of them, each with exactly one `{}`",
              f"10 built-in captions (“a photo of a {{}}”, …); for {TOY}, “a {{}}”",
              "caption templates; `{}` becomes the adjectives and the token"),
    OptionDoc("beta", "learn", "number 0 … 1", "`0.75`", "training gate bias β"),
    OptionDoc("tau", "learn", "number > 0 and ≤ 1", "`0.1`", "training gate temperature τ"),
    OptionDoc("strength", "generate", "number 0 … 1, or a non-empty list of distinct ones",
              "`0.5`", "concept gate: 1 = closest to the learned concept, 0 = most freedom "
              "for the text. A list renders each value"),
    OptionDoc("guidance", "generate", "number 0 … 100",
              f"model's default (`null`; `5` for {TOY})", "classifier-free guidance scale"),
    OptionDoc("size", "generate", "`WIDTHxHEIGHT`, each side 8 … 4,096 and a multiple of 8",
              "model's native (`null`)", "output size, e.g. `512x512`"),
    OptionDoc("negative", "generate", "quoted string", '`""`', "negative prompt"),
    OptionDoc("out", "generate", "path (quoted or bare)",
              "see [outputs](#the-run-root-and-output-paths)",
              "output folder, relative to the spec file. It must stay inside the run root"),
)


def docs_for(key: str, kind: str | None = None) -> list[OptionDoc]:
    """The rows of option `key`: of statement `kind` (`learn`/`generate`), or all of them
    (in `defaults`, where an option reaches both kinds)."""
    return [d for d in OPTION_DOCS
            if d.key == key and (kind is None or d.kind in (kind, "both"))]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table() -> str:
    """The options table as docs/language.md shows it."""
    lines = ["| key | for | type and range | default | meaning |", "|---|---|---|---|---|"]
    lines += [f"| `{d.key}` | {d.kind} | {_cell(d.type)} | {_cell(d.default)} | "
              f"{_cell(d.meaning)} |" for d in OPTION_DOCS]
    return "\n".join(lines) + "\n"


def hover_markdown(key: str, kind: str | None = None) -> str | None:
    """What an editor shows over option `key` in a block of `kind`."""
    rows = docs_for(key, kind)
    if not rows:
        return None
    parts = []
    for d in rows:
        where = "learn and generate" if d.kind == "both" else d.kind
        parts.append(f"**`{d.key}`** ({where} option): {d.meaning}\n\n"
                     f"- type: {d.type}\n- default: {d.default}")
    return "\n\n---\n\n".join(parts)
