"""The `kind: export` recipe section: the graph, the quantization, and the parity check of the result."""

from __future__ import annotations

import importlib.util
from typing import Any, Literal

from pydantic import Field, model_validator

from slimlm.quantize.config import GPTQOptions, SmoothOptions
from slimlm.stage import GGUF, HF, ONNX, StageConfig, Strict

ONNX_TYPES = ("none", "int8", "int4")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k_m", "q5_k_m", "q6_k")
GGUF_K_QUANTS = ("q4_k_m", "q5_k_m", "q6_k")  # llama.cpp's own mixes, made by its quantizer (the [llama] extra)
K_QUANT_BLOCK = 256  # values per K-quant block: every matrix row must be a multiple of it
INSTALL_LLAMA = "pip install 'slimlm[llama]' (it builds llama-cpp-python from source: about 10 minutes on 2 cores)"
ONNX_ONLY = ("block_size", "embedding_bits", "smooth", "gptq", "clients")


def llama_cpp_installed() -> bool:
    """Whether llama-cpp-python (the [llama] extra) is installed, found without importing it."""
    return importlib.util.find_spec("llama_cpp") is not None


class ParityOptions(Strict):
    data: str = "eval"
    max_tokens: int = Field(1024, ge=16)
    seq_len: int = Field(128, ge=8)
    greedy_steps: int = Field(16, ge=1)


class ExportConfig(StageConfig):
    kind: Literal["export"]
    # onnx-genai: onnxruntime-genai's fused graph (faster on CPUs); gguf: one model.gguf for llama.cpp
    format: Literal["onnx", "onnx-genai", "gguf"] = "onnx"
    quantize: Literal[ONNX_TYPES + GGUF_TYPES] = Field(  # type: ignore[valid-type]
        "int8", description="ONNX: none, int8 or int4. GGUF (default q8_0): " + ", ".join(GGUF_TYPES)
    )
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
        description="Linear layers a 4-bit export (int4, q4_0, q4_1) keeps at 8 bits: last name parts (lm_head, "
        "down_proj) or globs of whole names (model.layers.0.*); with a K-quant, lm_head and embed_tokens",
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
    metrics = frozenset({"max_logit_diff", "top1_agreement", "kl", "greedy_agreement", "tokenizer_match"})

    @property
    def produces(self) -> str:  # type: ignore[override]
        return GGUF if self.format == "gguf" else ONNX

    def data_references(self) -> dict[str, str]:
        refs = {"parity.data": self.parity.data} if self.parity else {}
        refs |= {"smooth.data": self.smooth.data} if self.smooth else {}
        return refs | ({"gptq.data": self.gptq.data} if self.gptq else {})

    @model_validator(mode="before")
    @classmethod
    def _gguf_default_type(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("format") == "gguf" and "quantize" not in data:
            return {**data, "quantize": "q8_0"}
        return data

    @model_validator(mode="after")
    def _options_fit_the_format(self) -> ExportConfig:
        if self.format == "gguf":
            return self._gguf_options()
        if self.quantize not in ONNX_TYPES:
            raise ValueError(f"quantize {self.quantize} is a GGUF type (format: gguf); ONNX takes none, int8 or int4")
        if self.keep_8bit and self.quantize != "int4":
            raise ValueError("keep_8bit applies to quantize: int4 only")
        for option in ("smooth", "gptq"):
            if getattr(self, option) and self.quantize == "none":
                raise ValueError(f"{option} applies to quantize: int8 or int4 only")
        return self

    def _gguf_options(self) -> ExportConfig:
        if self.quantize not in GGUF_TYPES:
            raise ValueError(f"format gguf takes quantize {', '.join(GGUF_TYPES)}; {self.quantize} is an ONNX type")
        if set_here := [f for f in ONNX_ONLY if f in self.model_fields_set]:
            raise ValueError(f"{', '.join(set_here)} apply to ONNX exports; a GGUF type fixes its own blocks")
        if self.keep_8bit and self.quantize not in ("q4_0", "q4_1", *GGUF_K_QUANTS):
            raise ValueError("keep_8bit applies to the 4-bit GGUF types (q4_0, q4_1, q4_k_m)")
        if self.quantize in GGUF_K_QUANTS:
            if odd := [p for p in self.keep_8bit if p not in ("lm_head", "embed_tokens")]:
                raise ValueError(
                    f"llama.cpp's quantizer can keep only lm_head and embed_tokens at 8 bits, not {', '.join(odd)}"
                )
            if not llama_cpp_installed():
                raise ValueError(
                    f"quantize {self.quantize} is made by llama.cpp's quantizer, which is not installed: "
                    f"{INSTALL_LLAMA}, or use q4_1 or q8_0"
                )
        return self
