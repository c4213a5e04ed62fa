"""The `kind: export` recipe section: the graph, the quantization, and the parity check of the result."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from slimlm.quantize.config import GPTQOptions, SmoothOptions
from slimlm.stage import HF, ONNX, StageConfig, Strict


class ParityOptions(Strict):
    data: str = "eval"
    max_tokens: int = Field(1024, ge=16)
    seq_len: int = Field(128, ge=8)
    greedy_steps: int = Field(16, ge=1)


class ExportConfig(StageConfig):
    kind: Literal["export"]
    format: Literal["onnx", "onnx-genai"] = "onnx"  # onnx-genai: onnxruntime-genai's fused graph (faster on CPUs)
    quantize: Literal["none", "int8", "int4"] = "int8"
    block_size: int = Field(32, ge=16, description="quantization block size along the input dimension (a power of two)")
    quantize_embeddings: bool = (
        True  # the embedding table is a fifth of a small model; quantizing it meets the size targets
    )
    embedding_bits: Literal[4, 8] | None = Field(
        None,
        description="bits of the quantized embedding table. Default: a table tied to the output head reads the "
        "head's quantized weights (its bits, no bytes of its own); an untied one is stored at 4 bits",
    )
    keep_8bit: list[str] = Field(
        [],
        description="Linear layers an int4 export keeps at 8 bits: last name parts (lm_head, down_proj) or "
        "globs of whole names (model.layers.0.*)",
    )
    smooth: SmoothOptions | None = None  # SmoothQuant scale migration before quantizing (quantize/smooth.py)
    gptq: GPTQOptions | None = None  # GPTQ instead of round-to-nearest for the layers at `quantize` bits (gptq.py)
    parity: ParityOptions | None = ParityOptions()
    clients: bool = Field(
        True,
        description="also run the export in the clients installed here (transformers.js, Optimum, "
        "onnxruntime-genai; see export/clients.py) and record whether they decode the same tokens",
    )

    consumes = frozenset({HF})
    produces = ONNX
    metrics = frozenset({"max_logit_diff", "top1_agreement", "kl", "greedy_agreement"})

    def data_references(self) -> dict[str, str]:
        refs = {"parity.data": self.parity.data} if self.parity else {}
        refs |= {"smooth.data": self.smooth.data} if self.smooth else {}
        return refs | ({"gptq.data": self.gptq.data} if self.gptq else {})

    @model_validator(mode="after")
    def _options_need_onnx_quantization(self) -> ExportConfig:
        if self.keep_8bit and self.quantize != "int4":
            raise ValueError("keep_8bit applies to quantize: int4 only")
        for option in ("smooth", "gptq"):
            if getattr(self, option) and self.quantize == "none":
                raise ValueError(f"{option} applies to quantize: int8 or int4 only")
        return self
