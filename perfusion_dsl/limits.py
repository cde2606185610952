"""Safety limits of the compiler: defaults, hard ceilings, and nothing a spec can change."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True, slots=True)
class Limits:
    """Every bound the compiler enforces. `perfusion.toml` may set these
    within `CEILINGS`; spec files have no syntax to change them at all."""

    max_spec_bytes: int = 262_144  # ~6,000 lines; checks in about 1 s (docs/performance.md)
    max_string_chars: int = 4_096
    max_spec_files: int = 10_000
    max_concepts: int = 1_000
    max_images_per_concept: int = 1_000
    max_glob_matches: int = 10_000
    max_image_pixels: int = 40_000_000
    max_image_bytes: int = 64 * 1024 * 1024
    max_renders_per_generate: int = 10_000
    max_renders_total: int = 100_000

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


DEFAULT_LIMITS = Limits()

# The most a project may raise each limit to; beyond these the compiler would no
# longer be safe to run on untrusted input in bounded time and memory.
CEILINGS = Limits(
    max_spec_bytes=16 * 1_048_576,
    max_string_chars=65_536,
    max_spec_files=100_000,
    max_concepts=10_000,
    max_images_per_concept=10_000,
    max_glob_matches=100_000,
    max_image_pixels=178_000_000,  # Pillow refuses more than ~179 MP outright
    max_image_bytes=512 * 1024 * 1024,
    max_renders_per_generate=100_000,
    max_renders_total=1_000_000,
)
