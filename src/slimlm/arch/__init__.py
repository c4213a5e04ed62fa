"""Per-family facts about the decoder architectures slimlm can prune: where heads, MLPs and norms live.

All supported families share Llama's layout (`model.embed_tokens`, `model.layers[i].self_attn`,
`.mlp`, per-layer norms, `model.norm`, `lm_head`); they differ in fused projections (Phi3),
extra norms (Gemma2/3), per-head q/k norms (Qwen3, Gemma3), biases (Qwen2) and BOS needs (Gemma).
"""

from __future__ import annotations

from dataclasses import dataclass

from slimlm.errors import UnsupportedModelError


@dataclass(frozen=True)
class Family:
    fused_qkv: bool = False  # Phi3: self_attn.qkv_proj = [q; k; v]
    fused_gate_up: bool = False  # Phi3: mlp.gate_up_proj = [gate; up]
    bos_per_window: bool = False  # Gemma: perplexity needs BOS at each window start (39.5 -> 23.0 measured)


FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(),
    "qwen2": Family(),
    "qwen3": Family(),
    "gemma2": Family(bos_per_window=True),
    "gemma3_text": Family(bos_per_window=True),
    "phi3": Family(fused_qkv=True, fused_gate_up=True),
}


def family_of(config) -> Family:
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported for pruning; supported: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]


def needs_bos_per_window(config) -> bool:
    family = FAMILIES.get(getattr(config, "model_type", ""))
    return bool(family and family.bos_per_window)


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def layers(model):
    return model.model.layers
