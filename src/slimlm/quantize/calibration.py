"""Run a model over calibration text and hand each Linear layer's inputs to a statistic (SmoothQuant, GPTQ)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


@torch.no_grad()
def record_linear_inputs(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    linears: Iterable[torch.nn.Module],
    record: Callable[[torch.nn.Module, torch.Tensor], None],
) -> None:
    """Call `record(linear, x)` with x the layer's input as [tokens, in_features], for every block of text."""

    def hook(module, inputs):
        record(module, inputs[0].detach().reshape(-1, inputs[0].shape[-1]))

    handles = [m.register_forward_pre_hook(hook) for m in linears]
    try:
        for block in blocks:
            model(input_ids=block[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
