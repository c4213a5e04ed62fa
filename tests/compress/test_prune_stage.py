"""The prune stage through the runner: budget search, depth methods, baselines, and one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimlm.errors import RecipeError, UnsupportedModelError
from slimlm.evaluate.size import parameter_counts
from slimlm.recipe import load_recipe
from slimlm.runner import run_recipe

RECIPE = """\
name: tiny
model: {model}
device: cpu
data:
  calibration: {{source: "builtin:python-docs", split: train, seq_len: 32, samples: 4}}
stages:
  - name: prune
    kind: prune
    round_to: 8
    target: {target}
"""


def run(tmp_path, model, target, *overrides):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(model=model, target=target))
    return run_recipe(load_recipe(path, list(overrides)), tmp_path / "run")


def test_budget_search_fits_the_budget_and_reports_candidates(tmp_path, tiny_llama):
    run(tmp_path, tiny_llama, "{params: 0.7}", "stages.prune.search.candidates=3")
    manifest = json.loads((tmp_path / "run" / "01-prune" / "manifest.json").read_text())
    teacher = json.loads((tmp_path / "run" / "00-teacher" / "manifest.json").read_text())
    candidates = manifest["metrics"]["candidates"]
    assert 2 <= len(candidates) <= 3 and all(c["proxy"] is not None for c in candidates)
    params = manifest["metrics"]["params"]
    assert abs(params - 0.7 * teacher["metrics"]["params"]) <= 0.05 * 0.7 * teacher["metrics"]["params"]
    best = min(candidates, key=lambda c: c["proxy"] or 0)
    assert manifest["metrics"]["shape"] == {k: best[k] for k in ("hidden", "ffn", "heads", "kv_heads", "layers")}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "01-prune" / "model")
    assert parameter_counts(model)["params"] == params


@pytest.mark.parametrize(
    "width,depth", [("magnitude", "contiguous"), ("random", "perplexity"), ("activation", "block_importance")]
)
def test_methods_are_usable_from_recipes(tmp_path, tiny_llama, width, depth):
    run(
        tmp_path,
        tiny_llama,
        "{ffn: 64, layers: 3}",
        f"stages.prune.width.method={width}",
        f"stages.prune.depth.method={depth}",
    )
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "01-prune" / "model")
    assert model.config.num_hidden_layers == 3 and model.config.intermediate_size == 64


@pytest.mark.parametrize(
    "target,overrides,message",
    [
        ("{hidden: 128}", [], "field 'target.hidden': 128 is larger than the model's 64"),
        ("{heads: 3}", [], "field 'target.heads': 3 query heads do not divide evenly into 2 key/value groups"),
        ("{params: 0.01}", [], "field 'target.params': no shape with widths in multiples of 8 fits"),
        ("{params: 100000000}", [], "field 'target.params': 100,000,000 is more than the model's"),
    ],
)
def test_impossible_targets_are_one_line_errors(tmp_path, tiny_llama, target, overrides, message):
    with pytest.raises(RecipeError, match=message) as e:
        run(tmp_path, tiny_llama, target, *overrides)
    assert "\n" not in str(e.value) and e.value.exit_code == 2


def test_zero_calibration_samples_is_rejected_at_load(tmp_path, tiny_llama):
    with pytest.raises(RecipeError, match=r"field 'data.calibration.samples'.*greater than or equal to 1"):
        run(tmp_path, tiny_llama, "{ffn: 64}", "data.calibration.samples=0")


def test_unsupported_family_names_the_supported_ones(tmp_path, tokenizer_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=512)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(
        UnsupportedModelError, match="model type 'gpt2' is not supported for pruning; supported: gemma2"
    ):
        run(tmp_path, tmp_path / "gpt2", "{ffn: 64}")


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
def test_offloaded_pruning_streams_layers_and_writes_the_same_model(tmp_path, tiny_models, family):
    """offload: disk keeps layers on disk (accelerate) and prunes the checkpoint weight by weight: same result."""
    from safetensors.torch import load_file

    target = "{params: 0.7}"
    overrides = ["stages.prune.search.candidates=2", "stages.prune.depth={method: block_importance}"]
    (tmp_path / "memory").mkdir()
    (tmp_path / "offload").mkdir()
    run(tmp_path / "memory", tiny_models[family], target, *overrides)
    run(tmp_path / "offload", tiny_models[family], target, *overrides, "stages.prune.offload=disk")
    folder = "run/01-prune"
    in_memory = json.loads((tmp_path / "memory" / folder / "manifest.json").read_text())["metrics"]
    offloaded = json.loads((tmp_path / "offload" / folder / "manifest.json").read_text())["metrics"]
    proxies = [c.pop("proxy") for c in in_memory["candidates"]]
    assert [c.pop("proxy") for c in offloaded["candidates"]] == pytest.approx(proxies, rel=1e-4)
    assert offloaded["candidates"] == in_memory["candidates"]
    assert offloaded["shape"] == in_memory["shape"] and offloaded["kept_layers"] == in_memory["kept_layers"]
    a = load_file(tmp_path / "memory" / folder / "model" / "model.safetensors")
    b = load_file(tmp_path / "offload" / folder / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "offload" / folder / "model")  # plain transformers
    assert parameter_counts(model)["params"] == offloaded["params"]


def test_offload_refuses_weight_magnitude_scores(tmp_path, tiny_llama):
    with pytest.raises(RecipeError, match="offload streams activations"):
        run(tmp_path, tiny_llama, "{ffn: 64}", "stages.prune.offload=disk", "stages.prune.width.method=magnitude")
