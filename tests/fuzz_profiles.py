"""Hypothesis profiles for the fuzz tests (F1, F3), chosen with `PERFUSION_FUZZ`.

- `ci` (default): about 200 examples per property, keeps `tests/test_fuzz.py` under a minute.
- `thorough`: 2,000 examples per property (`PERFUSION_FUZZ=thorough pytest tests/test_fuzz.py`).
- `PERFUSION_FUZZ_EXAMPLES=N` overrides the number of examples of either (long campaigns).

The profiles are applied to the fuzz tests only (as a `@settings` decorator), never loaded
globally, so other test modules keep Hypothesis' defaults. Deadlines are off: each example
measures its own time and asserts a bound that is meaningful for the scenario.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

ENV = "PERFUSION_FUZZ"
EXAMPLES_ENV = "PERFUSION_FUZZ_EXAMPLES"
DEFAULT = "ci"

_COMMON = dict(
    deadline=None,
    print_blob=True,
    # Generated specs are big and the filters on terminals reject some draws by design.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                           HealthCheck.data_too_large, HealthCheck.large_base_example],
)

settings.register_profile("ci", max_examples=200, **_COMMON)  # type: ignore[arg-type]
settings.register_profile("thorough", max_examples=2_000, **_COMMON)  # type: ignore[arg-type]


def profile_name() -> str:
    name = os.environ.get(ENV, "").strip() or DEFAULT
    if name not in ("ci", "thorough"):
        raise ValueError(f"{ENV}={name!r}: expected `ci` or `thorough`")
    return name


def _fuzz_settings(name: str) -> settings:
    chosen = settings.get_profile(name)
    override = os.environ.get(EXAMPLES_ENV, "").strip()
    return settings(chosen, max_examples=int(override)) if override else settings(chosen)


PROFILE = profile_name()
FUZZ_SETTINGS = _fuzz_settings(PROFILE)
MAX_EXAMPLES = FUZZ_SETTINGS.max_examples
