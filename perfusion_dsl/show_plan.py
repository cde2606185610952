"""The human-readable form of a plan, for `perfusion plan` without `--json`."""

from __future__ import annotations

from itertools import groupby
from pathlib import PurePosixPath

from perfusion_dsl.plan import Plan


def describe(plan: Plan) -> str:
    lines = [f"concepts to train: {len(plan.concepts)}"]
    for c in plan.concepts:
        state = "up to date" if c.up_to_date else "new"
        lines.append(f"  {c.token:<16} {state:<10} {len(c.images)} image(s), "
                     f"{c.options['steps']} steps, lock {c.options['lock']:<6}  "
                     f"({c.file}:{c.line}, key {c.key[:12]})")
    lines.append(f"images to render: {len(plan.renders)}")
    for (file, line), group in groupby(plan.renders, key=lambda r: (r.file, r.line)):
        renders = list(group)
        folders = sorted({str(PurePosixPath(r.out).parent) for r in renders})
        prompts = len({r.prompt for r in renders})
        lines.append(f"  {file}:{line}: {len(renders)} image(s) from {prompts} prompt(s) "
                     f"→ {', '.join(folders)}/")
    return "\n".join(lines)
