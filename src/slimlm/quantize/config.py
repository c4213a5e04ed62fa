"""Recipe options of the quantization algorithms (calibration, SmoothQuant, GPTQ) and the `kind: bitsandbytes` section."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from slimlm.stage import HF, HF_QUANTIZED, StageConfig, Strict


class CalibrationOptions(Strict):
    data: str = "calibration"
    samples: int = Field(8, ge=1, description="calibration blocks of seq_len tokens")
    seq_len: int = Field(256, ge=8)


class SmoothOptions(CalibrationOptions):
    alpha: float = Field(0.75, ge=0, le=1, description="how much of the activation range moves into the weights")


class GPTQOptions(CalibrationOptions):
    samples: int = Field(32, ge=1, description="calibration blocks of seq_len tokens")
    damp: float = Field(0.01, gt=0, description="added to the Hessian's diagonal, as a fraction of its mean")


class BitsAndBytesStageConfig(StageConfig):
    kind: Literal["bitsandbytes"]
    bits: Literal[8, 4] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"

    consumes = frozenset({HF})
    produces = HF_QUANTIZED
