"""SmoothQuant-style scale migration before an int8/int4 ONNX export (Xiao et al., 2023).

onnxruntime's fast MatMulNBits path (accuracy level 4) quantizes each activation row to int8 in
blocks along the input dimension, so one outlier channel crushes the other values of its block.
Dividing input channel j by s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha) and multiplying the
weight's column j by s_j leaves the fp32 model unchanged, evens out the activations, and moves
their range into weights quantized per block. The division is folded into the RMSNorm weight
before q/k/v and before gate/up, and into up_proj's rows before down_proj (the MLP is act(gate) * up,
linear in up). On the quickstart's student, alpha 0.75 took int8 top-1 agreement (fp32 embeddings)
from 0.947 to 0.968.
"""

from __future__ import annotations

import torch

from slimlm import arch
from slimlm.quantize.calibration import record_linear_inputs


@torch.no_grad()
def smooth(model: torch.nn.Module, blocks: torch.Tensor, alpha: float) -> None:
    """Migrate activation outliers into the weights of every decoder layer, in place; `blocks` calibrate."""
    family = arch.family_of(model.config)
    one_plus = model.config.model_type.startswith("gemma")  # Gemma's RMSNorm scales by (1 + weight)
    amax = _input_absmax(model, blocks)
    for layer in arch.layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        qkv = [attn.qkv_proj] if family.fused_qkv else [attn.q_proj, attn.k_proj, attn.v_proj]
        _fold_into_norm(layer.input_layernorm, qkv, amax[qkv[0]], alpha, one_plus)
        mlp_norm = layer.pre_feedforward_layernorm if one_plus else layer.post_attention_layernorm
        gate_up = [mlp.gate_up_proj] if family.fused_gate_up else [mlp.gate_proj, mlp.up_proj]
        _fold_into_norm(mlp_norm, gate_up, amax[gate_up[0]], alpha, one_plus)
        s = _scales(amax[mlp.down_proj], [mlp.down_proj], alpha)
        up = mlp.gate_up_proj if family.fused_gate_up else mlp.up_proj
        rows = slice(up.out_features - s.numel(), None)  # the up half of a fused [gate; up]
        up.weight[rows] /= s[:, None]
        if up.bias is not None:
            up.bias[rows] /= s
        mlp.down_proj.weight.mul_(s)


def _input_absmax(model: torch.nn.Module, blocks: torch.Tensor) -> dict[torch.nn.Module, torch.Tensor]:
    """Per-channel max |input| of every Linear over the calibration blocks."""
    amax: dict[torch.nn.Module, torch.Tensor] = {}

    def record(module, x):
        x = x.abs().amax(0).float()
        amax[module] = torch.maximum(amax[module], x) if module in amax else x

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    record_linear_inputs(model, blocks, linears, record)
    return amax


def _scales(x_amax: torch.Tensor, linears: list[torch.nn.Linear], alpha: float) -> torch.Tensor:
    w_amax = torch.stack([lin.weight.abs().amax(0).float() for lin in linears]).amax(0)
    return (x_amax.clamp(min=1e-5) ** alpha / w_amax.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)


def _fold_into_norm(norm, linears: list[torch.nn.Linear], x_amax: torch.Tensor, alpha: float, one_plus: bool):
    s = _scales(x_amax, linears, alpha)
    if one_plus:
        norm.weight.copy_((1 + norm.weight) / s - 1)
    else:
        norm.weight.div_(s)
    for lin in linears:
        lin.weight.mul_(s)
