"""An exported ONNX directory behind the interface evaluation code expects of a causal LM: `model(ids).logits`.

Perplexity, teacher agreement and lm-eval (through `HFLM(pretrained=model)`) then score the exported
model itself, with onnxruntime doing the forward passes, rather than its PyTorch parent.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig
from transformers.modeling_outputs import CausalLMOutput

from slimlm.edge import EdgeModel


class OnnxCausalLM(torch.nn.Module):
    def __init__(self, path: Path):
        super().__init__()
        self.edge = EdgeModel(path)
        self.config = AutoConfig.from_pretrained(path)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # onnxruntime's CPU provider; outputs come back as CPU tensors

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_) -> CausalLMOutput:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("OnnxCausalLM scores unpadded (or right-padded, unmasked) batches only")
        return CausalLMOutput(logits=torch.from_numpy(self.edge.logits(input_ids.cpu().numpy())))

    def tie_weights(self) -> None:  # lm-eval calls this on every model it is given; nothing to tie here
        pass
