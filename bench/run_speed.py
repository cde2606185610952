"""Times the README's main job, `perfusion run specs/`, from scratch and again (no-op, R4).

    .venv/bin/python bench/run_speed.py [--noop-repeat 5] [--keep] [--run-args '--executor ray']

The example project (specs/) is copied into a temporary folder, so its store and renders
start empty and your own checkout is left alone. Each command runs as a subprocess, as a
user runs it: the first (full) build, then the no-op rebuild `--noop-repeat` times, then
`perfusion check` for scale. It prints wall and CPU seconds, what each run did, and the
ratios, all from this one run.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PERFUSION = [sys.executable, "-m", "perfusion_dsl"]


@dataclass
class Timed:
    wall: float
    cpu: float
    stdout: str


def timed(argv: list[str], cwd: Path) -> Timed:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Timed(wall, cpu, done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--noop-repeat", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the copy (path printed)")
    parser.add_argument("--run-args", default="",
                        help="more arguments for the first `perfusion run`, e.g. "
                             "'--executor ray'")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="perfusion-run-speed-"))
    try:
        shutil.copytree(REPO / "specs", work / "specs",
                        ignore=shutil.ignore_patterns(".perfusion", "renders"))
        first = timed([*PERFUSION, "run", *args.run_args.split(), "specs/"], work)
        noops = [timed([*PERFUSION, "run", "specs/"], work) for _ in range(args.noop_repeat)]
        check = timed([*PERFUSION, "check", "specs/"], work)
        images = len(list((work / "specs" / "renders").rglob("*.png")))
        print(first.stdout.splitlines()[0])
        print(noops[-1].stdout.splitlines()[0])
        walls = [n.wall for n in noops]
        print(f"\nfirst run (from scratch): {first.wall:8.2f} s wall, {first.cpu:8.2f} s CPU "
              f"({images} PNGs incl. contact sheets)")
        print(f"no-op rerun (R4):         {min(walls):8.3f} s wall best, "
              f"{statistics.median(walls):.3f} median, {min(n.cpu for n in noops):.3f} s CPU")
        print(f"perfusion check:          {check.wall:8.3f} s wall")
        print(f"ratios: first / no-op {first.wall / min(walls):.0f}x; "
              f"no-op / check {min(walls) / check.wall:.2f}")
        print(f"\nPython {sys.version.split()[0]}, {os.cpu_count()} CPUs, load "
              f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
