"""bitsandbytes 8-bit and 4-bit stages: the output reloads with from_pretrained alone and generates on this CPU."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimlm.errors import RecipeError
from slimlm.recipe import load_recipe
from slimlm.runner import run_recipe

RECIPE = """\
name: tiny
model: {model}
device: cpu
stages:
  - {{name: prune, kind: prune, target: {{ffn: 72}}, calibration: c}}
  - {{name: quantize, kind: bitsandbytes, bits: {bits}}}
data:
  c: {{source: "builtin:python-docs", split: train, seq_len: 32, samples: 2}}
"""


@pytest.mark.parametrize("bits", [8, 4])
def test_bnb_output_reloads_and_generates(bits, tiny_llama, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(model=tiny_llama, bits=bits))
    run_recipe(load_recipe(path), tmp_path / "run")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "02-quantize" / "model")  # plain transformers
    assert model.config.quantization_config.load_in_8bit == (bits == 8)
    assert model.config.quantization_config.load_in_4bit == (bits == 4)
    # The MLP projections (72 wide, not a multiple of 32) stay in full precision, so the 4-bit kernel accepts the rest.
    assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == ("Linear8bitLt" if bits == 8 else "Linear4bit")
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_stages_after_bitsandbytes_are_refused(tiny_llama, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        RECIPE.format(model=tiny_llama, bits=8).replace(
            "data:", "  - {name: export, kind: export, parity: null}\ndata:"
        )
    )
    with pytest.raises(
        RecipeError,
        match="kind export needs a hf artifact, but it follows stage 'quantize', which produces hf-quantized",
    ):
        load_recipe(path)
