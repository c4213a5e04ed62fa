"""Activation-based importance (Minitron, arXiv 2407.14679), collected in one forward pass over calibration data.

Hooks read per-head attention outputs (the input of o_proj), per-channel MLP activations (the
input of down_proj), per-channel hidden activations (the outputs of the layer norms), and every
layer's input and output (for Block Importance and contiguous-block angular distance). Scores are
accumulated in fp32 per batch, so memory does not grow with the number of calibration samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from slimlm import arch

Aggregation = Literal["l2", "mean"]


@dataclass
class Importance:
    heads: torch.Tensor  # [layers, query heads]
    mlp: torch.Tensor  # [layers, intermediate channels]
    hidden: torch.Tensor  # [hidden channels]
    block: torch.Tensor  # [layers]: 1 - cos(layer input, layer output), Block Importance
    angular: torch.Tensor  # [layers, layers+1]: angular[l, n] = distance between the input of layer l and of layer l+n


class _Accumulator:
    """Reduces [batch, seq, channels] activations to per-channel scores: over sequence, then over batch."""

    def __init__(self, sequence: Aggregation, batch: Aggregation):
        self.sequence, self.batch = sequence, batch
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, x: torch.Tensor) -> None:  # x: [batch, seq, channels], non-negative
        x = x.float()
        per_sample = x.mean(1) if self.sequence == "mean" else x.pow(2).sum(1).sqrt()
        part = per_sample.pow(2).sum(0) if self.batch == "l2" else per_sample.sum(0)
        self.total = part if self.total is None else self.total + part
        self.count += x.shape[0]

    def result(self) -> torch.Tensor:
        assert self.total is not None, "no activations were recorded"
        return self.total.sqrt() if self.batch == "l2" else self.total / self.count


def _hidden_norms(layer) -> list[torch.nn.Module]:
    """The layer norms whose outputs live in the hidden (residual) width; q/k norms act per head."""
    return [m for name, m in layer.named_children() if name.endswith("layernorm")]


@torch.inference_mode()
def collect_importance(
    model,
    blocks: torch.Tensor,
    *,
    sequence: Aggregation = "mean",
    batch: Aggregation = "l2",
    batch_size: int = 4,
    progress=None,
) -> Importance:
    config = model.config
    layers = arch.layers(model)
    n_layers, n_heads, hd = len(layers), config.num_attention_heads, arch.head_dim(config)
    heads = [_Accumulator(sequence, batch) for _ in layers]
    mlp = [_Accumulator(sequence, batch) for _ in layers]
    hidden = _Accumulator(sequence, batch)
    boundary: list[torch.Tensor | None] = [None] * (n_layers + 1)  # inputs of each layer, then the last output
    handles = []

    def on_attention(i):
        def hook(module, args):
            x = args[0]
            heads[i].add(x.view(*x.shape[:-1], n_heads, hd).norm(dim=-1))

        return hook

    def on_mlp(i):
        return lambda module, args: mlp[i].add(args[0].abs())

    def unit_rows(x: torch.Tensor) -> torch.Tensor:  # [tokens, hidden], unit length: only angles are needed
        return torch.nn.functional.normalize(x.reshape(-1, x.shape[-1]).float(), dim=-1)

    def on_layer_input(i):
        def hook(module, args, kwargs):
            boundary[i] = unit_rows(args[0] if args else kwargs["hidden_states"])

        return hook

    def on_last_output(module, args, kwargs, output):
        boundary[n_layers] = unit_rows(output[0] if isinstance(output, tuple) else output)

    for i, layer in enumerate(layers):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(on_attention(i)))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(on_mlp(i)))
        handles.append(layer.register_forward_pre_hook(on_layer_input(i), with_kwargs=True))
        for norm in _hidden_norms(layer):
            handles.append(norm.register_forward_hook(lambda m, a, out: hidden.add(out.abs())))
    handles.append(layers[-1].register_forward_hook(on_last_output, with_kwargs=True))

    device = next(model.parameters()).device
    cos_sum = torch.zeros(n_layers, n_layers + 1, dtype=torch.float64)
    tokens = 0
    order = range(0, len(blocks), batch_size)
    try:
        for start in progress(order, "importance") if progress else order:
            # The decoder alone: the LM head's [batch, seq, vocab] logits are not needed for any score.
            model.model(input_ids=blocks[start : start + batch_size].to(device), use_cache=False)
            for first in range(n_layers):
                for n in range(1, n_layers - first + 1):  # one [tokens] vector at a time keeps the peak small
                    cos = (boundary[first] * boundary[first + n]).sum(-1).clamp(-1, 1)
                    cos_sum[first, n] += torch.arccos(cos).sum().double() / torch.pi
                    if n == 1:
                        cos_sum[first, 0] += (1 - cos).sum().double()  # Block Importance uses 1 - cos
            tokens += boundary[0].shape[0]
    finally:
        for h in handles:
            h.remove()
        boundary.clear()
    angular = (cos_sum / tokens).float()
    block = angular[:, 0].clone()
    angular[:, 0] = 0.0
    return Importance(
        heads=torch.stack([a.result() for a in heads]),
        mlp=torch.stack([a.result() for a in mlp]),
        hidden=hidden.result(),
        block=block,
        angular=angular,
    )


@torch.inference_mode()
def layer_removal_loss(model, blocks: torch.Tensor, *, batch_size: int = 4, progress=None) -> torch.Tensor:
    """LM loss on calibration data with each layer skipped in turn (Minitron's depth importance): [layers]."""
    layers = arch.layers(model)
    device = next(model.parameters()).device

    def skip(module, args, kwargs, output):
        hidden_in = args[0] if args else kwargs["hidden_states"]
        return (hidden_in, *output[1:]) if isinstance(output, tuple) else hidden_in

    losses = []
    order = range(len(layers))
    for i in progress(order, "layer removal") if progress else order:
        handle = layers[i].register_forward_hook(skip, with_kwargs=True)
        try:
            total, count = 0.0, 0
            for start in range(0, len(blocks), batch_size):
                ids = blocks[start : start + batch_size].to(device)
                total += model(input_ids=ids, labels=ids, use_cache=False).loss.item() * len(ids)
                count += len(ids)
            losses.append(total / count)
        finally:
            handle.remove()
    return torch.tensor(losses)
