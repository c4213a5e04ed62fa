"""SmoothQuant scale migration: exact in fp32 on every family, and it rescues int8 from an outlier channel."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from slimlm.edge import EdgeModel
from slimlm.export.graph_quantize import quantize_weights
from slimlm.export.onnx_graph import export_onnx
from slimlm.quantize.smooth import smooth
from tests.conftest import FAMILIES


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_smoothing_leaves_the_fp32_model_unchanged(family, tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models[family]).eval()
    ids = torch.randint(3, 500, (4, 16), generator=torch.Generator().manual_seed(0))
    smoothed = copy.deepcopy(model)
    smooth(smoothed, ids, alpha=0.75)
    with torch.no_grad():
        assert torch.allclose(smoothed(ids).logits, model(ids).logits, atol=1e-4)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), smoothed.parameters(), strict=True))


def test_smoothing_rescues_int8_from_an_outlier_channel(tiny_models, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    with torch.no_grad():  # an outlier input channel, as trained LLMs have, without changing the fp32 function
        for layer in model.model.layers:
            for norm, linears in (
                (layer.input_layernorm, [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]),
                (layer.post_attention_layernorm, [layer.mlp.gate_proj, layer.mlp.up_proj]),
            ):
                norm.weight[3] *= 100
                for lin in linears:
                    lin.weight[:, 3] /= 100
    ids = torch.randint(3, 500, (8, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids[:2]).logits.numpy()
    errors = {}
    for name in ("plain", "smoothed"):
        if name == "smoothed":
            smooth(model, ids, alpha=0.75)
        export_onnx(model, tiny_models["llama"], tmp_path / name / "fp32")
        quantize_weights(tmp_path / name / "fp32", tmp_path / name / "int8", bits=8, embeddings=False)
        errors[name] = np.abs(EdgeModel(tmp_path / name / "int8").logits(ids[:2].numpy()) - ref).mean()
    assert errors["smoothed"] < 0.5 * errors["plain"]
