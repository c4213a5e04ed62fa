"""Structured surgery: which axis of each weight is which dimension, and slicing a model to a smaller shape.

The result is a new model built from a rewritten config (homogeneous: the same head count, MLP
width and hidden size in every layer; `head_dim` explicit; layers renumbered), so it saves and
reloads as a standard Hugging Face directory.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers.initialization import no_init_weights

from slimlm import arch

LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Shape:
    """The sizes that width and depth pruning change."""

    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    layers: int

    @classmethod
    def of(cls, config) -> Shape:
        return cls(
            config.hidden_size,
            config.intermediate_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.num_hidden_layers,
        )

    def replace(self, **changes) -> Shape:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


@dataclass
class KeepPlan:
    """Indices (in the original model) of everything the pruned model keeps; sorted ascending."""

    layers: list[int]
    hidden: torch.Tensor
    ffn: dict[int, torch.Tensor]  # original layer index -> kept MLP channels
    heads: dict[int, torch.Tensor]  # original layer index -> kept query heads
    kv_heads: dict[int, torch.Tensor]  # original layer index -> kept key/value heads


def weight_axes(name: str) -> dict[int, str]:
    """Which dimension each axis of a parameter indexes: hidden, ffn, gate_up, q, kv, qkv (or none)."""
    m = LAYER_KEY.match(name)
    if m is None:
        if name == "model.embed_tokens.weight" or name == "lm_head.weight":
            return {1: "hidden"}
        if name == "model.norm.weight" or name == "model.norm.bias":
            return {0: "hidden"}
        if name == "lm_head.bias":
            return {}
        raise KeyError(name)
    rest = m.group(2)
    module, _, kind = rest.rpartition(".")
    is_bias = kind == "bias"
    table = {
        "self_attn.q_proj": {0: "q", 1: "hidden"},
        "self_attn.k_proj": {0: "kv", 1: "hidden"},
        "self_attn.v_proj": {0: "kv", 1: "hidden"},
        "self_attn.o_proj": {0: "hidden", 1: "q"},
        "self_attn.qkv_proj": {0: "qkv", 1: "hidden"},
        "mlp.gate_proj": {0: "ffn", 1: "hidden"},
        "mlp.up_proj": {0: "ffn", 1: "hidden"},
        "mlp.down_proj": {0: "hidden", 1: "ffn"},
        "mlp.gate_up_proj": {0: "gate_up", 1: "hidden"},
        "self_attn.q_norm": {},
        "self_attn.k_norm": {},  # per head_dim: untouched by head pruning
    }
    if module in table:
        axes = table[module]
        return {0: axes[0]} if is_bias and 0 in axes else ({} if is_bias else axes)
    if module.endswith("layernorm"):
        return {0: "hidden"}
    raise KeyError(name)


def _expand_heads(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def _indices(dim: str, layer: int | None, plan: KeepPlan, config) -> torch.Tensor:
    hd = arch.head_dim(config)
    if dim == "hidden":
        return plan.hidden
    if dim == "ffn":
        return plan.ffn[layer]
    if dim == "gate_up":
        return torch.cat([plan.ffn[layer], config.intermediate_size + plan.ffn[layer]])
    if dim == "q":
        return _expand_heads(plan.heads[layer], hd)
    if dim == "kv":
        return _expand_heads(plan.kv_heads[layer], hd)
    if dim == "qkv":
        q_rows = config.num_attention_heads * hd
        kv_rows = config.num_key_value_heads * hd
        kv = _expand_heads(plan.kv_heads[layer], hd)
        return torch.cat([_expand_heads(plan.heads[layer], hd), q_rows + kv, q_rows + kv_rows + kv])
    raise ValueError(dim)


def pruned_config(config, shape: Shape, kept_layers: list[int]):
    new = copy.deepcopy(config)
    new.hidden_size = shape.hidden
    new.intermediate_size = shape.ffn
    new.num_attention_heads = shape.heads
    new.num_key_value_heads = shape.kv_heads
    new.head_dim = arch.head_dim(config)  # explicit: hidden/heads no longer gives it
    new.num_hidden_layers = len(kept_layers)
    if getattr(config, "layer_types", None) is not None:
        new.layer_types = [config.layer_types[i] for i in kept_layers]
    if getattr(config, "max_window_layers", None) is not None:
        new.max_window_layers = sum(1 for i in kept_layers if i < config.max_window_layers)
    return new


def predict_parameters(model, shape: Shape) -> dict[str, int]:
    """Exact parameter counts of `model` pruned to `shape`, from the axis rules (no model is built)."""
    config = model.config
    hd = arch.head_dim(config)
    sizes = {
        "hidden": shape.hidden,
        "ffn": shape.ffn,
        "gate_up": 2 * shape.ffn,
        "q": shape.heads * hd,
        "kv": shape.kv_heads * hd,
        "qkv": (shape.heads + 2 * shape.kv_heads) * hd,
    }
    embedding_ids = {
        id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
    }
    total = embedding = 0
    for name, p in model.named_parameters():  # shared (tied) parameters appear once
        layer = LAYER_KEY.match(name)
        if layer and layer.group(1) != "0":
            continue  # layers are homogeneous: count layer 0 once per kept layer
        dims = list(p.shape)
        for axis, dim in weight_axes(name).items():
            dims[axis] = sizes[dim]
        n = math.prod(dims) * (shape.layers if layer else 1)
        total += n
        embedding += n if id(p) in embedding_ids else 0
    return {"params": total, "nonembedding_params": total - embedding}


def prune_model(model, plan: KeepPlan, shape: Shape, *, consume: bool = False):
    """A new model of `shape` holding the kept slices of `model`'s weights.

    With `consume`, each source weight is released as soon as it is sliced, so peak memory stays
    near one model instead of two; `model` is unusable afterwards.
    """
    config = model.config
    new_config = pruned_config(config, shape, plan.layers)
    state = {}
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    tied = {"lm_head.weight"} if getattr(new_config, "tie_word_embeddings", False) else set()
    for name in list(model.state_dict()):  # names only: holding the dict would keep every source tensor alive
        if name in tied:
            continue  # re-tied to the pruned embedding below
        tensor = _tensor(model, name)
        kept = slice_weight(name, tensor, plan, config)
        if kept is not None:
            state[kept[0]] = kept[1]  # index_select copied pruned tensors; untouched ones are shared, never written
        if consume and (kept is None or kept[1] is not tensor):  # dropped, or copied: release the source
            module_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(module_name)
            if attr in owner._parameters:
                owner._parameters[attr] = torch.nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)
        del tensor, kept
    with no_init_weights():  # no throwaway random init (its untouched pages never become resident)
        pruned = AutoModelForCausalLM.from_config(new_config, dtype=dtype)
    missing, unexpected = pruned.load_state_dict(state, strict=False, assign=True)
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"pruned state does not fit the pruned model: missing {missing}, unexpected {unexpected}")
    if tied:
        pruned.tie_weights()
    pruned.generation_config = copy.deepcopy(model.generation_config)
    return pruned.to(device).eval()


def slice_weight(name: str, tensor: torch.Tensor, plan: KeepPlan, config) -> tuple[str, torch.Tensor] | None:
    """The kept part of one weight under its pruned name, or None when its layer is dropped."""
    m = LAYER_KEY.match(name)
    layer = int(m.group(1)) if m else None
    if layer is not None and layer not in plan.layers:
        return None
    for axis, dim in weight_axes(name).items():
        tensor = tensor.index_select(axis, _indices(dim, layer, plan, config).to(tensor.device))
    return (f"model.layers.{plan.layers.index(layer)}.{m.group(2)}" if m else name), tensor


def prune_checkpoint(
    source: Path, plan: KeepPlan, shape: Shape, out: Path, config, dtype: torch.dtype, shard_bytes: int = 1 << 26
) -> None:
    """Prune a safetensors checkpoint on disk into `out`, one weight at a time (no model is built).

    Peak memory is one source weight plus one output shard, whatever the model's size.
    """
    from safetensors.torch import save_file

    from slimlm.sources.models import read_safetensors

    new_config = pruned_config(config, shape, plan.layers)
    tied = getattr(new_config, "tie_word_embeddings", False)
    out.mkdir(parents=True, exist_ok=True)
    current: dict[str, torch.Tensor] = {}
    where: dict[str, int] = {}
    shard = 1
    size = total = 0

    def flush() -> None:
        save_file(current, str(out / f".shard-{shard:05d}"), metadata={"format": "pt"})
        current.clear()  # written: drop the tensors

    for name, tensor in read_safetensors(source):
        kept = None if tied and name == "lm_head.weight" else slice_weight(name, tensor, plan, config)
        if kept is None:
            continue
        weight = (kept[1].to(dtype) if kept[1].is_floating_point() else kept[1]).contiguous()
        if current and size + weight.nbytes > shard_bytes:
            flush()
            shard, size = shard + 1, 0
        current[kept[0]], where[kept[0]] = weight, shard
        size, total = size + weight.nbytes, total + weight.nbytes
    flush()

    def final(i: int) -> str:
        return "model.safetensors" if shard == 1 else f"model-{i:05d}-of-{shard:05d}.safetensors"

    for i in range(1, shard + 1):
        (out / f".shard-{i:05d}").rename(out / final(i))
    if shard > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {n: final(i) for n, i in sorted(where.items())}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    new_config.save_pretrained(out)
    if (source / "generation_config.json").is_file():
        shutil.copy2(source / "generation_config.json", out / "generation_config.json")


def _tensor(model, name: str) -> torch.Tensor:
    try:
        return model.get_parameter(name).detach()
    except AttributeError:
        return model.get_buffer(name)
