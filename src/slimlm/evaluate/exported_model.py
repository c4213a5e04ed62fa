"""An exported model behind the interface evaluation code expects of a causal LM: `model(ids).logits`.

An ONNX folder runs in onnxruntime (EdgeModel); a GGUF folder in llama.cpp, or, without llama-cpp-python,
in transformers' dequantized read-back (export/gguf_runtime.py). Perplexity, teacher agreement and lm-eval
(through `HFLM(pretrained=model)`) then score the exported model itself rather than its PyTorch parent.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig
from transformers.modeling_outputs import CausalLMOutput

from slimlm.export.gguf_runtime import is_gguf, open_gguf

GGUF_CONTEXT = 1024  # llama.cpp keeps logits for every position of its context: 1024 x vocab floats


def is_exported(path: Path) -> bool:
    return (Path(path) / "model.onnx").is_file() or is_gguf(path)


class ExportedCausalLM(torch.nn.Module):
    def __init__(self, path: Path):
        super().__init__()
        self.config = AutoConfig.from_pretrained(path)
        if is_gguf(path):
            self.runtime = open_gguf(path, context=min(GGUF_CONTEXT, self.config.max_position_embeddings))
        else:
            from slimlm.edge import EdgeModel

            self.runtime = EdgeModel(path)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # onnxruntime's and llama.cpp's CPU backends; outputs come back as CPU tensors

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_) -> CausalLMOutput:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("ExportedCausalLM scores unpadded (or right-padded, unmasked) batches only")
        return CausalLMOutput(logits=torch.from_numpy(self.runtime.logits(input_ids.cpu().numpy())))

    def tie_weights(self) -> None:  # lm-eval calls this on every model it is given; nothing to tie here
        pass
