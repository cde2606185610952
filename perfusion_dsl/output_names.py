"""The file name of each rendered image: the prompt's slug, the seed and the strength."""

from __future__ import annotations

import re
from functools import lru_cache

_NON_WORD = re.compile(r"[^a-z0-9]+")
MAX_SLUG = 80


@lru_cache(maxsize=1024)  # a prompt's renders (strengths, seeds) come one after another
def slug(prompt: str) -> str:
    text = _NON_WORD.sub("-", prompt.lower()).strip("-")
    return text[:MAX_SLUG].rstrip("-") or "prompt"


def file_name(prompt: str, seed: int, strength: float) -> str:
    # repr: the shortest text that round-trips, so distinct strengths get distinct names
    return f"{slug(prompt)}_seed{seed}_s{strength!r}.png"
