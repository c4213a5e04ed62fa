"""What llama.cpp reads of each family slimlm prunes: the GGUF architecture, its metadata, and its tensors.

Facts learnt from llama.cpp's own converter and model loaders (written here, not copied):
- llama and mistral are llama.cpp's `llama` architecture, whose rope rotates interleaved pairs where HF
  rotates halves, so the q and k rows of each head are reordered (`_interleave_heads`);
- Gemma's RMSNorm computes x * (1 + w); llama.cpp's computes x * w, so every norm weight gets + 1;
- Gemma scales queries by head_dim ** -0.5 (hidden / heads at 46 layers, the 27B); a `query_pre_attn_scalar`
  that says otherwise is a model llama.cpp computes differently, so it is refused;
- Phi3 keeps its fused qkv and gate_up tensors, and llama.cpp sizes its query by the hidden width, so a
  Phi3 whose heads x head_dim differs from hidden_size cannot load;
- head_dim is written explicitly (key_length, value_length): pruned models differ from any checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np

from slimlm.arch import head_dim
from slimlm.errors import UnsupportedModelError


@dataclass(frozen=True)
class GGUFFamily:
    arch: gguf.MODEL_ARCH
    interleave_rope: bool = False  # llama's rope pairs dimensions (2i, 2i+1); HF's pairs (i, i + d/2)
    norm_shift: float = 0.0  # added to every norm weight
    gemma_query_scale: bool = False  # llama.cpp scales queries by head_dim ** -0.5 whatever the config says


GGUF_FAMILIES = {
    "llama": GGUFFamily(gguf.MODEL_ARCH.LLAMA, interleave_rope=True),
    "mistral": GGUFFamily(gguf.MODEL_ARCH.LLAMA, interleave_rope=True),
    "qwen2": GGUFFamily(gguf.MODEL_ARCH.QWEN2),
    "qwen3": GGUFFamily(gguf.MODEL_ARCH.QWEN3),
    "gemma2": GGUFFamily(gguf.MODEL_ARCH.GEMMA2, norm_shift=1.0, gemma_query_scale=True),
    "gemma3_text": GGUFFamily(gguf.MODEL_ARCH.GEMMA3, norm_shift=1.0, gemma_query_scale=True),
    "phi3": GGUFFamily(gguf.MODEL_ARCH.PHI3),
}


def gguf_family(config) -> GGUFFamily:
    """The family's GGUF facts, or one clear error for a model llama.cpp would compute differently."""
    model_type = getattr(config, "model_type", None)
    if model_type not in GGUF_FAMILIES:
        raise UnsupportedModelError(
            f"model type {model_type!r} has no GGUF export; supported: {', '.join(sorted(GGUF_FAMILIES))}"
        )
    family = GGUF_FAMILIES[model_type]
    heads, dim = config.num_attention_heads, head_dim(config)
    if family.gemma_query_scale:
        scaled_by = config.hidden_size // heads if config.num_hidden_layers == 46 else dim
        if getattr(config, "query_pre_attn_scalar", scaled_by) != scaled_by:
            raise UnsupportedModelError(
                f"this {model_type} scales attention by query_pre_attn_scalar {config.query_pre_attn_scalar}, but "
                f"llama.cpp scales it by {scaled_by} (head_dim) for this shape; a GGUF would compute another model"
            )
    if model_type == "phi3" and heads * dim != config.hidden_size:
        raise UnsupportedModelError(
            f"llama.cpp's phi3 needs heads x head_dim = hidden_size, and this model has {heads} x {dim} vs "
            f"{config.hidden_size}; prune phi3 with width.axes that keep them equal, or export ONNX"
        )
    if model_type == "gemma3_text" and getattr(config, "attn_logit_softcapping", None):
        raise UnsupportedModelError("llama.cpp's gemma3 has no attention logit soft-capping; export ONNX instead")
    return family


def rope_parameters(config) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(the global layers' rope parameters, the sliding layers' or None) from a transformers 5 config."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if "full_attention" in params:
        return dict(params["full_attention"]), params.get("sliding_attention")
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params, None


