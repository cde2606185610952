"""The plan: the frozen, versioned contract between the compiler and the runtime.

The option models below are the one declaration of every option's type, range and
default: `perfusion_dsl.options` reads its checks and defaults from them, and the runtime
reads options as their typed fields (docs/language.md#the-plan)."""

from __future__ import annotations

from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field

# 2: options became typed models; a render's base model moved to `RenderStep.model`.
PLAN_VERSION: Final = 2

MAX_SEED = 2**63 - 1
MAX_STEPS = 1_000_000

DEFAULT_TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a good photo of a {}",
    "a photo of one {}",
    "a rendition of the {}",
)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class LearnOptions(_Frozen):
    """Every option of a `learn` statement, after defaults (docs/language.md#learn-options).

    `mask` is `"none"`, `"attention"`, or in a plan the matched mask files, one per image
    (a spec writes a pattern; the compiler expands it)."""

    steps: int = Field(default=400, ge=1, le=MAX_STEPS)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    batch: int = Field(default=16, ge=1, le=4096)
    lr: float = Field(default=0.03, gt=0.0, le=10.0)
    embedding_lr: float = Field(default=0.006, gt=0.0, le=10.0)
    lock: Literal["local", "global"] = "local"
    mask: str | tuple[str, ...] = "none"
    # "none" (the templates), or in a plan each image's caption template, in image order (a
    # spec writes a pattern of text files; the compiler reads them)
    captions: str | tuple[str, ...] = "none"
    # None: the model's native resolution
    resolution: int | None = Field(default=None, ge=8, le=4096, multiple_of=8)
    flip: bool = True
    templates: tuple[str, ...] = Field(default=DEFAULT_TEMPLATES, min_length=1)
    beta: float = Field(default=0.75, ge=0.0, le=1.0)
    tau: float = Field(default=0.1, gt=0.0, le=1.0)


class RenderOptions(_Frozen):
    """The sampling options of one render; None means the model's own default."""

    steps: int | None = Field(default=None, ge=1, le=MAX_STEPS)
    guidance: float | None = Field(default=None, ge=0.0, le=100.0)
    size: str | None = Field(default=None, pattern=r"^\d+x\d+$")  # WIDTHxHEIGHT
    negative: str = ""

    def dimensions(self) -> tuple[int, int] | None:
        """(width, height), or None for the model's native size."""
        if self.size is None:
            return None
        width, height = self.size.split("x")
        return int(width), int(height)


class ConceptStep(_Frozen):
    """One concept to train, with where it was declared."""

    token: str
    file: str
    line: int = Field(ge=1)
    model: str
    supercategories: list[str] = Field(min_length=1)
    adjectives: list[str]
    images: list[str] = Field(min_length=1)
    # sha256 of each image's and mask file's bytes as the key was computed from them (in
    # the order of `images` and `options.mask`): the trainer trains only on those bytes
    image_sha256: list[str]
    mask_sha256: list[str]
    options: LearnOptions
    key: str = Field(pattern=r"^[0-9a-f]{64}$")
    up_to_date: bool = False


class RenderStep(_Frozen):
    """One image to render."""

    file: str
    line: int = Field(ge=1)
    model: str
    prompt: str
    concepts: list[str]
    seed: int = Field(ge=0, le=MAX_SEED)
    strength: float = Field(ge=0.0, le=1.0)
    out: str
    options: RenderOptions


class Plan(_Frozen):
    version: Literal[2] = PLAN_VERSION
    concepts: list[ConceptStep]
    renders: list[RenderStep]
    # `[checkpoints]` of perfusion.toml for the single-file models the steps use: the file as
    # the steps name it → its diffusers configuration (a folder relative to the run root, or
    # a model id)
    checkpoint_configs: dict[str, str] = Field(default_factory=dict)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)
