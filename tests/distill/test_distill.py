"""Distillation: losses, LoRA gradients and merging, resume after an interruption, and bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from slimlm.distill import train as train_module
from slimlm.distill.losses import LOGIT_LOSSES, hidden_state_loss, layer_mapping, top_k_teacher
from slimlm.errors import RecipeError, SourceError
from slimlm.recipe import load_recipe
from slimlm.runner import run_recipe

RECIPE = """\
name: tiny
model: {model}
device: cpu
data:
  train: {{source: "builtin:python-docs", split: train, seq_len: 32, samples: 16}}
stages:
  - name: prune
    kind: prune
    target: {{ffn: 64, layers: 3}}
    calibration: train
  - name: distill
    kind: distill
    data: train
    method: lora
    steps: 6
    batch_size: 2
    lr: 0.01
    checkpoint_every: 2
"""


@pytest.mark.parametrize("name", sorted(LOGIT_LOSSES))
def test_logit_losses_are_zero_for_equal_and_positive_for_different(name):
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(10, 50, generator=g)
    assert LOGIT_LOSSES[name](teacher.clone(), teacher, 2.0).abs().item() < 1e-6
    assert LOGIT_LOSSES[name](torch.randn(10, 50, generator=g), teacher, 2.0).item() > 1e-3


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_hidden_losses_are_zero_for_equal_and_positive_for_different(kind):
    h = torch.randn(8, 16)
    assert hidden_state_loss(h.clone(), h, kind).abs().item() < 1e-6
    assert hidden_state_loss(torch.randn(8, 16), h, kind).item() > 1e-3


def test_top_k_and_layer_mapping():
    student, teacher = torch.randn(4, 20), torch.randn(4, 20)
    s, t = top_k_teacher(student, teacher, 5)
    assert s.shape == t.shape == (4, 5) and torch.equal(t, teacher.topk(5).values)
    assert layer_mapping(3, 6) == [(0, 1), (1, 3), (2, 5)] and layer_mapping(4, 4) == [(i, i) for i in range(4)]


def test_lora_trains_only_adapters_and_merged_output_reloads(tiny_llama, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    ids = torch.randint(3, 500, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == ("lora_" in name), name
        if "lora_B" in name:
            assert p.grad.abs().sum() > 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # make the adapter change the model
        unmerged = model(input_ids=ids).logits
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, unmerged, atol=1e-4, rtol=0)
    assert not any("lora" in k for k in load_file(tmp_path / "model.safetensors"))


def _run(tmp_path, model, folder, *overrides):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(model=model))
    return run_recipe(load_recipe(path, list(overrides)), tmp_path / folder)


def test_distill_lowers_the_loss_and_writes_a_plain_model(tiny_llama, tmp_path):
    _run(tmp_path, tiny_llama, "run", "stages.distill.steps=20", "stages.distill.lr=0.002", "stages.distill.warmup=0")
    manifest = json.loads((tmp_path / "run" / "02-distill" / "manifest.json").read_text())
    curve = manifest["metrics"]["loss_curve"]
    assert len(curve) == 20 and sum(curve[-5:]) < sum(curve[:5])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "02-distill" / "model")
    assert model.config.num_hidden_layers == 3
    assert not (tmp_path / "run" / ".work").exists() or not any((tmp_path / "run" / ".work").rglob("step-*"))


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_resume_after_interruption_matches_an_uninterrupted_run(method, tiny_llama, tmp_path, monkeypatch):
    # QLoRA resumes onto a base quantized again from the pruned weights: the same NF4 codes, so the same run.
    method_override = f"stages.distill.method={method}"
    _run(tmp_path, tiny_llama, "straight", method_override)
    original = train_module.save_checkpoint

    def crash_after_step_4(accelerator, checkpoints, step, log):
        original(accelerator, checkpoints, step, log)
        if step == 4:
            raise KeyboardInterrupt  # as if the process were stopped here

    monkeypatch.setattr(train_module, "save_checkpoint", crash_after_step_4)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, tiny_llama, "resumed", method_override)
    assert not (tmp_path / "resumed" / "02-distill").exists()  # an interrupted stage never looks finished
    monkeypatch.setattr(train_module, "save_checkpoint", original)
    state = _run(tmp_path, tiny_llama, "resumed", method_override)
    assert state["stages"]["prune"] == "skipped" and state["stages"]["distill"] == "done"
    manifest = json.loads((tmp_path / "resumed" / "02-distill" / "manifest.json").read_text())
    assert manifest["metrics"]["resumed_from_step"] == 4
    a = load_file(tmp_path / "straight" / "02-distill" / "model" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "02-distill" / "model" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


def test_full_finetuning_with_hidden_state_loss_and_projection(tiny_llama, tmp_path):
    _run(
        tmp_path,
        tiny_llama,
        "run",
        "stages.prune.target={hidden: 48, layers: 3}",
        "stages.distill.method=full",
        "stages.distill.loss={logits: forward_kl, hidden: cosine, ce_weight: 0.5, top_k: 8}",
        "stages.distill.steps=3",
    )
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "02-distill" / "model")
    assert model.config.hidden_size == 48


def test_bad_distill_input_is_one_line(tiny_llama, tokenizer_dir, tmp_path):
    with pytest.raises(
        RecipeError, match=r"field 'lora.target_modules': \['qkv'\] not found in the model; its linear layers are"
    ):
        _run(tmp_path, tiny_llama, "a", "stages.distill.lora.target_modules=[qkv]")
    with pytest.raises(RecipeError, match="field 'tokens': 10 tokens is less than one optimizer step"):
        _run(tmp_path, tiny_llama, "b", "stages.distill.steps=null", "stages.distill.tokens=10")
    with pytest.raises(RecipeError, match="exactly one budget"):
        _run(tmp_path, tiny_llama, "c", "stages.distill.steps=null")
    from transformers import AutoTokenizer

    from slimlm.distill.stage import check_tokenizers

    other = tmp_path / "other-tokenizer"
    shutil.copytree(tokenizer_dir, other)
    data = json.loads((other / "tokenizer.json").read_text())
    data["model"]["vocab"] = {("zz" + k if v == 100 else k): v for k, v in data["model"]["vocab"].items()}
    (other / "tokenizer.json").write_text(json.dumps(data))
    same = AutoTokenizer.from_pretrained(tokenizer_dir)
    check_tokenizers(same, AutoTokenizer.from_pretrained(tokenizer_dir))
    with pytest.raises(SourceError, match="tokenizers differ"):
        check_tokenizers(same, AutoTokenizer.from_pretrained(other))


def test_distill_on_teacher_generated_text_is_cached(tiny_llama, tmp_path, monkeypatch):
    from slimlm.sources import models

    recipe = (
        RECIPE.format(model=tiny_llama)
        .replace(
            '  train: {source: "builtin:python-docs", split: train, seq_len: 32, samples: 16}',
            '  prompts: {source: "builtin:python-docs", split: train}\n'
            "  train: {source: generate, seq_len: 32, generate: {prompts: prompts, tokens: 400, max_new_tokens: 24, batch_size: 4}}",
        )
        .replace("    calibration: train", "    calibration: prompts")
    )
    path = tmp_path / "r.yaml"
    path.write_text(recipe)
    run_recipe(load_recipe(path, ["stages.distill.steps=2"]), tmp_path / "run")
    cached = list((tmp_path / "run" / "generated").glob("generated-*.jsonl"))
    assert len(cached) == 1
    docs = [json.loads(line)["text"] for line in cached[0].read_text().splitlines()]
    assert len(docs) >= 400 // 24 and all(docs)

    def no_sampling(*args, **kwargs):
        raise AssertionError("generated again instead of reading the cache")

    monkeypatch.setattr(models, "load_model", no_sampling)  # generate.py looks it up at call time
    run_recipe(load_recipe(path, ["stages.distill.steps=3"]), tmp_path / "run")  # distill re-runs, text is reused


def test_generate_needs_its_section(tiny_llama, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        RECIPE.format(model=tiny_llama).replace(
            '  train: {source: "builtin:python-docs", split: train, seq_len: 32, samples: 16}',
            "  train: {source: generate}",
        )
    )
    with pytest.raises(RecipeError, match="`source: generate` goes with a `generate:` section"):
        load_recipe(path)


def _with_teacher_correction(model, tmp_path):
    """The test recipe with a teacher correction (CE fine-tuning of the teacher) before the prune."""
    path = tmp_path / "r.yaml"
    path.write_text(
        RECIPE.format(model=model).replace(
            "stages:\n",
            (
                "stages:\n"
                "  - {name: correct, kind: distill, data: train, method: full, steps: 2, becomes_teacher: true,\n"
                "     loss: {logits: none, ce_weight: 1.0}, checkpoint_every: 0}\n"
            ),
        )
    )
    return path


def test_teacher_correction_becomes_the_teacher_of_later_stages(tiny_llama, tmp_path):
    path = _with_teacher_correction(tiny_llama, tmp_path)
    run_recipe(load_recipe(path), tmp_path / "run")
    corrected = json.loads((tmp_path / "run" / "01-correct" / "manifest.json").read_text())
    distilled = json.loads((tmp_path / "run" / "03-distill" / "manifest.json").read_text())
    assert corrected["teacher_path"] != corrected["artifact_path"]
    assert distilled["teacher_path"] == corrected["artifact_path"]
    pruned = json.loads((tmp_path / "run" / "02-prune" / "manifest.json").read_text())
    assert pruned["input_digest"] == corrected["output_digest"]


def test_qlora_trains_on_a_4bit_base_and_merges_into_full_precision(tiny_llama, tmp_path):
    _run(
        tmp_path,
        tiny_llama,
        "run",
        "stages.distill.method=qlora",
        "stages.distill.steps=3",
        "stages.prune.target={layers: 3}",
    )
    path = tmp_path / "run" / "02-distill" / "model"
    model = AutoModelForCausalLM.from_pretrained(path)
    assert getattr(model.config, "quantization_config", None) is None and model.dtype == torch.float32
    pruned = load_file(tmp_path / "run" / "01-prune" / "model" / "model.safetensors")
    merged = load_file(path / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(pruned[key], merged[key])  # the adapter moved the weights
    assert (pruned[key] - merged[key]).abs().max() < 0.5  # ...starting from the full-precision ones


def test_a_non_finite_loss_stops_the_stage_and_keeps_the_last_checkpoint(tiny_llama, tmp_path, monkeypatch):
    from slimlm.distill import losses
    from slimlm.errors import StageFailed

    calls = {"n": 0}
    real = losses.LOGIT_LOSSES["forward_kl"]

    def diverging(student, teacher, temperature=1.0):
        calls["n"] += 1
        value = real(student, teacher, temperature)
        return value * float("nan") if calls["n"] >= 4 else value  # the 4th step diverges

    monkeypatch.setitem(losses.LOGIT_LOSSES, "forward_kl", diverging)
    with pytest.raises(
        StageFailed, match=r"became nan at step 4; the last good checkpoint \(step-00000002\) is kept"
    ) as e:
        _run(tmp_path, tiny_llama, "run")
    assert e.value.exit_code == 4
    assert list((tmp_path / "run" / ".work").glob("*/step-00000002/progress.json"))
    assert not (tmp_path / "run" / "02-distill").exists()


def test_auto_precision_is_bf16_only_where_the_device_computes_it(monkeypatch):
    from slimlm.distill import precision

    monkeypatch.setattr(precision, "cpu_computes_bf16", lambda: True)
    assert precision.resolve_mixed_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(precision, "cpu_computes_bf16", lambda: False)
    assert precision.resolve_mixed_precision("auto", "cpu") == "no"
    assert precision.resolve_mixed_precision("bf16", "cpu") == "bf16"  # asked for: given, even where it is slow
    assert precision.resolve_teacher_dtype(None, "bf16", "float32") == "bfloat16"
    assert precision.resolve_teacher_dtype(None, "no", "float32") == "float32"
    assert precision.resolve_teacher_dtype("float32", "bf16", "float32") == "float32"


def test_stages_in_different_precisions_run_in_one_process_and_the_manifest_says_which(tiny_llama, tmp_path):
    # an fp32 teacher correction, then bf16 distillation: accelerate's per-process state must not carry over
    path = _with_teacher_correction(tiny_llama, tmp_path)
    run_recipe(load_recipe(path, ["stages.distill.mixed_precision=bf16"]), tmp_path / "run")
    corrected = json.loads((tmp_path / "run" / "01-correct" / "manifest.json").read_text())["stage_metrics"]
    distilled = json.loads((tmp_path / "run" / "03-distill" / "manifest.json").read_text())["stage_metrics"]
    assert (corrected["mixed_precision"], corrected["teacher_dtype"]) == ("no", None)
    assert (distilled["mixed_precision"], distilled["teacher_dtype"]) == ("bf16", "bfloat16")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "03-distill" / "model")
    assert model.dtype == torch.float32  # trained under bf16 autocast, saved in the recipe's dtype


def test_a_cached_teacher_trains_the_same_student_and_is_read_after_the_first_pass(tiny_llama, tmp_path):
    # 16 blocks in batches of 2: the first 8 steps fill the cache, the next 12 read it
    loss = "stages.distill.loss={logits: forward_kl, top_k: 8, chunk: 24}"
    common = ["stages.distill.steps=20", "stages.distill.checkpoint_every=0", loss]
    _run(tmp_path, tiny_llama, "plain", *common)
    _run(tmp_path, tiny_llama, "cached", *common[:-1], loss.replace("chunk: 24", "chunk: 24, cache_teacher: true"))
    cached = json.loads((tmp_path / "cached" / "02-distill" / "manifest.json").read_text())["stage_metrics"]
    plain = json.loads((tmp_path / "plain" / "02-distill" / "manifest.json").read_text())["stage_metrics"]
    assert cached["teacher_cache"] == {"read": 12, "computed": 8}
    assert cached["loss_curve"] == pytest.approx(plain["loss_curve"], rel=1e-5)
    a = load_file(tmp_path / "plain" / "02-distill" / "model" / "model.safetensors")
    b = load_file(tmp_path / "cached" / "02-distill" / "model" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def test_the_teacher_cache_needs_top_k_and_no_hidden_loss(tiny_llama, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(model=tiny_llama))
    for loss in ("{cache_teacher: true}", "{cache_teacher: true, top_k: 8, hidden: cosine}"):
        with pytest.raises(RecipeError, match="cache_teacher keeps the teacher's top-k logits only"):
            load_recipe(path, [f"stages.distill.loss={loss}"])


def test_lora_base_stored_in_bf16_computes_what_autocast_computes(tiny_llama):
    from peft import LoraConfig, get_peft_model

    from slimlm.distill.stage import _frozen_linears_to_bf16

    def lora_model():
        torch.manual_seed(0)
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(tiny_llama),
            LoraConfig(r=4, target_modules=["q_proj", "down_proj", "up_proj"]),
        )
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)  # an adapter that changes the output
        return model

    ids = torch.randint(3, 500, (2, 16))
    cast_every_call, cast_once = lora_model(), lora_model()
    _frozen_linears_to_bf16(cast_once)
    assert cast_once.base_model.model.model.layers[0].mlp.down_proj.base_layer.weight.dtype == torch.bfloat16
    assert cast_once.base_model.model.model.embed_tokens.weight.dtype == torch.float32  # the residual stream stays fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = cast_every_call(input_ids=ids).logits, cast_once(input_ids=ids).logits
    assert torch.equal(a, b)


def test_init_random_starts_from_fresh_seeded_weights_of_the_pruned_shape(tiny_llama, tmp_path):
    from slimlm.sources.models import fresh_model

    pruned_dir = tmp_path / "run" / "01-prune" / "model"
    _run(tmp_path, tiny_llama, "run", "stages.distill.steps=2")
    pruned = AutoModelForCausalLM.from_pretrained(pruned_dir)
    a, b, c = (fresh_model(pruned_dir, seed=seed) for seed in (0, 0, 1))
    for name, weight in pruned.state_dict().items():
        assert a.state_dict()[name].shape == weight.shape
        torch.testing.assert_close(a.state_dict()[name], b.state_dict()[name], rtol=0, atol=0)
        if weight.ndim == 2:  # matrices: freshly drawn, so neither the pruned ones nor another seed's
            assert not torch.equal(a.state_dict()[name], weight), name
            assert not torch.equal(a.state_dict()[name], c.state_dict()[name]), name


def test_init_random_trains_resumes_and_refuses_lora(tiny_llama, tmp_path, monkeypatch):
    scratch = ("stages.distill.init=random", "stages.distill.method=full", "evaluation.perplexity={data: train}")
    _run(tmp_path, tiny_llama, "straight", *scratch)
    original = train_module.save_checkpoint

    def crash_after_step_4(accelerator, checkpoints, step, log):
        original(accelerator, checkpoints, step, log)
        if step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", crash_after_step_4)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, tiny_llama, "resumed", *scratch)
    monkeypatch.setattr(train_module, "save_checkpoint", original)
    _run(tmp_path, tiny_llama, "resumed", *scratch)
    manifest = json.loads((tmp_path / "resumed" / "02-distill" / "manifest.json").read_text())
    assert manifest["metrics"]["resumed_from_step"] == 4 and manifest["config"]["init"] == "random"
    a = load_file(tmp_path / "straight" / "02-distill" / "model" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "02-distill" / "model" / "model.safetensors")
    pruned = load_file(tmp_path / "straight" / "01-prune" / "model" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    # six small steps from the pruned weights stay near them; from fresh weights the model is another one
    assert not torch.allclose(
        a["model.layers.0.mlp.down_proj.weight"], pruned["model.layers.0.mlp.down_proj.weight"], atol=1e-2
    )
    # the report plots perplexity against tokens when a stage trains from scratch, and names the series
    from slimlm.report import read_run, token_series

    series = token_series(read_run(tmp_path / "straight")[1])
    assert list(series) == ["random init in previous stage's shape + KD"] and series[next(iter(series))][0][0] > 0
    assert "report-tokens.png" in (tmp_path / "straight" / "report.md").read_text()
    for method in ("lora", "qlora"):
        with pytest.raises(RecipeError, match=f"init: random trains fresh weights, and {method} on random weights"):
            _run(tmp_path, tiny_llama, method, "stages.distill.init=random", f"stages.distill.method={method}")
