"""From importance scores to a KeepPlan: which layers, heads, MLP channels and hidden channels survive.

Width scores come from activations (Minitron) or from the baselines (magnitude, random); depth
from Block Importance (ShortGPT), the LM loss with each layer removed (Minitron), or the angular
distance across a contiguous block (Gromov et al.).
"""

from __future__ import annotations

import torch

from slimlm import arch
from slimlm.compress.config import DepthMethod
from slimlm.compress.surgery import KeepPlan, Shape, weight_axes


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(scores.float(), k).indices.sort().values


def choose_layers(
    n_layers: int,
    keep: int,
    method: DepthMethod,
    *,
    block: torch.Tensor | None = None,
    angular: torch.Tensor | None = None,
    removal_loss: torch.Tensor | None = None,
) -> list[int]:
    """Indices of the layers to keep."""
    drop = n_layers - keep
    if drop <= 0:
        return list(range(n_layers))
    if method == "block_importance":  # ShortGPT: drop the layers that change their input least
        return _top(block, keep).tolist()
    if method == "perplexity":  # Minitron: drop the layers whose removal hurts the LM loss least
        return _top(removal_loss, keep).tolist()
    if method == "contiguous":  # drop the block [l, l+drop) whose input and output are closest
        distances = angular[: n_layers - drop + 1, drop]
        start = int(torch.argmin(distances))
        return [i for i in range(n_layers) if not start <= i < start + drop]
    raise ValueError(method)


def select_plan(
    config, shape: Shape, layers: list[int], heads: torch.Tensor, mlp: torch.Tensor, hidden: torch.Tensor
) -> KeepPlan:
    """Keep the highest-scoring channels; query heads are ranked within their key/value group (GQA)."""
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    group = n_heads // n_kv
    per_group = shape.heads // shape.kv_heads
    plan = KeepPlan(layers=layers, hidden=_top(hidden, shape.hidden), ffn={}, heads={}, kv_heads={})
    for layer in layers:
        plan.ffn[layer] = _top(mlp[layer], shape.ffn)
        grouped = heads[layer].view(n_kv, group)
        kept_groups = _top(grouped.sum(-1), shape.kv_heads)
        plan.kv_heads[layer] = kept_groups
        plan.heads[layer] = torch.cat([g * group + _top(grouped[g], per_group) for g in kept_groups.tolist()])
    return plan


def magnitude_scores(model) -> dict[str, torch.Tensor]:
    """Baseline: L1 norm of the weights that read or write each head, MLP channel and hidden channel."""
    config = model.config
    n_layers, n_heads, hd = config.num_hidden_layers, config.num_attention_heads, arch.head_dim(config)
    scores = {
        "heads": torch.zeros(n_layers, n_heads),
        "mlp": torch.zeros(n_layers, config.intermediate_size),
        "hidden": torch.zeros(config.hidden_size),
    }
    for name, weight in model.state_dict().items():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        for axis, dim in weight_axes(name).items():
            l1 = (
                weight.detach().float().abs().transpose(0, axis).reshape(weight.shape[axis], -1).sum(-1)
                if weight.dim() > 1
                else weight.detach().float().abs()
            )
            if dim == "hidden":
                scores["hidden"] += l1
            elif dim == "ffn":
                scores["mlp"][layer] += l1
            elif dim == "gate_up":
                scores["mlp"][layer] += l1.view(2, -1).sum(0)
            elif dim == "q":
                scores["heads"][layer] += l1.view(n_heads, hd).sum(-1)
            elif dim == "qkv":
                scores["heads"][layer] += l1[: n_heads * hd].view(n_heads, hd).sum(-1)
            # kv rows are shared by a group of query heads; the group's query heads decide.
    return scores


def random_scores(config, seed: int) -> dict[str, torch.Tensor]:
    """Baseline: uniformly random channel scores."""
    g = torch.Generator().manual_seed(seed)
    return {
        "heads": torch.rand(config.num_hidden_layers, config.num_attention_heads, generator=g),
        "mlp": torch.rand(config.num_hidden_layers, config.intermediate_size, generator=g),
        "hidden": torch.rand(config.hidden_size, generator=g),
    }
