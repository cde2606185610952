"""Cache keys: sha256 of canonical JSON of exactly what changes a result."""

from __future__ import annotations

import hashlib
import json
from typing import Any

# Bump when the meaning of a key's inputs changes, so old artifacts are rebuilt.
# 2: the trainer edits only each caption's own text positions (docs/runtime.md, "Which
# positions the edit touches"), so every concept trained before is stale.
# 3: a supercategory phrase's leading words stand before the token in every caption
# (docs/runtime.md, "The supercategory's leading words"), so concepts with a phrase as their
# first supercategory train differently.
KEY_FORMAT = 3

# How `mask: attention` cuts its masks enters the key as "attention:<rule>", so that only the
# concepts it trained are rebuilt when it changes. 2 (2026-12-04): half-way from each image's
# least attention to its most; rule 1 (30 % of the peak, keyed "attention") kept whole images
# on toy:shapes (docs/runtime.md, "Training").
ATTENTION_MASK_RULE = 2


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


def digest(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()


def concept_key(inputs: dict[str, Any]) -> str:
    """Changes exactly when the trained concept would: image bytes (in path order, not
    paths or mtimes), token, supercategories, adjectives, training options, base model
    (`inputs` is `passes.check_duplicates.concept_inputs`)."""
    return digest({"format": KEY_FORMAT, **inputs})
