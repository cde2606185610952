"""Writes the example project's training pictures (specs/images/) with the toy:shapes world.

    .venv/bin/python tools/make_example_images.py [--out specs/images]
    .venv/bin/python tools/make_example_images.py --check   # exit 1 if a committed file differs

Each concept is one object of the world (an outline, colours, a pattern) drawn at seeded random
sizes, positions, backgrounds and rotations, as a user would photograph one thing in several
places. All three are held out of the model's training data (docs/toy.md#held-out): the moon's
outline (a crescent between thin and fat), the badge's and the tile's colour/pattern pairs.
The badge also gets a loss mask per picture (white where the object is), matched by file
stem. Each picture gets its caption beside it (`1.png` ↔ `1.txt`, the specs' `captions:`): the
world's own caption of the scene with `{}` for the object, so that the words say its size,
position and background and the concept stands for the object alone (docs/toy.md#training-captions).
Deterministic: rerunning rewrites the same bytes.
"""

from __future__ import annotations

import argparse
import io
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from runtime.toy import world  # noqa: E402

# folder -> (object, pictures); an object is (form, colour, pattern, second colour)
MOON = world.Form("crescent", facing="right")  # an outline the model never saw
EXAMPLES: dict[str, tuple[tuple[world.Form, str, str, str | None], int]] = {
    "moon": ((MOON, "orange", "solid", None), 5),
    "badge/pictures": ((world.Form("diamond"), "purple", "striped", "yellow"), 4),
    "tile/light": ((world.Form("square"), "cyan", "dotted", "red"), 3),
    "tile/dark": ((world.Form("square"), "cyan", "dotted", "red"), 2),
}
MASKED = {"badge/pictures": "badge/masks"}
DARK = ("black", "gray")


def scenes(folder: str, count: int) -> list[world.Scene]:
    (form, colour, pattern, second) = EXAMPLES[folder][0]
    rng = random.Random(f"example {folder}")
    out = []
    for _ in range(count):
        # one object: its proportions fixed (depth 0: the middle of the form's range)
        scene = world.with_changes(world.sample_scene(rng, (form,)), colour=colour,
                                   pattern=pattern, second=second, depth=0.0)
        if folder.startswith("tile/"):  # the light and dark halves of the `**` example
            backgrounds = DARK if folder.endswith("dark") else ("white", "beige")
            scene = world.with_changes(scene, background=rng.choice(backgrounds))
        out.append(scene)
    return out


def files() -> dict[str, bytes]:
    """Relative path -> bytes of every picture, its caption and its mask."""
    out = {}
    for folder, (_, count) in EXAMPLES.items():
        words = random.Random(f"captions {folder}")
        for k, scene in enumerate(scenes(folder, count), start=1):
            out[f"{folder}/{k}.png"] = _png(world.render(scene))
            out[f"{folder}/{k}.txt"] = (world.caption(scene, words, subject="{}") + "\n").encode()
            if folder in MASKED:
                out[f"{MASKED[folder]}/{k}.png"] = _png(world.object_mask(scene))
    return out


def _png(image: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)  # type: ignore[attr-defined]
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "specs" / "images")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a file differs from what would be written")
    args = parser.parse_args()
    differ = []
    for name, data in files().items():
        path = args.out / name
        if args.check:
            if not path.is_file() or path.read_bytes() != data:
                differ.append(name)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    if args.check:
        print("\n".join(f"differs: {n}" for n in differ) or "all example images are current")
        sys.exit(1 if differ else 0)
    print(f"wrote {len(files())} file(s) under {args.out}")


if __name__ == "__main__":
    main()
