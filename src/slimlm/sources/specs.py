"""The recipe's `data:` entries: a named text source, its split and block size, or text the teacher generates."""

from __future__ import annotations

from pydantic import Field, model_validator

from slimlm.stage import Strict


class GenerateSpec(Strict):
    """Text sampled from the teacher (`source: generate`): distillation without the original training data."""

    prompts: str | None = Field(
        None, description="a data source whose documents' openings prompt the teacher; BOS if unset"
    )
    tokens: int = Field(50_000, ge=1, description="how many tokens to generate in all")
    max_new_tokens: int = Field(256, ge=1)
    prompt_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    batch_size: int = Field(8, ge=1)


class DataSpec(Strict):
    """A named text source, its split, and how it is cut into token blocks."""

    source: str
    split: str = "all"
    field: str = "text"
    test_fraction: float = Field(0.1, gt=0, lt=1)
    seq_len: int = Field(256, ge=8)
    samples: int | None = Field(None, ge=1, description="number of seq_len blocks to use; all if unset")
    generate: GenerateSpec | None = None

    @model_validator(mode="after")
    def _generate_settings(self) -> DataSpec:
        if (self.source == "generate") != (self.generate is not None):
            raise ValueError(
                "`source: generate` goes with a `generate:` section (prompts, tokens, temperature, top_p), "
                "and only with it"
            )
        return self
