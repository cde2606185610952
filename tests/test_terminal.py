"""What reaches the terminal from users' files: control and bidi characters escaped."""

from __future__ import annotations

import io

from perfusion_dsl.terminal import visible
from perfusion_runtime.build.progress import Reporter


def test_visible_escapes_controls_and_bidi_and_keeps_the_rest() -> None:
    assert visible("a\x1b[2J\x07b\u202ec\x9b\x7f") == "a\\u{1b}[2J\\u{7}b\\u{202e}c\\u{9b}\\u{7f}"
    kept = "tab\there, é, 日本, emoji 🙂, quotes \"'`"
    assert visible(kept) == kept
    assert visible("line\nnext") == "line\nnext"


def test_progress_lines_escape_what_comes_from_specs() -> None:
    """Prompts, paths and errors in `perfusion run`'s lines come from the user's files."""
    err, out = io.StringIO(), io.StringIO()
    reporter = Reporter(stream=err, out=out, tty=False)
    reporter.error("while rendering `a \x1b]0;pwned\x07 photo` (a.concept:2): failed")
    reporter.result("  images:  renders/\u202eevil/")
    assert err.getvalue() == ("perfusion: error: while rendering `a \\u{1b}]0;pwned\\u{7} "
                              "photo` (a.concept:2): failed\n")
    assert out.getvalue() == "  images:  renders/\\u{202e}evil/\n"
