"""ONNX export with a KV cache, in the layout Optimum's ORTModelForCausalLM and transformers.js load.

`model.onnx` (+ `model.onnx_data`) takes `input_ids`, `attention_mask`, `position_ids` and
`past_key_values.N.key|value` ([batch, kv_heads, past, head_dim]) and returns `logits` and
`present.N.key|value`; config.json, generation_config.json and the tokenizer files sit beside it.
With transformers 5 the export goes through `torch.onnx.export(dynamo=True)` (optimum-onnx pins
transformers < 4.58).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
from transformers.cache_utils import DynamicCache

from slimlm import arch

ONNX_FILE = "model.onnx"
OPSET = 21  # the first opset with int4 types, which 4-bit quantization (GatherBlockQuantized) needs
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "genai_config.json",  # onnxruntime-genai's runtime reads it; the builder's graph keeps it through quantization
)


class DecoderWithPast(torch.nn.Module):
    """Flat tensors in and out, so the graph's inputs and outputs can carry Optimum's names."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past_key_values):
        cache = DynamicCache()
        for i, (key, value) in enumerate(past_key_values):
            cache.update(key, value, i)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        return out.logits, [(layer.keys, layer.values) for layer in out.past_key_values.layers]


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    inputs = ["input_ids", "attention_mask", "position_ids"]
    outputs = ["logits"]
    for i in range(n_layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


def export_onnx(model, source_dir: Path, out_dir: Path) -> Path:
    """Export an fp32 causal LM with its KV cache; copy its config and tokenizer files alongside."""
    config = model.config
    n_layers, kv_heads, head_dim = config.num_hidden_layers, config.num_key_value_heads, arch.head_dim(config)
    model = model.float().eval()
    head = model.get_output_embeddings()
    if head is not None and head.weight is model.get_input_embeddings().weight:
        # Untie in the graph: a tied head reaches MatMul through a Transpose, which quantizers cannot treat as a
        # constant weight; its own (folded) initializer lets int8/int4 quantize the LM head too.
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
    batch, seq, past = 1, 3, 2  # the exporter needs an example past length >= 2 to keep it dynamic
    example = (
        torch.ones(batch, seq, dtype=torch.long),
        torch.ones(batch, past + seq, dtype=torch.long),
        torch.arange(past, past + seq)[None],
        [
            (torch.zeros(batch, kv_heads, past, head_dim), torch.zeros(batch, kv_heads, past, head_dim))
            for _ in range(n_layers)
        ],
    )
    b, s, p, t = (
        torch.export.Dim(n) for n in ("batch_size", "sequence_length", "past_sequence_length", "total_sequence_length")
    )
    dynamic = {
        "input_ids": {0: b, 1: s},
        "attention_mask": {0: b, 1: t},
        "position_ids": {0: b, 1: s},
        "past_key_values": [({0: b, 2: p}, {0: b, 2: p}) for _ in range(n_layers)],
    }
    inputs, outputs = io_names(n_layers)
    out_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            DecoderWithPast(model),
            example,
            dynamo=True,
            opset_version=OPSET,
            dynamic_shapes=dynamic,
            input_names=inputs,
            output_names=outputs,
            external_data=True,
            verbose=False,
        )
    program.save(str(out_dir / ONNX_FILE), external_data=True)
    copy_side_files(source_dir, out_dir)
    return out_dir / ONNX_FILE


def copy_side_files(source_dir: Path, out_dir: Path) -> None:
    for name in SIDE_FILES:
        if (source_dir / name).is_file():
            shutil.copy2(source_dir / name, out_dir / name)
    if not (out_dir / "generation_config.json").is_file():  # the edge runtime reads EOS ids from here
        cfg = json.loads((source_dir / "config.json").read_text())
        (out_dir / "generation_config.json").write_text(
            json.dumps({k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg}, indent=2)
        )
