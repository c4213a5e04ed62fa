"""A loss on the LM head's logits computed a chunk of positions at a time, gradients included.

The logits of a batch are [tokens, vocabulary]: at a 128k vocabulary and 4k tokens that is 2 GB in
fp32 per copy, and a KD loss keeps several copies (student, teacher, their log-softmaxes, the
gradient). Here the head is applied to one chunk of hidden states at a time; each chunk's loss is
differentiated at once (with autograd, so any loss works) and only its gradients with respect to
the hidden states and the head's trainable weights are kept. The backward pass then only scales
those by the incoming gradient. Peak loss memory is set by the chunk, not by the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

ChunkLoss = Callable[[torch.Tensor, slice], torch.Tensor]


class _ChunkedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, chunk_loss: ChunkLoss, chunk: int, *params: torch.Tensor):
        wanted = [hidden.requires_grad, *(p.requires_grad for p in params)]
        # every row's gradient is written once, so no zeroing; a parameter's sums over chunks, from the first one
        grads: list[torch.Tensor | None] = [torch.empty_like(hidden) if wanted[0] else None] + [None] * len(params)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            piece = hidden[rows].detach().requires_grad_(wanted[0])
            with torch.enable_grad():
                loss = chunk_loss(piece, rows)
            inputs = [t for t, w in zip((piece, *params), wanted, strict=True) if w]
            if inputs:
                found = iter(torch.autograd.grad(loss, inputs, allow_unused=True))
                for i, w in enumerate(wanted):
                    g = next(found) if w else None
                    if g is None:  # the chunk's loss does not read it
                        if i == 0:
                            grads[0][rows] = 0
                        continue
                    if i == 0:
                        grads[0][rows] = g
                    elif grads[i] is None:
                        grads[i] = g
                    else:
                        grads[i] += g
            total += loss.detach().float()
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in grads))
        ctx.present = [g is not None for g in grads]
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        scale = None if grad_output.item() == 1 else grad_output  # a pass over the head's gradient saved at scale 1
        grads = [
            (g if scale is None else g * scale.to(g.dtype)) if present else None
            for g, present in zip(ctx.saved_tensors, ctx.present, strict=True)
        ]
        return grads[0], None, None, *grads[1:]


def chunked_loss(
    hidden: torch.Tensor, chunk_loss: ChunkLoss, chunk: int, params: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Sum of `chunk_loss(hidden[rows], rows)` over chunks of `chunk` rows of the [tokens, width] `hidden`.

    `params` are the tensors `chunk_loss` reads besides `hidden` (the head's weights): the gradients of
    those that require grad flow back through them, as if the whole loss had been one graph. Each
    chunk's loss must already be weighted by its share of the whole (e.g. rows / tokens for a mean).
    """
    return _ChunkedLoss.apply(hidden, chunk_loss, chunk, *params)
