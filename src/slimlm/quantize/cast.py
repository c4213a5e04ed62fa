"""`kind: cast` — save the input model in another floating-point dtype (e.g. bfloat16 for serving)."""

from __future__ import annotations

from typing import Literal

from slimlm.sources.models import load_model, load_tokenizer, save_model
from slimlm.stage import StageConfig, StageContext, StageResult


class CastConfig(StageConfig):
    kind: Literal["cast"]
    dtype: Literal["float32", "bfloat16", "float16"]


def run(config: CastConfig, context: StageContext) -> StageResult:
    trust = context.recipe.trust_remote_code
    model = load_model(context.input_dir, dtype=config.dtype, trust_remote_code=trust)
    save_model(model, load_tokenizer(context.input_dir, trust_remote_code=trust), context.output_dir / "model")
    return StageResult(artifact="model")
