"""GPTQ (Frantar et al., 2023): 4-bit weights chosen column by column to minimise the layer's output error.

Round-to-nearest quantizes each weight on its own. GPTQ quantizes one input column at a time and moves
the rounding error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's
inputs (H = X^T X on calibration text), so the layer's outputs on that text change least. The codes and
scales come out in MatMulNBits' symmetric layout (4-bit codes offset by 8, a scale per block of
`block_size` inputs), so onnxruntime runs them as they are: ort_quantize writes them, not its own rounding.

Measured on the quickstart's student (benchmarks/quantize_variants.py: top-1 agreement with fp32 on 4,096
held-out tokens): with the head, v, o and down at 8 bits, GPTQ took int4 from 0.84 (round-to-nearest after
SmoothQuant) to 0.90; with k at 8 bits too, 0.91. SmoothQuant before GPTQ costs a little (0.90 with it).
Ordering columns by the Hessian's diagonal ("act order") did not help in a trial and is not implemented.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from slimlm.errors import StageFailed
from slimlm.progress import track
from slimlm.quantize.calibration import record_linear_inputs
from slimlm.quantize.layers import matches


@torch.no_grad()
def gptq(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    *,
    skip: Sequence[str] = (),
    bits: int = 4,
    block_size: int = 32,
    damp: float = 0.01,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Quantize every Linear layer but those `skip` names (as keep_8bit does); returns name -> (uint8 codes
    [out, in], scales [out, in / block_size]).

    The Hessians come from one pass of the unquantized model over `blocks`. A layer whose inputs are not
    whole blocks is left out (round-to-nearest pads it).
    """
    linears = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not matches(n, skip) and m.in_features % block_size == 0
    }
    hessians = _hessians(model, blocks, linears)
    out = {}
    for name, linear in track(linears.items(), "GPTQ", total=len(linears)):
        out[name] = quantize_layer(linear.weight.float(), hessians[name], bits, block_size, damp)
    return out


def _hessians(model, blocks: torch.Tensor, linears: dict[str, torch.nn.Linear]) -> dict[str, torch.Tensor]:
    """X^T X / tokens of each layer's inputs over the calibration blocks."""
    sums = {m: torch.zeros(m.in_features, m.in_features) for m in linears.values()}
    record_linear_inputs(model, blocks, sums, lambda m, x: sums[m].addmm_(x.T.float(), x.float()))
    tokens = max(blocks.numel(), 1)
    return {n: sums[m] / tokens for n, m in linears.items()}


def quantize_layer(
    weight: torch.Tensor, hessian: torch.Tensor, bits: int, block_size: int, damp: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ on one [out, in] weight; returns codes (offset by 2^(bits-1)) and a scale per row block.

    The scales are fixed before any update, from the original weights ("static groups").
    """
    rows, cols = weight.shape
    half = 2 ** (bits - 1)
    h = hessian.clone()
    dead = torch.diag(h) == 0  # inputs never active on the calibration text: any value will do
    h[dead, dead] = 1
    scales = _scale(weight.reshape(rows, cols // block_size, block_size), torch.diag(h), half)
    column_scale = scales.repeat_interleave(block_size, dim=1)
    w = weight.clone()
    w[:, dead] = 0
    hinv = _inverse_factor(h, damp)
    codes = torch.zeros(rows, cols, dtype=torch.uint8)
    for start in range(0, cols, block_size):  # lazy batches: update the rest of the matrix once per batch
        end = start + block_size
        errors = torch.zeros(rows, block_size)
        for i in range(start, end):
            q = torch.clamp(torch.round(w[:, i] / column_scale[:, i]), -half, half - 1)
            codes[:, i] = (q + half).to(torch.uint8)
            error = (w[:, i] - q * column_scale[:, i]) / hinv[i, i]
            w[:, i:end] -= error[:, None] * hinv[i, i:end][None, :]
            errors[:, i - start] = error
        w[:, end:] -= errors @ hinv[start:end, end:]
    return codes, scales


def _inverse_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damping)^-1: row i holds how column i's error spreads to the columns after it.

    A Hessian from little or repetitive calibration text can be singular; more damping makes it definite.
    """
    mean = torch.diag(h).mean()
    for factor in (1, 10, 100):
        try:
            inverse = torch.cholesky_inverse(torch.linalg.cholesky(h + factor * damp * mean * torch.eye(len(h))))
            return torch.linalg.cholesky(inverse, upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise StageFailed(
        f"GPTQ: a layer's input Hessian is not positive definite even with damp {100 * damp}; "
        "give gptq more calibration samples, or a larger damp"
    )


def _scale(blocks: torch.Tensor, importance: torch.Tensor, half: int) -> torch.Tensor:
    """A symmetric scale per [rows, blocks, block_size] block, in MatMulNBits' convention (the entry of largest
    magnitude maps to -half, keeping its sign), shrunk where clipping that entry lowers the block's rounding
    error weighted by each input's importance (the Hessian's diagonal)."""
    idx = blocks.abs().argmax(dim=-1, keepdim=True)
    full = blocks.gather(-1, idx) / -half
    full[full == 0] = 1.0
    weight = importance.reshape(1, *blocks.shape[1:])
    best, best_error = full, None
    for shrink in torch.linspace(1.0, 0.7, 13):
        scale = full * shrink
        q = torch.clamp(torch.round(blocks / scale), -half, half - 1)
        error = ((blocks - q * scale) ** 2 * weight).sum(-1, keepdim=True)
        if best_error is None:
            best_error = error
        else:
            better = error < best_error
            best, best_error = torch.where(better, scale, best), torch.where(better, error, best_error)
    return best.squeeze(-1)