def write_metadata(writer: gguf.GGUFWriter, config) -> None:
    """Architecture metadata: every shape written explicitly, since a pruned model matches no published one."""
    family = gguf_family(config)
    dim = head_dim(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_key_length(dim)
    writer.add_value_length(dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    rope, sliding_rope = rope_parameters(config)
    writer.add_rope_dimension_count(int(dim * rope.get("partial_rotary_factor", 1.0)))
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if sliding_rope is not None:
        writer.add_rope_freq_base_swa(float(sliding_rope["rope_theta"]))
    _write_rope_scaling(writer, rope, config)
    if family.arch in (gguf.MODEL_ARCH.GEMMA2, gguf.MODEL_ARCH.GEMMA3):
        if getattr(config, "attn_logit_softcapping", None):
            writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        if getattr(config, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(config.final_logit_softcapping)
        layer_types = getattr(config, "layer_types", None) or []
        if "sliding_attention" in layer_types:
            writer.add_sliding_window(config.sliding_window)
            # per layer, from the config, rather than llama.cpp's default pattern for the family
            writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
    if family.arch == gguf.MODEL_ARCH.PHI3:
        writer.add_rope_scaling_orig_ctx_len(
            getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings
        )
        writer.add_sliding_window(getattr(config, "sliding_window", None) or 0)


def _write_rope_scaling(writer: gguf.GGUFWriter, rope: dict[str, Any], config) -> None:
    kind = rope.get("rope_type", "default")
    if kind in ("default", None):
        return
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        for key, add in (
            ("extrapolation_factor", writer.add_rope_scaling_yarn_ext_factor),
            ("attention_factor", writer.add_rope_scaling_yarn_attn_factor),
            ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
            ("beta_slow", writer.add_rope_scaling_yarn_beta_slow),
        ):
            if rope.get(key) is not None:
                add(rope[key])
    elif kind in ("longrope", "su"):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
    elif kind != "llama3":  # llama3's scaling is a tensor of per-frequency factors (rope_tensors)
        raise UnsupportedModelError(f"rope scaling {kind!r} has no GGUF counterpart that slimlm writes")


def rope_tensors(config) -> Iterator[tuple[str, np.ndarray]]:
    """llama3's frequency-dependent rope scaling and phi3's LongRoPE, as the factor tensors llama.cpp reads."""
    rope, _ = rope_parameters(config)
    kind = rope.get("rope_type", "default")
    dim = int(head_dim(config) * rope.get("partial_rotary_factor", 1.0))
    if kind == "llama3":
        factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
        context = rope.get("original_max_position_embeddings", 8192)
        freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
        factors = []
        for wavelength in 2 * math.pi / freqs:
            if wavelength < context / high:  # high frequencies: unscaled
                factors.append(1.0)
            elif wavelength > context / low:  # low frequencies: scaled by the full factor
                factors.append(factor)
            else:  # in between: a smooth blend of the two
                smooth = (context / wavelength - low) / (high - low)
                factors.append(1.0 / ((1 - smooth) / factor + smooth))
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", np.asarray(factors, dtype=np.float32)
    elif kind in ("longrope", "su"):
        for key, tensor in (
            ("long_factor", gguf.MODEL_TENSOR.ROPE_FACTORS_LONG),
            ("short_factor", gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT),
        ):
            yield gguf.TENSOR_NAMES[tensor] + ".weight", np.asarray(rope[key], dtype=np.float32)


def gguf_tensors(state: dict[str, Any], config) -> Iterator[tuple[str, str, np.ndarray]]:
    """(HF name, GGUF name, fp32 array) for every weight of an HF state dict, transformed as llama.cpp expects."""
    family = gguf_family(config)
    names = gguf.get_tensor_name_map(family.arch, config.num_hidden_layers)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp reads a tied head from token_embd
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UnsupportedModelError(f"tensor {hf_name} has no GGUF name in llama.cpp's {family.arch.name.lower()}")
        data = tensor.detach().float().cpu().numpy()
        if family.interleave_rope and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = _interleave_heads(data, heads)
        elif family.interleave_rope and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = _interleave_heads(data, kv_heads)
        if family.norm_shift and hf_name.endswith("norm.weight"):
            data = data + family.norm_shift
        yield hf_name, name, data
    for name, data in rope_tensors(config):
        yield name, name, data


def _interleave_heads(rows: np.ndarray, heads: int) -> np.ndarray:
    """Per head, rows [x0..x(d/2-1), y0..y(d/2-1)] -> [x0, y0, x1, y1, ...]: HF's rope halves become llama's pairs."""
    shape = rows.shape
    return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
