"""Text from files shown on a terminal: control and bidirectional-override characters are
written as `\\u{1b}` (as rustc does), so a spec, a path or a prompt cannot retitle the
window, clear the screen or reorder what the user reads. Shared by the compiler's
diagnostics and the runtime's progress lines (docs/language.md#diagnostics)."""

from __future__ import annotations

import re

# C0 controls but tab and newline (tabs are expanded where columns matter; newlines end a
# line), DEL, C1 controls, and the invisible characters that change the order or direction
# of text: LRM/RLM, ALM, LRE…RLO, LRI…PDI, and the BOM / zero-width no-break space.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e"
                     "\u2066-\u2069\ufeff]")


def visible(text: str) -> str:
    """`text` with every unsafe character written as `\\u{hex}`; the rest unchanged."""
    return _UNSAFE.sub(lambda m: f"\\u{{{ord(m.group()):x}}}", text)
