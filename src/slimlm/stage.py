"""The stage contract: a pydantic config class plus one function `run(config, context) -> StageResult`.

Every stage kind (prune, distill, export, ...) subclasses `StageConfig`, declares which artifact
format it consumes and produces, and the metrics it reports itself; the runner does the rest
(folders, manifests, evaluation, gates, skipping).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from slimlm.errors import RecipeError

if TYPE_CHECKING:
    from slimlm.sources.text import DataStore

# Artifact formats a stage can consume or produce.
HF = "hf"  # full-precision Hugging Face directory
HF_QUANTIZED = "hf-quantized"  # bitsandbytes-quantized Hugging Face directory (serve it; do not re-process)
ONNX = "onnx"
GGUF = "gguf"  # a folder with model.gguf for llama.cpp, beside the config and tokenizer files

# Run, stage and task names become folder and file names: a letter or digit first, so never "." or "..".
PLAIN_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class Strict(BaseModel):
    """Base for every recipe section: an unknown or misspelt key is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Gate(Strict):
    """A quality bound on one metric of a stage's output.

    `min`/`max` are absolute bounds; `min_ratio`/`max_ratio` bound the metric as a multiple of the
    same metric measured on the teacher or on the previous stage (`relative_to`). With
    `above_chance`, a ratio bounds the recovery above chance of a multiple-choice accuracy,
    (acc - chance) / (acc_reference - chance): small models sit near chance on hard tasks, where a
    plain ratio says little.
    """

    metric: str
    relative_to: Literal["teacher", "previous"] | None = None
    min: float | None = None
    max: float | None = None
    min_ratio: float | None = Field(None, gt=0)
    max_ratio: float | None = Field(None, gt=0)
    above_chance: bool = False

    @model_validator(mode="after")
    def _bounds(self) -> Gate:
        if all(v is None for v in (self.min, self.max, self.min_ratio, self.max_ratio)):
            raise ValueError("a gate needs at least one bound: min, max, min_ratio or max_ratio")
        ratio = self.min_ratio is not None or self.max_ratio is not None
        if ratio and self.relative_to is None:
            raise ValueError("min_ratio/max_ratio need relative_to: teacher or previous")
        if not ratio and self.relative_to is not None:
            raise ValueError("relative_to only applies to min_ratio/max_ratio; min/max are absolute bounds")
        if self.above_chance and not ratio:
            raise ValueError("above_chance bounds a recovery ratio: add min_ratio and relative_to")
        return self


class StageConfig(Strict):
    """Fields every stage has. Subclasses add `kind: Literal[...]` and their own options."""

    name: str = Field(pattern=PLAIN_NAME)
    input: str | None = Field(
        None,
        description="an earlier stage (or 'teacher') whose artifact this stage takes; default: the stage just before",
    )
    gates: list[Gate] = []

    consumes: ClassVar[frozenset[str]] = frozenset({HF})
    produces: ClassVar[str] = HF
    # Metrics the stage itself reports (in addition to the recipe's evaluation metrics).
    metrics: ClassVar[frozenset[str]] = frozenset()

    def digest_fields(self) -> dict[str, Any]:
        """What determines the stage's output: everything but the gates (a gate change needs no recompute)."""
        return self.model_dump(mode="json", exclude={"gates"})

    def data_references(self) -> dict[str, str]:
        """Fields that name a recipe data source (checked against the recipe's `data:` section)."""
        return {}

    def settings(self) -> dict[str, Any]:
        """What the recipe sets for this stage, and every setting off its default (name, kind and gates aside):
        `method: lora` shows although lora is the default, because the recipe says so."""
        skip = {"name", "kind", "gates"}
        written = self.model_dump(mode="json", exclude=skip, exclude_unset=True)
        return _merge(written, self.model_dump(mode="json", exclude=skip, exclude_defaults=True))

    @property
    def corrects_teacher(self) -> bool:
        """Teacher correction: whether the stages after this one take its output as their teacher."""
        return False

    def launch_options(self) -> Any | None:
        """How many processes the stage asks for (see launch.py: `processes` and an accelerate `config`); None for one."""
        return None


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        out[key] = _merge(out[key], value) if isinstance(out.get(key), dict) and isinstance(value, dict) else value
    return out


def describe_settings(settings: dict[str, Any]) -> str:
    """`method=lora, lora={r: 16, alpha: 32.0}, keep_8bit=[lm_head, k_proj]`"""

    def plain(value: Any) -> str:
        if isinstance(value, dict):
            return "{" + ", ".join(f"{k}: {plain(v)}" for k, v in value.items()) + "}"
        if isinstance(value, list):
            return "[" + ", ".join(plain(v) for v in value) + "]"
        return str(value)

    return ", ".join(f"{k}={plain(v)}" for k, v in settings.items())


def field_error(config: StageConfig, field: str, message: str) -> RecipeError:
    """A recipe mistake that only shows once the stage sees its input (a size larger than the model's, say)."""
    return RecipeError(f"stage '{config.name}', field '{field}': {message}")


@dataclass
class StageContext:
    """What the runner hands a stage."""

    input_dir: Path  # the previous stage's artifact (the teacher for the first stage)
    teacher_dir: Path
    output_dir: Path  # an empty folder; write the artifact here
    work_dir: Path  # checkpoints; kept across interrupted attempts of this exact config and input
    data: DataStore
    device: str
    seed: int
    dtype: str = "float32"  # the recipe's dtype: what a stage saves full-precision weights in
    trust_remote_code: bool = False


@dataclass
class StageResult:
    """What a stage hands back: where its artifact is (relative to output_dir) and what it measured."""

    artifact: str = "model"
    metrics: dict[str, Any] = field(default_factory=dict)


StageFn = Callable[[Any, StageContext], StageResult]
