"""An export's interface in the names its clients read: graph axes as Optimum names them, a tokenizer class
that transformers 4 and 5 both know.

transformers.js builds the empty cache of the first step from the graph's input shapes: it puts the batch
size where an axis is named `batch_size`, keeps numeric sizes, and puts 0 everywhere else. The dynamo
exporter names the batch axis after its `Dim` and onnxruntime-genai's builder leaves the head size symbolic
(`kv_cache_dim`), so without these names transformers.js fed a past of [0, heads, 0, head_dim] or a head size
of 0 (measured on SmolLM2-135M exports). The names change no computation: onnxruntime checks only numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx

# input or output name -> the names of its axes; None keeps the graph's own (a static size)
AXES = {
    "input_ids": ("batch_size", "sequence_length"),
    "attention_mask": ("batch_size", "total_sequence_length"),
    "position_ids": ("batch_size", "sequence_length"),
    "logits": ("batch_size", "sequence_length", None),
}
PAST_AXES = ("batch_size", None, "past_sequence_length", None)
PRESENT_AXES = ("batch_size", None, "total_sequence_length", None)
TOKENIZER_CLASS = "PreTrainedTokenizerFast"  # transformers 5 writes TokenizersBackend, which 4.x cannot load


def prepare_for_clients(onnx_dir: Path, config) -> None:
    """Give a written export (either graph, any precision) its clients' axis names and tokenizer class."""
    from slimlm import arch

    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    name_axes_for_clients(onnx_dir, kv_heads, arch.head_dim(config))
    write_portable_tokenizer_config(onnx_dir)


def name_axes_for_clients(onnx_dir: Path, kv_heads: int, head_dim: int) -> None:
    """Rename the graph's input and output axes to Optimum's names and make the cache's head axes numeric."""
    path = Path(onnx_dir) / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)  # the weights stay where they are
    for value in [*model.graph.input, *model.graph.output]:
        if value.name.startswith("past_key_values."):
            names, sizes = PAST_AXES, (None, kv_heads, None, head_dim)
        elif value.name.startswith("present."):
            names, sizes = PRESENT_AXES, (None, kv_heads, None, head_dim)
        elif value.name in AXES:
            names, sizes = AXES[value.name], (None,) * len(AXES[value.name])
        else:
            continue
        dims = value.type.tensor_type.shape.dim
        for dim, name, size in zip(dims, names, sizes, strict=False):
            if size is not None:
                if dim.HasField("dim_value") and dim.dim_value != size:
                    raise ValueError(f"{value.name} has {dim.dim_value} where the config says {size}")
                dim.dim_value = size
            elif name is not None and not dim.HasField("dim_value"):
                dim.dim_param = name
    onnx.save(model, str(path))


def write_portable_tokenizer_config(out_dir: Path) -> None:
    """Name a tokenizer class both transformers 4.x and 5.x load from tokenizer.json (same tokenization)."""
    path = Path(out_dir) / "tokenizer_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    if not (Path(out_dir) / "tokenizer.json").is_file():
        return  # a SentencePiece-only tokenizer keeps its own class
    config["tokenizer_class"] = TOKENIZER_CLASS
    extra = config.pop("extra_special_tokens", None)  # transformers 5's list; 4.x reads a dict by that name
    if isinstance(extra, list):
        config["additional_special_tokens"] = extra  # the name both read as a list
    elif extra is not None:
        config["extra_special_tokens"] = extra
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
