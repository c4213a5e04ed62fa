"""Distillation in two processes (torchrun, gloo on CPU) follows the one-process loss trajectory."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from slimlm.recipe import load_recipe
from slimlm.runner import run_recipe

RECIPE = """\
name: launch
model: {model}
device: cpu
data:
  train: {{source: "builtin:python-docs", split: train, seq_len: 32}}
stages:
  - {{name: prune, kind: prune, calibration: train, target: {{hidden: 48, ffn: 64, layers: 3}}}}
  - name: distill
    kind: distill
    data: train
    method: full
    steps: 6
    batch_size: 4
    lr: 1.0e-3
    schedule: constant
    warmup: 0.0
    checkpoint_every: 0
"""


@pytest.mark.heavy  # two torchrun processes and a one-process reference: 1.5 minutes on 2 cores
def test_two_processes_match_one_process_with_the_same_global_batch(tiny_llama, tmp_path):
    recipe_file = tmp_path / "launch.yaml"
    recipe_file.write_text(RECIPE.format(model=tiny_llama))
    run_recipe(load_recipe(recipe_file), tmp_path / "one")
    # 2 processes x 2 rows = the same 4 rows per optimizer step (batches are indexed by step, rank and row)
    two = load_recipe(recipe_file, ["stages.distill.batch_size=2", "stages.distill.launch={processes: 2}"])
    run_recipe(two, tmp_path / "two")
    one_m = json.loads((tmp_path / "one" / "02-distill" / "manifest.json").read_text())["stage_metrics"]
    two_m = json.loads((tmp_path / "two" / "02-distill" / "manifest.json").read_text())["stage_metrics"]
    assert two_m["train_tokens"] == one_m["train_tokens"] == 6 * 4 * 32
    assert len(one_m["loss_curve"]) == 6
    assert two_m["loss_curve"] == pytest.approx(one_m["loss_curve"], rel=1e-4)
    a = load_file(tmp_path / "one" / "02-distill" / "model" / "model.safetensors")
    b = load_file(tmp_path / "two" / "02-distill" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    pruned = load_file(tmp_path / "one" / "01-prune" / "model" / "model.safetensors")
    assert any(not torch.equal(pruned[name], a[name]) for name in a)  # training moved the weights
