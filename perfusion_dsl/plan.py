"""The plan: the frozen, versioned contract between the compiler and the runtime."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

PLAN_VERSION = 1


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class ConceptStep(_Frozen):
    """One concept to train, with where it was declared."""

    token: str
    file: str
    line: int = Field(ge=1)
    model: str
    supercategories: list[str] = Field(min_length=1)
    adjectives: list[str]
    images: list[str] = Field(min_length=1)
    options: dict[str, Any]
    key: str = Field(pattern=r"^[0-9a-f]{64}$")
    up_to_date: bool = False


class RenderStep(_Frozen):
    """One image to render."""

    file: str
    line: int = Field(ge=1)
    prompt: str
    concepts: list[str]
    seed: int = Field(ge=0)
    strength: float = Field(ge=0.0, le=1.0)
    out: str
    options: dict[str, Any]


class Plan(_Frozen):
    version: int = PLAN_VERSION
    concepts: list[ConceptStep]
    renders: list[RenderStep]

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)
