"""`kind: cast` — save the input model in another floating-point dtype (e.g. bfloat16 for serving)."""

from __future__ import annotations

from slimlm.cast.config import CastConfig
from slimlm.sources.models import load_model, load_tokenizer, save_model
from slimlm.stage import StageContext, StageResult


def run(config: CastConfig, context: StageContext) -> StageResult:
    trust = context.trust_remote_code
    model = load_model(context.input_dir, dtype=config.dtype, trust_remote_code=trust)
    save_model(model, load_tokenizer(context.input_dir, trust_remote_code=trust), context.output_dir / "model")
    return StageResult(artifact="model")
