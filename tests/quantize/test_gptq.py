"""GPTQ: less output error than round-to-nearest, and its codes run in onnxruntime as GPTQ chose them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from slimlm.edge import EdgeModel
from slimlm.errors import StageFailed
from slimlm.export.graph_quantize import quantize_weights
from slimlm.export.onnx_graph import export_onnx
from slimlm.quantize.gptq import gptq, quantize_layer


def dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    block = codes.shape[1] // scales.shape[1]
    return (codes.float() - 2 ** (bits - 1)) * scales.repeat_interleave(block, dim=1)


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(bits):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 32, generator=g) @ torch.randn(32, 128, generator=g)  # correlated inputs, as in LLMs
    w = torch.randn(64, 128, generator=g)
    hessian = x.T @ x / len(x)
    codes, scales = quantize_layer(w, hessian, bits, 32, damp=0.01)
    assert codes.dtype == torch.uint8 and int(codes.max()) < 2**bits and scales.shape == (64, 4)
    # Round-to-nearest on the same grid: zero Hessian correlation makes GPTQ do exactly that.
    rtn_codes, rtn_scales = quantize_layer(w, torch.eye(128), bits, 32, damp=0.01)
    error = {
        name: (x @ (dequantize(c, s, bits) - w).T).pow(2).mean()
        for name, (c, s) in {"gptq": (codes, scales), "rtn": (rtn_codes, rtn_scales)}.items()
    }
    assert error["gptq"] < 0.7 * error["rtn"]


def test_onnxruntime_runs_the_codes_gptq_chose(tiny_models, tmp_path):
    # phi3's tiny config has an untied head, so every Linear, the head too, can take GPTQ's codes while the
    # embedding table stays fp32 in both models.
    model = AutoModelForCausalLM.from_pretrained(tiny_models["phi3"]).eval()
    ids = torch.randint(3, 500, (4, 32), generator=torch.Generator().manual_seed(0))
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    codes = gptq(model, ids, bits=4, block_size=32)
    assert sorted(codes) == sorted(names)
    assert sorted(gptq(model, ids, skip=["lm_head", "*.mlp.*"])) == [n for n in sorted(names) if ".self_attn." in n]
    export_onnx(model, tiny_models["phi3"], tmp_path / "fp32")
    options = dict(bits=4, embeddings=False, accuracy_level=1)  # fp32 compute: the only error is the weights'
    quantize_weights(tmp_path / "fp32", tmp_path / "gptq", **options, prequantized=codes)
    quantize_weights(tmp_path / "fp32", tmp_path / "rtn", **options)
    with torch.no_grad():
        ref = model(ids[:1]).logits.numpy()
        for name in names:  # the PyTorch model with GPTQ's weights, as onnxruntime should compute them
            model.get_submodule(name).weight.copy_(dequantize(*codes[name], bits=4))
        fake = model(ids[:1]).logits.numpy()
    got, rtn = (EdgeModel(tmp_path / d).logits(ids[:1].numpy()) for d in ("gptq", "rtn"))
    assert np.abs(got - fake).max() < 1e-3 * np.abs(fake).max()
    assert np.abs(got - ref).mean() < np.abs(rtn - ref).mean()


def test_a_singular_hessian_gets_more_damping_and_a_hopeless_one_a_clear_error():
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    x = torch.ones(64, 32)  # every input equal: rank one
    h = x.T @ x
    with pytest.raises(torch.linalg.LinAlgError):  # singular at this damping...
        torch.linalg.cholesky(h + 1e-8 * torch.diag(h).mean() * torch.eye(32))
    codes, scales = quantize_layer(w, h, 4, 32, damp=1e-8)  # ...so GPTQ damps it more, and still fits the layer
    dequantized = (codes.float() - 8) * scales.repeat_interleave(32, dim=1)
    assert (x @ (dequantized - w).T).abs().mean() < 0.1 * (x @ w.T).abs().mean()
    with pytest.raises(StageFailed, match="give gptq more calibration samples, or a larger damp"):
        quantize_layer(w, -torch.eye(32), 4, 32, damp=0.01)
