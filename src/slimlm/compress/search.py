"""Budget search: enumerate homogeneous shapes that fit a parameter budget and rank them by a cheap proxy."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from slimlm.compress.surgery import Shape


def _options(full: int, step: int, floor_fraction: float = 0.4) -> list[int]:
    """Sizes from about floor_fraction x full up to full in multiples of `step` (full itself always included)."""
    low = max(step, math.ceil(full * floor_fraction / step) * step)
    return sorted({*range(low, full, step), full})


def candidate_shapes(
    base: Shape,
    *,
    axes: set[str],
    depth: bool,
    round_to: int,
    budget: int,
    tolerance: float,
    count: Callable[[Shape], int],
    limit: int,
) -> list[tuple[Shape, int]]:
    """Shapes within ±tolerance of `budget` parameters; at most `limit`, spread over hidden sizes."""
    hidden = _options(base.hidden, round_to) if "hidden" in axes else [base.hidden]
    ffn = _options(base.ffn, round_to) if "mlp" in axes else [base.ffn]
    heads = (
        [h for h in range(base.kv_heads, base.heads + 1, base.kv_heads) if h >= base.heads * 0.4]
        if "heads" in axes
        else [base.heads]
    )
    layers = list(range(max(1, math.ceil(base.layers * 0.4)), base.layers + 1)) if depth else [base.layers]
    best_per_hidden: dict[int, tuple[Shape, int]] = {}
    for h in hidden:
        for f in ffn:
            for q in heads:
                if h % q:  # transformers' Llama and Gemma configs refuse a hidden size heads do not divide
                    continue
                for n in layers:
                    shape = Shape(h, f, q, base.kv_heads, n)
                    params = count(shape)
                    if abs(params - budget) > tolerance * budget:
                        continue
                    # Per hidden size, prefer the shape that keeps the most layers, then the closest fit.
                    key = (n, -abs(params - budget))
                    old = best_per_hidden.get(h)
                    if old is None or key > (old[0].layers, -abs(old[1] - budget)):
                        best_per_hidden[h] = (shape, params)
    found = [best_per_hidden[h] for h in sorted(best_per_hidden, reverse=True)]
    if len(found) <= limit:
        return found
    step = (len(found) - 1) / (limit - 1) if limit > 1 else 0
    return [found[round(i * step)] for i in range(limit)]


@torch.inference_mode()
def kl_to_teacher(student, teacher_logprobs: torch.Tensor, blocks: torch.Tensor) -> float:
    """Mean KL(teacher || student) per token on the proxy blocks, one block at a time (vocab-sized tensors are big)."""
    device = next(student.parameters()).device
    total = 0.0
    for row, teacher in zip(blocks, teacher_logprobs, strict=True):
        logits = student(input_ids=row[None].to(device), use_cache=False).logits[0].float()
        student_logprobs = torch.log_softmax(logits, -1)
        del logits
        total += (teacher.exp() * (teacher - student_logprobs)).sum().item()
    return total / blocks.numel()


@torch.inference_mode()
def lm_loss(model, blocks: torch.Tensor) -> float:
    device = next(model.parameters()).device
    ids = blocks.to(device)
    return model(input_ids=ids, labels=ids, use_cache=False).loss.item()
