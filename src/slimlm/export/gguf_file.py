"""Writing model.gguf: tensors at the recipe's type, and llama.cpp's own quantizer for the K-quants.

`f32`, `f16`, `bf16`, `q8_0`, `q4_0` and `q4_1` are written here with gguf-py. Norms, biases and rope
factors stay f32, as in every llama.cpp file. At 4 bits the output head (which a tied embedding table
is) is kept at q8_0, as llama.cpp's own mixes keep it at 6 to 8 bits, and so is every layer `keep_8bit`
names. A matrix whose rows are not a whole number of blocks (32 values) is written f16 and reported.

`q4_k_m`, `q5_k_m` and `q6_k` are llama.cpp's mixes: an f32 GGUF is written first and
`llama_cpp.llama_model_quantize` turns it into the mix (llama-cpp-python, the `[llama]` extra).
K-quant blocks hold 256 values, so every matrix's rows must be a multiple of 256 wide (checked first:
llama.cpp would silently fall back to another type).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import gguf

from slimlm.export.config import GGUF_K_QUANTS, K_QUANT_BLOCK
from slimlm.export.gguf_arch import gguf_family, gguf_tensors, write_metadata
from slimlm.export.gguf_vocab import write_tokenizer
from slimlm.quantize.layers import matches

Q = gguf.GGMLQuantizationType
DIRECT_TYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1}
FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
    "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M,
    "q5_k_m": gguf.LlamaFileType.MOSTLY_Q5_K_M,
    "q6_k": gguf.LlamaFileType.MOSTLY_Q6_K,
}
HEAD = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight"
TABLE = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"


def k_quant_misfits(state: dict[str, Any]) -> list[str]:
    """The matrices whose rows a 256-value K-quant block does not divide: `name (width)`."""
    return [
        f"{name} ({t.shape[-1]})"
        for name, t in state.items()
        if t.dim() == 2 and t.shape[-1] % K_QUANT_BLOCK and not name.endswith("norm.weight")
    ]


def write_gguf(
    model,
    model_dir: Path,
    teacher_dir: Path,
    out: Path,
    quantize: str,
    *,
    keep_8bit: list[str],
    quantize_embeddings: bool,
    work_dir: Path,
    name: str,
) -> dict[str, Any]:
    """Write `out` (model.gguf); return facts about it: tensor types, tokenizer origin, fallbacks."""
    config = model.config
    family = gguf_family(config)  # refuses what llama.cpp cannot compute before anything is written
    state = model.state_dict()
    k_quant = quantize in GGUF_K_QUANTS
    target = work_dir / "f32.gguf" if k_quant else out
    writer = gguf.GGUFWriter(target, gguf.MODEL_ARCH_NAMES[family.arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(FILE_TYPES["f32" if k_quant else quantize])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_metadata(writer, config)
    tokenizer = write_tokenizer(writer, model_dir, teacher_dir, config.vocab_size)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    fallbacks = []
    for hf_name, gguf_name, data in gguf_tensors(state, config):
        qtype = (
            Q.F32 if k_quant else _tensor_type(hf_name, gguf_name, data, quantize, keep_8bit, quantize_embeddings, tied)
        )
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if data.shape[-1] % block:
            fallbacks.append(f"{gguf_name} ({data.shape[-1]} wide) as f16")
            qtype = Q.F16
        writer.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if k_quant:
        _llama_cpp_quantize(target, out, quantize, keep_8bit, tied)
        target.unlink()
    facts: dict[str, Any] = {"gguf_types": tensor_types(out), "tokenizer": tokenizer}
    if fallbacks:
        facts["fallbacks"] = fallbacks
    return facts


def _tensor_type(hf_name, gguf_name, data, quantize, keep_8bit, quantize_embeddings, tied) -> Q:
    if data.ndim < 2 or gguf_name.endswith("norm.weight"):
        return Q.F32
    base = DIRECT_TYPES[quantize]
    is_table = gguf_name == TABLE
    is_head = gguf_name == HEAD or (is_table and tied)
    if is_table and not quantize_embeddings:
        return Q.F16 if base not in (Q.F32, Q.BF16) else base
    if base in (Q.Q4_0, Q.Q4_1) and (is_head or matches(hf_name.removesuffix(".weight"), keep_8bit)):
        return Q.Q8_0
    return base


def _llama_cpp_quantize(source: Path, out: Path, quantize: str, keep_8bit: list[str], tied: bool) -> None:
    import llama_cpp

    # llama.cpp logs every tensor it converts through llama-cpp-python's logger; the types are reported instead
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FILE_TYPES[quantize].value
    params.nthread = os.cpu_count() or 1
    if matches("lm_head", keep_8bit):
        params.output_tensor_type = Q.Q8_0.value
        if tied:
            params.token_embedding_type = Q.Q8_0.value
    if matches("embed_tokens", keep_8bit):
        params.token_embedding_type = Q.Q8_0.value
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params)
    if status != 0:
        raise RuntimeError(f"llama.cpp's quantizer failed on {source.name} (status {status})")


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGML type the file holds, as llama.cpp will read them."""
    reader = gguf.GGUFReader(path)
    return dict(sorted(Counter(t.tensor_type.name.lower() for t in reader.tensors).items()))
